"""Meta's side of a conversion: params.json values, full tensors under Meta's names, Meta folders.

Every source (a Hugging Face folder, a GGUF file, a Meta folder) is read as a params.json dict
plus a MetaTensors mapping: full, unsharded tensors under Meta's state_dict names, each read from
the source (memory-mapped) and converted only when it is accessed. Writers go through it one
tensor at a time, so memory stays near the largest tensor plus one output shard.
"""

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from llama.args import FAMILY_DEFAULTS, CheckpointError, ModelArgs, ffn_hidden_dim
from llama.checkpoints.meta import (
    IGNORED_KEYS,
    TOKENIZER_FILES,
    check_model_parallel_size,
    checkpoint_paths,
    load_shard,
    read_params,
    resharded_state_dict,
    shard_dim,
    unexpected_weights_error,
    vocab_parallel_layout,
)
from llama.tokenizer import Tokenizer

TensorSpec = Tuple[torch.dtype, Tuple[int, ...]]

# The order of Meta's own params.json files.
PARAMS_ORDER = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "rope_theta", "use_scaled_rope",
)  # fmt: skip


class MetaTensors(Mapping):
    """Full (unsharded) tensors under Meta's names, read from the source when accessed.

    `spec(key)` gives (dtype, shape) without reading anything. Each access reads (and for
    quantized GGUF tensors dequantizes) the tensor again; take `dict(tensors)` to keep them.
    `blocks(key)` gives a quantized tensor's own blocks instead: (GGUF type name, the raw bytes
    as a uint8 array (rows, row_bytes)), or None for a float tensor or a source without blocks.
    """

    def __init__(
        self,
        specs: Dict[str, TensorSpec],
        load: Callable[[str], torch.Tensor],
        source: str,
        blocks: Optional[Callable[[str], Optional[Tuple[str, Any]]]] = None,
    ):
        self._specs = specs
        self._load = load
        self._blocks = blocks
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._specs:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs  # Mapping's own would read the tensor

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def blocks(self, key: str) -> Optional[Tuple[str, Any]]:
        if key not in self._specs:
            raise KeyError(key)
        return None if self._blocks is None else self._blocks(key)

    @property
    def tied(self) -> bool:
        """The output projection is the embedding (no output.weight); the loader ties them."""
        return "output.weight" not in self._specs


# --- params ---


