"""Hugging Face <-> Meta conversion: same logits as transformers, exact round trips, Meta's params, clear refusals."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint

from llama import Llama
from llama.args import CheckpointError, ModelArgs, ffn_hidden_dim
from llama.checkpoints.convert import convert_meta_to_hf, convert_to_meta
from llama.checkpoints.hf import params_from_config
from llama.checkpoints.load import load_into
from llama.checkpoints.meta import checkpoint_paths, load_for_rank, load_shard, read_params, shard_dim
from llama.checkpoints.safetensors import load_file
from llama.checkpoints.source import detect_format, read_as_meta
from llama.checkpoints.tensors import solve_ffn
from llama.model import FeedForward, Transformer
from llama.runtime.distributed import default_device_and_dtype

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e '.[test]'")

VOCAB = 320
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Tiny Hugging Face models, one per way a real folder can differ. intermediate_size 176 needs
# multiple_of 16; initializer_range 0.2 makes q/k mistakes show in the logits.
HF_VARIANTS: Dict[str, dict] = {
    "gqa": dict(config={}, save={}),
    "tied": dict(config={"tie_word_embeddings": True}, save={}),
    "llama3-rope": dict(config={"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING, "max_position_embeddings": 16384}, save={}),
    "sharded": dict(config={}, save={"max_shard_size": "100KB"}),
    "bin": dict(config={}, save={}),  # transformers 5 writes safetensors only: the fixture re-saves it as 4.x did
}


def hf_config(**overrides) -> "transformers.LlamaConfig":
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """name -> (folder, model) for each of HF_VARIANTS, saved by transformers itself."""
    folders = {}
    for i, (name, variant) in enumerate(HF_VARIANTS.items()):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(hf_config(**variant["config"])).eval()
        folder = tmp_path_factory.mktemp(f"hf-{name}")
        model.save_pretrained(folder, **variant["save"])
        if name == "bin":
            (folder / "model.safetensors").unlink()
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        assert weights[-1] == {"sharded": "model.safetensors.index.json", "bin": "pytorch_model.bin"}.get(name, "model.safetensors")
        folders[name] = (folder, model)
    return folders


def meta_model(ckpt_dir: Path, **overrides) -> Transformer:
    """Our Transformer loaded from a Meta folder as Llama.build loads one shard (fp32, CPU)."""
    params = {**read_params(str(ckpt_dir)), **overrides}
    args = ModelArgs.from_params(params, max_seq_len=64, max_batch_size=2)
    paths = checkpoint_paths(str(ckpt_dir))
    with default_device_and_dtype(torch.device("cpu"), torch.float32):
        model = Transformer(args)
    load_into(model, load_for_rank(paths, 0, 1, args.vocab_parallel_embedding), paths[0], torch.device("cpu"), torch.float32)
    return model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).logits.float()


# --- Hugging Face -> Meta ---


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_to_meta_gives_the_logits_of_transformers(hf_folders, tmp_path, model_parallel, variant):
    folder, hf = hf_folders[variant]
    out = convert_to_meta(folder, tmp_path / "meta", tokenizer=False)
    torch.testing.assert_close(meta_model(out).forward(tokens(), 0), hf_logits(hf, tokens()), atol=1e-4, rtol=1e-4)


def test_hf_to_meta_writes_params_shards_and_checklist(hf_folders, tmp_path):
    out = convert_to_meta(hf_folders["gqa"][0], tmp_path / "meta", tokenizer=False)
    assert sorted(p.name for p in out.iterdir()) == ["checklist.chk", "consolidated.00.pth", "params.json"]
    assert json.loads((out / "params.json").read_text()) == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 16,
        "norm_eps": 1e-5, "rope_theta": 10000.0,
    }  # fmt: skip
    listed = dict(reversed(line.split("  ")) for line in (out / "checklist.chk").read_text().splitlines())
    assert sorted(listed) == ["consolidated.00.pth", "params.json"]


def test_tied_embeddings_write_no_output_weight(hf_folders, tmp_path):
    out = convert_to_meta(hf_folders["tied"][0], tmp_path / "meta", tokenizer=False)
    assert "output.weight" not in load_shard(out / "consolidated.00.pth")


def test_llama3_rope_scaling_becomes_use_scaled_rope(hf_folders):
    params, _ = read_as_meta(hf_folders["llama3-rope"][0])
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0


def test_read_as_meta_gives_full_tensors_under_metas_names(hf_folders):
    params, tensors = read_as_meta(hf_folders["tied"][0])
    assert params["vocab_size"] == VOCAB
    assert set(tensors) == set(random_state_dict(ModelArgs.from_params(params))) - {"output.weight"}
    assert tensors["layers.1.attention.wk.weight"].shape == (32, 64)


def test_read_as_meta_tensors_are_cut_for_ranks_like_a_one_shard_checkpoint(hf_folders):
    from llama.checkpoints.meta import resharded_state_dict

    _, tensors = read_as_meta(hf_folders["gqa"][0])
    rank1 = resharded_state_dict([tensors], rank=1, model_parallel_size=2, vocab_parallel_embedding=True)
    assert torch.equal(rank1["layers.0.attention.wk.weight"], tensors["layers.0.attention.wk.weight"][16:])
    assert torch.equal(rank1["tok_embeddings.weight"], tensors["tok_embeddings.weight"][VOCAB // 2 :])


def test_two_shards_are_the_one_shard_output_cut_as_meta_cuts_it(hf_folders, tmp_path):
    one = load_shard(convert_to_meta(hf_folders["gqa"][0], tmp_path / "mp1", tokenizer=False) / "consolidated.00.pth")
    out = convert_to_meta(hf_folders["gqa"][0], tmp_path / "mp2", model_parallel_size=2, tokenizer=False)
    two = [load_shard(out / f"consolidated.0{r}.pth") for r in range(2)]
    assert set(two[0]) == set(two[1]) == set(one)
    for key, full in one.items():
        dim = shard_dim(key, vocab_parallel_embedding=True)
        merged = two[0][key] if dim is None else torch.cat([two[0][key], two[1][key]], dim=dim)
        assert torch.equal(merged, full), key


def test_dtype_option_converts_every_weight(hf_folders, tmp_path):
    out = convert_to_meta(hf_folders["gqa"][0], tmp_path / "meta", dtype="bf16", tokenizer=False)
    assert {t.dtype for t in load_shard(out / "consolidated.00.pth").values()} == {torch.bfloat16}


# --- with the tokenizer: its family decides Meta's layout ---


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory, llama2_tokenizer_path, llama3_tokenizer_path):
    """family -> (folder, model): tiny models with the real Llama 2 / Llama 3 vocabularies and tokenizer.model."""
    folders = {}
    for family, tokenizer_path, vocab, tied in (
        ("llama2", llama2_tokenizer_path, 32000, False),
        ("llama2-tied", llama2_tokenizer_path, 32000, True),
        ("llama3", llama3_tokenizer_path, 128256, False),
    ):
        torch.manual_seed(len(folders))
        model = transformers.LlamaForCausalLM(hf_config(vocab_size=vocab, tie_word_embeddings=tied)).eval()
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(folder)
        (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
        folders[family] = (folder, model)
    return folders


def test_a_folder_without_tokenizer_files_fails_and_leaves_no_output(hf_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        convert_to_meta(hf_folders["gqa"][0], tmp_path / "meta")
    assert list(tmp_path.iterdir()) == []


def test_a_llama2_tokenizer_gives_metas_llama2_params_and_embedding_split(hf_with_tokenizer, tmp_path):
    out = convert_to_meta(hf_with_tokenizer["llama2"][0], tmp_path / "meta", model_parallel_size=2)
    assert json.loads((out / "params.json").read_text()) == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 16, "norm_eps": 1e-5,
    }  # fmt: skip
    assert load_shard(out / "consolidated.00.pth")["tok_embeddings.weight"].shape == (32000, 32)
    assert sorted(p.name for p in out.iterdir()) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]


def test_a_tied_model_split_along_the_model_dimension_stores_each_shards_output_rows(hf_with_tokenizer, tmp_path):
    # A process ties output to its embedding slice only when the two have the same shape; a dim-1
    # embedding slice (32000, 32) is not the output's (16000, 64), so each shard carries its rows.
    folder, hf = hf_with_tokenizer["llama2-tied"]
    out = convert_to_meta(folder, tmp_path / "meta", model_parallel_size=2)
    for rank in range(2):
        shard = load_shard(out / f"consolidated.0{rank}.pth")
        assert torch.equal(shard["output.weight"], hf.model.embed_tokens.weight.detach()[rank * 16000 : (rank + 1) * 16000])


def test_a_llama3_tokenizer_gives_metas_llama3_params_and_embedding_split(hf_with_tokenizer, tmp_path):
    out = convert_to_meta(hf_with_tokenizer["llama3"][0], tmp_path / "meta", model_parallel_size=2)
    params = json.loads((out / "params.json").read_text())
    assert (params["vocab_size"], params["rope_theta"]) == (128256, 10000.0)
    assert load_shard(out / "consolidated.00.pth")["tok_embeddings.weight"].shape == (64128, 64)


@pytest.mark.parametrize("family", ["llama2", "llama2-tied", "llama3"])
def test_converted_folder_loads_with_llama_build_and_gives_transformers_logits(hf_with_tokenizer, tmp_path, family):
    from llama import Llama

    folder, hf = hf_with_tokenizer[family]
    out = convert_to_meta(folder, tmp_path / "meta", model_parallel_size=2)
    llama = Llama.build(str(out), str(out / "tokenizer.model"), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    toks = torch.tensor(llama.tokenizer.encode("The capital of France is", bos=True, eos=False))[None]
    torch.testing.assert_close(llama.model.forward(toks, 0), hf_logits(hf, toks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_llama_build_loads_a_hugging_face_folder_directly(hf_with_tokenizer, family):
    folder, hf = hf_with_tokenizer[family]
    llama = Llama.build(str(folder), None, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    toks = torch.tensor(llama.tokenizer.encode("The capital of France is", bos=True, eos=False))[None]
    torch.testing.assert_close(llama.model.forward(toks, 0), hf_logits(hf, toks), atol=1e-4, rtol=1e-4)


# --- Meta -> Hugging Face ---


def meta_checkpoint(folder: Path, n_shards: int = 1, tied: bool = False, llama2: bool = False) -> Path:
    params = {**TINY_PARAMS, "vocab_size": VOCAB, "rope_theta": 10000.0}
    state_dict = random_state_dict(ModelArgs.from_params(params), seed=5)
    if tied:
        del state_dict["output.weight"]
    if llama2:  # Meta's Llama 2 files: vocab_size -1, embedding split along dim 1, an extra rope.freqs tensor
        params = {k: v for k, v in params.items() if k != "rope_theta"} | {"vocab_size": -1}
        return write_checkpoint(folder, params, state_dict, n_shards, vocab_parallel_embedding=False, extra={"rope.freqs": torch.rand(8)})
    return write_checkpoint(folder, params, state_dict, n_shards)


@pytest.mark.parametrize("shape", ["1-shard", "2-shards", "llama2-2-shards", "tied"])
def test_meta_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, model_parallel, shape):
    src = meta_checkpoint(tmp_path / "meta", n_shards=2 if "2-shards" in shape else 1, tied=shape == "tied", llama2="llama2" in shape)
    out = convert_meta_to_hf(src, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == (shape == "tied")
    # What Llama.build takes from the Llama 2 tokenizer family for Meta's Llama 2 params.json.
    overrides = {"vocab_size": VOCAB, "rope_theta": 10000.0, "vocab_parallel_embedding": "llama2" not in shape}
    expected = meta_model(src, **overrides).forward(tokens(1), 0)
    torch.testing.assert_close(hf_logits(hf, tokens(1)), expected, atol=1e-4, rtol=1e-4)


def test_meta_to_hf_to_meta_gives_identical_tensors_and_params(tmp_path):
    src = meta_checkpoint(tmp_path / "meta")
    back = convert_to_meta(convert_meta_to_hf(src, tmp_path / "hf"), tmp_path / "back", tokenizer=False)
    original, converted = load_shard(src / "consolidated.00.pth"), load_shard(back / "consolidated.00.pth")
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)
    params = read_params(str(back))
    ffn_keys = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in params.items() if k in TINY_PARAMS and k not in ffn_keys} == {
        k: v for k, v in TINY_PARAMS.items() if k not in ffn_keys
    }
    # Several (multiple_of, ffn_dim_multiplier) pairs give one width; the width is what must survive.
    assert ffn_hidden_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == ffn_hidden_dim(64, TINY_PARAMS["multiple_of"], None)


def test_two_meta_shards_merge_into_the_one_shard_hf_weights(tmp_path):
    one = convert_meta_to_hf(meta_checkpoint(tmp_path / "mp1"), tmp_path / "hf1")
    two = convert_meta_to_hf(meta_checkpoint(tmp_path / "mp2", n_shards=2), tmp_path / "hf2")
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def test_meta_to_hf_copies_the_tokenizer_and_takes_its_special_ids(tmp_path, llama3_tokenizer_path):
    src = meta_checkpoint(tmp_path / "meta")
    (src / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    out = convert_meta_to_hf(src, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == llama3_tokenizer_path.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)


def test_meta_to_hf_writes_null_for_a_vocabulary_without_bos(tmp_path, smollm2_gguf_path):
    from llama.tokenizers.convert import write_tokenizer_from_gguf

    src = meta_checkpoint(tmp_path / "meta")
    write_tokenizer_from_gguf(smollm2_gguf_path, src)  # SmolLM2's tokenizer.json: no BOS token
    config = json.loads((convert_meta_to_hf(src, tmp_path / "hf") / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, 2)


# --- params.json from real configs; the FFN width ---

LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000, "hidden_act": "silu", "pretraining_tp": 1,
}  # fmt: skip
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}  # fmt: skip


@pytest.mark.parametrize(
    "config, metas",
    [
        (LLAMA2_7B_CONFIG, {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": 32000}),
        (LLAMA31_8B_CONFIG, {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8, "n_layers": 32,
                             "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}),
    ],
    ids=["llama-2-7b", "llama-3.1-8b"],
)  # fmt: skip
def test_real_configs_map_to_a_model_of_the_same_shape_as_metas_params(config, metas):
    ours = params_from_config(config, Path("config.json"))
    ours_args, metas_args = ModelArgs.from_params(ours), ModelArgs.from_params({"rope_theta": 10000.0, **metas})
    for field in ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope"):
        assert getattr(ours_args, field) == getattr(metas_args, field), field
    assert (ours_args.n_kv_heads or ours_args.n_heads) == (metas_args.n_kv_heads or metas_args.n_heads)
    assert ffn_hidden_dim(ours_args.dim, ours_args.multiple_of, ours_args.ffn_dim_multiplier) == ffn_hidden_dim(
        metas_args.dim, metas_args.multiple_of, metas_args.ffn_dim_multiplier
    )


REAL_FFN_SHAPES = {
    "llama-2-7b": (4096, 11008), "llama-2-13b": (5120, 13824), "llama-2-70b": (8192, 28672),
    "llama-3-8b": (4096, 14336), "llama-3-70b": (8192, 28672), "llama-3.2-1b": (2048, 8192),
    "llama-3.2-3b": (3072, 8192), "smollm2-135m": (576, 1536), "tiny": (64, 176), "odd": (100, 333),
}  # fmt: skip


@pytest.mark.parametrize("dim, hidden", REAL_FFN_SHAPES.values(), ids=list(REAL_FFN_SHAPES))
def test_ffn_solution_makes_metas_feedforward_exactly_that_wide(model_parallel, dim, hidden):
    multiple_of, multiplier = solve_ffn(dim, hidden)
    with torch.device("meta"):  # shapes only: no memory for the 70B-sized weights
        ffn = FeedForward(dim, 4 * dim, multiple_of, multiplier)
    assert ffn.w1.weight.shape == (hidden, dim)


def test_ffn_solution_for_llama2_is_metas_own():
    assert solve_ffn(4096, 11008) == (256, None)


# --- refusals ---


def write_config(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {**LLAMA2_7B_CONFIG, **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}, r"model_type = 'mistral'"),
        ({"architectures": ["Qwen2ForCausalLM"]}, r"architectures = \['Qwen2ForCausalLM'\]"),
        ({"attention_bias": True}, r"attention_bias = True: Meta's Llama has no biases"),
        ({"mlp_bias": True}, r"mlp_bias = True"),
        ({"hidden_act": "gelu"}, r"hidden_act = 'gelu'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_type = 'linear'"),
        ({"rope_scaling": {**LLAMA3_SCALING, "factor": 32.0}}, r"differs from the llama3 scaling this model implements"),
        ({"head_dim": 256}, r"head_dim = 256"),
    ],
    ids=["mistral", "qwen2", "attention-bias", "mlp-bias", "gelu", "linear-rope", "llama3-rope-factor-32", "head-dim"],
)
def test_configs_our_model_does_not_implement_are_refused_naming_the_field(tmp_path, changes, message):
    folder = write_config(tmp_path / "hf", **changes)
    with pytest.raises(CheckpointError, match=message):
        convert_to_meta(folder, tmp_path / "meta", tokenizer=False)
    assert not (tmp_path / "meta").exists()


BAD_CONFIG_VALUES = {
    "num_hidden_layers-negative": ("num_hidden_layers", -1, r"num_hidden_layers = -1: must be a positive integer"),
    "hidden_size-string": ("hidden_size", "4096", r"hidden_size = '4096': must be a positive integer"),
    "hidden_size-negative": ("hidden_size", -4096, r"hidden_size = -4096: must be a positive integer"),
    "num_attention_heads-string": ("num_attention_heads", "32", r"num_attention_heads = '32': must be a positive integer"),
    "num_attention_heads-zero": ("num_attention_heads", 0, r"num_attention_heads = 0: must be a positive integer"),
    "num_key_value_heads-not-dividing": ("num_key_value_heads", 5, r"num_key_value_heads = 5: must divide num_attention_heads \(32\)"),
    "intermediate_size-bool": ("intermediate_size", True, r"intermediate_size = True: must be a positive integer"),
    "vocab_size-float": ("vocab_size", 32000.5, r"vocab_size = 32000\.5: must be a positive integer"),
    "rms_norm_eps-string": ("rms_norm_eps", "1e-5", r"rms_norm_eps = '1e-5': must be a positive number"),
    "rope_theta-string": ("rope_theta", "10000", r"rope_theta = '10000': must be a positive number"),
    "rope_scaling-string": ("rope_scaling", "llama3", r"rope_scaling = 'llama3': must be an object, or null"),
    "tie_word_embeddings-string": ("tie_word_embeddings", "false", r"tie_word_embeddings = 'false': must be true or false"),
}


@pytest.mark.parametrize("field, value, message", BAD_CONFIG_VALUES.values(), ids=list(BAD_CONFIG_VALUES))
def test_config_values_of_the_wrong_type_or_range_are_refused_naming_file_field_and_value(tmp_path, field, value, message):
    folder = write_config(tmp_path / "hf", **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        read_as_meta(folder)


def hf_copy(folder: Path, dst: Path, **config_changes) -> Path:
    """dst holding folder's weights (linked) and its config.json with config_changes."""
    dst.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    for path in folder.glob("*.safetensors*"):
        (dst / path.name).symlink_to(path)
    return dst


