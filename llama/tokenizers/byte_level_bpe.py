"""Byte-level BPE tokenizers read from a Hugging Face `tokenizer.json` (GPT-2 style vocabularies:
SmolLM2, StarCoder, GPT-2 and many Llama-architecture models converted from HF or GGUF).

`Tokenizer(path)` returns a `ByteLevelBPETokenizer` for a JSON file. It keeps Meta's attribute
names and encode/decode contract, and encodes as the Hugging Face `tokenizers` library does for the
file forms it accepts (anything else is refused with the reason):

- model: BPE over the GPT-2 byte alphabet (no dropout, word prefix/suffix or byte fallback);
- normalizer: none; decoder: ByteLevel;
- pre-tokenizer: ByteLevel with GPT-2's regex (GPT-2); Digits(individual) then ByteLevel
  (StarCoder, SmolLM2); or Split(regex, isolated) then ByteLevel without regex (Llama 3 style);
- added tokens without lstrip/rstrip/single_word.

BOS, EOS and the chat template come from `tokenizer_config.json` beside the file, as in a Hugging
Face folder (see `llama.tokenizers.convert` for the files written from GGUF). The family is
"chatml" when `<|im_start|>` and `<|im_end|>` are special tokens, else "bpe".

The engine is tiktoken, ranks in merge order: it merges the adjacent pair whose concatenation
ranks lowest, HF the pair listed first in the merges; the two agree on vocabularies learned by
merging (tests check GPT-2, StarCoder, SmolLM2 and Llama 3 against `tokenizers` and the original
tokenizers' recorded ids). What tiktoken cannot do goes through HF's BPE in Python: a piece holding
bytes that are no token (SmolLM2 lacks 21, such as \\x04), which HF drops (or turns into the unk
token) before merging across the gap. One deviation is kept from Meta's TiktokenTokenizer, whose
regex engine overflows otherwise: runs of over 25,000 whitespace or non-whitespace characters
are cut every 25,000 characters.
"""

