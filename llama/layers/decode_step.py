"""Whether a loaded model's decode steps can run as one native call (llama.kernels.decode), and
its description for that call.

They can on the CPU in float32 with one process, when every linear weight is in a format the
kernels multiply (exact fp32, int8, int4; not bf16): then a step costs its products plus
microseconds, instead of ~25 torch operations per layer.
"""

import ctypes
from typing import List, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.kernels import decode
from llama.layers.linear import native_products


def _parts(projection: torch.nn.Module, keep: List[torch.Tensor]) -> Optional[List[decode.Linear]]:
    """A SeparateColumns' layers, or a FusedColumns' one weight, as kernel descriptions (their
    tensors added to keep)."""
    layers = getattr(projection, "layers", None)
    modules = layers if layers is not None else [projection]
    parts = [decode.linear(m.weight, m.weight_scale, m.weight_min) for m in modules]
    keep += [t for m in modules for t in (m.weight, m.weight_scale, m.weight_min) if t is not None]
    return None if any(p is None for p in parts) else parts


def _padded(parts: Sequence[decode.Linear], size: int) -> ctypes.Array:
    return (decode.Linear * size)(*parts)


def native_decode(model: torch.nn.Module) -> Optional[decode.DecodeLayers]:
    """model's layers as one native decode call, or None where that does not apply."""
    norm = model.norm.weight
    if fs_init.get_model_parallel_world_size() != 1 or not native_products():
        return None
    if norm.dtype != torch.float32 or not norm.is_cpu or not model.freqs_cos_sin.is_contiguous():
        return None
    keep: List[torch.Tensor] = [model.freqs_cos_sin]
    layers = []
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        qkv, w13 = _parts(attention.wqkv, keep), _parts(ffn.w13, keep)
        wo, w2 = _parts(attention.wo, keep), _parts(ffn.w2, keep)
        tensors = [block.attention_norm.weight, block.ffn_norm.weight, attention.cache_k, attention.cache_v]
        if None in (qkv, w13, wo, w2) or not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
            return None
        keep += tensors
        layers.append(
            decode.Layer(
                tensors[0].data_ptr(), tensors[1].data_ptr(), _padded(qkv, 3), len(qkv), wo[0],
                _padded(w13, 2), len(w13), w2[0], tensors[2].data_ptr(), tensors[3].data_ptr(),
            )
        )  # fmt: skip
    first = model.layers[0].attention
    batch, kv_heads, seq_len, head_dim = first.cache_k.shape
    dims = decode.Dims(
        model.params.dim, first.n_local_heads, kv_heads, head_dim, layers[0].w2.k,
        batch, seq_len, model.params.norm_eps,
    )  # fmt: skip
    return decode.DecodeLayers(layers, dims, model.freqs_cos_sin, keep)
