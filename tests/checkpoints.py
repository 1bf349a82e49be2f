"""Tiny checkpoints written exactly as Meta ships them: params.json + consolidated.NN.pth shards."""

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from llama.args import ModelArgs
from llama.checkpoints.meta import shard_dim

# Small enough for a 2-core CI, big enough to have grouped-query attention and two layers.
TINY_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5}


def ffn_hidden_dim(args: ModelArgs) -> int:
    """The SwiGLU width Meta's FeedForward derives from dim, multiple_of and ffn_dim_multiplier."""
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state_dict with Meta's keys and random weights of a plausible scale."""
    g = torch.Generator().manual_seed(seed)
    head_dim = args.dim // args.n_heads
    n_kv = args.n_kv_heads or args.n_heads
    hidden = ffn_hidden_dim(args)

    def w(*shape: int, scale: Optional[float] = None) -> torch.Tensor:
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": w(args.vocab_size, args.dim, scale=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(args.n_heads * head_dim, args.dim)
        sd[p + "attention.wk.weight"] = w(n_kv * head_dim, args.dim)
        sd[p + "attention.wv.weight"] = w(n_kv * head_dim, args.dim)
        sd[p + "attention.wo.weight"] = w(args.dim, args.n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = w(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, args.dim)
        sd[p + "attention_norm.weight"] = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype)
        sd[p + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype)
    sd["norm.weight"] = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype)
    sd["output.weight"] = w(args.vocab_size, args.dim)
    return sd


def write_checkpoint(
    folder: Path,
    params: dict,
    state_dict: Dict[str, torch.Tensor],
    n_shards: int = 1,
    vocab_parallel_embedding: bool = True,
    extra: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Write params.json and n_shards consolidated.NN.pth files cut as Meta cuts them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {}
        for key, tensor in state_dict.items():
            dim = shard_dim(key, vocab_parallel_embedding)
            shard[key] = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank].clone()
        shard.update(extra or {})
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder
