"""Model hyper-parameters, read from a checkpoint's params.json."""

import logging
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)


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
    def from_params(cls, params: Dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a params.json dict; keys this version does not know are logged and ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            logger.debug("params.json: ignoring keys this version does not use: %s", unknown)
        return cls(**{**{k: v for k, v in params.items() if k in known}, **overrides})
