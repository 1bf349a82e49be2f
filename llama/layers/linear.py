"""fairscale's model-parallel linear layers, with a choice of how the local weight is stored.

The layers keep fairscale's parameters, sharding and collectives; only the product with the
local weight changes, so that a model can be loaded in a compact, lossy weight format:

- exact (None): weights in the compute dtype, Meta's numerics.
- "bf16": weights stored in bfloat16 (half of fp32's bytes), activations in the compute dtype.
  A decode step (a few rows) multiplies in bf16, which streams half the bytes. A prefill (many
  rows) multiplies in bf16 too where bf16 matrix products are fast (GPUs; CPUs with AMX or
  AVX512-BF16, where they outrun fp32 several times); elsewhere (AVX2 CPUs, where they run
  hundreds of times slower than fp32) it upcasts the weight.
- "int8": symmetric int8 with a float scale per block of 32 columns, as GGUF Q8_0 (9/32 of
  fp32's bytes; per output row where the columns do not split into 32s). On the CPU a decode
  step multiplies through llama.kernels.linear_q8 (activations rounded to int8 per block too);
  elsewhere, and for a prefill, the weight is dequantized on the fly (to bf16 where bf16
  products are fast). A GGUF file's Q8_0 weights are kept as they are.
- "int4": 4 bits per weight, asymmetric per group of 32 columns of a row (fp16 scale d and min
  m, value = d * q + m, as GGUF Q4_1; about 5 bits a weight with the scales). A GGUF file's
  Q4_0/Q4_1 weights are taken as they are, its Q8_0 ones as int8 blocks. A decode step on the
  CPU multiplies through llama.kernels.linear_q4; a prefill, and any product on a GPU,
  dequantizes the weight per product (to bf16 where bf16 products are fast).

Compact formats are load-time only: such a model's state_dict holds the stored parts (int4:
the packed nibbles as `weight`), which a later load_state_dict cannot take back.
"""

import functools
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)

import llama.kernels as kernels
from llama.kernels import Q4Weight

WEIGHT_FORMATS = ("bf16", "int8", "int4")

# Columns per int4 group: GGUF's block, and what the CPU kernels are made for. A process's slice
# of a row-parallel weight must hold whole groups.
INT4_GROUP = kernels.BLOCK
# Columns per int8 scale, as GGUF Q8_0. One scale per output row gave SmolLM2 +0.70% perplexity
# through decode steps (whose kernels round the activations to int8 too), one per 32 columns +0.39%,
# for 12.5% more bytes read; weights whose rows do not split into 32s keep one per row.
INT8_GROUP = kernels.BLOCK

# Rows quantized at a time: bounds the float temporaries of packing a large weight (an
# embedding-sized output projection) to a few MB instead of several copies of the weight.
_PACK_ROWS = 4096

# Up to this many rows a product is bound by reading the weight (a decode step): use the compact
# weight as is. More rows (a prefill) are bound by arithmetic: compute in the activations' dtype.
DECODE_ROWS = 16


def check_weight_format(weight_format: Optional[str]) -> None:
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"unknown weight_format {weight_format!r}: use None (exact, Meta's numerics), 'bf16', 'int8' or 'int4'"
        )


def check_int4_columns(in_features: Dict[str, int], model_parallel_size: int) -> None:
    """Every process's slice of every linear weight holds whole int4 groups. in_features maps a
    layer's name to the input columns one process holds (a row-parallel weight's share)."""
    for name, columns in in_features.items():
        if columns % INT4_GROUP:
            whole = columns * model_parallel_size
            held = f"{columns} of its {whole} input columns on each of {model_parallel_size} processes" if model_parallel_size > 1 else f"{columns} input columns"
            raise ValueError(
                f"weight_format 'int4' quantizes groups of {INT4_GROUP} columns, but {name} has {held}, "
                f"not a multiple of {INT4_GROUP}: use a model_parallel_size that leaves whole groups to each process "
                "(fewer processes), or weight_format 'int8' or 'bf16'"
            )


Packed = Union[torch.Tensor, Q4Weight]


