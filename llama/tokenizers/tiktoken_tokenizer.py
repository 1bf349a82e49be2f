"""Llama 3 / 3.1's tiktoken BPE tokenizer, as in Meta's llama3 tokenizer.py."""

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import AbstractSet, Collection, Dict, List, Literal, Sequence, Set, Union, cast

import tiktoken

from llama.tokenizers.base import PATH_HINT, SNIFF_BYTES, Tokenizer, check_file, check_str, split_long_runs

logger = logging.getLogger(__name__)

# A tiktoken BPE rank file is text, one `<base64 token> <rank>` per line.
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.1's tiktoken BPE tokenizer, as in Meta's llama3 tokenizer.py."""

    family = "llama3"

    @staticmethod
    def reads(head: bytes) -> bool:
        return _looks_like_rank_file(head)

    num_reserved_special_tokens = 256
    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

    # tiktoken's core is slow or panics on very long inputs and on very long runs of
    # whitespace or non-whitespace, so encode() feeds it bounded pieces (Meta's limits).
    TIKTOKEN_MAX_ENCODE_CHARS = 400_000
    MAX_NO_WHITESPACES_CHARS = 25_000

    def __init__(self, model_path: str):
        path = check_file(Path(model_path))
        self._load(_load_bpe_ranks(path), str(path))

    @classmethod
    def from_mergeable_ranks(cls, mergeable_ranks: Dict[bytes, int], source: str) -> "TiktokenTokenizer":
        """The tokenizer whose BPE ranks a tokenizer.model file would list (token bytes -> rank);
        Llama 3.1's special tokens follow them. `source` names where they came from in logs."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(mergeable_ranks, source)
        return tokenizer

    def _load(self, mergeable_ranks: Dict[bytes, int], source: str) -> None:
        num_base_tokens = len(mergeable_ranks)
        names = llama31_special_token_names(self.num_reserved_special_tokens)
        self.special_tokens: Dict[str, int] = {
            name: num_base_tokens + i for i, name in enumerate(names)
        }
        self.model = tiktoken.Encoding(
            name=Path(source).name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        logger.info("Reloaded tiktoken model from %s", source)

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
        check_str(s)
        t: List[int] = []
        for start in range(0, len(s), self.TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[start : start + self.TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in split_long_runs(chunk, self.MAX_NO_WHITESPACES_CHARS):
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


def llama31_special_token_names(count: int) -> List[str]:
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


def _looks_like_rank_file(head: bytes) -> bool:
    lines = head.splitlines()
    if len(head) == SNIFF_BYTES and len(lines) > 1:
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
        raise ValueError(f"cannot read tokenizer file {path}: {e}; {PATH_HINT}") from e
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
                f"{line[:80]!r}; {PATH_HINT}"
            ) from e
    return ranks
