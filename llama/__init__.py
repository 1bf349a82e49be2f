"""Llama 2 and Llama 3 inference with Meta's API, on CUDA or the CPU."""

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Dialog, Message
from llama.generation import Llama, sample_top_p
from llama.model import Transformer
from llama.tokenizer import Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "Tokenizer", "Transformer", "sample_top_p"]
