"""Checkpoints on disk: Meta folders (read, cut, written), the Hugging Face and GGUF sources read as
Meta tensors, conversion between them, and loading a shard into a model."""
