"""fairscale's model-parallel linear layers, with a choice of how the local weight is stored.

The layers keep fairscale's parameters, sharding and collectives; only the product with the
local weight changes, so that a model can be loaded in a compact, lossy weight format:

- exact (None): weights in the compute dtype, Meta's numerics.
- "bf16": weights stored in bfloat16 (half of fp32's bytes), activations in the compute dtype.
  A decode step (a few rows) multiplies in bf16, which streams half the bytes. A prefill (many
  rows) multiplies in bf16 too where bf16 matrix products are fast (GPUs; CPUs with AMX or
  AVX512-BF16, where they outrun fp32 several times); elsewhere (AVX2 CPUs, where they run
  hundreds of times slower than fp32) it upcasts the weight.
- "int8": symmetric int8 per output channel with a float scale (a quarter of fp32's bytes). On
  the CPU a decode step uses torch's int8 weight-only kernel (activations rounded to bf16);
  elsewhere, and for a prefill, the weight is dequantized on the fly (to bf16 where bf16
  products are fast: int8 values are exact in bf16).
"""

import functools
from typing import Callable, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)

from llama import kernels

WEIGHT_FORMATS = ("bf16", "int8")

# Up to this many rows a product is bound by reading the weight (a decode step): use the compact
# weight as is. More rows (a prefill) are bound by arithmetic: compute in the activations' dtype.
DECODE_ROWS = 16


def check_weight_format(weight_format: Optional[str]) -> None:
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"unknown weight_format {weight_format!r}: use None (exact, Meta's numerics), 'bf16' or 'int8'"
        )


