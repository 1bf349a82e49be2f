"""Tokenizer back-ends, one per file format, and the tokenizers of converted sources (convert).

Importing this package registers every back-end with Tokenizer's choice by file content.
"""

from llama.tokenizers.byte_level_bpe import ByteLevelBPETokenizer
from llama.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from llama.tokenizers.tiktoken_tokenizer import TiktokenTokenizer

__all__ = ["ByteLevelBPETokenizer", "SentencePieceTokenizer", "TiktokenTokenizer"]
