"""The Llama transformer, with the state_dict keys and numerics of Meta's reference model.py.

Linear layers and embeddings are fairscale's model-parallel layers, so that each process of a
torchrun job holds the slice of the weights its consolidated.NN.pth shard carries.
"""

import math
import mmap
from typing import Callable, Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ParallelEmbedding, VocabParallelEmbedding
from torch import nn

from llama.args import LLAMA3_ROPE_SCALING, ModelArgs, swiglu_width
from llama.kernels.decode import DecodeLayers
from llama.layers.decode_step import native_decode
from llama.layers.linear import (
    DECODE_ROWS,
    ColumnParallelLinear,
    RowParallelLinear,
    SeparateColumns,
    is_compiling,
    native_products,
)
from llama.runtime.distributed import itemsize

__all__ = [
    "Attention", "FeedForward", "ModelArgs", "RMSNorm", "Transformer", "TransformerBlock", "apply_rotary_emb",
    "apply_scaling", "precompute_freqs_cis", "repeat_kv", "reshape_for_broadcast",
]  # fmt: skip


def _skip_init(x: torch.Tensor) -> torch.Tensor:
    """Weight 'initializer' that does nothing: every weight is overwritten by the checkpoint."""
    return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def apply_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """Llama 3.1 long-context frequencies: long wavelengths slowed 8x, short ones kept,
    a smooth blend between (original context 8192, low/high frequency factors 1 and 4)."""
    scaling = LLAMA3_ROPE_SCALING
    scale_factor, low_freq_factor = scaling["factor"], scaling["low_freq_factor"]
    high_freq_factor, old_context_len = scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype, device=freqs.device)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False) -> torch.Tensor:
    """Rotations e^(i * t * freq) for positions t < end, as complex64: (end, dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if use_scaled:
        freqs = apply_scaling(freqs)
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (seqlen, head_dim // 2) -> (1, seqlen, 1, head_dim // 2)
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate interleaved (even, odd) pairs of q and k, Meta's RoPE layout, in float32.

    freqs_cis is (seqlen, head_dim // 2) for positions shared by the batch, or already
    (bs, 1, 1, head_dim // 2) when each row is at its own position. It may also be given as
    real (cos, sin) pairs, freqs_cis with a last dimension of 2: the same rotation in real
    arithmetic, which torch.compile can generate code for (it cannot for complex numbers).
    """
    if not freqs_cis.is_complex():
        return _rotate_real(xq, freqs_cis), _rotate_real(xk, freqs_cis)
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    if freqs_cis.ndim == 2:
        freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _rotate_real(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """(a + ib) * (cos + i sin) for each interleaved pair (a, b) of x; cos_sin (bs, 1, 1, head_dim // 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Meta's helper, for code that imports it: (bs, seqlen, n_kv_heads, head_dim) ->
    (bs, seqlen, n_kv_heads * n_rep, head_dim), each key/value head repeated for its query heads.
    Attention here shares each head with its n_rep query heads without making the copies."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        model_parallel_size = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = self.n_kv_heads // model_parallel_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads

        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_skip_init)
        self.wk = ColumnParallelLinear(args.dim, self.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_skip_init)
        self.wv = ColumnParallelLinear(args.dim, self.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_skip_init)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_skip_init)
        # wq, wk and wv read the same input: one call for the three, which llama.layers.compact
        # swaps for one fused product when the weights are compact.
        self.wqkv: nn.Module = SeparateColumns(self.wq, self.wk, self.wv)

        # The cache lives in the compute dtype on the compute device from the start (the caller
        # builds the model under that default device/dtype), so no conversion per forward. It is
        # laid out heads-first so that a head's cached keys are one strided block: attention
        # reads it in place, and each group of n_rep query heads shares its key/value head
        # instead of copying it n_rep times (Meta's repeat_kv).
        cache_shape = (args.max_batch_size, self.n_local_kv_heads, args.max_seq_len, self.head_dim)
        self.register_buffer("cache_k", _lazy_zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", _lazy_zeros(cache_shape), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        freqs_cis: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache_row: int = 0,
    ) -> torch.Tensor:
        """x (bs, seqlen, dim) at positions start_pos.. of cache rows cache_row..cache_row + bs.

        start_pos is an int shared by the batch (Meta's), or a (bs,) tensor of per-row positions
        for one token each; then mask (bs, 1, 1, cache_len) hides each row's future.
        """
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

        rows = slice(cache_row, cache_row + bsz)
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            self.cache_k[rows, :, start_pos:end] = xk.transpose(1, 2)
            self.cache_v[rows, :, start_pos:end] = xv.transpose(1, 2)
        else:
            end = mask.shape[-1]
            row_ids = torch.arange(cache_row, cache_row + bsz, device=x.device)
            self.cache_k[row_ids, :, start_pos] = xk[:, 0]
            self.cache_v[row_ids, :, start_pos] = xv[:, 0]
        keys = self.cache_k[rows, :, :end]  # (bs, n_local_kv_heads, cache_len + seqlen, head_dim)
        values = self.cache_v[rows, :, :end]

        # Query heads grouped by the key/value head they share: (bs, n_local_kv_heads, n_rep * seqlen, head_dim)
        xq = xq.view(bsz, seqlen, self.n_local_kv_heads, self.n_rep, self.head_dim).permute(0, 2, 3, 1, 4)
        xq = xq.reshape(bsz, self.n_local_kv_heads, self.n_rep * seqlen, self.head_dim)
        if mask is not None and mask.dim() == 2:
            mask = mask.repeat(self.n_rep, 1)  # (n_rep * seqlen, cache_len + seqlen), one copy per query head
        # softmax(q k^T / sqrt(head_dim) + mask) v, as Meta's; fused, as in Meta's llama-models code.
        if is_compiling():
            output = _attention_by_reductions(xq, keys, values, mask)
        else:
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask)
        output = output.view(bsz, self.n_local_kv_heads, self.n_rep, seqlen, self.head_dim).permute(0, 3, 1, 2, 4)
        return self.wo(output.reshape(bsz, seqlen, -1))


def _lazy_zeros(shape: Tuple[int, ...]) -> torch.Tensor:
    """torch.zeros(shape) in the default dtype and device; on the CPU backed by anonymous memory
    the OS maps as it is first written, so that a cache holds memory for the positions a
    generation reaches, not for max_seq_len (Llama 3 8B at 8192 positions: 4 GiB in fp32)."""
    dtype, device = torch.get_default_dtype(), torch.empty(0).device
    if device.type != "cpu":
        return torch.zeros(shape)
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape)
    memory = mmap.mmap(-1, count * itemsize(dtype))
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


def _attention_by_reductions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) v, in float32, written as broadcast products and
    sums, which torch.compile fuses into generated kernels: for a decode step's few query rows
    the fused SDPA kernel costs more in set-up than in work."""
    scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1)
    return (probs.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).type_as(q)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = swiglu_width(hidden_dim, multiple_of, ffn_dim_multiplier)

        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_skip_init)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_skip_init)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_skip_init)
        self.w13: nn.Module = SeparateColumns(self.w1, self.w3)  # as wqkv in Attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h3 = self.w13(x)
        return self.w2(F.silu(h1) * h3)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args)
        self.feed_forward = FeedForward(
            dim=args.dim, hidden_dim=4 * args.dim, multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier
        )
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: Union[int, torch.Tensor], freqs_cis: torch.Tensor, mask: Optional[torch.Tensor], cache_row: int = 0
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache_row)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, *, compile_decode: bool = False):
        """compile_decode: step() runs decode steps (one token per row at per-row positions) that
        do not run natively (llama.layers.decode_step) through torch.compile, compiled at the first such step with the batch size and the
        attended length symbolic, so that neither recompiles (a batch of one is specialized, so
        a first other batch size compiles once more)."""
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        if fs_init.get_model_parallel_world_size() == 1:
            # fairscale's embedding in a world of one, minus collectives torch.compile cannot trace.
            self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim, _weight=torch.empty(params.vocab_size, params.dim))
        else:
            embedding = VocabParallelEmbedding if params.vocab_parallel_embedding else ParallelEmbedding
            self.tok_embeddings = embedding(params.vocab_size, params.dim, init_method=_skip_init)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_skip_init)

        # Complex, so kept out of the buffers that Module.to(dtype) would cast.
        self.freqs_cis = precompute_freqs_cis(
            params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta, params.use_scaled_rope
        )
        self.freqs_cos_sin = torch.view_as_real(self.freqs_cis)  # the same numbers, for real arithmetic
        self._native: Union[None, bool, DecodeLayers] = None  # decided at the first decode step after a prefill
        self._compiled_decode: Optional[Callable[..., torch.Tensor]] = None
        if compile_decode:
            native_products()  # decided now: the compiled step must not trace the kernels' build check
            self._compiled_decode = torch.compile(self._decode_with_mask)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], *, cache_row: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """tokens (bsz, seqlen) at positions start_pos.. -> float32 logits (bsz, seqlen, vocab_size).

        Keys and values of these positions are written to cache rows cache_row..cache_row + bsz;
        earlier ones are read from them. start_pos may also be a (bsz,) tensor of per-row
        positions when seqlen is 1 (rows of a batch at different lengths). last_only: logits of
        the last position only (bsz, 1, vocab_size), all that sampling needs.
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        self._rope_to(h.device)

        mask = None
        if isinstance(start_pos, int):
            freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
            if seqlen > 1:
                mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
                mask = torch.triu(mask, diagonal=1)
                # Cached positions are all visible: (seqlen, start_pos + seqlen)
                mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)
        else:
            freqs_cis = self.freqs_cis[start_pos].view(bsz, 1, 1, -1)
            # Each row sees its cache up to its own position.
            mask = _row_mask(start_pos, int(start_pos.max()) + 1, h.dtype)
        return self._layers(h, start_pos, freqs_cis, mask, cache_row, last_only)

    def step(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], *, cache_row: int = 0, last_only: bool = True
    ) -> torch.Tensor:
        """forward for generation: a prefill (int start_pos) or a decode step (tokens (bsz, 1) at
        per-row positions, a (bsz,) tensor), compiled where the model was built to compile it.

        Logits as forward's, (bsz, seqlen or 1, vocab_size); a compiled decode step's equal them
        up to float rounding.
        """
        if isinstance(start_pos, int):
            self._native = None  # weights may have changed since the last generation: described anew
            return self.forward(tokens, start_pos, cache_row=cache_row, last_only=last_only)
        if self._native is None:
            self._native = native_decode(self) or False
        if self._native and tokens.shape[0] <= DECODE_ROWS:
            return self._native_step(self._native, tokens, start_pos, cache_row)
        if self._compiled_decode is not None:
            mask = _row_mask(start_pos, int(start_pos.max()) + 1, self.norm.weight.dtype)
            for t, dims in ((tokens, (0,)), (start_pos, (0,)), (mask, (0, 3))):
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
            return self._compiled_decode(tokens, start_pos, mask, cache_row)
        if bool((start_pos == start_pos[0]).all()):
            start_pos = int(start_pos[0])  # the whole batch at one position: Meta's path, no mask
        return self.forward(tokens, start_pos, cache_row=cache_row, last_only=last_only)

    @torch.inference_mode()
    def _native_step(self, layers: DecodeLayers, tokens: torch.Tensor, positions: torch.Tensor, cache_row: int) -> torch.Tensor:
        """A decode step with every layer in one native call (llama.layers.decode_step): Meta's
        arithmetic in float32 without ~25 torch operations per layer -> logits (bsz, 1, vocab_size)."""
        h = self.tok_embeddings(tokens).reshape(tokens.shape[0], -1).contiguous()
        h = layers(h, positions, cache_row)
        return self.output(self.norm(h[:, None])).float()

    @torch.no_grad()
    def _decode_with_mask(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache_row: int) -> torch.Tensor:
        """forward(tokens, positions) for one token per row in the form torch.compile compiles
        once for any batch size and length: RoPE in real arithmetic (no complex numbers), the
        attended length carried by mask's shape (bsz, 1, 1, cache_len), not read from positions
        on the host -> logits (bsz, 1, vocab_size)."""
        h = self.tok_embeddings(tokens)
        self._rope_to(h.device)
        freqs = self.freqs_cos_sin[positions][:, None, None]  # (bsz, 1, 1, head_dim // 2, 2)
        return self._layers(h, positions, freqs, mask, cache_row, True)

    def _rope_to(self, device: torch.device) -> None:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
            self.freqs_cos_sin = torch.view_as_real(self.freqs_cis)

    def _layers(
        self, h: torch.Tensor, start_pos: Union[int, torch.Tensor], freqs_cis: torch.Tensor, mask: Optional[torch.Tensor],
        cache_row: int, last_only: bool,
    ) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, cache_row)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return self.output(h).float()


def _row_mask(positions: torch.Tensor, cache_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(bsz, 1, 1, cache_len) additive mask: row i sees cached positions <= positions[i]."""
    keys = torch.arange(cache_len, device=positions.device)
    mask = torch.zeros(positions.shape[0], cache_len, device=positions.device, dtype=dtype)
    mask.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))
    return mask.view(positions.shape[0], 1, 1, cache_len)
