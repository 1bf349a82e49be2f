"""CPU products of a few activation rows with an fp32, int8 or 4-bit weight (decode steps).

torch's CPU products are slow here: MKL's fp32 product with 2-16 rows costs several times one
row and collapses when another process competes for a core, and torch's int8/int4 weight-only
kernels run below fp32 speed with fp32 activations. These kernels (cpu.cpp) read each weight row
once for all activation rows on a small thread pool that tolerates a busy core.

- fp32: fp32 multiply-adds, the same products as F.linear up to float rounding.
- int8 and 4-bit: as llama.cpp's CPU backend does for Q8_0, Q4_0 and Q4_1 weights, each
  activation row is quantized per block of 32 columns to int8 with a float scale
  (quantize_activations_q8), and each block's product is an integer dot product times the two
  scales (plus the 4-bit min times the block's scaled sum). Converting the weight to floats costs
  more than reading it on AVX2; integer dot products do not. Quantizing the activations is part of
  these lossy formats' cost (about 0.5% of an output's scale per product), measured with the
  perplexity command (llama/cli/perplexity.py).

The library is built at first use (build.py). Without a compiler, or with LLAMA_KERNELS=torch,
every product runs its torch reference instead: the same integers, the same results up to float
rounding.
"""

import ctypes
import functools
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.kernels import build
from llama.kernels.formats import (
    BLOCK,
    Q4Weight,
    dequantize_q4,
    dequantize_q8,
    q4_from_gguf,
    q8_from_gguf,
    quantize_activations_q8,
    quantize_q4,
    quantize_q8,
)

__all__ = [
    "BLOCK", "Q4Weight", "available", "dequantize_q4", "dequantize_q8", "isa", "linear_f32", "linear_q4",
    "linear_q8", "num_threads", "q4_from_gguf", "q8_from_gguf", "quantize_activations_q8", "quantize_q4",
    "quantize_q8", "reference_linear_f32", "reference_linear_q4", "reference_linear_q8", "set_num_threads",
]

_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("LLAMA_KERNELS") == "torch":
        return None
    lib = build.native_library()
    if lib is not None:
        lib.llk_set_threads(_threads)
    return lib


def available() -> bool:
    """Whether the native kernels are built and in use (else the torch references run)."""
    return _library() is not None


def isa() -> str:
    """The instruction set the kernels were built for: avx512, avx2, portable; or torch (fallback)."""
    lib = _library()
    return lib.llk_isa().decode() if lib is not None else "torch"


def set_num_threads(n: int) -> None:
    """Threads per product, the caller's included (default: the CPUs this process may run on)."""
    global _threads
    if n < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, got {n}")
    _threads = n
    lib = _library()
    if lib is not None:
        lib.llk_set_threads(n)


def num_threads() -> int:
    return _threads


# --- torch references: what the kernels compute, and what runs without them ---

