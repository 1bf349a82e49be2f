"""Opt-in compact weight formats (Llama.build(weight_format=...)): smaller weights, close logits."""

import pytest
import torch
from checkpoints import TINY_PARAMS, write_checkpoint

import llama.layers.linear
from llama import Llama
from llama.kernels import Q4Weight, dequantize_q4, dequantize_q8
from llama.layers.linear import DECODE_ROWS, LocalProduct

PROMPT_ROWS = DECODE_ROWS + 8  # long enough to take the prefill path


@pytest.fixture(scope="module", params=["bf16", "int8", "int4"])
def compact(request, llama3_ckpt, llama3_tokenizer_path) -> Llama:
    return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2, weight_format=request.param)


def linear_weights(generator: Llama, output: bool = True):
    """The linear layers' weights, with or without the output projection's."""
    return [m.weight for m in generator.model.modules() if isinstance(m, LocalProduct) and (output or m is not generator.model.output)]


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 128256, (2, n), generator=torch.Generator().manual_seed(n))


# Largest logit error allowed, as a fraction of the largest logit. int8 decoding also rounds
# activations to int8 per block (llama.kernels), hence its wider bound. int4 rounds each
# weight to one of 16 levels (max - min) / 15 apart in its group of 32: on Gaussian weights an rms
# error of ~8% of the weights' scale, and each of the ~5 products on a path through these two
# layers adds its own: measured 0.15-0.19 here. test_int4_products_are_its_dequantized_weights
# checks the int4 machinery itself tightly.
TOLERANCE = {"bf16": 0.02, "int8": 0.05, "int4": 0.25}


def weight_format(generator: Llama) -> str:
    wq = generator.model.layers[0].attention.wq
    return "bf16" if wq.weight_scale is None else "int4" if wq.weight_min is not None else "int8"


def assert_close_logits(generator: Llama, got: torch.Tensor, want: torch.Tensor) -> None:
    # Random weights leave many near-ties among 128256 logits, so argmax agreement is the
    # benchmark's job (on a trained model); here the error must be small against the scale.
    assert (got - want).abs().max() <= TOLERANCE[weight_format(generator)] * want.abs().max()


def test_linear_weights_are_stored_in_the_format(compact):
    expected = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[weight_format(compact)]
    assert {w.dtype for w in linear_weights(compact, output=False)} == {expected}


def test_int4_keeps_the_output_projection_in_int8_as_llama_cpps_q4_files_do(compact):
    # In 4 bits it cost SmolLM2 6% of perplexity (benchmarks/README.md), the layers together 0.1%.
    output = compact.model.output
    want = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.int8}[weight_format(compact)]
    assert output.weight.dtype == want and output.weight_min is None


def test_other_weights_keep_the_compute_dtype(compact):
    assert compact.model.tok_embeddings.weight.dtype == torch.float32
    assert compact.model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-products", "upcast-products"])
def test_prefill_logits_are_close_to_exact(compact, llama3, fast_bf16, monkeypatch):
    # Either way a prefill may go on this machine: products in bf16 (AMX/AVX512-BF16 CPUs, GPUs) or upcast.
    monkeypatch.setattr(llama.layers.linear, "fast_bf16_products", lambda device_type: fast_bf16)
    x = tokens(PROMPT_ROWS)
    assert_close_logits(compact, compact.model.forward(x, 0), llama3.model.forward(x, 0))


@pytest.mark.parametrize("rows", [1, 2], ids=["one-row", "two-rows"])  # one row takes a matrix-vector product
def test_decode_logits_are_close_to_exact(compact, llama3, rows):
    x = tokens(5)[:rows]
    compact.model.forward(x[:, :4], 0)
    llama3.model.forward(x[:, :4], 0)
    assert_close_logits(compact, compact.model.forward(x[:, 4:], 4), llama3.model.forward(x[:, 4:], 4))


@pytest.mark.parametrize("k, fold", [(576, 1), (2048, 2), (1024, 4)], ids=["as-is", "folded-2", "folded-4"])
def test_int8_one_row_product_matches_the_float_product(k, fold):
    # Short weight rows go through torch's int8 kernel folded side by side (faster on the CPU).
    n = 64
    assert llama.layers.linear._int8_fold(n, k) == fold
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) / 100
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    want = x.float() @ (q.float() * scale[:, None]).T
    got = llama.layers.linear._int8_decode(x, q, scale).float()
    assert (got - want).abs().max() <= 0.01 * want.abs().max()


def test_fused_products_hold_each_weight_once_under_metas_keys(compact, llama3):
    # wq/wk/wv (and w1/w3) are one product over one concatenated weight; each layer's weight is a view of it.
    attention = compact.model.layers[0].attention
    storage = {m.weight.untyped_storage().data_ptr() for m in (attention.wq, attention.wk, attention.wv, attention.wqkv)}
    assert len(storage) == 1
    assert compact.model.state_dict().keys() == llama3.model.state_dict().keys()


