"""Hugging Face Llama folders (config.json + safetensors or pytorch_model*.bin) to and from Meta's names.

Hugging Face's LlamaForCausalLM rotates the two halves of each head (rotate_half) where Meta
rotates interleaved (even, odd) pairs, so its q and k projection rows are permuted within each
head: Meta's rows (2i, 2i+1) are its rows (i, i + head_dim/2). The conversions undo and redo
exactly that permutation (with n_kv_heads heads for k); every other weight is only renamed.
"""

import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from llama.args import LLAMA3_ROPE_SCALING, CheckpointError, ffn_hidden_dim
from llama.checkpoints.meta import read_json_object
from llama.checkpoints.safetensors import SafetensorsFile, write_file
from llama.checkpoints.tensors import (
    MetaTensors,
    Progress,
    TensorSpec,
    check_shapes,
    ordered_params,
    solve_ffn,
)

ARCHITECTURE = "LlamaForCausalLM"

_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
_META_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Older checkpoints saved the RoPE table as a buffer; both models compute it themselves.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_WEIGHT_FILES = "model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"


# --- names and the RoPE row permutation ---


def meta_name(hf_name: str) -> Optional[str]:
    """Meta's state_dict key for a Hugging Face Llama weight name, None if it is not one."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _HF_LAYER.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def hf_name(meta_key: str) -> str:
    """Hugging Face's weight name for one of Meta's state_dict keys."""
    if meta_key in _META_TOP_NAMES:
        return _META_TOP_NAMES[meta_key]
    match = _META_LAYER.fullmatch(meta_key)
    if match and match.group(2) in _META_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_META_LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"{meta_key!r} is not a Llama weight")


def from_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q/k rows -> Meta's: row i + half*j of a head (j = 0, 1) becomes row 2i + j."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows -> Hugging Face's (the inverse of from_rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(key: str, params: Dict[str, Any]) -> Optional[int]:
    """Heads to permute this weight by: n_heads for wq, n_kv_heads for wk, None otherwise."""
    if key.endswith("attention.wq.weight"):
        return params["n_heads"]
    if key.endswith("attention.wk.weight"):
        return params.get("n_kv_heads") or params["n_heads"]
    return None


# --- config.json <-> params.json ---


def read_config(folder: Path) -> Dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face model folder needs it beside the weights")
    return read_json_object(path)


def params_from_config(config: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """params.json values (vocab_size positive) for a Llama config.json; refuses what our model does not implement.

    Raises CheckpointError naming the config field, its value and what is supported.
    """

    def refuse(field: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} = {value!r}: {why}")

    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if model_type is not None and model_type != "llama":
        raise refuse("model_type", model_type, "only Llama models (model_type 'llama') can be converted")
    if architectures is not None and (not isinstance(architectures, list) or any(a != ARCHITECTURE for a in architectures)):
        raise refuse("architectures", architectures, f"only {ARCHITECTURE} can be converted")
    if model_type is None and architectures is None:
        raise CheckpointError(f"{path} names neither model_type nor architectures; is it a Llama config.json?")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise refuse(field, config[field], "Meta's Llama has no biases; this model cannot be converted")
    if config.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", config["hidden_act"], "Meta's Llama uses silu (SwiGLU)")
    if config.get("sliding_window") is not None:
        raise refuse("sliding_window", config["sliding_window"], "Meta's Llama attends to the whole context")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"], dict) else None
        raise refuse("quantization_config", method, "quantized Hugging Face weights are not supported; use the bf16/fp16/fp32 model")

    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; a Llama config.json has them")
    check_config_values(config, path)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if dim % n_heads or (dim // n_heads) % 2:
        raise refuse("num_attention_heads", n_heads, f"hidden_size {dim} must split into heads of an even size")
    if n_heads % n_kv_heads:
        raise refuse("num_key_value_heads", n_kv_heads, f"must divide num_attention_heads ({n_heads})")
    if config.get("head_dim") is not None and config["head_dim"] != dim // n_heads:
        raise refuse("head_dim", config["head_dim"], f"Meta's Llama uses hidden_size / num_attention_heads = {dim // n_heads}")

    theta, use_scaled_rope = _rope_settings(config, path)
    multiple_of, ffn_dim_multiplier = solve_ffn(dim, config["intermediate_size"])
    return ordered_params(
        {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "vocab_size": config["vocab_size"],
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": ffn_dim_multiplier,
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": theta,
            "use_scaled_rope": use_scaled_rope,
        }
    )


def _positive_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# config.json field -> (check, what it must be); the fields params_from_config reads.
_CONFIG_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "hidden_size": (_positive_integer, "a positive integer"),
    "intermediate_size": (_positive_integer, "a positive integer"),
    "num_hidden_layers": (_positive_integer, "a positive integer"),
    "num_attention_heads": (_positive_integer, "a positive integer"),
    "num_key_value_heads": (lambda v: v is None or _positive_integer(v), "a positive integer, or null"),
    "head_dim": (lambda v: v is None or _positive_integer(v), "a positive integer, or null"),
    "vocab_size": (_positive_integer, "a positive integer"),
    "rms_norm_eps": (_positive_number, "a positive number"),
    "rope_theta": (_positive_number, "a positive number"),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "an object, or null"),
    "rope_parameters": (lambda v: v is None or isinstance(v, dict), "an object, or null"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
}


def check_config_values(config: Dict[str, Any], path: Path) -> None:
    """The one check of a config.json's values: each field read has its type and range (a
    string "4096" is refused, not converted). Raises CheckpointError naming path, field and value."""
    for field, (check, expected) in _CONFIG_RULES.items():
        if field in config and not check(config[field]):
            raise CheckpointError(f"{path}: {field} = {config[field]!r}: must be {expected}; correct it, or download config.json again")
    for field in ("rope_scaling", "rope_parameters"):
        theta = (config.get(field) or {}).get("rope_theta")
        if theta is not None and not _positive_number(theta):
            raise CheckpointError(f"{path}: {field} rope_theta = {theta!r}: must be a positive number")


def _rope_settings(config: Dict[str, Any], path: Path) -> Tuple[float, bool]:
    """(rope_theta, use_scaled_rope) from transformers 4's rope_theta/rope_scaling or 5's rope_parameters."""
    field = "rope_parameters" if isinstance(config.get("rope_parameters"), dict) else "rope_scaling"
    scaling = config.get(field) or {}
    theta = float(scaling.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, False
    if kind != "llama3":
        raise CheckpointError(
            f"{path}: {field} rope_type = {kind!r}: only the default RoPE and Llama 3.1's 'llama3' scaling are implemented"
        )
    seen = {k: scaling.get(k) for k in LLAMA3_ROPE_SCALING}
    if any(not _positive_number(seen[k]) or float(seen[k]) != v for k, v in LLAMA3_ROPE_SCALING.items()):
        raise CheckpointError(
            f"{path}: {field} {seen} differs from the llama3 scaling this model implements {LLAMA3_ROPE_SCALING}; "
            "these weights would give different results here"
        )
    return theta, True


def config_from_params(
    params: Dict[str, Any], tied: bool, dtype: torch.dtype, context_length: int, special_ids: Dict[str, int]
) -> Dict[str, Any]:
    """A transformers LlamaConfig (config.json) for params.json values with a positive vocab_size."""
    dim, n_heads = params["dim"], params["n_heads"]
    config: Dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,
        "vocab_size": params["vocab_size"],
        "rms_norm_eps": params["norm_eps"],
        "rope_theta": params["rope_theta"],
        "rope_scaling": {"rope_type": "llama3", **LLAMA3_ROPE_SCALING} if params.get("use_scaled_rope") else None,
        "max_position_embeddings": context_length,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }
    return config


# --- weight files ---


class HFWeights:
    """The weight files of a Hugging Face folder, by tensor name; tensors are memory-mapped on access."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._specs: Dict[str, TensorSpec] = {}
        self._files: Dict[str, Path] = {}
        self._safetensors: Dict[Path, SafetensorsFile] = {}
        self._bins: Dict[Path, Dict[str, torch.Tensor]] = {}
        for path, names in self._locate():
            if path.suffix == ".safetensors":
                f = self._safetensors[path] = SafetensorsFile(path)
                available = {name: f.spec(name) for name in f.keys()}
            else:
                sd = self._bins[path] = _load_bin(path)
                available = {name: (t.dtype, tuple(t.shape)) for name, t in sd.items()}
            wanted = names if names is not None else list(available)
            absent = [n for n in wanted if n not in available]
            if absent:
                raise CheckpointError(f"{path} lacks {absent[:3]}, which the index file places in it; download it again")
            for name in wanted:
                self._specs[name], self._files[name] = available[name], path

    def _locate(self) -> List[Tuple[Path, Optional[List[str]]]]:
        """(file, names the index places in it, or None for all) in the order of preference."""
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index} is not an index file with a weight_map ({e}); download it again") from e
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index}: weight_map should map tensor names to files, got {weight_map!r:.80}; download it again")
                by_file: Dict[str, List[str]] = {}
                for name, file in weight_map.items():
                    _check_index_entry(index, name, file)
                    by_file.setdefault(file, []).append(name)
                missing = [f for f in by_file if not (self.folder / f).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists {missing[:3]}, which are not in {self.folder}; is the download complete?")
                return [(self.folder / f, names) for f, names in by_file.items()]
            if (self.folder / single).is_file():
                return [(self.folder / single, None)]
        raise CheckpointError(f"no weights found in {self.folder}: expected {_WEIGHT_FILES}")

    def names(self) -> List[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path in self._safetensors:
            return self._safetensors[path].get(name)
        return self._bins[path][name]


def _check_index_entry(index: Path, name: str, file: Any) -> None:
    """An index places tensors in files of its own folder: a path that leaves it (`../x`, `/x`) is refused.

    Checked on the name, not the resolved path: the Hugging Face cache links a snapshot's files
    to blobs outside the folder, and that is fine.
    """
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise CheckpointError(
            f"{index} places {name!r} in {file!r}, which is not a file inside {index.parent}; "
            "an index names the model folder's own weight files: download it again"
        )


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    """A pytorch_model*.bin state_dict, memory-mapped, with no pickle code run."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot memory-map {path}: it is not a zip-format torch.save file (torch >= 1.6); "
            "use the model's .safetensors files, or re-save the weights with a recent torch"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors, which could run code") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; download it again") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors")
    return sd


# --- reading and writing ---


def read_hf_as_meta(folder: Path) -> Tuple[Dict[str, Any], MetaTensors]:
    """params.json values and Meta-named full tensors of a Hugging Face Llama folder.

    Raises CheckpointError for a config our model does not implement, missing or unknown weights,
    and shapes that do not match the config.
    """
    config = read_config(folder)
    params = params_from_config(config, folder / "config.json")
    weights = HFWeights(folder)
    names: Dict[str, str] = {}
    unknown = []
    for name in weights.names():
        key = meta_name(name)
        if key is not None:
            names[key] = name
        elif not _IGNORED.fullmatch(name):
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{folder}: weights that a Llama model does not have, e.g. {unknown[:3]}; is it a plain {ARCHITECTURE}?")
    if config.get("tie_word_embeddings", False):
        names.pop("output.weight", None)  # a saved lm_head is the embedding itself
    specs = {key: weights.spec(name) for key, name in names.items()}
    check_shapes(params, specs, str(folder), lambda key: names.get(key) or hf_name(key), "config.json num_hidden_layers")

    def load(key: str) -> torch.Tensor:
        tensor = weights.get(names[key])
        heads = _rope_heads(key, params)
        return tensor if heads is None else from_rotate_half(tensor, heads)

    return params, MetaTensors(specs, load, str(folder))


def write_hf_weights(params: Dict[str, Any], tensors: MetaTensors, path: Path) -> None:
    """Write tensors under Hugging Face's names (q/k rows permuted) as one safetensors file, tensor by tensor."""
    specs = {hf_name(key): tensors.spec(key) for key in tensors}
    progress = Progress(path.name, len(specs))

    def produce() -> Iterator[Tuple[str, torch.Tensor]]:
        for key in tensors:
            heads = _rope_heads(key, params)
            yield hf_name(key), tensors[key] if heads is None else to_rotate_half(tensors[key], heads)
            progress.step()

    # transformers refuses safetensors files whose metadata does not say which framework wrote them.
    write_file(path, specs, produce(), metadata={"format": "pt"})
    progress.done()
