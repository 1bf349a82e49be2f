"""Dialog -> prompt tokens, for Llama 3 (`ChatFormat`), Llama 2 chat (`Llama2ChatFormat`) and
ChatML (`ChatMLFormat`, byte-level BPE models such as SmolLM2).

`chat_format_for(tokenizer)` is the one place that maps a tokenizer family to its format; all
formats offer `encode_dialog_prompt(dialog)` and `has_special_tags(dialog)`, so generation code
needs no family checks.
"""

import logging
import re
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, TypedDict, Union

from llama.tokenizers.base import Tokenizer

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

# Llama 2 chat markup (Meta's names).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

LLAMA2_ROLES = ("system", "user", "assistant")
LLAMA3_ROLES = ("system", "user", "assistant", "ipython")  # ipython: Llama 3.1 tool output
CHATML_ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAMA2_ORDER_RULE = (
    "model only supports 'system', 'user' and 'assistant' roles, "
    "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
)


class ChatFormat:
    """Llama 3 chat template: each message is
    `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`."""

    _REQUIRED_TOKENS = (
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )

    def __init__(self, tokenizer: Tokenizer):
        missing = [name for name in self._REQUIRED_TOKENS if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"ChatFormat needs a Llama 3 tokenizer with {', '.join(missing)}; got a "
                f"{tokenizer.family} tokenizer: use chat_format_for(tokenizer)"
            )
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> List[int]:
        """Tokens that open `message`: its role between header tokens, then a blank line."""
        _check_message(message, "message", LLAMA3_ROLES, need_content=False)
        special = self.tokenizer.special_tokens
        return (
            [special["<|start_header_id|>"]]
            + self.tokenizer.encode(message["role"], bos=False, eos=False)
            + [special["<|end_header_id|>"]]
            + self.tokenizer.encode("\n\n", bos=False, eos=False)
        )

    def encode_message(self, message: Message) -> List[int]:
        """Header, stripped content, then <|eot_id|>."""
        _check_message(message, "message", LLAMA3_ROLES)
        return (
            self.encode_header(message)
            + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
            + [self.tokenizer.special_tokens["<|eot_id|>"]]
        )

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """<|begin_of_text|>, every message, then an open assistant header for the model to
        complete. Like Meta, any order of roles is accepted.

        Raises:
            ValueError: empty dialog, malformed message or unknown role.
        """
        _check_dialog(dialog, LLAMA3_ROLES)
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens

    def has_special_tags(self, dialog: Dialog) -> bool:
        """Always False: Llama 3 control tokens typed as text encode as plain text, so there is
        nothing to refuse (Meta's Llama 3 has no such check)."""
        return False