def solve_ffn(dim: int, hidden_dim: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FeedForward formula gives exactly hidden_dim.

    Prefers what Meta's own params.json files look like: multiple_of 256 and no multiplier, then
    a multiplier with as few decimals as possible.
    """
    if dim < 1 or hidden_dim < 1:
        raise CheckpointError(f"cannot express an FFN width of {hidden_dim} for dim {dim}: both must be positive")
    divisors = [2**k for k in range(int(math.log2(hidden_dim)), -1, -1) if hidden_dim % 2**k == 0]
    no_multiplier = [m for m in divisors if m <= 256]  # a larger multiple_of alone would be an odd way to say it
    with_multiplier = sorted(divisors, key=lambda m: (m < 256, abs(math.log2(m) - 8)))
    for m in no_multiplier:
        if ffn_hidden_dim(dim, m, None) == hidden_dim:
            return m, None
    base = int(2 * (4 * dim) / 3)
    for decimals in range(1, 8):
        multiplier = round(hidden_dim / base, decimals)
        for m in with_multiplier:
            if ffn_hidden_dim(dim, m, multiplier) == hidden_dim:
                return m, multiplier
    for multiplier in ((hidden_dim + 0.5) / base, hidden_dim / base):  # multiple_of 1: int() must land exactly
        if ffn_hidden_dim(dim, 1, multiplier) == hidden_dim:
            return 1, multiplier
    raise CheckpointError(f"no multiple_of/ffn_dim_multiplier gives an FFN width of {hidden_dim} for dim {dim}")


def ordered_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """params in Meta's key order, without the keys that are None (Meta's files leave them out)."""
    known = [k for k in PARAMS_ORDER if params.get(k) is not None]
    return {k: params[k] for k in known + sorted(k for k in params if k not in PARAMS_ORDER and params[k] is not None)}


def params_json_for(params: Dict[str, Any], vocab_parallel_embedding: bool) -> Dict[str, Any]:
    """What params.json says for this layout; a Llama 2 layout is written as Meta's Llama 2 files are.

    Meta's Llama 2 params.json has vocab_size -1 (the tokenizer gives it), no rope_theta (fixed at
    10000) and no use_scaled_rope, and their reference code rejects keys it does not know. The -1
    is also how tools that see one shard (llama-reshard) know the embedding is split along dim 1.
    """
    out = dict(params)
    if not out.get("use_scaled_rope"):
        out.pop("use_scaled_rope", None)
    if not vocab_parallel_embedding:
        out["vocab_size"] = -1
        if out.get("rope_theta") == 10000.0:
            del out["rope_theta"]
    return ordered_params(out)


def expected_shapes(params: Dict[str, Any], tied: bool) -> Dict[str, Tuple[int, ...]]:
    """Meta's full (unsharded) state_dict shapes for params (with a positive vocab_size)."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    hidden = ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    per_layer = {
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv_heads * head_dim, dim),
        "attention.wv.weight": (n_kv_heads * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    shapes = {"tok_embeddings.weight": (params["vocab_size"], dim)}
    for i in range(params["n_layers"]):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["norm.weight"] = (dim,)
    if not tied:
        shapes["output.weight"] = (params["vocab_size"], dim)
    return shapes


def check_shapes(
    params: Dict[str, Any], specs: Dict[str, TensorSpec], source: str, names: Callable[[str], str], layers_field: str = "n_layers"
) -> None:
    """Every tensor Meta's model needs is there with the shape params implies, and no other;
    names(key) is the source's name, layers_field the source's name for n_layers."""
    tied = "output.weight" not in specs
    expected = expected_shapes(params, tied)
    extra = [k for k in specs if k not in expected]
    if extra:
        raise unexpected_weights_error(source, extra, params["n_layers"], layers_field, names)
    missing = [names(k) for k in expected if k not in specs]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} weight(s) a Llama model with {params['n_layers']} layers needs, "
            f"e.g. {missing[:3]}; the weights are incomplete or do not belong to this config"
        )
    wrong = [f"{names(k)}: {list(specs[k][1])}, expected {list(v)}" for k, v in expected.items() if tuple(specs[k][1]) != v]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match the model's parameters: " + "; ".join(wrong[:3]))


# --- Meta folders ---


class MetaFolder(NamedTuple):
    params: Dict[str, Any]  # params.json as written
    shards: List[Dict[str, torch.Tensor]]  # memory-mapped: only what is used is read
    vocab_parallel: bool  # the embedding is split by vocabulary (Llama 3), not by model dimension
    defaults: Dict[str, Any]  # what the folder's tokenizer family leaves out of params.json


def open_meta_folder(src: Path) -> MetaFolder:
    """A Meta folder's params.json, shards, embedding split and family defaults (its tokenizer read once)."""
    paths = checkpoint_paths(str(src))
    params = read_params(str(src))
    shards = [load_shard(p) for p in paths]
    embedding = shards[0].get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{paths[0]} has no tok_embeddings.weight; is it a Meta consolidated.NN.pth shard?")
    defaults = family_defaults(src, params)
    family_says = defaults.get("vocab_parallel_embedding", True)
    return MetaFolder(params, shards, vocab_parallel_layout(embedding.shape, len(paths), params, family_says), defaults)


def read_meta_folder(src: Path) -> Tuple[Dict[str, Any], MetaTensors, bool]:
    """params (vocab_size and rope_theta filled in), full tensors and whether the embedding is vocab-split.

    Several shards are merged tensor by tensor from their memory maps.
    """
    params, shards, vocab_parallel, defaults = open_meta_folder(src)

    def merged(key: str) -> torch.Tensor:
        return resharded_state_dict([{key: s[key]} for s in shards], 0, 1, vocab_parallel)[key]

    specs: Dict[str, TensorSpec] = {}
    for key, first in shards[0].items():
        if key in IGNORED_KEYS:
            continue
        dim = shard_dim(key, vocab_parallel)
        shape = list(first.shape)
        if dim is not None:
            shape[dim] *= len(shards)
        specs[key] = (first.dtype, tuple(shape))
    full = {**params}
    full["vocab_size"] = specs["tok_embeddings.weight"][1][0]
    full.setdefault("rope_theta", defaults.get("rope_theta", 500000.0))
    full.setdefault("multiple_of", ModelArgs.multiple_of)
    check_shapes(full, specs, str(src), str, f"{src / 'params.json'} n_layers")
    return ordered_params(full), MetaTensors(specs, merged, str(src)), vocab_parallel


