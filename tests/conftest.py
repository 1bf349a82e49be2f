"""Shared fixtures: real tokenizer files and reference vectors (fetched once, see assets.py)."""

from pathlib import Path
from typing import Callable, TypeVar

import pytest

import assets
from llama.tokenizer import Tokenizer

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