class Llama2ChatFormat:
    """Llama 2 chat template, as Meta's Llama.chat_completion tokenizes it:
    `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`
    `<s>[INST] {user} [/INST]`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Tokens of the dialog, ending in an open [INST] for the model to answer.

        Raises:
            ValueError: empty dialog, malformed message, unknown role, roles not
                [system], user, assistant, user, ... or a last message not from the user.
        """
        _check_dialog(dialog, LLAMA2_ROLES)
        turns = _merge_system_prompt(dialog)
        tokens: List[int] = []
        for prompt, answer in zip(turns[::2], turns[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                bos=True,
                eos=True,
            )
        tokens += self.tokenizer.encode(
            f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", bos=True, eos=False
        )
        return tokens

    def has_special_tags(self, dialog: Dialog) -> bool:
        """True when a message contains Llama 2 chat markup; Meta then answers UNSAFE_ERROR
        instead of generating, since the markup could forge turns.

        Raises:
            ValueError: empty dialog, malformed message or unknown role.
        """
        _check_dialog(dialog, LLAMA2_ROLES)
        return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


class ChatMLFormat:
    """ChatML, as the chat templates of SmolLM2 (and Qwen) write it: each message is
    `<|im_start|>{role}\n{content}<|im_end|>\n`, and the prompt ends with an open
    `<|im_start|>assistant\n`. Content is kept as is: the templates do not strip it.

    `default_system_prompt` is the system message the model's chat template adds when a dialog
    starts without one (SmolLM2's "You are a helpful AI assistant named SmolLM, ..."), read from
    the tokenizer's `chat_template`; None when it adds none.
    """

    def __init__(self, tokenizer: Tokenizer):
        missing = [name for name in (IM_START, IM_END) if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"ChatMLFormat needs a tokenizer with {', '.join(missing)}; got a "
                f"{tokenizer.family} tokenizer: use chat_format_for(tokenizer)"
            )
        self.tokenizer = tokenizer
        self.default_system_prompt = chatml_default_system_prompt(
            getattr(tokenizer, "chat_template", None)
        )

    def encode_header(self, message: Message) -> List[int]:
        """Tokens that open `message`: <|im_start|>, its role and a newline."""
        _check_message(message, "message", CHATML_ROLES, need_content=False)
        return [self.tokenizer.special_tokens[IM_START]] + self._encode_text(f"{message['role']}\n")

    def encode_message(self, message: Message) -> List[int]:
        """<|im_start|>, role, newline and content, <|im_end|>, newline. Role and content are
        encoded as one text, as the template's output is: whitespace at the start of the
        content may join the newline in one token."""
        _check_message(message, "message", CHATML_ROLES)
        im_start, im_end = (self.tokenizer.special_tokens[name] for name in (IM_START, IM_END))
        return (
            [im_start]
            + self._encode_text(f"{message['role']}\n{message['content']}")
            + [im_end]
            + self._encode_text("\n")
        )

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """The template's default system message when the dialog has none first, every message,
        then an open assistant header. No BOS: the templates write none. Any order of roles is
        accepted, as by the templates.

        Raises:
            ValueError: empty dialog, malformed message or unknown role.
        """
        _check_dialog(dialog, CHATML_ROLES)
        messages: List[Message] = list(dialog)
        if self.default_system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system_prompt})
        tokens: List[int] = []
        for message in messages:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens

    def has_special_tags(self, dialog: Dialog) -> bool:
        """Always False: <|im_start|> or <|im_end|> typed in a message encode as plain text (as
        Llama 3's ChatFormat does), so they cannot forge a turn and there is nothing to refuse."""
        return False

    def _encode_text(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)