def family_defaults(folder: Path, params: Dict[str, Any]) -> Dict[str, Any]:
    """The values params.json leaves to the tokenizer family (llama.args.FAMILY_DEFAULTS).

    The folder's tokenizer file tells the family; without one, vocab_size -1 marks Llama 2, as in Meta's files.
    """
    tokenizers = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if tokenizers:
        family = tokenizer_family(tokenizers[0])
    else:
        family = "llama2" if params.get("vocab_size", -1) <= 0 else "llama3"
    return FAMILY_DEFAULTS.get(family, {})


def tokenizer_family(path: Path) -> Optional[str]:
    """The family llama.tokenizer.Tokenizer reads this file as, None if it cannot read it."""
    try:
        return Tokenizer(str(path)).family
    except ValueError:
        return None


def vocab_parallel_for(tokenizer_path: Optional[Path]) -> bool:
    """How Meta's shards of this tokenizer family split tok_embeddings (by vocabulary unless the family says otherwise)."""
    if tokenizer_path is None:
        return True
    family = tokenizer_family(tokenizer_path)
    return FAMILY_DEFAULTS.get(family, {}).get("vocab_parallel_embedding", True)


def write_meta_shards(
    tensors: MetaTensors,
    out: Path,
    model_parallel_size: int,
    vocab_parallel_embedding: bool,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write consolidated.NN.pth shards cut as Meta cuts them, one shard at a time.

    Every shard re-reads its slices of the source through the memory map, so memory stays near
    one output shard plus the largest (converted) tensor.
    """
    keys = list(tensors)
    for rank in range(model_parallel_size):
        name = f"consolidated.{rank:02d}.pth"
        shard: Dict[str, torch.Tensor] = {}
        progress = Progress(f"{name} ({rank + 1}/{model_parallel_size})", len(keys))
        for key in keys:
            full = tensors[key]
            if dtype is not None:
                full = full.to(dtype)
            dim = shard_dim(key, vocab_parallel_embedding)
            piece = full if dim is None else full.chunk(model_parallel_size, dim=dim)[rank]
            shard[key] = _compact(piece)
            del full, piece
            progress.step()
        if tensors.tied and model_parallel_size > 1 and not vocab_parallel_embedding:
            # The loader ties output to the embedding only when their slices have the same shape,
            # which a model-dimension split breaks: store this shard's rows of the output instead.
            embedding = tensors["tok_embeddings.weight"]
            shard["output.weight"] = _compact(
                (embedding if dtype is None else embedding.to(dtype)).chunk(model_parallel_size, dim=0)[rank]
            )
        torch.save(shard, out / name)
        del shard
        progress.done()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t with storage of exactly its own bytes: torch.save writes a view's whole storage."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def write_params(out: Path, params: Dict[str, Any]) -> None:
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")


def check_parallel_split(params: Dict[str, Any], vocab_parallel_embedding: bool, model_parallel_size: int, source: str) -> None:
    """model_parallel_size keeps whole heads and equal embedding slices in each shard; else the error lists the sizes that do."""
    split_size = params["vocab_size"] if vocab_parallel_embedding else params["dim"]
    n_heads = params["n_heads"]
    check_model_parallel_size(n_heads, params.get("n_kv_heads") or n_heads, split_size, model_parallel_size, source)


class Progress:
    """`llama-convert: <what> 12/291 tensors` on one terminal line, then one line per finished file."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.count = what, total, 0
        self._live = sys.stderr.isatty()
        self._start = time.time()

    def step(self) -> None:
        self.count += 1
        if self._live:
            print(f"\rllama-convert: {self.what} {self.count}/{self.total} tensors", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        start = "\r" if self._live else ""
        elapsed = time.time() - self._start
        print(f"{start}llama-convert: wrote {self.what}, {self.total} tensors ({elapsed:.1f} s)", file=sys.stderr, flush=True)
