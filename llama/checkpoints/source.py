"""What Llama.build loads from: a Meta folder, or a Hugging Face folder / GGUF file converted in memory.

Both end as the same thing: a params.json dict and, for each model-parallel rank, a state_dict
with Meta's keys and layout. Foreign checkpoints are read tensor by tensor (llama.checkpoints.hf, llama.checkpoints.gguf)
and their tokenizer is built in memory (llama.tokenizers.convert), so nothing is written to disk.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from llama.args import CheckpointError
from llama.checkpoints.gguf import read_gguf_as_meta
from llama.checkpoints.gguf_metadata import GGUF_MAGIC
from llama.checkpoints.hf import read_hf_as_meta
from llama.checkpoints.meta import TOKENIZER_FILES, checkpoint_paths, load_for_rank, read_params, shard_dim
from llama.checkpoints.tensors import MetaTensors, read_meta_folder
from llama.kernels import BLOCK
from llama.tokenizer import Tokenizer
from llama.tokenizers.convert import tokenizer_from_gguf, tokenizer_from_hf

PathLike = Union[str, Path]
_KINDS = "a Hugging Face folder (config.json + weights), a .gguf file or a Meta folder (params.json + consolidated.*.pth)"


@dataclass
class CheckpointSource:
    path: Path
    params: Dict[str, Any]
    shards: Optional[List[Path]] = None  # a Meta folder's consolidated.NN.pth files
    tensors: Optional[Mapping[str, torch.Tensor]] = None  # a converted checkpoint, unsharded

    @property
    def kind(self) -> str:
        return "meta" if self.shards is not None else "converted"

    @property
    def params_file(self) -> str:
        """Where params came from, for errors about their values."""
        return str(self.path / "params.json") if self.kind == "meta" else f"{self.path} (converted)"

    def state_dict_for(self, rank: int, model_parallel_size: int, vocab_parallel_embedding: bool) -> Mapping[str, torch.Tensor]:
        """This rank's weights: a Meta folder's (memory-mapped) shard, or a converted source's
        slices, each read (and dequantized) only when accessed (ConvertedShard)."""
        if self.shards is not None:
            return load_for_rank(self.shards, rank, model_parallel_size, vocab_parallel_embedding)
        return ConvertedShard(self.tensors, rank, model_parallel_size, vocab_parallel_embedding)

    def file_for_errors(self, rank: int, model_parallel_size: int) -> Path:
        """The file errors about this rank's weights should name."""
        if self.shards is not None and len(self.shards) == model_parallel_size:
            return self.shards[rank]
        return self.path if self.shards is None else self.shards[0].parent


class ConvertedShard(Mapping):
    """One rank's slices of a converted checkpoint's full tensors, each read when accessed, so that
    loading holds one converted tensor at a time (a GGUF's dequantized floats are never all in
    memory at once). shape(key) reads nothing; blocks(key) gives a GGUF tensor's quantized blocks
    of this rank's slice (MetaTensors.blocks; None where the slice would cut a block of BLOCK columns)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], rank: int, model_parallel_size: int, vocab_parallel_embedding: bool):
        self.tensors = tensors
        self.rank, self.size, self.vocab_parallel_embedding = rank, model_parallel_size, vocab_parallel_embedding

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors  # Mapping's own would read (and dequantize) the tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        cut = self._cut(key)
        if cut is None:
            return t
        dim, start, size = cut
        # A copy of the slice: a view would keep the whole (dequantized) tensor alive.
        return t.narrow(dim, start, size).clone()

    def shape(self, key: str) -> Tuple[int, ...]:
        shape = list(self.tensors.spec(key)[1])
        cut = self._cut(key)
        if cut is not None:
            shape[cut[0]] = cut[2]
        return tuple(shape)

    def blocks(self, key: str) -> Optional[Tuple[str, Any]]:
        found = self.tensors.blocks(key)
        cut = self._cut(key)
        if found is None or cut is None:
            return found
        qtype, data = found
        dim, start, size = cut
        if dim == 0:
            return qtype, data[start : start + size]
        if start % BLOCK or size % BLOCK:
            return None
        block_bytes = data.shape[1] // (self.tensors.spec(key)[1][1] // BLOCK)
        return qtype, data[:, start // BLOCK * block_bytes : (start + size) // BLOCK * block_bytes]

    def _cut(self, key: str) -> Optional[Tuple[int, int, int]]:
        """(dim, start, size) of this rank's slice of key, None if it holds the whole tensor."""
        dim = shard_dim(key, self.vocab_parallel_embedding)
        if dim is None or self.size == 1:
            return None
        full = self.tensors.spec(key)[1][dim]
        if full % self.size:
            raise CheckpointError(f"{key}: size {full} along dim {dim} cannot be split in {self.size} equal parts")
        size = full // self.size
        return dim, self.rank * size, size


