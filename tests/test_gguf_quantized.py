"""GGUF files kept quantized: Q4_0/Q4_1 blocks as int4 groups and Q8_0 blocks as int8, as they are."""

from pathlib import Path

import pytest
import torch
from test_convert_gguf import TINY_ARGS, write_gguf

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoints.gguf import gguf_name
from llama.checkpoints.load import load_into
from llama.checkpoints.source import ConvertedShard, read_as_meta
from llama.kernels import Q4Weight, dequantize_q4, dequantize_q8, quantize_q8
from llama.layers.linear import LocalProduct
from llama.model import Transformer
from llama.runtime.distributed import default_device_and_dtype

gguf = pytest.importorskip("gguf", reason="gguf is a test dependency: pip install -e '.[test]'")

LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def stored_floats(layer: LocalProduct) -> torch.Tensor:
    """The float32 weight a linear layer multiplies by, whatever its format."""
    if layer.weight_min is not None:
        return dequantize_q4(Q4Weight(layer.weight, layer.weight_scale, layer.weight_min))
    if layer.weight_scale is not None:
        return dequantize_q8(layer.weight, layer.weight_scale)
    return layer.weight.float()


def gguf_floats(reader, key: str) -> torch.Tensor:
    """The gguf package's dequantization of a Meta-named tensor (the reference llama.cpp agrees with)."""
    t = next(t for t in reader.tensors if t.name == gguf_name(key))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tuple(reversed([int(d) for d in t.shape])))


def linear(model: Transformer, key: str) -> LocalProduct:
    return dict(model.named_modules())[key.removesuffix(".weight")]


def layer_keys(i: int):
    return [f"layers.{i}.{'attention' if n.startswith('w') and n[1] in 'qkvo' else 'feed_forward'}.{n}.weight" for n in LINEARS]


# --- a tiny GGUF with several storage types (test_convert_gguf's): Q8_0 linears, Q4_0 w2, F16 wq, BF16 wk ---


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tied=True)


def tiny_model(path: Path, weight_format, rank: int = 0, size: int = 1) -> Transformer:
    params, tensors = read_as_meta(path)
    with default_device_and_dtype(torch.device("cpu"), torch.float32):
        model = Transformer(ModelArgs.from_params(params, max_seq_len=32, max_batch_size=1))
    load_into(model, ConvertedShard(tensors, rank, size, True), path, torch.device("cpu"), torch.float32, weight_format)
    return model


def test_q8_0_blocks_load_as_int8_blocks_under_int8(tiny, model_parallel):
    model, reader = tiny_model(tiny, "int8"), gguf.GGUFReader(tiny)
    wv = model.layers[0].attention.wv
    assert wv.weight.dtype == torch.int8 and wv.weight_scale.shape == (wv.weight.shape[0], TINY_ARGS.dim // 32)
    assert torch.equal(stored_floats(wv), gguf_floats(reader, "layers.0.attention.wv.weight"))
    # The tied output is the Q8_0 embedding's blocks; the lookup dequantizes rows of the same blocks.
    assert torch.equal(stored_floats(model.output), gguf_floats(reader, "tok_embeddings.weight"))


def test_a_q8_0_embedding_stays_in_its_blocks_under_int8_and_int4(tiny, model_parallel):
    reader = gguf.GGUFReader(tiny)
    floats = gguf_floats(reader, "tok_embeddings.weight")
    for weight_format in ("int8", "int4"):
        model = tiny_model(tiny, weight_format)
        assert model.tok_embeddings.q.dtype == torch.int8
        assert model.tok_embeddings.q.data_ptr() == model.output.weight.data_ptr()  # one copy for both
        tokens = torch.tensor([[0, 5, floats.shape[0] - 1]])
        assert torch.equal(model.tok_embeddings(tokens), floats[tokens])


def test_without_a_compact_format_the_embedding_is_the_dequantized_table(tiny, model_parallel):
    model = tiny_model(tiny, None)
    assert torch.equal(model.tok_embeddings.weight, gguf_floats(gguf.GGUFReader(tiny), "tok_embeddings.weight"))


def test_other_types_are_quantized_from_their_floats_under_int8(tiny, model_parallel):
    model, reader = tiny_model(tiny, "int8"), gguf.GGUFReader(tiny)
    # Q4_0 (w2) and F16 (wq) are not int8 blocks: quantized from their floats, a scale per 32
    # columns, like any float checkpoint's.
    for key in ("layers.0.feed_forward.w2.weight", "layers.0.attention.wq.weight"):
        q, scale = quantize_q8(gguf_floats(reader, key).float(), 32)
        assert torch.equal(linear(model, key).weight, q) and torch.equal(linear(model, key).weight_scale, scale), key


def test_q4_0_blocks_load_as_int4_groups_under_int4(tiny, model_parallel):
    model, reader = tiny_model(tiny, "int4"), gguf.GGUFReader(tiny)
    w2 = model.layers[1].feed_forward.w2
    assert w2.weight.dtype == torch.uint8
    assert torch.equal(stored_floats(w2), gguf_floats(reader, "layers.1.feed_forward.w2.weight"))
    # Q8_0 linears keep their (finer) blocks; a float one (wq, F16) is quantized to int4.
    assert model.layers[1].attention.wv.weight.dtype == torch.int8
    wq = model.layers[1].attention.wq
    assert wq.weight_min is not None
    assert (stored_floats(wq) - gguf_floats(reader, "layers.1.attention.wq.weight")).abs().max() < 0.1


def test_without_weight_format_a_gguf_is_dequantized_as_before(tiny, model_parallel):
    model, reader = tiny_model(tiny, None), gguf.GGUFReader(tiny)
    for key in layer_keys(0):
        w = linear(model, key).weight  # F16 (wq) and BF16 (wk) too: in the compute dtype
        assert w.dtype == torch.float32 and torch.equal(w, gguf_floats(reader, key).float()), key


def test_a_process_takes_the_blocks_of_its_slice(tiny):
    _, tensors = read_as_meta(tiny)
    for key, dim in (("layers.0.feed_forward.w2.weight", 1), ("layers.0.attention.wv.weight", 0)):
        full = tensors[key]
        for rank in range(2):
            qtype, blocks = ConvertedShard(tensors, rank, 2, True).blocks(key)
            floats = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]))
            assert torch.equal(floats, full.chunk(2, dim=dim)[rank]), (key, rank)


