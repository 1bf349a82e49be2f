"""A decode step's transformer layers in one native call (decode.cpp): the layout of its arguments.

The weights are described once (pointers, shapes, formats) and the description reused for every
step; DecodeLayers keeps the tensors it points into alive.
"""

import ctypes
from typing import List, Optional, Sequence

import torch

from llama.kernels import _library

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p

F32, Q8, Q4 = 0, 1, 2


class Linear(ctypes.Structure):
    _fields_ = [("format", _i64), ("w", _ptr), ("scale", _ptr), ("min", _ptr), ("groups", _i64), ("n", _i64), ("k", _i64)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("attention_norm", _ptr), ("ffn_norm", _ptr), ("qkv", Linear * 3), ("qkv_parts", _i64), ("wo", Linear),
        ("w13", Linear * 2), ("w13_parts", _i64), ("w2", Linear), ("cache_k", _ptr), ("cache_v", _ptr),
    ]  # fmt: skip


class Dims(ctypes.Structure):
    _fields_ = [
        ("dim", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64), ("hidden", _i64),
        ("max_batch_size", _i64), ("max_seq_len", _i64), ("norm_eps", ctypes.c_float),
    ]  # fmt: skip


def _plain(t: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    return t is not None and t.dtype is dtype and t.is_cpu and t.is_contiguous()


def linear(weight: torch.Tensor, scale: Optional[torch.Tensor], minimum: Optional[torch.Tensor]) -> Optional[Linear]:
    """A stored weight (LocalProduct's parts) as the kernels take it, or None for a format they do
    not multiply (bf16, a non-contiguous or non-CPU weight)."""
    if scale is None and minimum is None and _plain(weight, torch.float32):
        n, k = weight.shape
        return Linear(F32, weight.data_ptr(), None, None, 1, n, k)
    if minimum is None and _plain(weight, torch.int8) and _plain(scale, torch.float32):
        groups = scale.shape[1] if scale.dim() == 2 else 1
        n, k = weight.shape
        return Linear(Q8, weight.data_ptr(), scale.data_ptr(), None, groups, n, k)
    if _plain(weight, torch.uint8) and _plain(scale, torch.float16) and _plain(minimum, torch.float16):
        n, k = weight.shape[0], 2 * weight.shape[1]
        return Linear(Q4, weight.data_ptr(), scale.data_ptr(), minimum.data_ptr(), scale.shape[1], n, k)
    return None


class DecodeLayers:
    """Every layer of a model for rows of one token each: h (m, dim) float32 -> the last layer's output."""

    def __init__(self, layers: Sequence[Layer], dims: Dims, rope: torch.Tensor, keep: List[torch.Tensor]):
        self.layers = (Layer * len(layers))(*layers)
        self.dims, self.rope = dims, rope
        self._keep = keep  # the tensors the descriptions point into

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, cache_row: int) -> torch.Tensor:
        """h (m, dim) contiguous float32, updated in place and returned; positions (m,) int64."""
        positions = positions.to(torch.int64).contiguous()
        status = _library().llk_decode_layers(
            ctypes.byref(self.layers), len(self.layers), ctypes.byref(self.dims), h.data_ptr(), h.shape[0],
            positions.data_ptr(), cache_row, self.rope.data_ptr(),
        )
        if status != 0:
            raise ValueError(
                f"decode step: positions {positions.tolist()} or cache rows {cache_row}..{cache_row + h.shape[0] - 1} "
                f"lie outside the cache ({self.dims.max_seq_len} positions, {self.dims.max_batch_size} rows): "
                "build the model with a larger max_seq_len / max_batch_size"
            )
        return h