def detect_format(path: PathLike) -> str:
    """"meta", "hf" or "gguf": what kind of checkpoint path is.

    Raises FileNotFoundError if path does not exist, CheckpointError if it is none of the three.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(p)!r}; pass {_KINDS}")
    kind = _format_of(p)
    if kind is not None:
        return kind
    if p.is_file():
        raise CheckpointError(f"{p} is not a GGUF file (it does not start with b'GGUF'); pass {_KINDS}")
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    hint = f"; to convert a GGUF file, pass the file itself, e.g. {str(p / ggufs[0])!r}" if ggufs else ""
    raise CheckpointError(f"{p} has neither params.json (Meta) nor config.json (Hugging Face){hint}; pass {_KINDS}")


def read_as_meta(src: PathLike) -> Tuple[Dict[str, Any], MetaTensors]:
    """(params, tensors) of any checkpoint kind, in Meta's terms, without writing anything.

    params is a params.json dict with a positive vocab_size and rope_theta filled in. tensors maps
    Meta's state_dict keys to full (unsharded) tensors, each read from the memory-mapped source
    (q/k rows re-ordered, GGUF quantizations dequantized) when accessed; output.weight is absent
    when the model ties it to tok_embeddings.weight (llama.checkpoints.meta.load_into ties them).
    """
    p = Path(src)
    kind = detect_format(p)
    if kind == "hf":
        return read_hf_as_meta(p)
    if kind == "gguf":
        return read_gguf_as_meta(p)
    params, tensors, _ = read_meta_folder(p)
    return params, tensors


def _format_of(p: Path) -> Optional[str]:
    """"gguf" for a file that starts as one, "meta" for a folder with params.json, "hf" for one with
    config.json; None for anything else."""
    if p.is_file():
        with open(p, "rb") as f:
            return "gguf" if f.read(4) == GGUF_MAGIC else None
    if (p / "params.json").is_file():
        return "meta"
    if (p / "config.json").is_file():
        return "hf"
    return None


def open_checkpoint(ckpt_dir: str) -> CheckpointSource:
    """Find and check the checkpoint's files and read its params; no weight is read yet."""
    if _format_of(Path(ckpt_dir)) in ("gguf", "hf"):
        params, tensors = read_as_meta(ckpt_dir)
        return CheckpointSource(Path(ckpt_dir), params, tensors=tensors)
    shards = checkpoint_paths(ckpt_dir)
    return CheckpointSource(Path(ckpt_dir), read_params(ckpt_dir), shards=shards)


def open_tokenizer(source: CheckpointSource, tokenizer_path: Optional[str]) -> Tokenizer:
    """The tokenizer at tokenizer_path; without one, the checkpoint's own: a converted source's
    vocabulary, or the tokenizer file in a Meta folder or beside it (where Llama 2 keeps it)."""
    if tokenizer_path:
        return Tokenizer(model_path=tokenizer_path)
    if source.kind == "meta":
        for folder in (source.path, source.path.parent):
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    return Tokenizer(model_path=str(folder / name))
        raise FileNotFoundError(
            f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {source.path} or beside it: pass tokenizer_path "
            "(--tokenizer_path), the tokenizer.model that came with the checkpoint"
        )
    if source.path.is_file():
        return tokenizer_from_gguf(source.path)
    return tokenizer_from_hf(source.path)
