"""The native decode step: every layer of a CPU decode step in one call, with the torch step's numbers."""

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict

import llama.model
from llama import Llama, kernels
from llama.args import ModelArgs
from llama.kernels import build
from llama.model import Transformer
from llama.runtime.distributed import default_device_and_dtype

VOCAB = 512


@pytest.fixture(autouse=True)
def native():
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built")
    if kernels.isa() not in ("avx2", "avx512"):
        pytest.skip("the native decode step runs where the products have SIMD code")


def tiny_model(seed: int = 0) -> Transformer:
    args = ModelArgs.from_params(TINY_PARAMS, vocab_size=VOCAB, max_seq_len=32, max_batch_size=4, rope_theta=10000.0)
    with default_device_and_dtype(torch.device("cpu"), torch.float32):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed), assign=True)
    return model


def torch_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache_row: int = 0) -> torch.Tensor:
    model._native = False  # decided per forward: this step runs the torch layers
    return model.step(tokens, positions, cache_row=cache_row)


def prefill(models, tokens: torch.Tensor, lengths, cache_row: int = 0) -> None:
    for model in models:
        for i, n in enumerate(lengths):
            model.step(tokens[i : i + 1, :n], 0, cache_row=cache_row + i)


def test_native_step_gives_the_torch_steps_logits_and_cache(model_parallel):
    native, reference = tiny_model(), tiny_model()
    lengths = [5, 11, 8]
    tokens = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    prefill((native, reference), tokens, lengths, cache_row=1)
    for step in range(3):
        positions = torch.tensor(lengths) + step
        step_tokens = tokens[torch.arange(3), positions][:, None]
        got = native.step(step_tokens, positions, cache_row=1)
        assert native._native, "this model's decode steps should run natively"
        torch.testing.assert_close(got, torch_step(reference, step_tokens, positions, cache_row=1), atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(native.layers, reference.layers):
        torch.testing.assert_close(ours.attention.cache_k, theirs.attention.cache_k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.attention.cache_v, theirs.attention.cache_v, atol=1e-6, rtol=1e-6)


def test_weights_replaced_after_a_step_are_read_after_the_next_prefill(model_parallel):
    native, reference = tiny_model(seed=0), tiny_model(seed=0)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    prefill((native, reference), tokens, [6])
    native.step(tokens[:, 6:7], torch.tensor([6]))
    replacement = tiny_model(seed=1).state_dict()
    for model in (native, reference):
        model.load_state_dict(replacement, assign=True)  # new tensors, not copies into the old ones
    prefill((native, reference), tokens, [6])
    got = native.step(tokens[:, 6:7], torch.tensor([6]))
    torch.testing.assert_close(got, torch_step(reference, tokens[:, 6:7], torch.tensor([6])), atol=1e-5, rtol=1e-5)


def test_a_position_outside_the_cache_is_named(model_parallel):
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the cache .*max_seq_len"):
        model.step(torch.tensor([[1]]), torch.tensor([32]))


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_compact_weights_decode_natively_as_their_products(llama3_ckpt, llama3_tokenizer_path, weight_format):
    generators = [
        Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=32, max_batch_size=2, weight_format=weight_format)
        for _ in range(2)
    ]
    native, reference = (g.model for g in generators)
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    prefill((native, reference), tokens, [7, 4])
    positions = torch.tensor([7, 4])
    got = native.step(tokens[torch.arange(2), positions][:, None], positions)
    assert native._native
    expected = torch_step(reference, tokens[torch.arange(2), positions][:, None], positions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_weights_keep_the_torch_step(llama3_ckpt, llama3_tokenizer_path):
    model = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=32, max_batch_size=1, weight_format="bf16").model
    model.step(torch.tensor([[1, 2, 3]]), 0)
    model.step(torch.tensor([[4]]), torch.tensor([3]))
    assert model._native is False


def test_steps_of_more_rows_than_a_decode_product_keep_the_torch_step(model_parallel, monkeypatch):
    monkeypatch.setattr(llama.model, "DECODE_ROWS", 2)
    model = tiny_model()
    monkeypatch.setattr(model, "_native_step", lambda *args: pytest.fail("a 3-row step ran natively"))
    tokens = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    prefill([model], tokens, [5, 5, 5])
    assert model.step(tokens[:, 5:6], torch.tensor([5, 5, 5])).shape == (3, 1, VOCAB)


def test_compile_is_not_needed_where_steps_run_natively(llama3_ckpt, llama3_tokenizer_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda step: lambda *args: pytest.fail("a compiled step ran"))
    with caplog.at_level("INFO", logger="llama.generation"):
        generator = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=32, max_batch_size=1, compile=True)
    assert "not needed here" in caplog.text
    tokens, _ = generator.generate([[128000, 40, 1093]], max_gen_len=4, temperature=0)
    assert len(tokens[0]) == 4