def test_weights_with_more_layers_than_num_hidden_layers_are_refused_naming_it(hf_folders, tmp_path):
    folder = hf_copy(hf_folders["gqa"][0], tmp_path / "hf", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"config\.json num_hidden_layers = 1, but the weights have 2 layers .*model\.layers\.1\."):
        read_as_meta(folder)


def test_llama_build_refuses_a_hugging_face_folder_with_fewer_layers_than_its_weights(hf_with_tokenizer, tmp_path, llama3_tokenizer_path):
    folder = hf_copy(hf_with_tokenizer["llama3"][0], tmp_path / "hf", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 1, but the weights have 2 layers"):
        Llama.build(str(folder), str(llama3_tokenizer_path), max_seq_len=32, max_batch_size=1)


def test_an_index_pointing_outside_the_model_folder_is_refused(hf_folders, tmp_path):
    source = hf_folders["gqa"][0]
    (tmp_path / "x.safetensors").symlink_to(source / "model.safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    names = list(load_file(source / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../x.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json places .* in '\.\./x\.safetensors', which is not a file inside"):
        read_as_meta(folder)


def test_transformers_5_rope_parameters_are_read(tmp_path):
    folder = write_config(tmp_path / "hf", rope_scaling=..., rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING})
    params = params_from_config(json.loads((folder / "config.json").read_text()), folder / "config.json")
    assert (params["rope_theta"], params["use_scaled_rope"]) == (500000.0, True)


