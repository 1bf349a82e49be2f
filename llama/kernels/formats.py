"""Compact weight formats for the CPU kernels: how they are packed from a float weight or from GGUF
blocks, and how they dequantize (the reference the kernels agree with).

- int8: q (n, k) int8 and float32 scales (n, k // 32) (one per block of 32 columns, as GGUF Q8_0
  and llama/layers/linear.py's pack_weight make) or (n,) (one per output row, where k is not a
  multiple of 32); value = q * scale.
- 4-bit: Q4Weight, GGUF Q4_0/Q4_1 blocks with their scales pulled out beside the nibbles.

Products with either quantize the activations too (quantize_activations_q8), per block of 32
columns to int8, as llama.cpp's CPU backend does for Q4_0/Q4_1/Q8_0 weights.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from llama.runtime.distributed import itemsize

BLOCK = 32  # columns per GGUF block

# GGMLQuantizationType values (gguf is an optional dependency: its enum, a name or the int do).
_GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
# Bytes per block: fp16 scale (+ fp16 min for Q4_1) and the quants.
_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}

QType = Union[int, str]
Blocks = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Q4Weight:
    """A 4-bit weight (n, k): value = d * q + m for q in 0..15, d and m per group of columns.

    qs: uint8 (n, k // 2). Each run of 32 columns is 16 bytes, byte j holding column j in its low
        nibble and column j + 16 in its high nibble: GGUF's Q4_0/Q4_1 order, so their blocks' bytes
        are copied as they are.
    d, m: float16 (n, k // group), group a multiple of 32. GGUF Q4_1 blocks give d and m as stored;
        Q4_0 blocks (value = d * (q - 8)) give m = -8 * d, which dequantizes to the same floats.
    """

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> Tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2

    @property
    def group(self) -> int:
        return self.shape[1] // self.d.shape[1]


def quantize_q8(w: torch.Tensor, group: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A float weight (n, k) -> (int8 (n, k), float32 scales): symmetric, one scale per output row
    ((n,)) or, given a group of columns (a multiple of 32 dividing k), per group ((n, k // group),
    GGUF Q8_0's layout with group 32)."""
    n, k = w.shape
    if group is not None and (group % BLOCK or k % group):
        raise ValueError(f"quantize_q8: group {group} must be a multiple of {BLOCK} dividing k = {k}")
    g = w.float().reshape(n, 1 if group is None else k // group, -1)
    scale = g.abs().amax(dim=2).clamp(min=1e-12) / 127.0
    q = torch.round(g / scale[:, :, None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scale.reshape(n) if group is None else scale


def dequantize_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (n, k) with float32 scales (n,) or (n, groups) -> float32 (n, k)."""
    n, k = q.shape
    groups = scale.reshape(n, -1)
    return (q.float().view(n, groups.shape[1], -1) * groups[:, :, None]).view(n, k)


def quantize_q4(w: torch.Tensor, group: int = BLOCK) -> Q4Weight:
    """A float weight (n, k) -> Q4Weight, asymmetric per group like GGUF Q4_1: d = (max - min) / 15
    and m = min, rounded to fp16; q = round((w - m) / d) with the rounded d and m."""
    n, k = w.shape
    if group % BLOCK or k % group:
        raise ValueError(f"quantize_q4: group {group} must be a multiple of {BLOCK} dividing k = {k}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    scale = d.float()[:, :, None]
    q = torch.where(scale > 0, (g - m.float()[:, :, None]) / scale, torch.zeros_like(g))
    q = q.round().clamp(0, 15).to(torch.uint8).view(n, k // BLOCK, BLOCK)
    qs = (q[:, :, : BLOCK // 2] | q[:, :, BLOCK // 2 :] << 4).reshape(n, k // 2)
    return Q4Weight(qs, d, m)


def dequantize_q4(w: Q4Weight) -> torch.Tensor:
    """Q4Weight -> float32 (n, k), as llama.cpp dequantizes Q4_0/Q4_1 (d * q exact, one rounding)."""
    n, k = w.shape
    qs = w.qs.view(n, k // BLOCK, BLOCK // 2)
    q = torch.cat([qs & 15, qs >> 4], dim=2).view(n, w.d.shape[1], w.group).float()
    return (q * w.d.float()[:, :, None] + w.m.float()[:, :, None]).view(n, k)


def quantize_activations_q8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations (..., k) -> (q, d, s) as the kernels quantize them, per block of 32 columns like
    llama.cpp's Q8_0/Q8_1: q int8 (rows, blocks * 32) zero-padded past k, d float32 (rows, blocks)
    = amax / 127, q = round_half_even(x * (127 / amax)) (0 where amax is 0), and s = d * sum(q)
    (Q8_1's sum, which turns a 4-bit weight's min into one product per block)."""
    k = x.shape[-1]
    blocks = -(-k // BLOCK)
    x = F.pad(x.reshape(-1, k).float(), (0, blocks * BLOCK - k)).view(-1, blocks, BLOCK)
    amax = x.abs().amax(dim=2)
    # A true division, as in C++: `127 / amax` on a tensor multiplies by a rounded reciprocal.
    inverse = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(x * inverse[:, :, None]).to(torch.int8)
    d = amax / 127
    s = d * q.sum(dim=2, dtype=torch.int32).float()
    return q.view(-1, blocks * BLOCK), d, s


def _gguf_type(qtype: QType) -> int:
    value = _GGUF_TYPES.get(qtype, qtype) if isinstance(qtype, str) else int(qtype)
    if value not in _BLOCK_BYTES:
        raise ValueError(f"GGUF quantization type {qtype!r}: only Q4_0, Q4_1 and Q8_0 blocks are supported")
    return value


def _blocks(data: Blocks, qtype: int) -> np.ndarray:
    """Raw block bytes (n, row_bytes) (a GGUF tensor's data as GGUFReader gives it) -> (n, blocks, block_bytes)."""
    array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    size = _BLOCK_BYTES[qtype]
    if array.dtype != np.uint8 or array.ndim < 2 or array.shape[-1] % size:
        raise ValueError(
            f"GGUF blocks: expected uint8 bytes shaped (rows, row_bytes) with row_bytes a multiple of "
            f"{size}, got {array.dtype} {tuple(array.shape)}"
        )
    return array.reshape(-1, array.shape[-1] // size, size)


def _copied(fields: np.ndarray, dtype: torch.dtype, empty: Callable[..., torch.Tensor] = torch.empty) -> torch.Tensor:
    """The bytes of fields (n, blocks, width) copied into a new tensor (n, blocks * width // itemsize)
    of dtype from empty (torch's allocator by default): 64-byte aligned, where numpy's large arrays
    start 16 bytes into a page and put every 64-byte load of the kernels across two cache lines."""
    n, blocks, width = fields.shape
    out = empty((n, blocks * width // itemsize(dtype)), dtype=dtype)
    out.numpy().view(np.uint8).reshape(n, blocks, width)[...] = fields
    return out


def _half(fields: np.ndarray) -> torch.Tensor:
    """Two bytes per block (n, blocks, 2) -> float16 (n, blocks): a copy of just these bytes."""
    return _copied(fields, torch.float16)


def q4_from_gguf(data: Blocks, qtype: QType) -> Q4Weight:
    """GGUF Q4_0 or Q4_1 blocks (uint8, (n, row_bytes)) -> Q4Weight (group 32), copying the bytes
    once and never making a float copy of the weight."""
    kind = _gguf_type(qtype)
    if kind == _GGUF_TYPES["Q8_0"]:
        raise ValueError("q4_from_gguf: Q8_0 blocks are int8: use q8_from_gguf")
    blocks = _blocks(data, kind)
    d = _half(blocks[..., 0:2])
    if kind == _GGUF_TYPES["Q4_1"]:
        m, quants = _half(blocks[..., 2:4]), blocks[..., 4:]
    else:
        if d.abs().max() > 8188:  # -8 * d must stay finite in fp16 to be exact
            raise ValueError("q4_from_gguf: Q4_0 scale beyond 8188 cannot be represented as a fp16 min")
        m, quants = -8 * d, blocks[..., 2:]
    return Q4Weight(_copied(quants, torch.uint8), d, m)


def q8_from_gguf(data: Blocks, empty: Callable[..., torch.Tensor] = torch.empty) -> Tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 blocks (uint8, (n, row_bytes)) -> (int8 (n, k), float32 scales (n, k // 32)),
    allocated by empty(shape, dtype=) (the loader's 2 MB-page memory, or torch's)."""
    blocks = _blocks(data, _GGUF_TYPES["Q8_0"])
    scale = empty(blocks.shape[:2], dtype=torch.float32).copy_(_half(blocks[..., 0:2]))
    return _copied(blocks[..., 2:], torch.int8, empty), scale
