"""Compact weights' fused products, swapped into a loaded model: the model's code never asks.

With compact weights (bf16, int8, int4), a decode step's one-row products stream one large
weight faster than several small ones (2-8% of a decode step), so the layers that read the same
input (wq/wk/wv, w1/w3) multiply as one. Exact weights keep Meta's separate products, whose
bits a fused product need not reproduce. On the CPU the compact weights are then held in 2 MB pages
(runtime.host.HugePageArena), as the loader holds float weights: SmolLM2's int8 products streamed
~11% faster from them, its int4 ones ~4%, whole decode steps 1.02-1.04x (paired, 2-core Zen 5).
"""

from typing import Iterator, Optional, Sequence, Tuple

import torch

from llama.kernels import BLOCK
from llama.layers.linear import (
    ColumnParallelLinear,
    LocalProduct,
    SeparateColumns,
    compact_product,
    compiled_into_generated_code,
)
from llama.model import Transformer
from llama.runtime.host import HugePageArena, huge_page_arena, release_freed_memory


class FusedColumns(torch.nn.Module):
    """Column-parallel layers that read the same input, as one product over their concatenated
    compact weights -> each layer's output.

    The concatenated weight is a buffer outside the state_dict; the layers' weights become views
    of it, so that memory holds them once, under Meta's keys.
    """

    def __init__(self, layers: Sequence[ColumnParallelLinear], arena: Optional[HugePageArena] = None):
        super().__init__()
        self.sizes = [layer.weight.shape[0] for layer in layers]
        self.register_buffer("weight", _cat([layer.weight for layer in layers], arena), persistent=False)
        for name in ("weight_scale", "weight_min"):  # int8's scales, int4's d and m: one row per weight row
            parts = [getattr(layer, name) for layer in layers]
            self.register_buffer(name, None if parts[0] is None else _cat(parts, arena), persistent=False)
        for i, layer in enumerate(layers):
            layer.weight = torch.nn.Parameter(self.weight.split(self.sizes)[i], requires_grad=False)
            for name in ("weight_scale", "weight_min"):
                fused = getattr(self, name)
                setattr(layer, name, None if fused is None else fused.split(self.sizes)[i])
        self.separate = SeparateColumns(*layers)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if compiled_into_generated_code(self.weight, self.weight_scale):
            # Inductor does better on the separate products (SmolLM2 compiled bf16 decode: 63 tok/s
            # separate, 55 fused).
            return self.separate(x)
        return compact_product(x, self.weight, self.weight_scale, self.weight_min).split(self.sizes, dim=-1)


class Q8Embedding(torch.nn.Module):
    """An embedding kept as int8 values with a scale per block of 32 columns (a GGUF file's Q8_0
    blocks, as they are) whose looked-up rows are dequantized when used: the floats of the
    dequantized table, in a quarter of its memory (SmolLM2: 113 MB -> 30 MB). A tied output
    layer multiplies by the same blocks."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", q, persistent=False)  # (vocab, dim) int8
        self.register_buffer("scale", scale, persistent=False)  # (vocab, dim // 32) float32
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.q[tokens].float().unflatten(-1, (-1, BLOCK)) * self.scale[tokens][..., None]
        return rows.flatten(-2).to(self.dtype)


def _cat(parts: Sequence[torch.Tensor], arena: Optional[HugePageArena]) -> torch.Tensor:
    if arena is None:
        return torch.cat(parts)
    return torch.cat(parts, out=arena.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), parts[0].dtype))


_STORED = ("weight", "weight_scale", "weight_min")


def _stored(module: LocalProduct) -> Iterator[torch.Tensor]:
    return (t for t in (getattr(module, name) for name in _STORED) if t is not None)


def _into_arena(module: LocalProduct, arena: HugePageArena) -> None:
    """A product's stored tensors copied into the arena (the originals freed with their last reference)."""
    for name in _STORED:
        t = getattr(module, name)
        if t is not None:
            copy = arena.copy(t)
            setattr(module, name, torch.nn.Parameter(copy, requires_grad=False) if name == "weight" else copy)


def fuse_projections(model: Transformer) -> None:
    """Swap each attention's wqkv and feed-forward's w13 (separate products of wq/wk/wv and
    w1/w3) for one fused product each, and on the CPU move every compact weight into 2 MB pages.
    For weights load_into stored in a compact format."""
    embedding = model.tok_embeddings
    # An output tied to a Q8 embedding shares its blocks, which the loader already put in 2 MB pages.
    tied = isinstance(embedding, Q8Embedding) and embedding.q.data_ptr() == model.output.weight.data_ptr()
    arena = None
    if model.output.weight.is_cpu:
        products = [m for m in model.modules() if isinstance(m, LocalProduct) and not (tied and m is model.output)]
        arena = huge_page_arena(HugePageArena.size_for(t.numel() * t.element_size() for m in products for t in _stored(m)))
    for layer in model.layers:
        attention, feed_forward = layer.attention, layer.feed_forward
        # After each copy its originals are handed back, not held until a later allocation reuses them.
        attention.wqkv = FusedColumns([attention.wq, attention.wk, attention.wv], arena)
        release_freed_memory()
        feed_forward.w13 = FusedColumns([feed_forward.w1, feed_forward.w3], arena)
        release_freed_memory()
        if arena is not None:
            for product in (attention.wo, feed_forward.w2):
                _into_arena(product, arena)
                release_freed_memory()
    if arena is not None and not tied:
        _into_arena(model.output, arena)
        release_freed_memory()
