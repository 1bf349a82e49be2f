"""Tokenizers for Llama 2 (SentencePiece) and Llama 3 (tiktoken BPE), chosen from the file itself.

`Tokenizer(path)` reads the start of `path` and returns a `SentencePieceTokenizer`, a
`TiktokenTokenizer`, or for a Hugging Face tokenizer.json a `ByteLevelBPETokenizer`
(llama.hf_tokenizer); all keep Meta's attribute names and encode/decode behaviour, so the rest
of the library never asks which family it has: stop tokens, special tokens and the chat format
follow from the tokenizer object.
"""

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import (
    AbstractSet,
    Collection,
    Dict,
    Iterator,
    List,
    Literal,
    Sequence,
    Set,
    Type,
    Union,
    cast,
)

import tiktoken
from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)

_PATH_HINT = (
    "pass --tokenizer_path pointing at the tokenizer.model (or, for a converted byte-level BPE "
    "model, the tokenizer.json) that came with the checkpoint"
)

# A tiktoken BPE rank file is text, one `<base64 token> <rank>` per line.
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")
_SNIFF_BYTES = 4096


class Tokenizer:
    """A Llama tokenizer; `Tokenizer(model_path)` returns the subclass that reads that file.

    Attributes shared by every family: `n_words` (vocabulary size, special tokens included),
    `bos_id` (-1 when the tokenizer adds no BOS), `eos_id`, `pad_id` (-1: Llama has no pad
    token), `stop_tokens` (ids that end a generation), `special_tokens` (name -> id) and `family`
    ("llama2", "llama3", or for a tokenizer.json "chatml" or "bpe").

    Raises:
        FileNotFoundError: `model_path` does not exist.
        IsADirectoryError: `model_path` is a directory.
        ValueError: the file is neither a tiktoken rank file, a SentencePiece model nor a
            supported byte-level BPE tokenizer.json.
    """

    family: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: Set[int]
    special_tokens: Dict[str, int]

    def __new__(cls, model_path: str = "") -> "Tokenizer":
        # Only the base class dispatches; the default argument keeps copy/pickle working for
        # subclasses, which re-create instances through cls.__new__(cls).
        if cls is Tokenizer:
            cls = _tokenizer_class_for(Path(model_path))
        return super().__new__(cls)

    def encode(self, s: str, *, bos: bool, eos: bool) -> List[int]:
        """Encodes `s` to token ids, with BOS prepended / EOS appended when asked."""
        raise NotImplementedError

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids back to text."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, n_words={self.n_words})"


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's SentencePiece tokenizer, as in Meta's llama/tokenizer.py."""

    family = "llama2"

    def __init__(self, model_path: str):
        path = _check_file(Path(model_path))
        try:
            self.sp_model = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"tokenizer file {path} is neither a tiktoken BPE rank file (Llama 3) nor a "
                f"SentencePiece model (Llama 2): {e}; {_PATH_HINT}"
            ) from e
        logger.info("Loaded SentencePiece model from %s", path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.stop_tokens: Set[int] = {self.eos_id}
        self.special_tokens: Dict[str, int] = {}
        logger.info("#words: %d - BOS ID: %d - EOS ID: %d", self.n_words, self.bos_id, self.eos_id)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Encodes `s` with SentencePiece; `bos`/`eos` add Llama 2's <s> and </s>.

        Lone surrogates ("\\ud800", which no UTF-8 text holds) become U+FFFD, as tiktoken makes
        them for Llama 3: SentencePiece itself cannot take them.

        Raises:
            TypeError: `s` is not a str (Meta asserts this).
        """
        _check_str(s)
        t: List[int] = self.sp_model.encode(replace_lone_surrogates(s))
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(list(t))


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.1's tiktoken BPE tokenizer, as in Meta's llama3 tokenizer.py."""

    family = "llama3"

    num_reserved_special_tokens = 256
    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

    # tiktoken's core is slow or panics on very long inputs and on very long runs of
    # whitespace or non-whitespace, so encode() feeds it bounded pieces (Meta's limits).
    TIKTOKEN_MAX_ENCODE_CHARS = 400_000
    MAX_NO_WHITESPACES_CHARS = 25_000

    def __init__(self, model_path: str):
        path = _check_file(Path(model_path))
        mergeable_ranks = _load_bpe_ranks(path)
        num_base_tokens = len(mergeable_ranks)
        names = _llama31_special_token_names(self.num_reserved_special_tokens)
        self.special_tokens: Dict[str, int] = {
            name: num_base_tokens + i for i, name in enumerate(names)
        }
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        logger.info("Reloaded tiktoken model from %s", path)

        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.stop_tokens: Set[int] = {
            self.special_tokens["<|end_of_text|>"],
            self.special_tokens["<|eom_id|>"],
            self.special_tokens["<|eot_id|>"],
        }
        logger.info("#words: %d - BOS ID: %d - EOS ID: %d", self.n_words, self.bos_id, self.eos_id)

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Encodes `s` to token ids.

        By default special-token text such as "<|eot_id|>" inside `s` is encoded as ordinary
        text, so user input cannot forge a turn boundary; `allowed_special="all"` turns such
        text into the special ids. `disallowed_special` names special tokens whose text makes
        tiktoken raise ValueError instead.

        Raises:
            TypeError: `s` is not a str (Meta asserts this).
        """
        _check_str(s)
        t: List[int] = []
        for start in range(0, len(s), self.TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[start : start + self.TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in _split_long_runs(chunk, self.MAX_NO_WHITESPACES_CHARS):
                t.extend(
                    self.model.encode(
                        piece,
                        allowed_special=allowed_special,
                        disallowed_special=disallowed_special,
                    )
                )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        # tiktoken wants a list; callers hand over any sequence of ids.
        return self.model.decode(cast(List[int], list(t)))


def _llama31_special_token_names(count: int) -> List[str]:
    """Llama 3.1's special token names, in id order after the BPE ranks."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message: the model called a tool and waits for its output
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
    ]
    first_reserved = 3
    reserved = [
        f"<|reserved_special_token_{i}|>"
        for i in range(first_reserved, first_reserved + count - len(named))
    ]
    return named + reserved


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cuts `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace
    characters; cuts fall every `max_run` characters from the start of each long run, where
    Meta's tokenizer cuts, so ids match Meta's on long inputs too."""
    start = 0
    # The lookbehinds anchor each match at the start of a run, keeping the scan linear.
    long_run = re.compile(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}")
    for run in long_run.finditer(s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


def replace_lone_surrogates(s: str) -> str:
    """Lone surrogates become U+FFFD, as tiktoken does before encoding: every family encodes them alike."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return s


def _check_str(s: object) -> None:
    if type(s) is not str:
        raise TypeError(f"encode() takes a str, got {type(s).__name__}: {s!r:.80}")


def _check_file(path: Path) -> Path:
    """Fails early, with the fix in the message, on paths that cannot be a tokenizer file."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}; {_PATH_HINT}")
    if path.is_dir():
        inside = path / "tokenizer.model"
        hint = f"did you mean {inside}?" if inside.is_file() else _PATH_HINT
        raise IsADirectoryError(f"tokenizer path {path} is a directory, not a file; {hint}")
    return path


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_SNIFF_BYTES)
    except OSError as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}; {_PATH_HINT}") from e


