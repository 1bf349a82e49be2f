"""A shard's tensors into a model: converted to the compute device and dtype, the linear layers'
weights to a compact format, one tensor at a time, never holding the source and its copy at once."""

import ctypes
import mmap
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import numpy as np
import torch
from torch import nn

import llama.kernels as kernels
from llama.args import CheckpointError
from llama.checkpoints.meta import IGNORED_KEYS, tensor_shape, unexpected_weights_error
from llama.layers.compact import Q8Embedding
from llama.layers.linear import LocalProduct, Packed, check_int4_columns, pack_weight
from llama.runtime.distributed import itemsize
from llama.runtime.host import HugePageArena, huge_page_arena, madvise


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    weight_format: Optional[str] = None,
) -> None:
    """Put the shard's tensors into model in place of its parameters, converted to (device, dtype),
    and the linear layers' weights to weight_format if given (see llama.layers.linear).

    Parameters are swapped (assign=True), not copied into, so the weights exist once in memory;
    each is converted straight from the memory-mapped shard to its final format, one at a time
    (a state_dict that reads tensors when accessed is never held whole). A state_dict with a
    `blocks(key)` method (a GGUF source) gives quantized blocks that weight_format takes as they
    are: Q4_0/Q4_1 under "int4", Q8_0 under "int8" and "int4"; under those two, a Q8_0 embedding
    stays in its blocks too (Q8Embedding, one process only), shared with a tied output.
    """
    expected = model.state_dict()
    names = {k: k for k in state_dict}  # the model's key -> the checkpoint's
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        if tensor_shape(state_dict, "tok_embeddings.weight") == tuple(expected["output.weight"].shape):
            # Llama 3.2 1B/3B tie the output projection to the embedding (same vocabulary split).
            names["output.weight"] = "tok_embeddings.weight"
    missing = [k for k in expected if k not in names]
    unexpected = [k for k in state_dict if k not in expected and k not in IGNORED_KEYS]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}; "
            "params.json and the shards do not belong together, or the file is incomplete"
        )
    if unexpected:
        raise unexpected_weights_error(str(path), unexpected, model.params.n_layers, "params.json n_layers")
    mismatched = [
        f"{k}: checkpoint {tensor_shape(state_dict, names[k])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tensor_shape(state_dict, names[k]) != tuple(v.shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{path} does not match params.json and the model-parallel size: " + "; ".join(mismatched[:3])
        )
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LocalProduct)}
    if weight_format == "int4":
        check_int4_columns({k: expected[k].shape[1] for k in linears}, fs_init.get_model_parallel_world_size())
    converted: Dict[str, torch.Tensor] = {}
    # By checkpoint key: a tied output shares its embedding's converted memory (or Q8_0 blocks).
    done: Dict[str, torch.Tensor] = {}
    packed: Dict[str, Tuple[Packed, Optional[torch.Tensor]]] = {}
    embedding_blocks = None
    arena = _dense_arena(expected, names, set(linears) if weight_format is not None else set(), device, dtype)
    for k in expected:
        name = names[k]
        if weight_format is not None and k in linears:
            linears[k].store(*(packed.get(name) or _packed(state_dict, name, weight_format, device, k == "output.weight")))
        elif k == "tok_embeddings.weight" and (embedding_blocks := _q8_embedding(state_dict, name, weight_format, device)):
            packed[name] = embedding_blocks
        elif name in done:
            converted[k] = done[name]
        else:
            source = state_dict[name]
            converted[k] = done[name] = _converted(source, device, dtype, arena)
            del source  # a converted source's tensor is freed before the next one is read
    model.requires_grad_(False)  # inference only; lets int8 weights be parameters
    result = model.load_state_dict(converted, strict=False, assign=True)
    if embedding_blocks is not None:
        model.tok_embeddings = Q8Embedding(*embedding_blocks, dtype)
        result.missing_keys.remove("tok_embeddings.weight")
    stored = [k for k in result.missing_keys if k not in linears or weight_format is None]
    if stored or result.unexpected_keys:  # the checks above make this unreachable
        raise CheckpointError(f"{path}: weights left unloaded {stored[:3]} or unused {result.unexpected_keys[:3]}")


def _dense_arena(
    expected: Mapping[str, torch.Tensor], names: Mapping[str, str], packed: set, device: torch.device, dtype: torch.dtype
) -> Optional[HugePageArena]:
    """2 MB-page memory for the large weights kept in dtype on the CPU (each checkpoint tensor
    once), or None."""
    if device.type != "cpu":
        return None
    sizes = {names[k]: v.numel() * itemsize(dtype) for k, v in expected.items() if k not in packed}
    return huge_page_arena(HugePageArena.size_for(size for size in sizes.values() if _in_arena(size)))


def _in_arena(nbytes: int) -> bool:
    """Whether a weight of nbytes goes to the arena. Smaller ones (norms) stay in torch's memory:
    a model whose large weights are all packed would otherwise hold a whole 2 MB page for its
    norms' few KB."""
    return nbytes >= 1 << 18