import heapq
import json
import logging
import re
from array import array
from pathlib import Path
from typing import (
    AbstractSet,
    Any,
    Collection,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import tiktoken

from llama.tokenizers.base import Tokenizer, check_file, check_str, replace_lone_surrogates, split_long_runs

logger = logging.getLogger(__name__)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")  # stop generation when present, besides EOS

# GPT-2's byte-level pre-tokenizer regex, as the HF ByteLevel pre-tokenizer applies it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits(individual_digits) then GPT-2's regex, as one regex: every digit is a piece, and a
# whitespace run before a digit is not cut short (the digit ended the text GPT-2's regex saw).
DIGITS_THEN_GPT2_PATTERN = (
    r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
)

# tiktoken's regex overflows its stack on very long runs (as in TiktokenTokenizer); HF does not
# cut, so ids can differ from HF's only around each cut of a run over this many characters.
MAX_RUN_CHARS = 25_000

_HINT = "pass a byte-level BPE tokenizer.json (or the tokenizer.model of a Meta checkpoint)"


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte alphabet: each byte as one printable character. Printable Latin-1 bytes stand
    for themselves; the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_ENCODER = bytes_to_unicode()
# str.translate table: alphabet character -> its byte as a Latin-1 character; Latin-1 characters
# outside the alphabet -> a character Latin-1 cannot encode, so that they fail like the rest.
_TO_LATIN1 = {ord(c): b for b, c in BYTE_ENCODER.items()}
_TO_LATIN1.update({b: 0xFFFF for b in range(256) if b not in _TO_LATIN1})


def token_bytes(token: str) -> Optional[bytes]:
    """The bytes a byte-level token spells; None if it uses characters outside the alphabet."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


class ByteLevelBPETokenizer(Tokenizer):
    """A GPT-2 style byte-level BPE tokenizer from a Hugging Face tokenizer.json.

    Attributes beyond Tokenizer's: `chat_template` (the Jinja text from tokenizer_config.json or
    chat_template.jinja beside the file, None without one). `bos_id` is -1 when the original
    tokenizer adds no BOS (SmolLM2, GPT-2): `encode(bos=True)` then adds nothing.

    Raises:
        FileNotFoundError / IsADirectoryError: as Tokenizer.
        ValueError: the file is not JSON, or uses a form listed as unsupported in this module's
            docstring (the message names the field and value), or no EOS token can be found.
    """

    @staticmethod
    def reads(head: bytes) -> bool:
        return head.lstrip()[:1] == b"{"

    def __init__(self, model_path: str):
        path = check_file(Path(model_path))
        self._load(read_json(path), read_tokenizer_config(path.parent), str(path))

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], config: Mapping[str, Any], source: str
    ) -> "ByteLevelBPETokenizer":
        """The tokenizer a tokenizer.json holding `spec` makes, with `config` as the
        tokenizer_config.json beside it (its chat_template is the chat template); `source` names
        where they came from in errors.

        Raises:
            ValueError: as the class docstring says.
        """
        tokenizer = cls.__new__(cls)
        tokenizer._load(spec, config, source)
        return tokenizer

    def _load(self, spec: Mapping[str, Any], config: Mapping[str, Any], source: str) -> None:
        model = _check_bpe_model(spec, source)
        pattern = pattern_for(spec.get("pre_tokenizer"), source)
        _check_no_normalizer(spec, source)
        _check_byte_level_decoder(spec, source)
        added = _added_tokens(spec, source)

        self._read_vocab(source, model["vocab"], added)
        self._build_bpe(source, pattern, model, added)
        self.special_tokens: Dict[str, int] = {a["content"]: a["id"] for a in added if a["special"]}
        # HF matches non-special added tokens in any text, as if always allowed.
        self._always_matched = frozenset(a["content"] for a in added if not a["special"])

        self.pad_id: int = -1
        self.bos_id: int = self._bos_id(spec, config, source)
        self.eos_id: int = self._eos_id(config, source)
        self.stop_tokens: Set[int] = {self.eos_id} | {
            self.special_tokens[name] for name in END_TOKENS if name in self.special_tokens
        }
        self.family: str = (
            "chatml" if all(name in self.special_tokens for name in CHATML_TOKENS) else "bpe"
        )
        self.chat_template: Optional[str] = _chat_template(config)
        self._vocab_bytes = None  # rebuilt by _vocab() when the exact path first needs it
        logger.info(
            "Loaded byte-level BPE tokenizer from %s: #words %d, BOS %d, EOS %d, family %s",
            source, self.n_words, self.bos_id, self.eos_id, self.family,
        )

    def _read_vocab(self, source: str, vocab: Mapping[str, int], added: List[Dict[str, Any]]) -> None:
        """Sets n_words and the bytes of every id (added tokens: their text); _vocab() derives bytes -> id."""
        self.n_words: int = 1 + max([*vocab.values(), *(a["id"] for a in added)], default=-1)
        self._id_bytes: List[Optional[bytes]] = [None] * self.n_words
        self._added_ids = added_ids = frozenset(a["id"] for a in added)
        for token, i in vocab.items():
            spelled = token_bytes(token)
            if spelled is None and i not in added_ids:
                raise ValueError(
                    f"tokenizer file {source}: vocabulary entry {token!r} is not spelled in the "
                    f"GPT-2 byte alphabet: not a byte-level BPE vocabulary; {_HINT}"
                )
            self._id_bytes[i] = spelled
        self._vocab_bytes: Optional[Dict[bytes, int]] = None
        for a in added:
            self._id_bytes[a["id"]] = a["content"].encode("utf-8")

    def _build_bpe(
        self, source: str, pattern: str, model: Mapping[str, Any], added: List[Dict[str, Any]]
    ) -> None:
        """tiktoken's ranks are its ids: single bytes, then each merge's result in merge order,
        then added tokens; `_ids` maps them to the file's ids. Keys are the vocabulary's own bytes
        objects, and HF's merge table is kept as ids until the exact path first needs it: a
        50,000-merge vocabulary held ~11 MB more as fresh bytes, tuples and a dict."""
        vocab, spelled = self._vocab(), self._id_bytes
        ranks: Dict[bytes, int] = {}
        self._ids: List[int] = []
        for byte in range(256):
            i = vocab.get(bytes([byte]))
            if i is not None:
                ranks[spelled[i]] = len(self._ids)  # type: ignore[index]
                self._ids.append(i)
        self._merges = array("i")  # HF's merges as (left id, right id), in priority order
        for rank, merge in enumerate(model["merges"]):
            left, right = _merge_pair(merge, source)
            ids = [vocab.get(b) if b is not None else None for b in (token_bytes(left), token_bytes(right))]
            merged = vocab.get(spelled[ids[0]] + spelled[ids[1]]) if None not in ids else None  # type: ignore
            if merged is None:
                raise ValueError(
                    f"tokenizer file {source}: merge {rank} ({left!r}, {right!r}) uses or makes a "
                    f"token missing from the byte-level vocabulary; {_HINT}"
                )
            self._merges.extend(ids)  # type: ignore[arg-type]
            result = spelled[merged]
            if result not in ranks:  # made by several merges (Llama 3): its first one counts
                ranks[result] = len(self._ids)  # type: ignore[index]
                self._ids.append(merged)
        self._merge_table: Optional[Dict[Tuple[bytes, bytes], int]] = None
        # Bytes that are no token: valid UTF-8 may still hold them; HF drops them (or emits unk).
        self._absent_bytes = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._ignore_merges = bool(model.get("ignore_merges", False))
        unk = model.get("unk_token")
        self._unk_id: Optional[int] = model["vocab"].get(unk) if unk is not None else None
        self._fuse_unk = bool(model.get("fuse_unk", False))
        self._special_ranks: Dict[str, int] = {}
        for a in added:
            self._special_ranks[a["content"]] = len(self._ids)
            self._ids.append(a["id"])
        try:
            self._bpe = tiktoken.Encoding(
                name=Path(source).name,
                pat_str=pattern,
                mergeable_ranks=ranks,
                special_tokens=self._special_ranks,
            )
        except ValueError as e:
            raise ValueError(f"tokenizer file {source}: pre-tokenizer regex rejected: {e}") from e
        self._pattern = pattern
        self._exact_splitter: Optional[Any] = None  # compiled on first use of the exact path

    def _bos_id(self, spec: Mapping[str, Any], config: Mapping[str, Any], source: str) -> int:
        """The BOS id if the original tokenizer adds one, else -1. tokenizer_config.json's
        add_bos_token and bos_token decide (transformers rebuilds the post-processor from them);
        without add_bos_token, the special token the post-processor puts first, if any."""
        template_bos = _post_processor_bos(spec.get("post_processor"), source)
        if "add_bos_token" not in config:
            bos = template_bos
        elif not config["add_bos_token"]:
            bos = None
        else:
            bos = _token_name(config.get("bos_token"))
            if bos is None:
                raise ValueError(
                    f"tokenizer_config.json beside {source} sets add_bos_token but names no bos_token"
                )
        if bos is None:
            return -1
        bos_id = self._token_id(bos)
        if bos_id is None:
            raise ValueError(
                f"tokenizer {source} adds BOS {bos!r} (tokenizer_config.json's add_bos_token and "
                f"bos_token, or the post-processor), but that is not one of its tokens"
            )
        return bos_id

    def _eos_id(self, config: Mapping[str, Any], source: str) -> int:
        """tokenizer_config.json's eos_token, else <|im_end|> or <|endoftext|>."""
        eos = _token_name(config.get("eos_token"))
        names = [eos] if eos is not None else list(END_TOKENS)
        for name in names:
            i = self._token_id(name)
            if i is not None:
                return i
        raise ValueError(
            f"tokenizer file {source}: no EOS token: {' or '.join(map(repr, names))} is not a "
            f"token; put a tokenizer_config.json with eos_token beside it"
        )

    def _token_id(self, name: str) -> Optional[int]:
        if name in self.special_tokens:
            return self.special_tokens[name]
        return self._vocab().get(name.encode("utf-8"))

    def _vocab(self) -> Dict[bytes, int]:
        """bytes -> id of the vocabulary's own tokens (not added ones), from _id_bytes. Loading builds
        it, then drops it (2.5 MB for 50,000 tokens); the exact path rebuilds it when it first needs it."""
        if self._vocab_bytes is None:
            added = self._added_ids
            self._vocab_bytes = {b: i for i, b in enumerate(self._id_bytes) if b is not None and i not in added}
        return self._vocab_bytes

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Encodes `s` to token ids, as TiktokenTokenizer.encode.

        Special-token text such as "<|im_end|>" in `s` is plain text unless `allowed_special`
        names it ("all": every special token); non-special added tokens always match, as in HF.
        BOS is added only if the tokenizer has one (bos_id >= 0).

        Raises:
            TypeError: `s` is not a str.
            ValueError: `s` holds text of a special token named in `disallowed_special`.
        """
        check_str(s)
        s = replace_lone_surrogates(s)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        allowed |= self._always_matched
        t: List[int] = []
        for piece in split_long_runs(s, MAX_RUN_CHARS):
            if self._absent_bytes and _holds_any(piece, self._absent_bytes):
                t.extend(self._encode_exactly(piece, allowed, disallowed_special))
            else:
                ranks = self._bpe.encode(
                    piece, allowed_special=allowed, disallowed_special=disallowed_special
                )
                t.extend(self._ids[r] for r in ranks)
        if bos and self.bos_id >= 0:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Decodes ids to text; bytes that end mid-character decode to U+FFFD, as in HF.

        Raises:
            ValueError: an id is not a token of this vocabulary.
        """
        parts: List[bytes] = []
        for i in t:
            part = self._id_bytes[i] if 0 <= i < self.n_words else None
            if part is None:
                raise ValueError(f"token id {i} is not in this vocabulary of {self.n_words} ids")
            parts.append(part)
        return b"".join(parts).decode("utf-8", errors="replace")

    # The exact path: HF's BPE in Python, for text holding bytes that are no token.

    def _encode_exactly(
        self, s: str, allowed: AbstractSet[str], disallowed: Union[Literal["all"], Collection[str]]
    ) -> List[int]:
        disallowed_set = set(self.special_tokens) - allowed if disallowed == "all" else set(disallowed)
        for name in disallowed_set:
            if name in s:
                raise ValueError(f"Encountered text corresponding to disallowed special token {name!r}")
        t: List[int] = []
        for text, special in _split_on(s, allowed):
            if special:
                t.append(self._ids[self._special_ranks[text]])
                continue
            for match in self._splitter().finditer(text):
                t.extend(self._bpe_piece(match.group().encode("utf-8")))
        return t

    def _splitter(self) -> Any:
        if self._exact_splitter is None:
            import regex  # tiktoken's own dependency; \p{..} classes need it

            self._exact_splitter = regex.compile(self._pattern)
        return self._exact_splitter

    def _merge_ranks(self) -> Dict[Tuple[bytes, bytes], int]:
        """HF's merge table: (left, right) -> priority (a pair listed twice keeps its last, as HF)."""
        if self._merge_table is None:
            spelled, merges = self._id_bytes, self._merges
            self._merge_table = {
                (spelled[merges[2 * rank]], spelled[merges[2 * rank + 1]]): rank  # type: ignore[misc]
                for rank in range(len(merges) // 2)
            }
        return self._merge_table

    def _bpe_piece(self, piece: bytes) -> List[int]:
        """HF's BPE of one pre-tokenized piece: merge the adjacent pair of lowest merge rank,
        leftmost first, until none is left; a heap of candidate pairs keeps long pieces fast."""
        vocab, merge_ranks = self._vocab(), self._merge_ranks()
        if self._ignore_merges and piece in vocab:
            return [vocab[piece]]
        # One symbol per byte; a byte that is no token is dropped, or becomes a barrier (None)
        # that turns into the unk id.
        symbols: List[Optional[bytes]] = []
        for byte in piece:
            if byte not in self._absent_bytes:
                symbols.append(bytes([byte]))
            elif self._unk_id is not None and not (self._fuse_unk and symbols and symbols[-1] is None):
                symbols.append(None)
        n = len(symbols)
        right_of = list(range(1, n + 1))  # a linked list over the symbols still alive
        left_of = list(range(-1, n - 1))
        alive = [True] * n

        def rank_at(k: int) -> Optional[int]:
            """The merge rank of the pair starting at symbol k, None if there is none."""
            j = right_of[k]
            if k < 0 or j >= n or symbols[k] is None or symbols[j] is None:
                return None
            return merge_ranks.get((symbols[k], symbols[j]))  # type: ignore[arg-type]

        heap = [(r, k) for k in range(n - 1) if (r := rank_at(k)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, k = heapq.heappop(heap)
            if not alive[k] or rank_at(k) != rank:
                continue  # a side of this pair was merged since it was pushed
            j = right_of[k]
            symbols[k] = symbols[k] + symbols[j]  # type: ignore[operator]
            alive[j] = False
            right_of[k] = right_of[j]
            if right_of[j] < n:
                left_of[right_of[j]] = k
            for start in (left_of[k], k):
                if start >= 0 and (r := rank_at(start)) is not None:
                    heapq.heappush(heap, (r, start))
        return [
            self._unk_id if s is None else vocab[s]  # type: ignore[misc]
            for s, keep in zip(symbols, alive)
            if keep
        ]


def pattern_for(pre_tokenizer: Any, source: str) -> str:
    """The one regex whose matches are the pieces the HF `pre_tokenizer` makes.

    Raises:
        ValueError: a pre-tokenizer form other than those in this module's docstring.
    """
    forms = _pre_tokenizer_list(pre_tokenizer)
    kinds = [f.get("type") for f in forms]
    if kinds == ["ByteLevel"] and _byte_level_ok(forms[0], use_regex=True):
        return GPT2_PATTERN
    if (
        kinds == ["Digits", "ByteLevel"]
        and forms[0].get("individual_digits") is True
        and _byte_level_ok(forms[1], use_regex=True)
    ):
        return DIGITS_THEN_GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and _byte_level_ok(forms[1], use_regex=False):
        split = forms[0]
        regex_text = (split.get("pattern") or {}).get("Regex")
        if regex_text and split.get("behavior") == "Isolated" and not split.get("invert"):
            # HF keeps the text between matches as pieces too; tiktoken keeps only matches, so
            # the gaps become matches of their own.
            return f"(?:{regex_text})|(?:(?!(?:{regex_text}))[\\s\\S])+"
    raise ValueError(
        f"tokenizer file {source}: pre_tokenizer {json.dumps(pre_tokenizer)[:300]} is not "
        f"supported; supported: ByteLevel(use_regex) as GPT-2, Digits(individual_digits) then "
        f"ByteLevel(use_regex) as StarCoder/SmolLM2, Split(Regex, Isolated) then "
        f"ByteLevel(use_regex=false) as Llama 3; all without add_prefix_space"
    )


def _pre_tokenizer_list(pre_tokenizer: Any) -> List[Dict[str, Any]]:
    if not isinstance(pre_tokenizer, dict):
        return []
    if pre_tokenizer.get("type") == "Sequence":
        forms = pre_tokenizer.get("pretokenizers")
        return [f for f in forms if isinstance(f, dict)] if isinstance(forms, list) else []
    return [pre_tokenizer]


def _byte_level_ok(form: Mapping[str, Any], use_regex: bool) -> bool:
    return not form.get("add_prefix_space", False) and form.get("use_regex", True) is use_regex


def read_json(path: Path) -> Dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not readable JSON: {e}; {_HINT}") from e
    if not isinstance(spec, dict):
        raise ValueError(f"tokenizer file {path} holds JSON {type(spec).__name__}, not an object")
    return spec


def _check_bpe_model(spec: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    model = spec.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise ValueError(
            f"tokenizer file {source} has model type {kind!r}; only byte-level BPE tokenizer.json "
            f"files are supported; {_HINT}"
        )
    for key in ("vocab", "merges"):
        if not isinstance(model.get(key), (dict if key == "vocab" else list)):
            raise ValueError(f"tokenizer file {source}: model.{key} is missing or malformed")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise ValueError(
                f"tokenizer file {source}: model.{key} = {model[key]!r} is not supported "
                f"(byte-level BPE has none); {_HINT}"
            )
    return model


def _check_no_normalizer(spec: Mapping[str, Any], source: str) -> None:
    if spec.get("normalizer") is not None:
        raise ValueError(
            f"tokenizer file {source}: normalizer {json.dumps(spec['normalizer'])[:200]} is not "
            f"supported (byte-level BPE files have none)"
        )


def _check_byte_level_decoder(spec: Mapping[str, Any], source: str) -> None:
    decoder = spec.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise ValueError(
            f"tokenizer file {source}: decoder {json.dumps(decoder)[:200]} is not supported; "
            f"byte-level BPE needs the ByteLevel decoder"
        )


def _merge_pair(merge: Any, source: str) -> Tuple[str, str]:
    """A merge as HF writes it: "left right" (older files) or ["left", "right"]."""
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if isinstance(parts, list) and len(parts) == 2:
        left, right = parts
        if isinstance(left, str) and isinstance(right, str):
            return left, right
    raise ValueError(f"tokenizer file {source}: malformed merge {merge!r}")


def _added_tokens(spec: Mapping[str, Any], source: str) -> List[Dict[str, Any]]:
    """The added tokens, each with its "special" flag (False when absent, as in HF); copies, so
    that a spec held in memory is left as it was given."""
    added = []
    for a in spec.get("added_tokens") or []:
        if not (isinstance(a, dict) and isinstance(a.get("id"), int)) or not isinstance(
            a.get("content"), str
        ):
            raise ValueError(f"tokenizer file {source}: malformed added token {a!r}")
        flags = [flag for flag in ("lstrip", "rstrip", "single_word") if a.get(flag)]
        if flags:
            raise ValueError(
                f"tokenizer file {source}: added token {a['content']!r} sets {', '.join(flags)}, "
                f"which is not supported"
            )
        added.append({**a, "special": a.get("special", False)})
    return added


def _post_processor_bos(post_processor: Any, source: str) -> Optional[str]:
    """The special token a TemplateProcessing post-processor puts before the text, if any."""
    steps = post_processor.get("processors", []) if isinstance(post_processor, dict) and (
        post_processor.get("type") == "Sequence"
    ) else [post_processor]
    for step in steps:
        if step is None or step.get("type") == "ByteLevel":
            continue
        if step.get("type") != "TemplateProcessing":
            raise ValueError(
                f"tokenizer file {source}: post_processor {json.dumps(step)[:200]} is not supported"
            )
        single = step.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def read_tokenizer_config(folder: Path) -> Dict[str, Any]:
    """A Hugging Face folder's tokenizer_config.json ({} without one), its chat_template taken from
    chat_template.jinja where newer folders keep it (that file wins, as in transformers)."""
    path = folder / "tokenizer_config.json"
    config: Dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not readable JSON: {e}") from e
        config = loaded if isinstance(loaded, dict) else {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config


def _token_name(token: Any) -> Optional[str]:
    """tokenizer_config.json names tokens as text or as {"content": text, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(config: Mapping[str, Any]) -> Optional[str]:
    """The default chat template: tokenizer_config's chat_template (text, or a list of named
    templates)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _holds_any(s: str, absent: bytes) -> bool:
    data = s.encode("utf-8")
    return len(data.translate(None, absent)) != len(data)


def _split_on(s: str, specials: AbstractSet[str]) -> Iterator[Tuple[str, bool]]:
    """(text, is_special) runs of `s`, the longest special token matching first."""
    if not specials:
        yield s, False
        return
    names = sorted(specials, key=len, reverse=True)
    start = 0
    for match in re.finditer("|".join(map(re.escape, names)), s):
        if match.start() > start:
            yield s[start : match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(s):
        yield s[start:], False
