"""The model's and the sampler's arguments, and the rules that follow from them.

ModelArgs and the checks of params.json; the shape rules every reader and writer of weights
shares (the FFN width, Llama 3.1's RoPE scaling, what each tokenizer family leaves out of
params.json); the checks of the sampling settings. No torch here: command-line programs check
their flags before anything heavy is imported.
"""

import logging
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder or shard (params.json included) that cannot be used, with what to do
    about it."""


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # Llama 2 ships -1: filled from the tokenizer
    multiple_of: int = 256  # make SwiGLU hidden layer size multiple of large power of 2
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 / 3.2 long-context RoPE frequencies
    # Llama 3 shards tok_embeddings along the vocabulary, Llama 2 along the model dimension.
    vocab_parallel_embedding: bool = True

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: Dict[str, Any], source: str = "params.json", **overrides: Any) -> "ModelArgs":
        """Build from a params.json dict read from `source` (named in errors), then apply overrides.

        Keys this version does not know are logged and ignored. Raises CheckpointError, naming
        source, field and value, for a missing shape field or a value of the wrong type or range
        (see check_params).
        """
        check_params(params, source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            logger.debug("%s: ignoring keys this version does not use: %s", source, unknown)
        return cls(**{**{k: v for k, v in params.items() if k in known}, **overrides})


# Every params.json Meta ships (Llama 1, 2, 3, 3.1, 3.2, Code Llama) names these: the defaults
# above are one model's, and a file without them would build some other model without a word.
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_integer(value: Any) -> bool:
    return _integer(value) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# field -> (check, what the field must be)
_PARAM_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "dim": (_positive_integer, "a positive integer"),
    "n_layers": (_positive_integer, "a positive integer"),
    "n_heads": (_positive_integer, "a positive integer"),
    "n_kv_heads": (_optional(_positive_integer), "a positive integer, or null (as many as n_heads)"),
    "vocab_size": (lambda v: _integer(v) and (v > 0 or v == -1), "a positive integer, or -1 (taken from the tokenizer)"),
    "multiple_of": (_positive_integer, "a positive integer"),
    "ffn_dim_multiplier": (_optional(_positive_number), "a positive number, or null"),
    "norm_eps": (_positive_number, "a positive number"),
    "rope_theta": (_positive_number, "a positive number"),
    "use_scaled_rope": (lambda v: isinstance(v, bool), "true or false"),
    "vocab_parallel_embedding": (lambda v: isinstance(v, bool), "true or false"),
    "max_batch_size": (_positive_integer, "a positive integer"),
    "max_seq_len": (_positive_integer, "a positive integer"),
}


def check_params(params: Dict[str, Any], source: str = "params.json") -> None:
    """The one check of params.json values: the shape fields are there, every known field has its
    type and range, and the heads split evenly. Raises CheckpointError naming source, field and value."""

    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field} = {params[field]!r}: {why}; correct it, or download params.json again")

    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise CheckpointError(
            f"{source} lacks {', '.join(missing)}: a params.json names the model's shape "
            f"({', '.join(REQUIRED_PARAMS)}); download it again with the weights"
        )
    for field, (check, expected) in _PARAM_RULES.items():
        if field in params and not check(params[field]):
            raise refuse(field, f"must be {expected}")
    dim, n_heads = params["dim"], params["n_heads"]
    if dim % n_heads or (dim // n_heads) % 2:
        raise refuse("n_heads", f"dim {dim} must split into n_heads heads of an even size (RoPE rotates pairs)")
    n_kv_heads = params.get("n_kv_heads")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise refuse("n_kv_heads", f"must divide n_heads ({n_heads}): each key/value head serves a whole group of query heads")


# --- shape rules: what a params.json means, for the model and every reader and writer of weights ---

# What Meta's params.json files leave out, decided by the tokenizer family.
FAMILY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama2": {"rope_theta": 10000.0, "vocab_parallel_embedding": False},
    "llama3": {"rope_theta": 500000.0, "vocab_parallel_embedding": True},
    # Byte-level BPE vocabularies of converted models (SmolLM2...): their params.json names
    # rope_theta; the embedding is split by vocabulary like the (often tied) output.
    "chatml": {"rope_theta": 10000.0, "vocab_parallel_embedding": True},
    "bpe": {"rope_theta": 10000.0, "vocab_parallel_embedding": True},
}

# Llama 3.1's long-context RoPE (use_scaled_rope), in the names Hugging Face configs use; a
# config with other values would need other frequencies.
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def swiglu_width(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FeedForward(dim, hidden_dim, ...) width: 2/3 of hidden_dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The FFN width of a model with these params.json values (its blocks pass hidden_dim = 4 * dim)."""
    return swiglu_width(4 * dim, multiple_of, ffn_dim_multiplier)


# --- sampling settings, checked in one place for every entry point ---


def check_sampling_args(temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    """Refuse sampling settings that torch would fail on deep inside, or silently misread.

    temperature: a finite number >= 0 (0 means greedy); top_p: a number in (0, 1]; max_gen_len:
    an integer >= 0, or None (the caller's default). Raises TypeError for a value of the wrong
    type (a string, a bool), ValueError for one out of range (NaN and infinity included).
    """
    _check_number("temperature", temperature, ">= 0 (0 means greedy)", lambda v: v >= 0)
    _check_number("top_p", top_p, "in (0, 1]", lambda v: 0 < v <= 1)
    if max_gen_len is None:
        return
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, numbers.Integral):
        raise TypeError(f"max_gen_len must be an integer >= 0 (a number of tokens), got {max_gen_len!r} ({type(max_gen_len).__name__})")
    if max_gen_len < 0:
        raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")


def _check_number(name: str, value: object, expected: str, in_range: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    if not in_range(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
