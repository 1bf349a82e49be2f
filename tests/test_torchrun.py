"""Real multi-process runs: the example scripts under torchrun (gloo) and as plain python."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint

from llama.args import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # a hung process group fails the test instead of the whole run


def run(args, nproc=None, check=True, env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
    ]
    env = None if env is None else {**os.environ, **env}
    result = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same random weights saved as 1 and as 2 shards, for each family's embedding split."""
    made = {}

    def make(family: str) -> dict:
        if family in made:
            return made[family]
        vocab_parallel = family == "llama3"
        params = {**TINY_PARAMS, "vocab_size": 128256 if vocab_parallel else -1}
        args = ModelArgs.from_params(params, vocab_size=128256 if vocab_parallel else 32000)
        state_dict = random_state_dict(args, seed=5, dtype=torch.bfloat16)
        base = tmp_path_factory.mktemp(family)
        made[family] = {
            n: write_checkpoint(base / f"mp{n}", params, state_dict, n_shards=n, vocab_parallel_embedding=vocab_parallel)
            for n in (1, 2)
        }
        return made[family]

    return make


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_two_processes_on_two_shards_equal_one_process(family, sharded, request):
    folders = sharded(family)
    tokenizer = request.getfixturevalue(f"{family}_tokenizer_path")
    common = ["example_text_completion.py", "--tokenizer_path", tokenizer, "--max_gen_len", 12, "--temperature", 0]
    one = run(common + ["--ckpt_dir", folders[1]])
    two = run(common + ["--ckpt_dir", folders[2]], nproc=2)
    assert one.stdout.count("==================================") == 4
    assert two.stdout == one.stdout  # only rank 0 prints, and prints the same


def test_bf16_weights_on_two_processes_equal_one_process(sharded, llama3_tokenizer_path):
    # bf16 rounds each weight alone, so a split weight is rounded as the whole one is.
    folders = sharded("llama3")
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12,
              "--temperature", 0, "--weight_format", "bf16"]
    one = run(common + ["--ckpt_dir", folders[1]])
    two = run(common + ["--ckpt_dir", folders[2]], nproc=2)
    assert two.stdout == one.stdout


def test_int8_weights_run_on_two_processes(sharded, llama3_tokenizer_path):
    # A process quantizes the slice it holds (per 32 columns, or per row where its slice's columns
    # do not split into 32s): close to, not always the same as, one process. It must still run.
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12,
              "--temperature", 0, "--weight_format", "int8", "--ckpt_dir", sharded("llama3")[2]]
    assert run(common, nproc=2).stdout.count("==================================") == 4


def test_seeded_sampling_is_the_same_on_every_rank_and_in_one_process(sharded, llama3_tokenizer_path):
    folders = sharded("llama3")
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12]
    assert run(common + ["--ckpt_dir", folders[2]], nproc=2).stdout == run(common + ["--ckpt_dir", folders[1]]).stdout


def test_chat_example_prints_metas_layout_under_torchrun(sharded, llama2_tokenizer_path):
    folder = sharded("llama2")[1]
    out = run(["example_chat_completion.py", "--ckpt_dir", folder, "--tokenizer_path", llama2_tokenizer_path,
               "--max_gen_len", 4, "--max_batch_size", 4], nproc=1).stdout
    assert out.count("==================================") == 6
    assert "User: what is the recipe of mayonnaise?\n\n> Assistant: " in out
    assert "System: Always answer with Haiku\n\nUser: I am going to Paris, what should I see?\n\n> Assistant: " in out
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in out


def test_process_count_that_splits_heads_fails_every_rank_with_valid_counts(sharded, llama3_tokenizer_path):
    folder = sharded("llama3")[2]
    result = run(["example_text_completion.py", "--ckpt_dir", folder, "--tokenizer_path", llama3_tokenizer_path],
                 nproc=3, check=False)
    assert result.returncode != 0
    assert "valid numbers of processes: 1, 2" in result.stderr


def test_corrupt_shard_on_one_rank_ends_the_whole_run(sharded, llama3_tokenizer_path, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in sharded("llama3")[2].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "consolidated.01.pth").write_bytes(b"\0" * 1000)
    result = run(["example_text_completion.py", "--ckpt_dir", folder, "--tokenizer_path", llama3_tokenizer_path],
                 nproc=2, check=False)
    assert result.returncode != 0
    assert "consolidated.01.pth" in result.stderr


def test_compiled_decoding_on_two_processes_equals_eager(sharded, llama3_tokenizer_path):
    # Each process compiles its step; the collectives between its pieces run eagerly.
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12,
              "--temperature", 0, "--ckpt_dir", sharded("llama3")[2]]
    assert run(common + ["--compile"], nproc=2).stdout == run(common, nproc=2).stdout


def test_a_frozen_rank_ends_the_job_with_a_message_naming_it(sharded, llama3_tokenizer_path):
    # Rank 1 stops itself after loading. Rank 0 gives up on it after LLAMA_DIST_TIMEOUT; torchrun
    # then sends the stopped rank SIGTERM, which waits for a SIGCONT that never comes, and kills it
    # 30 s later: about 10 + 30 s after the freeze, plus start and load.
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    start = time.monotonic()
    result = run(["tests/frozen_rank.py", sharded("llama3")[2], llama3_tokenizer_path], nproc=2, check=False,
                 env={"FREEZE_RANK": "1", "LLAMA_DIST_TIMEOUT": "10", "PYTHONPATH": path}, timeout=150)
    assert result.returncode != 0
    assert "error: rank 1 did not answer within 10 s" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr
    assert time.monotonic() - start < 120


def test_int4_weights_run_on_two_processes(sharded, llama3_tokenizer_path):
    # Each process's slice of a row-parallel weight holds whole 32-column groups (checked at load;
    # test_gguf_quantized checks the slices' blocks), but the two partial sums of a decode step
    # add up in another order than one process's: close to, not the same as, one process.
    common = ["example_text_completion.py", "--tokenizer_path", llama3_tokenizer_path, "--max_gen_len", 12,
              "--temperature", 0, "--weight_format", "int4", "--ckpt_dir", sharded("llama3")[2]]
    assert run(common, nproc=2).stdout.count("==================================") == 4