def reference_linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _per_block(scale: torch.Tensor, blocks: int) -> torch.Tensor:
    """Scales (n, groups) -> (n, blocks): each group's scale repeated over its blocks of 32."""
    return scale.float().repeat_interleave(blocks // scale.shape[1], dim=1)


def _block_products(x: torch.Tensor, w_blocks: torch.Tensor, combine: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The integer math of the quantized kernels: x (..., k) quantized by quantize_activations_q8;
    w_blocks (n, blocks, 32) integer-valued weight blocks; combine(dots (rows, n', blocks), dx
    (rows, 1, blocks), sx (rows, 1, blocks), rows') -> (rows, n') for weight rows [rows'] (a slice).
    Float32 dots are exact: every partial sum is an integer below 2^24."""
    n, blocks, _ = w_blocks.shape
    qx, dx, sx = quantize_activations_q8(x)
    qx = qx.float().view(-1, blocks, BLOCK).transpose(0, 1)  # (blocks, rows, 32)
    rows = qx.shape[1]
    y = torch.empty(rows, n)
    step = max(1, (1 << 22) // max(1, rows * blocks))  # bounds the (rows, step, blocks) dots
    for r0 in range(0, n, step):
        w = w_blocks[r0 : r0 + step].float().permute(1, 2, 0)  # (blocks, 32, n')
        dots = torch.bmm(qx, w).permute(1, 2, 0)  # (rows, n', blocks)
        y[:, r0 : r0 + step] = combine(dots, dx[:, None], sx[:, None], slice(r0, r0 + step))
    return y.view(*x.shape[:-1], n)


def reference_linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What linear_q8 computes: per block of 32 columns (d_w * dx) * dot(q, qx), summed; a
    per-row scale d_w multiplies the row's sum instead."""
    n, k = q.shape
    blocks = -(-k // BLOCK)
    w_blocks = F.pad(q, (0, blocks * BLOCK - k)).view(n, blocks, BLOCK)
    if scale.dim() == 1:
        return _block_products(x, w_blocks, lambda dots, dx, sx, r: (dx * dots).sum(2) * scale[r])
    d = _per_block(scale, blocks)
    return _block_products(x, w_blocks, lambda dots, dx, sx, r: (d[r] * dx * dots).sum(2))


def reference_linear_q4(x: torch.Tensor, w: Q4Weight) -> torch.Tensor:
    """What linear_q4 computes: per block of 32 columns (d * dx) * dot(q, qx) + m * sx, summed."""
    n, k = w.shape
    blocks = k // BLOCK
    qs = w.qs.view(n, blocks, BLOCK // 2)
    w_blocks = torch.cat([qs & 15, qs >> 4], dim=2)  # (n, blocks, 32) in column order
    d, m = _per_block(w.d, blocks), _per_block(w.m, blocks)
    return _block_products(x, w_blocks, lambda dots, dx, sx, r: (d[r] * dx * dots).sum(2) + (m[r] * sx).sum(2))


# --- validation: the C functions trust their pointers and sizes ---

def _check(name: str, what: str, t: torch.Tensor, dtype: torch.dtype, shape: Tuple[Optional[int], ...]) -> None:
    ok_shape = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if t.device.type != "cpu" or t.dtype != dtype or not ok_shape or not t.is_contiguous():
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(
            f"{name}: {what} must be a contiguous {dtype} CPU tensor shaped {want}, got a "
            f"{'contiguous' if t.is_contiguous() else 'non-contiguous'} {t.dtype} {t.device.type} tensor "
            f"shaped {tuple(t.shape)}"
        )


def _check_x(name: str, x: torch.Tensor, k: int) -> None:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: x must end in the weight's k = {k} columns, got shape {tuple(x.shape)}")
    _check(name, "x", x, torch.float32, tuple(x.shape))


def _check_scale(name: str, scale: torch.Tensor, n: int, k: int) -> None:
    _check(name, "scale", scale, torch.float32, (n, None) if scale.dim() == 2 else (n,))
    groups = scale.shape[1] if scale.dim() == 2 else 1
    if k % groups or (groups > 1 and (k // groups) % BLOCK):
        raise ValueError(f"{name}: {groups} scale groups must split k = {k} into runs of a multiple of {BLOCK}")


def _check_q4(name: str, w: Q4Weight) -> None:
    _check(name, "qs", w.qs, torch.uint8, (None, None))
    n, k = w.shape
    _check(name, "d", w.d, torch.float16, (n, None))
    _check(name, "m", w.m, torch.float16, tuple(w.d.shape))
    if k % w.d.shape[1] or w.group % BLOCK:
        raise ValueError(f"{name}: {w.d.shape[1]} groups must split k = {k} into runs of a multiple of {BLOCK}")


# --- the products: native kernels, or torch when they are unavailable ---

def _call(fn: Callable[..., None], x: torch.Tensor, n: int, *weight: int) -> torch.Tensor:
    """fn(x, *weight, y, rows, k, n) into a new y (..., n)."""
    rows = x.numel() // x.shape[-1]
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if rows and n:
        fn(x.data_ptr(), *weight, y.data_ptr(), rows, x.shape[-1], n)
    return y


def _linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    lib = _library()
    if lib is None:
        return reference_linear_f32(x, w)
    return _call(lib.llk_linear_f32, x, w.shape[0], w.data_ptr())


def _linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    lib = _library()
    if lib is None:
        return reference_linear_q8(x, q, scale)
    groups = scale.shape[1] if scale.dim() == 2 else 1
    return _call(lib.llk_linear_q8, x, q.shape[0], q.data_ptr(), scale.data_ptr(), groups)


def _linear_q4(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lib = _library()
    if lib is None:
        return reference_linear_q4(x, Q4Weight(qs, d, m))
    return _call(lib.llk_linear_q4, x, qs.shape[0], qs.data_ptr(), d.data_ptr(), m.data_ptr(), d.shape[1])


# --- torch.compile: the products as opaque custom ops that a compiled graph calls as they are.
# Eagerly the public functions call the implementations directly: an op costs a Python dispatch.

_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def _opaque(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn as a custom op (torch 2.4+; fn itself before). Its second argument has n rows."""
    if not hasattr(torch.library, "custom_op"):
        return fn
    op = torch.library.custom_op(f"llama_kernels::{fn.__name__.lstrip('_')}", mutates_args=())(fn)
    op.register_fake(lambda x, w, *rest: x.new_empty(*x.shape[:-1], w.shape[0]))
    return op


_op_f32, _op_q8, _op_q4 = _opaque(_linear_f32), _opaque(_linear_q8), _opaque(_linear_q4)


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., k) @ w (n, k)^T -> (..., n), all float32. Made for 1-16 rows of x."""
    if _compiling():
        return _op_f32(x, w)
    lib = _library()
    if lib is not None and _plain_f32(x) and _plain_f32(w) and w.dim() == 2 and x.shape[-1] == w.shape[1]:
        # A decode step makes ~200 of these calls: the common case is checked in ~1 us, not ~15 (torch.empty's
        # fastest form, the attributes that build no objects).
        n = w.shape[0]
        y = torch.empty(*x.shape[:-1], n)
        lib.llk_linear_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // w.shape[1], w.shape[1], n)
        return y
    _check("linear_f32", "w", w, torch.float32, (None, None))
    _check_x("linear_f32", x, w.shape[1])
    return _linear_f32(x, w)


def _plain_f32(t: torch.Tensor) -> bool:
    return _plain(t, torch.float32)


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype is dtype and t.is_cpu and t.is_contiguous() and t.numel() > 0


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., k) float32 @ (q * scale)^T -> (..., n): q int8 (n, k), scale float32 (n,) per output
    row or (n, groups) per run of k // groups columns (a multiple of 32)."""
    lib = None if _compiling() else _library()
    if lib is not None and _plain_f32(x) and _plain_f32(scale) and _plain(q, torch.int8):
        # The common case checked in ~1 us (as linear_f32): a decode step makes ~100 of these calls.
        n, k = q.shape
        groups = scale.shape[1] if scale.dim() == 2 else 1
        if x.shape[-1] == k and scale.shape[0] == n and scale.dim() <= 2 and (groups == 1 or k % (groups * BLOCK) == 0):
            return _call(lib.llk_linear_q8, x, n, q.data_ptr(), scale.data_ptr(), groups)
    _check("linear_q8", "q", q, torch.int8, (None, None))
    _check_scale("linear_q8", scale, *q.shape)
    _check_x("linear_q8", x, q.shape[1])
    return (_op_q8 if _compiling() else _linear_q8)(x, q, scale)


def linear_q4(x: torch.Tensor, w: Q4Weight) -> torch.Tensor:
    """x (..., k) float32 @ dequantize_q4(w)^T -> (..., n)."""
    lib = None if _compiling() else _library()
    qs, d, m = w.qs, w.d, w.m
    if lib is not None and _plain_f32(x) and _plain(qs, torch.uint8) and _plain(d, torch.float16) and _plain(m, torch.float16):
        n, k = qs.shape[0], 2 * qs.shape[1]  # as linear_q8's fast path
        if d.dim() == 2 and d.shape == m.shape and d.shape[0] == n and x.shape[-1] == k and k % (d.shape[1] * BLOCK) == 0:
            return _call(lib.llk_linear_q4, x, n, qs.data_ptr(), d.data_ptr(), m.data_ptr(), d.shape[1])
    _check_q4("linear_q4", w)
    _check_x("linear_q4", x, w.shape[1])
    return (_op_q4 if _compiling() else _linear_q4)(x, w.qs, w.d, w.m)
