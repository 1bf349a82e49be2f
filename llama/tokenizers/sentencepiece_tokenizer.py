"""Llama 2's SentencePiece tokenizer, as in Meta's llama/tokenizer.py."""

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Set

from sentencepiece import SentencePieceProcessor

from llama.tokenizers.base import PATH_HINT, Tokenizer, check_file, check_str, replace_lone_surrogates

logger = logging.getLogger(__name__)


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's SentencePiece tokenizer, as in Meta's llama/tokenizer.py."""

    family = "llama2"
    sniff_order = 100  # asked last: any file the others do not take goes to SentencePiece's loader, whose error says what is wrong

    @staticmethod
    def reads(head: bytes) -> bool:
        return True

    def __init__(self, model_path: str):
        path = check_file(Path(model_path))
        self._load(str(path), model_file=str(path))

    @classmethod
    def from_model_proto(cls, model_proto: bytes, source: str) -> "SentencePieceTokenizer":
        """The tokenizer of a serialized SentencePiece ModelProto, what a tokenizer.model file
        holds; `source` names where it came from in errors and logs.

        Raises:
            ValueError: `model_proto` is not a SentencePiece model.
        """
        tokenizer = cls.__new__(cls)
        tokenizer._load(source, model_proto=model_proto)
        return tokenizer

    def _load(self, source: str, **model: object) -> None:
        """Loads the model (SentencePieceProcessor's `model_file` or `model_proto`) and sets
        Meta's attributes from it."""
        try:
            self.sp_model = SentencePieceProcessor(**model)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"tokenizer file {source} is neither a tiktoken BPE rank file (Llama 3) nor a "
                f"SentencePiece model (Llama 2): {e}; {PATH_HINT}"
            ) from e
        logger.info("Loaded SentencePiece model from %s", source)

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
        check_str(s)
        t: List[int] = self.sp_model.encode(replace_lone_surrogates(s))
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(list(t))
