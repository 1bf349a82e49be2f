"""Llama.build: Meta checkpoint folders of both families load, and every bad input is named before heavy work."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint

from llama import Llama
from llama.args import CheckpointError, ModelArgs


def build(ckpt_dir, tokenizer_path, **kwargs) -> Llama:
    return Llama.build(str(ckpt_dir), str(tokenizer_path), **{"max_seq_len": 32, "max_batch_size": 2, **kwargs})


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_llama2_folder_fills_vocab_from_tokenizer_and_uses_family_defaults(llama2):
    params = llama2.model.params
    assert params.vocab_size == 32000
    assert params.rope_theta == 10000.0
    assert not params.vocab_parallel_embedding


def test_llama3_folder_keeps_its_params(llama3):
    params = llama3.model.params
    assert (params.vocab_size, params.rope_theta, params.vocab_parallel_embedding) == (128256, 500000.0, True)


def test_cpu_default_dtype_is_float32(llama3):
    assert {p.dtype for p in llama3.model.parameters()} == {torch.float32}
    assert llama3.model.layers[0].attention.cache_k.dtype == torch.float32


def test_dtype_override_gives_bfloat16(llama3_ckpt, llama3_tokenizer_path):
    generator = build(llama3_ckpt, llama3_tokenizer_path, dtype="bf16")
    assert {p.dtype for p in generator.model.parameters()} == {torch.bfloat16}
    tokens, _ = generator.generate([[128000, 40, 1093]], max_gen_len=3, temperature=0)
    assert len(tokens[0]) <= 3


def mapped_file(address: int) -> str:
    """The file whose memory mapping holds this address (Linux), or '' for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_weights_in_compute_dtype_are_mapped_not_copied(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 128256}
    state_dict = random_state_dict(ModelArgs.from_params(params), dtype=torch.float32)
    folder = write_checkpoint(tmp_path / "fp32", params, state_dict)
    generator = build(folder, llama3_tokenizer_path)
    weight = generator.model.layers[0].attention.wq.weight
    assert mapped_file(weight.data_ptr()) == str(folder / "consolidated.00.pth")
    torch.testing.assert_close(weight, state_dict["layers.0.attention.wq.weight"])


def test_unknown_params_keys_are_ignored(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "some_future_key": 1, "use_scaled_rope": True}))
    assert build(folder, llama3_tokenizer_path).model.params.use_scaled_rope