def _converted(source: torch.Tensor, device: torch.device, dtype: torch.dtype, arena: Optional[HugePageArena]) -> torch.Tensor:
    """source in (device, dtype), its pages released once read: a large one copied into the arena
    where there is one (even a source already in dtype: a memory-mapped shard's pages are 4 KB
    ones), else source.to's result."""
    if arena is None or not _in_arena(source.numel() * itemsize(dtype)):
        converted = source.to(device=device, dtype=dtype)
        if converted.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
            _page_out(source)
        return converted
    copy = arena.empty(source.shape, dtype)
    if source.dim() == 0 or not source.is_contiguous() or source.device.type != "cpu":
        copy.copy_(source)
        _page_out(source)
        return copy
    # A slice at a time, each paged out once copied: the largest tensor (an embedding) is not
    # resident twice.
    rows = max(1, _COPY_BYTES // max(1, source[0].numel() * source.element_size()))
    for start in range(0, source.shape[0], rows):
        piece = source[start:start + rows]
        copy[start:start + rows].copy_(piece)
        _page_out(piece)
    return copy


_COPY_BYTES = 16 << 20


def _q8_embedding(state_dict: Mapping[str, torch.Tensor], key: str, weight_format: Optional[str], device: torch.device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The embedding's Q8_0 blocks as (int8 values, scales) when the source has them, the weights
    are int8/int4 and one process holds the whole vocabulary; else None (loaded as floats).

    On the CPU they lie in 2 MB pages, as compact.fuse_projections places the other compact
    weights later: copied now, while little else is loaded, a tied output's copy does not add to
    the load's peak memory."""
    if weight_format not in ("int8", "int4") or fs_init.get_model_parallel_world_size() != 1:
        return None
    found = _source_blocks(state_dict, key)
    if found is None or found[0] != "Q8_0":
        return None
    blocks = found[1].nbytes // 34  # a Q8_0 block: fp16 scale and 32 int8 values
    arena = huge_page_arena(HugePageArena.size_for((blocks * 32, blocks * 4))) if device.type == "cpu" else None
    return _packed(state_dict, key, "int8", device, empty=arena.empty if arena is not None else torch.empty)


def _source_blocks(state_dict: Mapping[str, torch.Tensor], key: str) -> Optional[Tuple[str, np.ndarray]]:
    """(GGUF type name, raw blocks) of a quantized source tensor (MetaTensors.blocks), else None."""
    blocks = getattr(state_dict, "blocks", None)
    return blocks(key) if callable(blocks) else None


def _packed(
    state_dict: Mapping[str, torch.Tensor], key: str, weight_format: str, device: torch.device, output: bool = False,
    empty: Callable[..., torch.Tensor] = torch.empty,
) -> Tuple[Packed, Optional[torch.Tensor]]:
    """A linear weight in weight_format (pack_weight's result): from the source's quantized
    blocks where they fit the format, copied as they are, else quantized from its floats; under
    int4, the output projection from floats is quantized to int8 (llama.cpp's Q4 files keep it in
    6-8 bits: SmolLM2's perplexity rose 6% with it in 4 bits, 0.1% with the rest). Q8_0 blocks are
    copied into memory from empty(shape, dtype=)."""
    found = _source_blocks(state_dict, key)
    if found is not None and weight_format != "bf16":
        qtype, data = found
        packed: Optional[Tuple[Packed, Optional[torch.Tensor]]] = None
        if weight_format == "int4" and qtype in ("Q4_0", "Q4_1"):
            w = kernels.q4_from_gguf(data, qtype)
            packed = kernels.Q4Weight(w.qs.to(device), w.d.to(device), w.m.to(device)), None
        elif qtype == "Q8_0":
            # Under int4 too: llama.cpp's Q4 files keep their embedding (the tied output) in Q8_0,
            # and reading its blocks is exact where a second rounding to 4 bits is not.
            q, scale = kernels.q8_from_gguf(data, empty)
            packed = q.to(device), scale.to(device)
        if packed is not None:
            _page_out_array(data)
            return packed
    source = state_dict[key]
    packed = pack_weight(source, "int8" if output and weight_format == "int4" else weight_format, device)
    _page_out(source)
    return packed


_MADV_PAGEOUT = 21  # Linux 5.4+


def _page_out(t: torch.Tensor) -> None:
    """Ask the kernel to drop a converted source tensor's pages from this process's memory.

    The source is a memory-mapped shard: its pages, once read, would stay resident beside the
    converted copy until the whole file is unmapped (1.5x the weights when bf16 becomes fp32).
    MADV_PAGEOUT only reclaims (clean file pages are re-read if touched again), so it is safe for
    any tensor; where it is unsupported (not Linux, old kernel) nothing happens.
    """
    if t.device.type == "cpu":
        _page_out_range(t.data_ptr(), t.numel() * t.element_size())


def _page_out_array(a: np.ndarray) -> None:
    """_page_out for a numpy array (a GGUF file's memory-mapped blocks)."""
    _page_out_range(a.__array_interface__["data"][0], a.nbytes)


def _page_out_range(start: int, size: int) -> None:
    if madvise is None:
        return
    end = start + size
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