@pytest.mark.parametrize("rows", [1, PROMPT_ROWS], ids=["decode", "prefill"])
def test_fused_products_equal_the_layers_products(compact, rows):
    layer = compact.model.layers[0]
    x = torch.randn(1, rows, layer.dim, generator=torch.Generator().manual_seed(rows))
    attention, feed_forward = layer.attention, layer.feed_forward
    for fused, parts in ((attention.wqkv, (attention.wq, attention.wk, attention.wv)), (feed_forward.w13, (feed_forward.w1, feed_forward.w3))):
        want = [part.local_product(x) for part in parts]
        got = fused(x)
        assert [t.shape for t in got] == [t.shape for t in want]
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 0.01 * w.abs().max()


def test_generation_runs_to_max_gen_len(compact, monkeypatch):
    monkeypatch.setattr(compact.tokenizer, "stop_tokens", set())  # only max_gen_len ends the answer
    prompts = [compact.tokenizer.encode("The capital of France is", bos=True, eos=False)]
    out, _ = compact.generate(prompts, max_gen_len=6, temperature=0)
    assert len(out[0]) == 6


def test_int8_weights_take_a_quarter_of_fp32(llama3_ckpt, llama3_tokenizer_path, llama3):
    int8 = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2, weight_format="int8")
    fp32_bytes = sum(w.numel() * w.element_size() for w in linear_weights(llama3))
    int8_bytes = sum(w.numel() * w.element_size() for w in linear_weights(int8))
    assert int8_bytes * 4 == fp32_bytes


def test_unknown_weight_format_is_named(llama3_ckpt, llama3_tokenizer_path):
    with pytest.raises(ValueError, match="unknown weight_format 'int3'.*'bf16', 'int8' or 'int4'"):
        Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2, weight_format="int3")


@pytest.fixture(scope="module")
def int4(llama3_ckpt, llama3_tokenizer_path) -> Llama:
    return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2, weight_format="int4")


@pytest.fixture(scope="module")
def int4_as_floats(int4, llama3_ckpt, llama3_tokenizer_path) -> Llama:
    """An exact model whose linear weights are the int4 model's, dequantized."""
    exact = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2)
    packed = dict(int4.model.named_modules())
    for name, layer in exact.model.named_modules():
        if isinstance(layer, LocalProduct):
            q = packed[name]
            w = dequantize_q8(q.weight, q.weight_scale) if q.weight_min is None else dequantize_q4(Q4Weight(q.weight, q.weight_scale, q.weight_min))
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
    return exact


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-products", "upcast-products"])
@pytest.mark.parametrize("rows", [1, 2, PROMPT_ROWS], ids=["decode-one-row", "decode-two-rows", "prefill"])
def test_int4_products_are_its_dequantized_weights(int4, int4_as_floats, rows, fast_bf16, monkeypatch):
    # The kernel (decode) and the dequantized product (prefill) multiply by exactly these weights.
    # A prefill differs by float rounding (bf16 products: the activations' rounding to bf16); a
    # decode step by the kernel's rounding of the activations to int8 per 32 columns.
    monkeypatch.setattr(llama.layers.linear, "fast_bf16_products", lambda device_type: fast_bf16)
    x = tokens(PROMPT_ROWS)[:, :rows] if rows == PROMPT_ROWS else tokens(5)[:rows, :1]
    got, want = int4.model.forward(x, 0), int4_as_floats.model.forward(x, 0)
    tolerance = 1e-4 if rows == PROMPT_ROWS and not fast_bf16 else 0.02  # measured: 1.1-1.3% for decode
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_int4_weights_take_five_bits_a_weight(int4, llama3):
    # 4 bits a weight plus an fp16 scale and min per 32 weights: 5/32 of fp32's bytes.
    fp32_bytes = sum(w.numel() * w.element_size() for w in linear_weights(llama3, output=False))
    layers = [m for m in int4.model.modules() if isinstance(m, LocalProduct) and m is not int4.model.output]
    int4_bytes = sum(t.numel() * t.element_size() for m in layers for t in (m.weight, m.weight_scale, m.weight_min))
    assert int4_bytes * 32 == fp32_bytes * 5


def test_int4_model_state_dict_holds_the_packed_weights(int4, llama3):
    # Compact formats are load-time only, but a state_dict must still be taken (e.g. by tools that list weights).
    state_dict = int4.model.state_dict()
    assert state_dict.keys() == llama3.model.state_dict().keys()
    wq = state_dict["layers.0.attention.wq.weight"]
    assert wq.dtype == torch.uint8 and wq.shape[1] * 2 == llama3.model.layers[0].attention.wq.weight.shape[1]


def test_int4_needs_whole_groups_on_each_process(tmp_path, llama3_tokenizer_path):
    # multiple_of 16 gives an FFN width of 176: 88 columns of w2 on each of 2 processes.
    params = {**TINY_PARAMS, "n_kv_heads": 4, "multiple_of": 16, "vocab_size": 128256, "rope_theta": 500000.0}
    folder = write_checkpoint(tmp_path, params, {"tok_embeddings.weight": torch.zeros(1, 1)})  # never read
    with pytest.raises(ValueError, match="groups of 32 columns, but feed_forward.w2 has 88 of its 176 input columns on each of 2 processes"):
        Llama.build(str(folder), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=2, model_parallel_size=2, weight_format="int4")
