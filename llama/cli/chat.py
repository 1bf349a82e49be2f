"""llama-chat: a multi-turn conversation with a chat model of either family, in the terminal.

    llama-chat --ckpt_dir Meta-Llama-3-8B-Instruct/ --tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model
    torchrun --nproc_per_node 8 -m llama.cli.chat --ckpt_dir Meta-Llama-3-70B-Instruct/ --tokenizer_path ...

Answers stream as they are generated. Ctrl-C stops the answer being written and keeps the part
shown; at the prompt it discards the line, as shells do. /quit, /exit or Ctrl-D (end of input)
leave. Under torchrun Ctrl-C reaches only torchrun, which ends every process: the processes run
each step together and cannot agree on where to stop an answer.
"""

import io
import logging
import os
import sys
from typing import List, Optional, TextIO

import fire
import torch.distributed as dist

from llama.args import check_sampling_args
from llama.chat_format import UNSAFE_ERROR, Dialog, Message, NoChatFormat
from llama.cli.demo import checkpoint_or_demo
from llama.cli.errors import reported_errors
from llama.generation import Llama
from llama.runtime.distributed import input_group

PROMPT = "> "
BANNER = "Chatting with the model: /help lists the commands, /quit or Ctrl-D leaves.\n\n"
HELP = """\
/reset          forget the conversation (the system prompt stays)
/system [text]  set the system prompt (none without text) and forget the conversation
/help           this list
/quit, /exit    leave (Ctrl-D too)
Ctrl-C stops an answer while it is written; the part shown stays in the conversation.
"""


def check_settings(max_seq_len: int, max_gen_len: Optional[int], temperature: float, top_p: float) -> None:
    """Raise ValueError or TypeError, naming the flag, for settings that would otherwise fail only at the first answer."""
    check_sampling_args(temperature, top_p, max_gen_len)
    if max_gen_len is not None and not 0 < max_gen_len < max_seq_len:
        raise ValueError(
            f"max_gen_len={max_gen_len} leaves no room for the conversation in max_seq_len={max_seq_len}: "
            f"pass a --max_gen_len from 1 to {max_seq_len - 1}, or leave it out"
        )


def answer_reserve(max_seq_len: int, max_gen_len: Optional[int]) -> int:
    """Tokens of max_seq_len kept free for the answer when the history is trimmed.

    With max_gen_len the answer can use no more, so exactly that is kept. Without it the answer runs
    until a stop token or max_seq_len; keeping a quarter of the context gives it room to say
    something while most of the conversation stays. The answer may still use whatever else is free.
    """
    return max_gen_len if max_gen_len is not None else max_seq_len // 4