def chatml_default_system_prompt(chat_template: Optional[str]) -> Optional[str]:
    """The system message `chat_template` (Jinja, as in tokenizer_config.json) adds to a dialog
    that has none, found by rendering it; None if it adds none, or if it does not render ChatML
    (then a warning says the model's own layout is not followed)."""
    if chat_template is None:
        return None
    system, user = "SYSTEM PROMPT", "USER MESSAGE"
    opening = f"{IM_START}assistant\n"
    expected = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{opening}"
    try:
        with_system = _render_chat_template(
            chat_template, [{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
        without_system = _render_chat_template(chat_template, [{"role": "user", "content": user}])
    except Exception as e:  # a template may raise anything; ChatML still works without it
        logger.warning(
            "chat template does not render (%s); using ChatML without a default system prompt", e
        )
        return None
    user_turn = expected[expected.index(f"{IM_START}user") :]
    default = re.fullmatch(
        re.escape(f"{IM_START}system\n") + "(.*)" + re.escape(f"{IM_END}\n"),
        without_system[: -len(user_turn)],
        re.DOTALL,
    )
    if with_system == expected and without_system == user_turn:
        return None
    if with_system == expected and without_system.endswith(user_turn) and default:
        return default.group(1)
    logger.warning(
        "chat template does not render the ChatML layout; using ChatML without a default system "
        "prompt. Rendered: %r",
        with_system[:300],
    )
    return None


def _render_chat_template(template: str, messages: List[Dict[str, str]]) -> str:
    """Renders as transformers does: sandboxed, blocks trimmed, with a generation prompt."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )


def _merge_system_prompt(dialog: Dialog) -> List[Dict[str, str]]:
    """Folds a leading system message into the first user message and checks Llama 2's turn
    order; returns the user/assistant turns."""
    turns: List[Dict[str, str]] = [dict(message) for message in dialog]
    offset = 0  # so errors name indices of the caller's dialog, not of the merged one
    if turns[0]["role"] == "system":
        if len(turns) == 1:
            raise ValueError(
                f"message 0 has role 'system' but no user message follows it: {LLAMA2_ORDER_RULE}"
            )
        system, first = turns[0], turns[1]
        turns = [
            {"role": first["role"], "content": B_SYS + system["content"] + E_SYS + first["content"]}
        ] + turns[2:]
        offset = 1
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"message {i + offset} has role {message['role']!r} where {expected!r} was "
                f"expected: {LLAMA2_ORDER_RULE}"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(
            f"message {len(turns) - 1 + offset}: Last message must be from user, "
            f"got {turns[-1]['role']}"
        )
    return turns


def _check_dialog(dialog: Dialog, roles: Sequence[str]) -> None:
    if isinstance(dialog, (str, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise ValueError("dialog is empty: it needs at least one user message")
    for i, message in enumerate(dialog):
        _check_message(message, f"message {i}", roles)


def _check_message(
    message: Any, where: str, roles: Sequence[str], need_content: bool = True
) -> None:
    """Raises ValueError naming the message (`where`: "message 3"), what was seen and the rule."""
    if not isinstance(message, Mapping):
        raise ValueError(
            f"{where} is a {type(message).__name__}, not a dict with 'role' and 'content'"
        )
    if "role" not in message:
        raise ValueError(f"{where} has no 'role': every message needs 'role' and 'content'")
    role = message["role"]
    if role not in roles:
        raise ValueError(
            f"{where} has unknown role {role!r}: roles are {', '.join(map(repr, roles))}"
        )
    if not need_content:
        return
    if "content" not in message:
        raise ValueError(
            f"{where} (role {role!r}) has no 'content': every message needs 'role' and 'content'"
        )
    content = message["content"]
    if not isinstance(content, str):
        raise ValueError(
            f"{where} (role {role!r}) has content of type {type(content).__name__}; "
            f"content must be a str"
        )


class NoChatFormat:
    """Stands for the chat format of a tokenizer that has none (a byte-level BPE vocabulary
    without ChatML's tokens): such a model completes text, and every dialog is refused with
    `reason` (why chat_format_for found no format)."""

    def __init__(self, reason: str):
        self.reason = reason

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        raise self.error()

    def has_special_tags(self, dialog: Dialog) -> bool:
        raise self.error()

    def error(self) -> ValueError:
        return ValueError(
            f"this model's tokenizer has no chat format, so it cannot answer dialogs ({self.reason}); "
            "use text_completion, or a tokenizer with a chat template (ChatML's <|im_start|> and <|im_end|> "
            "special tokens in its tokenizer.json)"
        )


DialogFormat = Union[ChatFormat, Llama2ChatFormat, ChatMLFormat]

_FORMATS: Dict[str, Callable[[Tokenizer], DialogFormat]] = {
    "llama2": Llama2ChatFormat,
    "llama3": ChatFormat,
    "chatml": ChatMLFormat,
}


def chat_format_for(tokenizer: Tokenizer) -> DialogFormat:
    """The chat format that goes with `tokenizer`'s family.

    Raises:
        ValueError: the tokenizer's family has no chat format.
    """
    try:
        make = _FORMATS[tokenizer.family]
    except (KeyError, AttributeError):
        family = getattr(tokenizer, "family", None)
        raise ValueError(
            f"no chat format for tokenizer family {family!r}; known families: {', '.join(_FORMATS)}"
        ) from None
    return make(tokenizer)