def pack_weight(weight: torch.Tensor, weight_format: str, device: torch.device) -> Tuple[Packed, Optional[torch.Tensor]]:
    """A checkpoint weight (out, in) in the given format -> (stored weight, per-row scale or None).

    "bf16": (bf16 weight, None); "int8": (int8 weight, float32 scales per INT8_GROUP columns, or per
    row where they do not divide the row); "int4": (Q4Weight with groups of INT4_GROUP columns,
    None: the Q4Weight holds its scales). Quantized a few
    thousand rows at a time, so that packing never holds more than a slice in float32.
    """
    if weight_format == "bf16":
        return weight.to(device=device, dtype=torch.bfloat16), None
    n, k = weight.shape
    if weight_format == "int4":
        if k % INT4_GROUP:
            raise ValueError(f"weight_format 'int4': a weight with {k} columns does not split into groups of {INT4_GROUP}")
        q = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
        d = torch.empty(n, k // INT4_GROUP, dtype=torch.float16, device=device)
        m = torch.empty_like(d)
        for rows, chunk in _row_chunks(weight, device):
            part = kernels.quantize_q4(chunk, INT4_GROUP)
            q[rows], d[rows], m[rows] = part.qs, part.d, part.m
        return Q4Weight(q, d, m), None
    group = INT8_GROUP if k % INT8_GROUP == 0 else None
    q = torch.empty(n, k, dtype=torch.int8, device=device)
    scale = torch.empty((n,) if group is None else (n, k // group), dtype=torch.float32, device=device)
    for rows, chunk in _row_chunks(weight, device):
        q[rows], scale[rows] = kernels.quantize_q8(chunk, group)
    return q, scale


def _row_chunks(weight: torch.Tensor, device: torch.device) -> Iterator[Tuple[slice, torch.Tensor]]:
    """(rows, those rows in float32 on device), _PACK_ROWS at a time."""
    for i in range(0, weight.shape[0], _PACK_ROWS):
        rows = slice(i, min(i + _PACK_ROWS, weight.shape[0]))
        yield rows, weight[rows].to(device=device, dtype=torch.float32)


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
    at all, torch's own products stay faster. Decided once (Transformer(compile_decode=True) asks
    before tracing, so that a compiled step reads the answer instead of tracing the build)."""
    global _native
    if _native is None:
        _native = kernels.isa() in ("avx2", "avx512")
    return _native


def few_rows_on_kernels(layer: "LocalProduct") -> bool:
    """Whether this layer's products of a decode step (up to DECODE_ROWS rows on the CPU) run on
    llama.kernels: exact fp32, int8 and 4-bit weights do; bf16 weights use torch's."""
    return layer.weight.device.type == "cpu" and native_products() and (
        layer.weight_scale is not None or layer.weight.dtype == torch.float32
    )


def _native_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= DECODE_ROWS and native_products()


class LocalProduct(torch.nn.Module):
    """x @ W.T with this process's slice of the weight, in whichever format it is stored.

    checkpoint.load_into sets the stored parts (store): `weight`, and buffers outside the
    state_dict: `weight_scale` (int8: float32 per block of 32 columns, as GGUF Q8_0, or per row
    where k is not a multiple of 32; int4: fp16 d per group) and `weight_min` (int4: fp16 m per group).
    """

    weight: torch.Tensor
    weight_scale: Optional[torch.Tensor]
    weight_min: Optional[torch.Tensor]

    def store(self, stored: Packed, scale: Optional[torch.Tensor] = None) -> None:
        """Hold a packed weight (pack_weight's result, or GGUF blocks) in place of the weight."""
        if isinstance(stored, Q4Weight):
            stored, scale, minimum = stored.qs, stored.d, stored.m
        else:
            minimum = None
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.weight_scale, self.weight_min = scale, minimum

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        if scale is None and w.dtype == x.dtype:
            # Exact: Meta's product in the compute dtype (the kernel's fp32 sums round differently
            # from MKL's in the last bits: logits agree to ~1e-6).
            if x.dtype == torch.float32 and w.is_contiguous() and _native_rows(x):
                return kernels.linear_f32(x.contiguous(), w)
            return F.linear(x, w)
        return compact_product(x, w, scale, self.weight_min)


def compact_product(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], minimum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W.T for a weight in a compact format: bf16 (scale None), int8 with per-row or
    per-block scales, or int4 (w the packed nibbles, scale and minimum its d and m per group)."""
    rows = x.numel() // x.shape[-1]
    if minimum is not None:
        return _int4_product(x, Q4Weight(w, scale, minimum), rows)
    if scale is not None and scale.dim() == 2:
        return _q8_block_product(x, w, scale, rows)
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


def _unpacked_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a weight is dequantized to for a prefill: bf16 on CPUs with fast bf16 products,
    else the activations' (a GPU's compute dtype; float32 on other CPUs)."""
    return torch.bfloat16 if x.device.type == "cpu" and fast_bf16_products("cpu") else x.dtype


def _int4_product(x: torch.Tensor, w: Q4Weight, rows: int) -> torch.Tensor:
    """A decode step on the CPU reads the nibbles once (llama.kernels, or its torch reference
    without a compiler); a prefill or a GPU dequantizes the weight for one matrix product.
    torch's own int4 kernels (_weight_int4pack_mm) want another packing and are not used."""
    if x.device.type == "cpu" and rows <= DECODE_ROWS:
        return kernels.linear_q4(x.float().contiguous(), w).to(x.dtype)
    dtype = _unpacked_dtype(x)
    return F.linear(x.to(dtype), kernels.dequantize_q4(w).to(dtype)).to(x.dtype)


def _q8_block_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """int8 with a scale per block of columns (GGUF Q8_0), as _int4_product."""
    if x.device.type == "cpu" and rows <= DECODE_ROWS:
        return kernels.linear_q8(x.float().contiguous(), q, scale).to(x.dtype)
    dtype = _unpacked_dtype(x)
    return F.linear(x.to(dtype), kernels.dequantize_q8(q, scale).to(dtype)).to(x.dtype)


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


def compiled_into_generated_code(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """Whether this product is being compiled into code that inductor generates (a bf16 weight
    below _OPAQUE_MV_NUMEL elements) rather than into a call of a kernel."""
    return is_compiling() and scale is None and weight.numel() < _OPAQUE_MV_NUMEL


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


class SeparateColumns(torch.nn.Module):
    """Column-parallel layers that read the same input (wq/wk/wv, w1/w3), each its own product:
    Meta's. llama.layers.compact swaps it for a fused product when the weights are compact.

    The layers stay their parent's children, under Meta's state_dict keys; this holds them
    outside the module tree, so that they are not listed twice.
    """

    def __init__(self, *layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


def _untouched_weight(layer: LocalProduct) -> None:
    """Replace the weight fairscale just filled (with more than one process it copies a slice of
    an uninitialized master weight into it) by untouched memory, and add the slots of the
    compact formats' scales.

    The checkpoint overwrites every weight, so this keeps the garbage copy from adding a whole
    shard to the resident memory before loading.
    """
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight), requires_grad=False)
    layer.register_buffer("weight_scale", None, persistent=False)
    layer.register_buffer("weight_min", None, persistent=False)