def test_missing_ckpt_dir_is_named(tmp_path, llama3_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found.*--ckpt_dir"):
        build(tmp_path / "nope", llama3_tokenizer_path)


def test_file_as_ckpt_dir_is_named(llama3_ckpt, llama3_tokenizer_path):
    with pytest.raises(NotADirectoryError, match="must be a folder"):
        build(llama3_ckpt / "params.json", llama3_tokenizer_path)


def test_folder_without_shards_is_named(tmp_path, llama3_tokenizer_path):
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no checkpoint files \(\*\.pth\)"):
        build(tmp_path, llama3_tokenizer_path)


def test_missing_params_json_is_named(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    (folder / "params.json").unlink()
    with pytest.raises(CheckpointError, match="no params.json"):
        build(folder, llama3_tokenizer_path)


def test_missing_tokenizer_is_named(tmp_path, llama3_ckpt):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build(llama3_ckpt, tmp_path / "tokenizer.model")


def test_llama2_tokenizer_with_llama3_checkpoint_is_refused(llama3_ckpt, llama2_tokenizer_path):
    with pytest.raises(CheckpointError, match="does not belong to the checkpoint.*vocab_size=128256"):
        build(llama3_ckpt, llama2_tokenizer_path)


def test_llama3_tokenizer_with_llama2_checkpoint_is_refused(llama2_ckpt, llama3_tokenizer_path):
    with pytest.raises(CheckpointError, match="has 128256 tokens but .* embeds 32000"):
        build(llama2_ckpt, llama3_tokenizer_path)


def test_two_shard_folder_loads_in_one_process(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 128256}
    state_dict = random_state_dict(ModelArgs.from_params(params))
    folder = write_checkpoint(tmp_path / "two", params, state_dict, n_shards=2)
    model_sd = build(folder, llama3_tokenizer_path).model.state_dict()
    for key, tensor in state_dict.items():
        assert torch.equal(model_sd[key], tensor), key


def test_process_count_that_splits_heads_lists_valid_counts(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 128256}
    folder = write_checkpoint(tmp_path / "two", params, random_state_dict(ModelArgs.from_params(params)), n_shards=2)
    with pytest.raises(CheckpointError, match=r"cannot be split over 3 processes; valid numbers of processes: 1, 2"):
        build(folder, llama3_tokenizer_path, model_parallel_size=3)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_shard_is_named(tmp_path, llama3_ckpt, llama3_tokenizer_path, damage):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    shard = folder / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint shard .*consolidated\.00\.pth.*checklist\.chk"):
        build(folder, llama3_tokenizer_path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_shard_that_would_run_code_is_refused(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    torch.save({"tok_embeddings.weight": torch.zeros(1), "evil": RunsCode()}, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refusing to load"):
        build(folder, llama3_tokenizer_path)


def test_shard_missing_a_weight_is_named(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    shard = folder / "consolidated.00.pth"
    state_dict = torch.load(shard, weights_only=True)
    del state_dict["layers.1.feed_forward.w2.weight"]
    torch.save(state_dict, shard)
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*layers\.1\.feed_forward\.w2\.weight"):
        build(folder, llama3_tokenizer_path)


def test_params_not_matching_the_weights_are_named(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    (folder / "params.json").write_text(json.dumps({**TINY_PARAMS, "vocab_size": 128256, "dim": 128}))
    with pytest.raises(CheckpointError, match="does not match params.json"):
        build(folder, llama3_tokenizer_path)


def test_invalid_params_json_is_named(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    (folder / "params.json").write_text("<html>403 Forbidden</html>")
    with pytest.raises(CheckpointError, match="params.json is not valid JSON"):
        build(folder, llama3_tokenizer_path)


def test_heads_not_divisible_by_processes_are_named(llama3_ckpt, llama3_tokenizer_path, tmp_path):
    params = {**TINY_PARAMS, "vocab_size": 128256}
    folder = write_checkpoint(tmp_path / "three", params, random_state_dict(ModelArgs.from_params(params)), n_shards=3)
    with pytest.raises(CheckpointError, match="cannot be split over 3 processes"):
        build(folder, llama3_tokenizer_path, model_parallel_size=3)


def test_checkpoint_without_output_weight_ties_it_to_the_embedding(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 128256, "use_scaled_rope": True}
    state_dict = random_state_dict(ModelArgs.from_params(params))
    del state_dict["output.weight"]
    generator = build(write_checkpoint(tmp_path / "llama-3.2-tiny", params, state_dict), llama3_tokenizer_path)
    torch.testing.assert_close(generator.model.output.weight, state_dict["tok_embeddings.weight"])


def test_a_tied_output_shares_the_embeddings_memory_after_conversion(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 128256}
    state_dict = random_state_dict(ModelArgs.from_params(params), dtype=torch.bfloat16)
    del state_dict["output.weight"]
    generator = build(write_checkpoint(tmp_path / "tied", params, state_dict), llama3_tokenizer_path)  # bf16 -> fp32
    model = generator.model
    assert model.output.weight.dtype == torch.float32
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_shards_with_more_layers_than_params_json_says_are_refused_naming_n_layers(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_layers": 1}))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: params\.json n_layers = 1, but the weights have 2 layers .*layers\.1\."):
        build(folder, llama3_tokenizer_path)


def test_a_tensor_a_llama_model_does_not_have_is_refused_naming_it(tmp_path, llama3_ckpt, llama3_tokenizer_path):
    folder = copy_ckpt(llama3_ckpt, tmp_path / "ckpt")
    shard = folder / "consolidated.00.pth"
    torch.save({**torch.load(shard, weights_only=True), "lm_head.bias": torch.zeros(4)}, shard)
    with pytest.raises(CheckpointError, match=r"holds 1 weight\(s\) a Llama model does not have, e\.g\. \['lm_head\.bias'\]"):
        build(folder, llama3_tokenizer_path)


def test_llama2_shards_keep_their_rope_freqs_table(llama2_ckpt, llama2):
    assert "rope.freqs" in torch.load(llama2_ckpt / "consolidated.00.pth", weights_only=True, mmap=True)
    assert llama2.model.params.n_layers == TINY_PARAMS["n_layers"]


def test_model_parallel_size_without_torchrun_says_how_to_start_the_processes(llama3_ckpt, llama3_tokenizer_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"model_parallel_size=2 needs 2 processes, but this is a single process: run with `torchrun --nproc_per_node 2"):
        build(llama3_ckpt, llama3_tokenizer_path, model_parallel_size=2)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model_parallel_size": "2"}, TypeError, r"model_parallel_size must be an integer .*got '2'"),
        ({"model_parallel_size": 0}, ValueError, r"model_parallel_size must be >= 1, got 0"),
        ({"max_seq_len": "32"}, TypeError, r"max_seq_len must be an integer, got '32' \(str\)"),
        ({"max_batch_size": 2.5}, TypeError, r"max_batch_size must be an integer, got 2\.5 \(float\)"),
    ],
    ids=["model_parallel_size-string", "model_parallel_size-zero", "max_seq_len-string", "max_batch_size-float"],
)
def test_build_arguments_of_the_wrong_type_are_named(llama3_ckpt, llama3_tokenizer_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        build(llama3_ckpt, llama3_tokenizer_path, **kwargs)
