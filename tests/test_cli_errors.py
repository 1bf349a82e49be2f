"""What a command-line user sees when something is wrong: `error: <message>`, no traceback."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from llama.cli.errors import reported_errors

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # a hung process fails its test instead of the whole run
EXAMPLES = ["example_text_completion.py", "example_chat_completion.py"]
COMMANDS = {
    "example_text_completion.py": ["example_text_completion.py"],
    "example_chat_completion.py": ["example_chat_completion.py"],
    "llama-chat": ["-m", "llama.cli.chat"],
}


def run(args, env: Optional[Dict[str, str]] = None, nproc: Optional[int] = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "LLAMA_DEBUG"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    full_env.update(env or {})
    return subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=full_env)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_checkpoint_folder_is_one_line(command, tmp_path):
    result = run(COMMANDS[command] + ["--ckpt_dir", tmp_path / "nowhere"])
    assert_one_line_error(result, "checkpoint")
    assert "nowhere" in result.stderr


def test_llama_debug_shows_the_traceback(tmp_path):
    result = run(["example_text_completion.py", "--ckpt_dir", tmp_path / "nowhere"], env={"LLAMA_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "nowhere" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_weight_format_is_one_line(command, tmp_path):
    assert_one_line_error(run(COMMANDS[command] + ["--ckpt_dir", tmp_path, "--weight_format", "int3"]), "unknown weight_format 'int3'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_on_a_machine_without_it_is_one_line(command, llama3_ckpt, llama3_tokenizer_path):
    result = run(COMMANDS[command] + ["--ckpt_dir", llama3_ckpt, "--tokenizer_path", llama3_tokenizer_path, "--device", "cuda"])
    assert_one_line_error(result, "CUDA is not available here")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "flag, value, message",
    [("--temperature", -1, "temperature must be >= 0"), ("--top_p", 0, "top_p must be in (0, 1]"),
     ("--max_gen_len", 2.5, "max_gen_len must be an integer")],
)
def test_sampling_flags_are_refused_before_the_checkpoint_is_opened(command, flag, value, message, tmp_path):
    # The folder does not exist: an error about it would mean the flags were checked too late.
    assert_one_line_error(run(COMMANDS[command] + ["--ckpt_dir", tmp_path / "nowhere", flag, value]), message)


def test_too_small_max_seq_len_is_one_line(llama3_ckpt, llama3_tokenizer_path):
    result = run(["example_text_completion.py", "--ckpt_dir", llama3_ckpt, "--tokenizer_path", llama3_tokenizer_path,
                  "--max_seq_len", 4])
    assert_one_line_error(result, "more than max_seq_len=4")


def test_llama_convert_missing_source_is_one_line(tmp_path):
    assert_one_line_error(run(["-m", "llama.cli.convert", tmp_path / "nowhere", tmp_path / "out"]), "checkpoint not found")


def test_llama_reshard_missing_checkpoint_is_one_line(tmp_path):
    result = run(["-m", "llama.cli.reshard", "--ckpt_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out",
                  "--model_parallel_size", 1])
    assert_one_line_error(result, "checkpoint folder not found")


def test_llama_reshard_to_an_impossible_count_names_its_own_flag(llama3_ckpt, tmp_path):
    result = run(["-m", "llama.cli.reshard", "--ckpt_dir", llama3_ckpt, "--output_dir", tmp_path / "out", "--model_parallel_size", 3])
    assert_one_line_error(result, "--model_parallel_size 2")
    assert "torchrun" not in result.stderr


def test_llama_reshard_help_describes_every_flag():
    result = run(["-m", "llama.cli.reshard", "--help"], env={"PAGER": "cat"})
    out = result.stdout + result.stderr  # fire writes its help to either, by version
    for described in ["the Meta folder to read", "the folder to create", "the number of shards to write", "replace output_dir"]:
        assert described in out


def test_under_torchrun_rank_0_alone_prints_an_error_every_rank_meets(tmp_path):
    result = run(["example_text_completion.py", "--ckpt_dir", tmp_path / "nowhere"], nproc=2)
    assert result.returncode != 0
    assert result.stderr.count("error: checkpoint folder not found") == 1
    assert "error (rank 1)" not in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


# --- the helper itself ---


def test_expected_error_exits_1_with_its_message(capsys, monkeypatch):
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:
        with reported_errors():
            raise FileNotFoundError("no such folder: 'x'")
    assert exit.value.code == 1
    assert capsys.readouterr().err == "error: no such folder: 'x'\n"


def test_ctrl_c_exits_130_quietly(capsys, monkeypatch):
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:
        with reported_errors():
            raise KeyboardInterrupt
    assert exit.value.code == 130
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    with pytest.raises(KeyError):
        with reported_errors():
            raise KeyError("tok_embeddings.weight")
