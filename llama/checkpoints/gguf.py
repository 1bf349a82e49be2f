"""llama.cpp GGUF files of Llama-architecture models, read as params.json values and Meta-named tensors.

Hyper-parameters come from the `llama.*` metadata; tensors are memory-mapped from the file (its
header read by llama.checkpoints.gguf_metadata, not the `gguf` package's reader, which holds tens
of MB of numpy objects for the vocabulary) and dequantized one at a time with
`gguf.quants.dequantize`. llama.cpp keeps q/k
in Meta's interleaved RoPE layout, so no rows are permuted. GGUF lists a tensor's dimensions
fastest-varying first (ne0 = row length), the reverse of torch's shape.

`gguf` is an optional dependency (`pip install -e ".[demo]"`), imported only when a GGUF is read.
"""

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from llama.args import CheckpointError, check_params
from llama.checkpoints.gguf_metadata import TensorInfo, read_gguf_header
from llama.checkpoints.tensors import MetaTensors, TensorSpec, check_shapes, ordered_params, solve_ffn
from llama.model import apply_scaling

_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}
_LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors in this tensor.
ROPE_FREQS = "rope_freqs.weight"

# Quantizations whose blocks (32 columns each) a compact weight format takes as they are (blocks()).
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_NUMPY_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}  # BF16 stays raw bytes: numpy has none
_REQUIRED = object()


def import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install -e '.[demo]' (or pip install gguf)") from e
    return gguf


def meta_name(gguf_name: str) -> Optional[str]:
    """Meta's state_dict key for a llama.cpp tensor name, None if it is not a Llama weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def gguf_name(meta_key: str) -> str:
    for theirs, ours in _TOP_NAMES.items():
        if ours == meta_key:
            return theirs
    match = _META_LAYER.fullmatch(meta_key)
    if match:
        for theirs, ours in _LAYER_NAMES.items():
            if ours == match.group(2):
                return f"blk.{match.group(1)}.{theirs}"
    return meta_key


def read_gguf_as_meta(path: Path) -> Tuple[Dict[str, Any], MetaTensors]:
    """params.json values and Meta-named full tensors of a Llama GGUF file.

    Float tensors keep their dtype (F32, F16, BF16); quantized ones are dequantized to float32,
    and their raw blocks of KEPT_TYPES are also offered as they are (MetaTensors.blocks).
    Raises CheckpointError for another architecture, settings our model does not implement,
    unknown tensors or a quantization type the gguf package cannot dequantize.
    """
    gguf = import_gguf()
    try:
        header = read_gguf_header(path, prefix=("general.", "llama."))  # not the tokenizer's arrays
        file = np.memmap(path, mode="c")  # copy-on-write: torch gets writable arrays, the file stays untouched
        tensors = {name: _Tensor(gguf, info, file) for name, info in header.tensors.items()}
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"cannot read {path} as a GGUF file: {e}; is the download complete?") from e

    def field(key: str, default: Any = _REQUIRED) -> Any:
        if key not in header.metadata:
            if default is _REQUIRED:
                raise CheckpointError(f"{path} lacks the metadata {key!r}, which a Llama GGUF file has")
            return default
        return header.metadata[key]

    architecture = field("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{path}: general.architecture = {architecture!r}; only 'llama' GGUF files can be converted")
    params = _params(path, field, header.array_lengths.get("tokenizer.ggml.tokens"), tensors)

    names: Dict[str, str] = {}
    unknown = []
    for name in tensors:
        key = meta_name(name)
        if key is not None:
            names[key] = name
        elif name != ROPE_FREQS:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{path}: tensors that a Llama model does not have, e.g. {unknown[:3]}")
    _check_types(gguf, path, [tensors[n] for n in names.values()])
    specs: Dict[str, TensorSpec] = {}
    for key, name in names.items():
        t = tensors[name]
        specs[key] = (_FLOAT_TYPES.get(t.kind, torch.float32), t.shape)
    check_shapes(params, specs, str(path), lambda key: names.get(key) or gguf_name(key), "llama.block_count")

    def load(key: str) -> torch.Tensor:
        return _to_torch(gguf, tensors[names[key]], specs[key][1])

    def blocks(key: str) -> Optional[Tuple[str, Any]]:
        # Block rows are weight rows: llama.cpp's q/k rows are already in Meta's order (no
        # permutation here), so the blocks are the weight as Meta's model reads it.
        t = tensors[names[key]]
        return (t.kind, t.data) if t.kind in KEPT_TYPES and t.data.ndim == 2 else None

    return params, MetaTensors(specs, load, str(path), blocks)


class _Tensor:
    """A tensor of the file, its bytes memory-mapped: `data` is what the gguf package's reader gives,
    a float array shaped as torch's shape, or for a quantization the raw blocks (rows, row_bytes)."""

    def __init__(self, gguf, info: TensorInfo, file: np.ndarray):
        qtype = gguf.GGMLQuantizationType(info.type_id)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        self.name, self.qtype, self.kind = info.name, qtype, qtype.name
        self.shape = tuple(int(d) for d in reversed(info.dims))  # torch's order: slowest-varying first
        row_bytes = info.dims[0] // block * block_bytes
        rows = int(np.prod(info.dims[1:], dtype=np.int64))
        raw = file[info.file_offset : info.file_offset + rows * row_bytes]
        if len(raw) < rows * row_bytes:
            raise ValueError(f"tensor {info.name} runs past the end of the file")
        float_dtype = _NUMPY_FLOATS.get(self.kind)
        self.data = raw.view(float_dtype).reshape(self.shape) if float_dtype else raw.reshape(*self.shape[:-1], row_bytes)