def test_converted_shard_reads_nothing_for_shapes(tiny):
    _, tensors = read_as_meta(tiny)
    read = []
    spy = type(tensors)({k: tensors.spec(k) for k in tensors}, lambda key: read.append(key), tensors.source)
    shard = ConvertedShard(spy, 1, 2, True)
    assert shard.shape("layers.0.feed_forward.w2.weight") == (TINY_ARGS.dim, tensors.spec("layers.0.feed_forward.w2.weight")[1][1] // 2)
    assert read == []


def test_converted_shard_reads_nothing_to_say_what_it_holds(tiny):
    _, tensors = read_as_meta(tiny)
    read = []
    spy = type(tensors)({k: tensors.spec(k) for k in tensors}, lambda key: read.append(key), tensors.source)
    shard = ConvertedShard(spy, 0, 1, True)
    assert "tok_embeddings.weight" in shard and "tok_embeddings.weight" in spy
    assert "output.weight.nope" not in shard
    assert read == []


# --- the real model: SmolLM2-135M-Instruct's Q4_1 file ---


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_gguf_path) -> Llama:
    return Llama.build(str(smollm2_gguf_path), None, max_seq_len=64, max_batch_size=1, weight_format="int4")


def test_smollm2_q4_1_weights_are_the_files_bit_for_bit(smollm2_int4, smollm2_gguf_path):
    reader = gguf.GGUFReader(smollm2_gguf_path)
    for i in (0, 17, 29):
        for key in layer_keys(i):
            layer = linear(smollm2_int4.model, key)
            assert layer.weight_min is not None, key  # int4 groups, not re-quantized floats
            assert torch.equal(stored_floats(layer), gguf_floats(reader, key)), key
    # The tied output multiplies by the Q8_0 embedding's own blocks.
    assert torch.equal(stored_floats(smollm2_int4.model.output), gguf_floats(reader, "tok_embeddings.weight"))


def test_smollm2_int4_logits_equal_the_dequantized_files(smollm2_int4, smollm2_gguf_path):
    # The same weights as the exact (dequantizing) load; products of up to 16 rows (llama.kernels)
    # also round the activations to int8 per 32 columns, as llama.cpp's do: over 30 layers the
    # logits move by up to ~3% of their scale (measured), and the next token stays the same.
    exact = Llama.build(str(smollm2_gguf_path), None, max_seq_len=64, max_batch_size=1)
    tokens = torch.tensor([smollm2_int4.tokenizer.encode("The capital of France is the city of", bos=True, eos=False)])
    for start, part in ((0, tokens[:, :-1]), (tokens.shape[1] - 1, tokens[:, -1:])):
        got, want = smollm2_int4.model.forward(part, start), exact.model.forward(part, start)
        torch.testing.assert_close(got, want, atol=5e-2 * want.abs().max().item(), rtol=0)
        assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))
