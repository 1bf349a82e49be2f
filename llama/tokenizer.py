"""Meta's llama.tokenizer: `Tokenizer(path)` gives Llama 2's SentencePiece or Llama 3's tiktoken
tokenizer (or a converted model's byte-level BPE), chosen from the file itself; and, where Meta's
Llama 3 puts them, ChatFormat, Dialog, Message and Role."""

from llama.chat_format import ChatFormat, Dialog, Message, Role
from llama.tokenizers import ByteLevelBPETokenizer, SentencePieceTokenizer, TiktokenTokenizer
from llama.tokenizers.base import Tokenizer

__all__ = [
    "ByteLevelBPETokenizer", "ChatFormat", "Dialog", "Message", "Role", "SentencePieceTokenizer",
    "TiktokenTokenizer", "Tokenizer",
]  # fmt: skip