def _tokenizer_class_for(path: Path) -> Type[Tokenizer]:
    """Picks the tokenizer class from the file's content, not its name: Meta ships both
    families as `tokenizer.model`."""
    head = _read_head(_check_file(path))
    if not head:
        raise ValueError(f"tokenizer file {path} is empty; {_PATH_HINT}")
    if _looks_like_rank_file(head):
        return TiktokenTokenizer
    if head.lstrip()[:1] == b"{":
        # Imported here: llama.hf_tokenizer builds on this module.
        from llama.hf_tokenizer import ByteLevelBPETokenizer

        return ByteLevelBPETokenizer
    # Everything else must be a SentencePiece ModelProto; its loader says if it is not.
    return SentencePieceTokenizer


def _looks_like_rank_file(head: bytes) -> bool:
    lines = head.splitlines()
    if len(head) == _SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut short by the read
    lines = [line for line in lines if line]
    return bool(lines) and all(_RANK_LINE.fullmatch(line) for line in lines)


def _load_bpe_ranks(path: Path) -> Dict[bytes, int]:
    """Reads a tiktoken rank file (what tiktoken.load.load_tiktoken_bpe parses).

    load_tiktoken_bpe is not used because it caches files by path in a temporary folder and
    then serves the cached copy even after the file at that path has changed.
    """
    try:
        contents = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}; {_PATH_HINT}") from e
    ranks: Dict[bytes, int] = {}
    for number, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(
                f"tokenizer file {path} line {number} is not `<base64 token> <rank>`: "
                f"{line[:80]!r}; {_PATH_HINT}"
            ) from e
    return ranks