class ChatSession:
    """A conversation with `generator`, read from `stdin` and written to `stdout` line by line.

    `history` holds the user and assistant messages so far (the system prompt apart), alternating
    as both chat formats need. Under several processes every rank runs the same session in
    lockstep: rank 0 alone reads `stdin` and sends each line to the others.
    """

    def __init__(
        self,
        generator: Llama,
        system_prompt: Optional[str] = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stdin: Optional[TextIO] = None,
        stdout: Optional[TextIO] = None,
    ):
        if isinstance(generator.formatter, NoChatFormat):
            raise generator.formatter.error()  # before the banner, not at the first answer
        self.max_seq_len = generator.model.params.max_seq_len
        check_settings(self.max_seq_len, max_gen_len, temperature, top_p)
        self.generator = generator
        self.temperature, self.top_p, self.max_gen_len = temperature, top_p, max_gen_len
        self.reserve = answer_reserve(self.max_seq_len, max_gen_len)
        self.stdin = sys.stdin if stdin is None else stdin
        self.stdout = sys.stdout if stdout is None else stdout
        self.history: List[Message] = []
        self.system_prompt = (system_prompt or "").strip() or None
        error = self._system_prompt_error(self.system_prompt) if self.system_prompt else None
        if error:
            raise ValueError(f"system_prompt: {error}")
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.reads_input = not dist.is_initialized() or dist.get_rank() == 0

    def run(self) -> None:
        """Answer each line read until /quit, /exit or the end of the input."""
        self._write(BANNER)
        while True:
            line = self._read_line()
            if line is None or not self.handle(line):
                # The prompt has no line end of its own: a terminal echoed the user's Enter after
                # /quit, but not Ctrl-D, and a pipe echoes nothing.
                if line is None or not self.stdin.isatty():
                    self._write("\n")
                return

    def handle(self, line: str) -> bool:
        """Act on one input line: a command, or a message to answer. False when it asks to leave."""
        text = line.strip()
        if text.startswith("/"):
            return self._command(text)
        if text:
            self.answer(text)
        return True

    def answer(self, text: str) -> None:
        """Stream the answer to the user message `text` and add both to the history.

        A message that cannot fit in max_seq_len is refused with a notice. Llama 2's refusal of
        its own markup (Meta's UNSAFE_ERROR) is shown but not kept: kept, it would refuse every
        later turn. Ctrl-C keeps the part of the answer already shown, so the model remembers
        what the user saw.
        """
        user: Message = {"role": "user", "content": text}
        if self.generator.formatter.has_special_tags([user]):
            self._write(UNSAFE_ERROR + "\n\n")
            return
        dialog = self._fit(user)
        if dialog is None:
            return
        pieces: List[str] = []
        interrupted = False
        try:
            events = self.generator.stream_chat_completion(
                [dialog], temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len
            )
            for event in events:
                self._write(event.text)
                pieces.append(event.text)
        except KeyboardInterrupt:
            if self.distributed:
                raise  # the other ranks are inside a step that this one will never finish
            interrupted = True
        self._write("\n")
        if interrupted:
            self._notice("answer stopped: the part shown stays in the conversation")
        self._write("\n")
        self.history += [user, {"role": "assistant", "content": "".join(pieces)}]

    def _fit(self, user: Message) -> Optional[Dialog]:
        """The dialog to answer: the system prompt, the most recent history that leaves
        `self.reserve` tokens for the answer, then `user`. Older turns are dropped for good, with a
        notice. None, after an error notice, when `user` does not fit even without history."""
        system: List[Message] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        alone = self._prompt_len(system + [user])
        if alone + self.reserve > self.max_seq_len:
            budget = "" if self.max_gen_len is None else " or a smaller --max_gen_len"
            self._notice(
                f"message too long: it takes {alone} tokens{' with the system prompt' if system else ''} and "
                f"{self.reserve} are kept for the answer, more than max_seq_len={self.max_seq_len}; "
                f"shorten it, or restart with a larger --max_seq_len{budget}"
            )
            return None
        dropped = 0
        while self._prompt_len(system + self.history + [user]) + self.reserve > self.max_seq_len:
            del self.history[:2]
            dropped += 1
        if dropped:
            turns = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            self._notice(f"history trimmed: dropped {turns} to fit max_seq_len={self.max_seq_len}")
        return system + self.history + [user]

    def _prompt_len(self, dialog: Dialog) -> int:
        return len(self.generator.formatter.encode_dialog_prompt(dialog))

    def _command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history.clear()
            self._notice("conversation forgotten")
        elif name == "/system":
            self._set_system_prompt(arg.strip())
        elif name == "/help":
            self._write(HELP + "\n")
        else:
            self._notice(f"unknown command {name}: /help lists the commands")
        return True

    def _set_system_prompt(self, text: str) -> None:
        error = self._system_prompt_error(text) if text else None
        if error:
            self._notice(f"system prompt not changed: {error}")
            return
        self.system_prompt = text or None
        self.history.clear()
        self._notice("system prompt set, conversation forgotten" if text else "system prompt removed, conversation forgotten")

    def _system_prompt_error(self, text: str) -> Optional[str]:
        """Why `text` cannot be the system prompt (Llama 2 markup would get every turn refused), else None."""
        if self.generator.formatter.has_special_tags([{"role": "system", "content": text}]):
            return "it contains Llama 2 chat markup ([INST], [/INST], <<SYS>>, <</SYS>>), which Meta's format refuses"
        return None

    def _read_line(self) -> Optional[str]:
        """The next input line, the same on every rank; None at the end of the input."""
        line = self._prompt() if self.reads_input else None
        if self.distributed:
            box = [line]
            dist.broadcast_object_list(box, src=0, group=input_group())  # the user may take their time
            line = box[0]
        return line

    def _prompt(self) -> Optional[str]:
        """Show the prompt and read a line. Ctrl-C here discards the line and prompts again."""
        while True:
            try:
                self._write(PROMPT)
                line = self.stdin.readline()
            except KeyboardInterrupt:
                self._write("\n")
                self._notice("Ctrl-C stops an answer; /quit or Ctrl-D leaves")
                continue
            return line if line else None

    def _notice(self, text: str) -> None:
        self._write(f"[{text}]\n")

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: Optional[int] = None,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    weight_format: Optional[str] = None,
    compile: bool = False,
    system_prompt: Optional[str] = None,
    threads: Optional[int] = None,
) -> None:
    """
    Chat with a chat-tuned model (Llama 2 chat or Llama 3 instruct) until /quit or Ctrl-D.
    `max_seq_len` bounds the whole conversation: the oldest turns are dropped to fit it.
    `max_gen_len` caps each answer (chat models stop by themselves). `device` (cuda, cpu, mps)
    and `dtype` (bf16, fp16, fp32) override the automatic choice; `weight_format` (bf16, int8, int4)
    stores the weights compactly: faster answers, close to but not exactly the model's own.
    `compile` compiles the decode step with torch.compile: slower start, faster answers.
    `threads` sets the CPU threads (default: the CPUs this process may use; or LLAMA_NUM_THREADS).
    Without --ckpt_dir, a small demo chat model is used (see llama/cli/demo.py); without
    --tokenizer_path, the checkpoint's own tokenizer file.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_settings(max_seq_len, max_gen_len, temperature, top_p)
    generator = Llama.build(
        ckpt_dir=checkpoint_or_demo(ckpt_dir),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,  # a conversation is one dialog
        model_parallel_size=model_parallel_size,
        device=device,
        dtype=dtype,
        weight_format=weight_format,
        compile=compile,
        threads=threads,
    )
    # fire turns a prompt such as "42" into a number.
    system_prompt = None if system_prompt is None else str(system_prompt)
    stdout = sys.stdout if dist.get_rank() == 0 else open(os.devnull, "w")
    ChatSession(generator, system_prompt, temperature, top_p, max_gen_len, stdin=standard_input(), stdout=stdout).run()


def standard_input() -> TextIO:
    """sys.stdin, with bytes that are not text in its encoding read as U+FFFD instead of failing;
    an empty input (the end at once) when the process was started without one (`<&-`)."""
    if sys.stdin is None:
        return io.StringIO()
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")
    return sys.stdin


def cli() -> None:
    with reported_errors():
        fire.Fire(main)


if __name__ == "__main__":
    cli()