def test_missing_config_is_refused(hf_folders, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_folders["gqa"][0] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has neither params.json .* nor config.json"):
        convert_to_meta(folder, tmp_path / "meta", tokenizer=False)


def test_missing_weights_are_refused(tmp_path):
    folder = write_config(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no weights found in .*: expected model.safetensors"):
        read_as_meta(folder)


def test_a_missing_tensor_is_refused_naming_it(hf_folders, tmp_path):
    from llama.checkpoints.safetensors import load_file, save_file

    folder, _ = hf_folders["gqa"]
    copy = tmp_path / "hf"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, copy / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        read_as_meta(copy)


def test_an_existing_output_folder_is_kept_unless_overwrite(hf_folders, tmp_path):
    out = tmp_path / "meta"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        convert_to_meta(hf_folders["gqa"][0], out, tokenizer=False)
    assert (out / "notes.txt").read_text() == "mine"
    convert_to_meta(hf_folders["gqa"][0], out, overwrite=True, tokenizer=False)
    assert not (out / "notes.txt").exists() and (out / "consolidated.00.pth").is_file()


def test_overwrite_never_deletes_the_source(hf_folders):
    folder = hf_folders["gqa"][0]
    with pytest.raises(ValueError, match="holds the source"):
        convert_to_meta(folder, folder.parent, overwrite=True, tokenizer=False)
    assert (folder / "model.safetensors").is_file()


def test_a_model_parallel_size_that_splits_heads_is_refused_before_writing(hf_folders, tmp_path):
    with pytest.raises(CheckpointError, match="cannot be split over 3 processes; valid numbers of processes: 1, 2"):
        convert_to_meta(hf_folders["gqa"][0], tmp_path / "meta", model_parallel_size=3, tokenizer=False)
    assert not (tmp_path / "meta").exists() and list(tmp_path.iterdir()) == []


def test_a_meta_folder_is_not_converted_to_meta(tmp_path):
    with pytest.raises(CheckpointError, match="already a Meta folder; use llama-reshard"):
        convert_to_meta(meta_checkpoint(tmp_path / "meta"), tmp_path / "out")


def test_detect_format_tells_the_three_kinds_apart(hf_folders, tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    assert detect_format(hf_folders["gqa"][0]) == "hf"
    assert detect_format(meta_checkpoint(tmp_path / "meta")) == "meta"
    assert detect_format(gguf_file) == "gguf"


# --- command line ---


def test_cli_converts_meta_to_hf_and_back(tmp_path):
    src = meta_checkpoint(tmp_path / "meta")
    run = [sys.executable, "-m", "llama.cli.convert"]
    subprocess.run([*run, str(src), str(tmp_path / "hf")], check=True, capture_output=True, text=True)
    result = subprocess.run([*run, str(tmp_path / "hf"), str(tmp_path / "back"), "--notokenizer"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "llama-convert: wrote consolidated.00.pth (1/1)" in result.stderr
    back = load_shard(tmp_path / "back" / "consolidated.00.pth")
    assert torch.equal(back["layers.0.attention.wq.weight"], load_shard(src / "consolidated.00.pth")["layers.0.attention.wq.weight"])
