"""Resharding: a checkpoint saved as N shards loads on M processes, and llama-reshard writes it as M shards."""

import shutil
import subprocess
import sys

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint
from test_torchrun import run

from llama import Llama
from llama.args import CheckpointError, ModelArgs
from llama.checkpoints.meta import load_shard, shard_dim
from llama.checkpoints.reshard import reshard

# n_kv_heads 4 so that 4 shards keep whole key/value heads.
PARAMS4 = {**TINY_PARAMS, "n_kv_heads": 4}
FAMILIES = {
    "llama2": ({**PARAMS4, "vocab_size": -1}, 32000, False),
    "llama3": ({**PARAMS4, "vocab_size": 128256}, 128256, True),
}
PROMPTS = ["I believe the meaning of life is", "Simply put, the theory of relativity states that"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """For each family: the same random weights as 1 and as 4 shards, and the full state_dict."""
    made = {}

    def make(family: str):
        if family not in made:
            params, vocab, vocab_parallel = FAMILIES[family]
            state_dict = random_state_dict(ModelArgs.from_params(params, vocab_size=vocab), seed=7, dtype=torch.bfloat16)
            base = tmp_path_factory.mktemp(family)
            made[family] = {
                n: write_checkpoint(base / f"mp{n}", params, state_dict, n_shards=n, vocab_parallel_embedding=vocab_parallel)
                for n in (1, 4)
            }
            made[family]["state_dict"] = state_dict
        return made[family]

    return make


def build(folder, tokenizer_path) -> Llama:
    return Llama.build(str(folder), str(tokenizer_path), max_seq_len=32, max_batch_size=2)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_four_shards_in_one_process_equal_one_shard(family, folders, request):
    tokenizer = request.getfixturevalue(f"{family}_tokenizer_path")
    one, four = build(folders(family)[1], tokenizer), build(folders(family)[4], tokenizer)
    tokens = [one.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    out_one, _ = one.generate(tokens, max_gen_len=8, temperature=0)
    out_four, _ = four.generate(tokens, max_gen_len=8, temperature=0)
    assert out_four == out_one
    x = torch.tensor([tokens[0]])
    torch.testing.assert_close(four.model.forward(x, 0), one.model.forward(x, 0))


def test_process_count_that_splits_a_head_lists_valid_counts(folders, llama3_tokenizer_path):
    with pytest.raises(CheckpointError, match=r"cannot be split over 3 processes; valid numbers of processes: 1, 2, 4"):
        Llama.build(str(folders("llama3")[4]), str(llama3_tokenizer_path), 32, 2, model_parallel_size=3)


@pytest.mark.parametrize("shards", [4, 1])
def test_two_processes_merge_or_split_shards_like_one_process(shards, folders, llama3_tokenizer_path):
    family = folders("llama3")
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12, "--temperature", 0]
    one = run(common + ["--ckpt_dir", family[1]])
    two = run(common + ["--ckpt_dir", family[shards]], nproc=2)
    assert two.stdout == one.stdout


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_reshard_writes_torch_chunk_of_full_weights(family, folders, tmp_path):
    out = reshard(str(folders(family)[4]), str(tmp_path / "mp2"), 2)
    full, vocab_parallel = folders(family)["state_dict"], FAMILIES[family][2]
    for rank in range(2):
        shard = load_shard(out / f"consolidated.{rank:02d}.pth")
        for key, tensor in full.items():
            dim = shard_dim(key, vocab_parallel)
            expected = tensor if dim is None else tensor.chunk(2, dim=dim)[rank]
            assert torch.equal(shard[key], expected), key
    assert (out / "params.json").read_text() == (folders(family)[4] / "params.json").read_text()


def test_reshard_checklist_verifies_with_md5sum(folders, tmp_path):
    out = reshard(str(folders("llama3")[1]), str(tmp_path / "mp2"), 2)
    names = {line.split("  ")[1] for line in (out / "checklist.chk").read_text().splitlines()}
    assert names == {"params.json", "consolidated.00.pth", "consolidated.01.pth"}
    subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=out, check=True, capture_output=True)


def test_reshard_refuses_a_non_empty_folder_unless_overwrite(folders, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite True"):
        reshard(str(folders("llama3")[1]), str(tmp_path / "out"), 2)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    out = reshard(str(folders("llama3")[1]), str(tmp_path / "out"), 2, overwrite=True)
    assert (out / "consolidated.01.pth").is_file() and not (out / "notes.txt").exists()


def test_reshard_copies_a_converted_folders_tokenizer_files_and_lists_them_in_the_checklist(folders, tmp_path, smollm2_tokenizer_json):
    src = tmp_path / "converted"
    shutil.copytree(folders("llama3")[1], src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_tokenizer_json.parent / name, src / name)
    out = reshard(str(src), str(tmp_path / "mp2"), 2)
    for name in ("params.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=out, check=True, capture_output=True)
    assert "tokenizer.json" in (out / "checklist.chk").read_text()


def test_reshard_bad_size_lists_valid_sizes(folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"valid numbers of processes: 1, 2, 4"):
        reshard(str(folders("llama2")[4]), str(tmp_path / "out"), 3)
    assert not (tmp_path / "out").exists()


def test_reshard_command_line(folders, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llama.cli.reshard", "--ckpt_dir", str(folders("llama3")[4]), "--output_dir", str(tmp_path / "o"),
         "--model_parallel_size", "1"], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote shard 1/1" in result.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["checklist.chk", "consolidated.00.pth", "params.json"]
