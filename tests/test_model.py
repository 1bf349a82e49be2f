"""The Transformer: Meta's state_dict keys, the same numbers as an independent implementation, the KV cache."""

import math
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_PARAMS, ffn_hidden_dim, random_state_dict

import llama.model
from llama.args import ModelArgs
from llama.model import Transformer, _attention_by_reductions, apply_rotary_emb, precompute_freqs_cis
from llama.runtime.distributed import default_device_and_dtype

VOCAB = 512


def tiny_model(compile_decode: bool = False, **overrides) -> Transformer:
    args = ModelArgs.from_params(TINY_PARAMS, **{"vocab_size": VOCAB, "max_seq_len": 64, "max_batch_size": 3, "rope_theta": 10000.0, **overrides})
    with default_device_and_dtype(torch.device("cpu"), torch.float32):
        model = Transformer(args, compile_decode=compile_decode)
    model.load_state_dict(random_state_dict(args), assign=True)
    return model


def hf_model(model: Transformer):
    """The same weights in transformers' LlamaForCausalLM, whose RoPE rotates halves, not pairs."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e '.[test]'")
    args = model.params
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=2 * args.max_seq_len,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()

    def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        # Meta pairs rows (2i, 2i+1) of each head; HF pairs (i, i + head_dim/2).
        return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = model.state_dict()
    hf_sd = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hf_sd[theirs + "self_attn.q_proj.weight"] = to_rotate_half(sd[ours + "attention.wq.weight"], args.n_heads)
        hf_sd[theirs + "self_attn.k_proj.weight"] = to_rotate_half(sd[ours + "attention.wk.weight"], args.n_kv_heads)
        hf_sd[theirs + "self_attn.v_proj.weight"] = sd[ours + "attention.wv.weight"]
        hf_sd[theirs + "self_attn.o_proj.weight"] = sd[ours + "attention.wo.weight"]
        hf_sd[theirs + "mlp.gate_proj.weight"] = sd[ours + "feed_forward.w1.weight"]
        hf_sd[theirs + "mlp.down_proj.weight"] = sd[ours + "feed_forward.w2.weight"]
        hf_sd[theirs + "mlp.up_proj.weight"] = sd[ours + "feed_forward.w3.weight"]
        hf_sd[theirs + "input_layernorm.weight"] = sd[ours + "attention_norm.weight"]
        hf_sd[theirs + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
    hf.load_state_dict(hf_sd, strict=True)
    return hf


def test_state_dict_keys_are_metas(model_parallel):
    model = tiny_model()
    per_layer = [
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight",
    ]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{k}" for i in range(model.params.n_layers) for k in per_layer}
    assert set(model.state_dict()) == expected


def test_forward_matches_transformers_llama(model_parallel):
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(model)(tokens).logits
    actual = model.forward(tokens, 0)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_cached_decode_equals_full_recompute(model_parallel):
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    full = model.forward(tokens, 0)
    pieces = [model.forward(tokens[:, :7], 0)]
    pieces += [model.forward(tokens[:, pos : pos + 1], pos) for pos in range(7, 12)]
    pieces.append(model.forward(tokens[:, 12:], 12))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_their_own_positions_equal_each_row_alone(model_parallel):
    model = tiny_model()
    lengths = [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    alone = [model.forward(tokens[i : i + 1, : n + 1], 0)[0, -1] for i, n in enumerate(lengths)]
    for i, n in enumerate(lengths):
        model.forward(tokens[i : i + 1, :n], 0, cache_row=i)
    positions = torch.tensor(lengths)
    together = model.forward(tokens[torch.arange(3), positions][:, None], positions)
    torch.testing.assert_close(together[:, 0], torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_static_shape_decode_gives_forward_logits(model_parallel, monkeypatch):
    # The step compile_decode compiles, run eagerly: its static-shape form (real RoPE, mask) alone,
    # on a model whose decode steps would otherwise run natively.
    monkeypatch.setattr(torch, "compile", lambda step: step)
    monkeypatch.setattr(llama.model, "native_decode", lambda model: None)
    model = tiny_model(compile_decode=True)
    lengths = [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(4))
    for i, n in enumerate(lengths):
        model.forward(tokens[i : i + 1, :n], 0, cache_row=i)
    for step in range(2):
        positions = torch.tensor(lengths) + step
        step_tokens = tokens[torch.arange(3), positions][:, None]
        decoded = model.step(step_tokens, positions)
        # forward writes the same keys and values to the cache again: same state for the next step.
        torch.testing.assert_close(decoded, model.forward(step_tokens, positions), atol=1e-5, rtol=1e-5)


def test_rotation_in_real_arithmetic_equals_the_complex_one():
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16)
    freqs_cis = precompute_freqs_cis(16, 32)[torch.tensor([3, 17])].view(2, 1, 1, -1)
    complex_q, complex_k = apply_rotary_emb(q, k, freqs_cis)
    real_q, real_k = apply_rotary_emb(q, k, torch.view_as_real(freqs_cis))
    torch.testing.assert_close(real_q, complex_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(real_k, complex_k, atol=1e-6, rtol=1e-6)


def test_compiled_steps_attention_by_reductions_equals_sdpa():
    # The compiled decode step's attention: 2 rows, 2 key/value heads shared by 3 query heads each.
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.zeros(2, 1, 1, 7)
    mask[0, ..., 4:] = float("-inf")  # row 0 sees 4 positions, row 1 all 7
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attention_by_reductions(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's resident memory from /proc")
def test_the_kv_cache_holds_memory_only_for_positions_written(model_parallel):
    before = _resident_mb()
    model = tiny_model(max_seq_len=32768)  # caches: 2 layers x 2 x 3 x 2 x 32768 x 16 floats = 48 MB
    grown = _resident_mb() - before
    assert grown < 16, f"building the model took {grown:.0f} MB"
    cache = model.layers[0].attention.cache_k
    assert cache.shape == (3, 2, 32768, 16) and not cache[:, :, :4].any()
    model.forward(torch.tensor([[1, 2, 3]]), 0)
    assert cache[0, :, :3].any() and not cache[0, :, 3:].any()


def test_last_only_logits_are_the_last_position(model_parallel):
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    full = model.forward(tokens, 0)
    last = model.forward(tokens, 0, last_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_rope_frequencies_follow_the_formula():
    dim, end, theta = 16, 5, 10000.0
    freqs = precompute_freqs_cis(dim, end, theta)
    for t in range(end):
        for i in range(dim // 2):
            angle = t / theta ** (2 * i / dim)
            assert freqs[t, i].real.item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert freqs[t, i].imag.item() == pytest.approx(math.sin(angle), abs=1e-5)


def test_scaled_rope_frequencies_follow_llama31_formula():
    dim, theta = 128, 500000.0
    scaled = torch.angle(precompute_freqs_cis(dim, 2, theta, use_scaled=True)[1]).double()
    for i, got in enumerate(scaled.tolist()):
        freq = 1.0 / theta ** (2 * i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:  # high frequencies: unchanged
            want = freq
        elif wavelen > 8192 / 1:  # low frequencies: slowed by the factor 8
            want = freq / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * freq / 8 + smooth * freq
        assert got == pytest.approx(want, rel=1e-5)
    unscaled = torch.angle(precompute_freqs_cis(dim, 2, theta)[1]).double()
    assert unscaled[0] == scaled[0] and unscaled[-1] / scaled[-1] == pytest.approx(8, rel=1e-5)