def _params(path: Path, field, token_count: Optional[int], tensors: Dict[str, Any]) -> Dict[str, Any]:
    def refuse(key: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key} = {value!r}: {why}")

    experts = field("llama.expert_count", 0)
    if experts:
        raise refuse("llama.expert_count", experts, "mixture-of-experts models are not Meta's Llama")
    dim = int(field("llama.embedding_length"))
    n_heads = field("llama.attention.head_count")
    n_kv_heads = field("llama.attention.head_count_kv", n_heads)
    for key, value in (("llama.attention.head_count", n_heads), ("llama.attention.head_count_kv", n_kv_heads)):
        if not isinstance(value, int):
            raise refuse(key, value, "a different head count per layer is not Meta's Llama")
        if value < 1:
            raise refuse(key, value, "must be a positive number of heads")
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise refuse("llama.attention.head_count", n_heads, f"with embedding_length {dim} and head_count_kv {n_kv_heads} the heads do not split evenly")
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        value = field(key, head_dim)
        if value != head_dim:
            raise refuse(key, value, f"Meta's Llama uses embedding_length / head_count = {head_dim}")
    scaling = field("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise refuse("llama.rope.scaling.type", scaling, "only unscaled RoPE and Llama 3.1's scaling (rope_freqs) are implemented")

    theta = _float32(field("llama.rope.freq_base", 10000.0))
    vocab_size = field("llama.vocab_size", None)
    if vocab_size is None:
        vocab_size = token_count or tensors["token_embd.weight"].shape[0]
    multiple_of, ffn_dim_multiplier = solve_ffn(dim, int(field("llama.feed_forward_length")))
    params = ordered_params(
        {
            "dim": dim,
            "n_layers": int(field("llama.block_count")),
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "vocab_size": int(vocab_size),
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": ffn_dim_multiplier,
            "norm_eps": _float32(field("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "use_scaled_rope": _uses_llama31_scaling(path, tensors.get(ROPE_FREQS), head_dim, theta),
        }
    )
    check_params(params, f"{path} (llama.* metadata as params.json)")
    return params


def llama31_rope_divisors(head_dim: int, theta: float) -> torch.Tensor:
    """What llama.cpp's rope_freqs tensor holds for Llama 3.1's scaling: each RoPE frequency
    divided by its scaled value (llama/model.py's apply_scaling)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return freqs / apply_scaling(freqs)


def _uses_llama31_scaling(path: Path, rope_freqs: Any, head_dim: int, theta: float) -> bool:
    """Whether rope_freqs (if any) holds exactly the divisors of llama/model.py's apply_scaling."""
    if rope_freqs is None:
        return False
    expected = llama31_rope_divisors(head_dim, theta)
    seen = torch.from_numpy(rope_freqs.data.astype("float32")).reshape(-1)
    if seen.shape != expected.shape or not torch.allclose(seen, expected, rtol=1e-4):
        raise CheckpointError(
            f"{path}: {ROPE_FREQS} holds RoPE scaling factors other than Llama 3.1's (factor 8, low 1, high 4, "
            "original context 8192), which is the only scaling implemented here"
        )
    return True


def _check_types(gguf, path: Path, tensors) -> None:
    """Every tensor is a float type or a quantization the gguf package dequantizes (tried on one row)."""
    tried = set()
    for t in tensors:
        kind = t.qtype
        if t.kind in _FLOAT_TYPES or kind in tried:
            continue
        try:
            gguf.quants.dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], kind)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path}: tensor {t.name} has type {t.kind}, which the installed gguf package cannot dequantize ({e}); "
                "use a file with another quantization (e.g. Q8_0, Q4_K, Q6_K, F16) or upgrade gguf"
            ) from e
        tried.add(kind)


def _to_torch(gguf, t: _Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    if t.kind == "BF16":  # raw bytes: numpy has no bfloat16
        return torch.from_numpy(t.data.reshape(-1)).view(torch.bfloat16).reshape(shape)
    if t.kind in _FLOAT_TYPES:
        return torch.from_numpy(t.data).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.qtype)).reshape(shape)


def _float32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the value that was meant."""
    return float(str(np.float32(value)))
