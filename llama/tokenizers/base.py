"""The Tokenizer every back-end shares: its attributes, the choice of back-end from the file's
first bytes, and the text checks all back-ends make.

`Tokenizer(path)` returns an instance of the back-end that reads the file (llama.tokenizers
registers them: SentencePiece for Llama 2, tiktoken BPE for Llama 3, byte-level BPE for a
Hugging Face tokenizer.json); all keep Meta's attribute names and encode/decode behaviour, so the
rest of the library never asks which family it has: stop tokens, special tokens and the chat
format follow from the tokenizer object.
"""

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Set, Type

PATH_HINT = (
    "pass --tokenizer_path pointing at the tokenizer.model (or, for a converted byte-level BPE "
    "model, the tokenizer.json) that came with the checkpoint"
)
SNIFF_BYTES = 4096


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

    # The back-ends that recognise their file by its first bytes, asked in `sniff_order`.
    _readers: List[Type["Tokenizer"]] = []
    sniff_order = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "reads" in cls.__dict__:
            Tokenizer._readers.append(cls)
            Tokenizer._readers.sort(key=lambda reader: reader.sniff_order)

    def __new__(cls, model_path: str = "") -> "Tokenizer":
        # Only the base class dispatches; the default argument keeps copy/pickle working for
        # subclasses, which re-create instances through cls.__new__(cls).
        if cls is Tokenizer:
            cls = _tokenizer_class_for(Path(model_path))
        return super().__new__(cls)

    @staticmethod
    def reads(head: bytes) -> bool:
        """Whether a file that starts with `head` (up to 4096 bytes) is this back-end's format."""
        return False

    def encode(self, s: str, *, bos: bool, eos: bool) -> List[int]:
        """Encodes `s` to token ids, with BOS prepended / EOS appended when asked."""
        raise NotImplementedError

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids back to text."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, n_words={self.n_words})"


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
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


def check_str(s: object) -> None:
    if type(s) is not str:
        raise TypeError(f"encode() takes a str, got {type(s).__name__}: {s!r:.80}")


def check_file(path: Path) -> Path:
    """Fails early, with the fix in the message, on paths that cannot be a tokenizer file."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}; {PATH_HINT}")
    if path.is_dir():
        inside = path / "tokenizer.model"
        hint = f"did you mean {inside}?" if inside.is_file() else PATH_HINT
        raise IsADirectoryError(f"tokenizer path {path} is a directory, not a file; {hint}")
    return path


def read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}; {PATH_HINT}") from e


def _tokenizer_class_for(path: Path) -> Type[Tokenizer]:
    """Picks the tokenizer class from the file's content, not its name: Meta ships both
    families as `tokenizer.model`."""
    head = read_head(check_file(path))
    if not head:
        raise ValueError(f"tokenizer file {path} is empty; {PATH_HINT}")
    for reader in Tokenizer._readers:
        if reader.reads(head):
            return reader
    raise ValueError(f"tokenizer file {path} is not a format this version reads; {PATH_HINT}")
