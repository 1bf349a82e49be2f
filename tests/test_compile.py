"""Opt-in compiled decoding (Llama.build(compile=True)): Meta's step, compiled once."""

import pytest
import torch
from torch._dynamo.utils import counters

import llama.layers.linear
import llama.model
from llama import Llama

# torch's compiler itself calls torch.jit.script_method, which torch deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

PROMPTS = [[128000, 40, 1093, 311], [128000, 791, 3938, 315, 9822, 374, 12366, 11, 323]]


@pytest.fixture(scope="module", autouse=True)
def torch_layers():
    """Decode steps through torch's layers, compiled or eager: where the native step
    (llama.layers.decode_step) would run them instead, compile=True has nothing to do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama.model, "native_decode", lambda model: None)
        yield


@pytest.fixture(scope="module")
def compiled(llama3_ckpt, llama3_tokenizer_path):
    """A compiled generator, with the graph breaks its first (compiling) generation met."""
    generator = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=4, compile=True)
    counters.clear()
    first = generator.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True)
    return generator, first, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_the_decode_step_compiles_into_one_graph(compiled):
    _, _, graph_breaks, graphs = compiled
    assert graphs >= 1 and graph_breaks == {}


def test_greedy_tokens_equal_eager_decoding(compiled, llama3):
    _, (tokens, _), _, _ = compiled
    expected, _ = llama3.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True)
    assert tokens == expected


def test_logprobs_equal_eager_decoding_to_float_rounding(compiled, llama3):
    _, (_, logprobs), _, _ = compiled
    _, expected = llama3.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True)
    for got, want in zip(logprobs, expected):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_another_batch_size_and_length_reuse_the_compiled_step(compiled, llama3):
    generator, _, _, _ = compiled
    prompts = [[128000, 40] * 10] * 3
    with torch.compiler.set_stance("fail_on_recompile"):
        got = generator.generate(prompts, max_gen_len=6, temperature=0)[0]
    assert got == llama3.generate(prompts, max_gen_len=6, temperature=0)[0]


@pytest.mark.parametrize("weight_format", ["bf16", "int8"])
def test_compact_weights_compile_into_one_graph_with_their_eager_tokens(weight_format, llama3_ckpt, llama3_tokenizer_path):
    def build(compile: bool) -> Llama:
        return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), 64, 2, weight_format=weight_format, compile=compile)

    eager, compiled = build(False), build(True)
    counters.clear()
    got = compiled.generate(PROMPTS, max_gen_len=8, temperature=0)[0]
    assert dict(counters["graph_break"]) == {}
    assert got == eager.generate(PROMPTS, max_gen_len=8, temperature=0)[0]


def test_large_bf16_weights_stay_torch_mv_calls_in_the_compiled_step(llama3_ckpt, llama3_tokenizer_path, monkeypatch):
    monkeypatch.setattr(llama.layers.linear, "_OPAQUE_MV_NUMEL", 0)  # every weight counts as large here

    def build(compile: bool) -> Llama:
        return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), 64, 1, weight_format="bf16", compile=compile)

    eager, compiled = build(False), build(True)
    counters.clear()
    got = compiled.generate(PROMPTS[:1], max_gen_len=8, temperature=0)[0]  # one row: the matrix-vector path
    assert dict(counters["graph_break"]) == {}
    assert got == eager.generate(PROMPTS[:1], max_gen_len=8, temperature=0)[0]


def test_without_a_cpp_compiler_the_build_says_so_before_reading_weights(llama3_ckpt, llama3_tokenizer_path, tmp_path, monkeypatch):
    import torch._inductor.config

    (tmp_path / "params.json").write_bytes((llama3_ckpt / "params.json").read_bytes())
    (tmp_path / "consolidated.00.pth").write_bytes(b"not read")
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        Llama.build(str(tmp_path), str(llama3_tokenizer_path), 64, 2, compile=True)