def pack_weight(weight: torch.Tensor, weight_format: str, device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A checkpoint weight (out, in) in the given format -> (stored weight, per-row scale or None)."""
    if weight_format == "bf16":
        return weight.to(device=device, dtype=torch.bfloat16), None
    w = weight.to(device=device, dtype=torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.lru_cache(maxsize=None)
def fast_bf16_products(device_type: str) -> bool:
    """Whether bf16 matrix products (many rows) are fast on this kind of device: CUDA GPUs, and
    CPUs whose oneDNN kernels use AMX or AVX512-BF16 instructions."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


_native: Optional[bool] = None


def native_products() -> bool:
    """Whether a decode step's products go through llama.kernels: built here with SIMD code
    (AVX2 or AVX-512). They read each weight row once for all of a step's rows, where MKL's fp32
    product costs several times one row's for 2-16 rows (and far more on a busy machine), and
    torch's int8 kernel runs below fp32 speed on AVX2 CPUs. Built with portable code only, or not
    at all, torch's own products stay faster. Decided once (Transformer.compile_decode asks
    before tracing, so that a compiled step reads the answer instead of tracing the build)."""
    global _native
    if _native is None:
        _native = kernels.isa() in ("avx2", "avx512")
    return _native


def _native_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= DECODE_ROWS and native_products()


class LocalProduct(torch.nn.Module):
    """x @ W.T with this process's slice of the weight, in whichever format it is stored.

    `weight_scale` (a buffer outside the state_dict) is set by checkpoint.load_into for int8.
    """

    weight: torch.Tensor
    weight_scale: Optional[torch.Tensor]

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        if scale is None and w.dtype == x.dtype:
            # Exact: Meta's product in the compute dtype (the kernel's fp32 sums round differently
            # from MKL's in the last bits: logits agree to ~1e-6).
            if x.dtype == torch.float32 and w.is_contiguous() and _native_rows(x):
                return kernels.linear_f32(x.contiguous(), w)
            return F.linear(x, w)
        return compact_product(x, w, scale)


def compact_product(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ W.T for a weight in a compact format: bf16 (scale None) or int8 with per-row scales."""
    rows = x.numel() // x.shape[-1]
    if scale is not None:
        if _native_rows(x):
            return kernels.linear_q8(x.float().contiguous(), w, scale).to(x.dtype)
        if rows <= DECODE_ROWS and x.device.type == "cpu":
            y = _int8_decode(x.reshape(rows, -1).to(torch.bfloat16), w, scale)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        if fast_bf16_products(x.device.type):
            return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).to(x.dtype) * scale.to(x.dtype)
        return F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
    if rows == 1 and x.device.type == "cpu":
        # bf16 F.linear sets up a oneDNN matrix product per call; torch.mv streams a one-row
        # product up to twice as fast (1.3x decoding on the 1B shape).
        mv = _mv if is_compiling() and w.numel() >= _OPAQUE_MV_NUMEL else torch.mv
        return mv(w, x.reshape(-1).to(w.dtype)).to(x.dtype).view(*x.shape[:-1], -1)
    if rows <= DECODE_ROWS or fast_bf16_products(x.device.type):
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    return F.linear(x, w.to(x.dtype))


# torch.compiler.is_compiling is torch 2.3+; older versions keep it in torch._dynamo.
is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def _opaque(name: str, fake: Callable[..., torch.Tensor]) -> Callable:
    """Make a function an op that torch.compile calls as it is instead of generating code for it
    (custom ops: torch 2.4+; `fake` gives the output's shape). Used only while compiling: eagerly
    the op costs a Python dispatch per call."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if not hasattr(torch.library, "custom_op"):
            return fn
        op = torch.library.custom_op(f"llama::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return wrap


@_opaque("int8_product", lambda x, w, scale: x.new_empty(x.shape[0], w.shape[0]))
def _int8_product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 weight-only kernel: torch.compile cannot lower it inline."""
    return torch._weight_int8pack_mm(x, w, scale)


@_opaque("mv", lambda w, x: x.new_empty(w.shape[0]))
def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv: torch.compile would generate a reduction that streams a large bf16 weight at
    0.6-0.85x the speed of torch's kernel (on small ones the call's dispatch costs more)."""
    return torch.mv(w, x)


# From this many weight elements a compiled one-row bf16 product calls torch.mv (see _mv).
_OPAQUE_MV_NUMEL = 1 << 22


# torch's int8 weight-only CPU kernel streams rows of 4096+ int8 values about 1.4x faster than
# rows of 1024-3072 (torch 2.13 on a Xeon, its AVX512 and its AVX2 code alike: 20 vs 14 GB/s
# with AVX512); folding does not pay for 2+ activation rows.
_INT8_FAST_ROW = 4096


def _int8_fold(n: int, k: int) -> int:
    """How many rows of an (n, k) int8 weight to lay side by side for one activation row: 1, 2 or 4."""
    fold = 1
    while fold < 4 and k >= 1024 and fold * k < _INT8_FAST_ROW and n % (2 * fold) == 0:
        fold *= 2
    return fold


def _int8_decode(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (rows, k) bf16 times an int8 weight (n, k) with per-row float scales -> (rows, n).

    One row with short weight rows goes through the kernel folded: the weight viewed as
    (n / fold, fold * k) (no copy) against `fold` block-diagonal copies of x, so that entry
    (i, j) of the product is weight row j * fold + i times x; the scales then apply in float.
    """
    product = _int8_product if is_compiling() else torch._weight_int8pack_mm
    (n, k), rows = w.shape, x.shape[0]
    fold = _int8_fold(n, k) if rows == 1 else 1
    if fold == 1:
        return product(x, w, scale.to(torch.bfloat16))
    ones = torch.ones(n // fold, dtype=torch.bfloat16, device=x.device)
    y = product(torch.block_diag(*[x] * fold), w.view(n // fold, fold * k), ones)
    return y.t().reshape(1, n) * scale


class ColumnParallelLinear(LocalProduct, fs_layers.ColumnParallelLinear):
    """fairscale's ColumnParallelLinear (inference only: no bias, no backward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _untouched_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_product(x)
        return gather_from_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(LocalProduct, fs_layers.RowParallelLinear):
    """fairscale's RowParallelLinear (inference only: no bias, no backward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _untouched_weight(self)
        # A world of one has nothing to add up: skip the collective's call overhead every step.
        self.reduce = fs_init.get_model_parallel_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_model_parallel_region(x)
        y = self.local_product(x)
        return reduce_from_model_parallel_region(y) if self.reduce else y


class FusedColumns(torch.nn.Module):
    """Column-parallel layers that read the same input (wq/wk/wv, w1/w3) as one product.

    For compact weights: their one-row products stream one large weight faster than several
    small ones (2-8% of a decode step). Exact mode keeps Meta's separate products, whose bits a
    fused product need not reproduce. The layers' weights become views of the concatenated
    weight (a buffer outside the state_dict), so memory holds them once under Meta's keys.
    """

    def __init__(self, layers: Sequence[ColumnParallelLinear]):
        super().__init__()
        self.sizes = [layer.weight.shape[0] for layer in layers]
        self.register_buffer("weight", torch.cat([layer.weight for layer in layers]), persistent=False)
        scales = [layer.weight_scale for layer in layers]
        scale = None if scales[0] is None else torch.cat(scales)
        self.register_buffer("weight_scale", scale, persistent=False)
        part_scales = [None] * len(layers) if scale is None else scale.split(self.sizes)
        for layer, part, part_scale in zip(layers, self.weight.split(self.sizes), part_scales):
            layer.weight = torch.nn.Parameter(part, requires_grad=False)
            layer.weight_scale = part_scale

    def pays(self) -> bool:
        """Whether to multiply fused: always eagerly. Compiled, not where inductor generates the
        products' code (one-row bf16 over small weights): it does better on the separate ones
        (SmolLM2 compiled bf16 decode 63 tok/s separate, 55 fused)."""
        return not (is_compiling() and self.weight_scale is None and self.weight.numel() < _OPAQUE_MV_NUMEL)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return compact_product(x, self.weight, self.weight_scale).split(self.sizes, dim=-1)


def _untouched_weight(layer: LocalProduct) -> None:
    """Replace the weight fairscale just filled (with more than one process it copies a slice of
    an uninitialized master weight into it) by untouched memory, and add the int8 scale slot.

    The checkpoint overwrites every weight, so this keeps the garbage copy from adding a whole
    shard to the resident memory before loading.
    """
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight), requires_grad=False)
    layer.register_buffer("weight_scale", None, persistent=False)
