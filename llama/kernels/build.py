"""Build cpu.cpp and decode.cpp into a shared library once per source, compiler, flags and CPU, and load it.

The library is compiled with -march=native, so a cached build is only valid on a CPU with the
same instruction set extensions: their list is part of the cache key, and a cache directory copied
to another machine rebuilds.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from llama.runtime.host import cache_root

log = logging.getLogger(__name__)

# The products (cpu.cpp), the decode step that calls them (decode.cpp), and their shared vector types.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu.cpp", "decode.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "linear.h"))
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")
# $LLAMA_KERNELS_MARCH replaces -march=native: "haswell" runs the AVX2 code on an AVX-512 CPU (to
# measure what an AVX2-only CPU gets), "x86-64" the portable C++.
MARCH_ENV = "LLAMA_KERNELS_MARCH"


def default_flags() -> Sequence[str]:
    """FLAGS with -march from $LLAMA_KERNELS_MARCH where it is set."""
    march = os.environ.get(MARCH_ENV)
    return FLAGS if not march else tuple(f"-march={march}" if f == "-march=native" else f for f in FLAGS)


class BuildError(RuntimeError):
    pass


def find_compiler() -> Optional[str]:
    """$CXX, else the compiler torch.compile is configured with (if inductor is loaded already:
    importing it takes seconds), else c++, g++ or clang++ on the PATH."""
    candidates = [os.environ.get("CXX")]
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        cxx = getattr(getattr(inductor, "cpp", None), "cxx", None)  # not in every torch version
        candidates += list(cxx) if isinstance(cxx, (tuple, list)) else [cxx]
    candidates += ["c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> str:
    """The CPU's instruction set extensions (Linux: the flags line of /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def library_path(compiler: str, flags: Optional[Sequence[str]] = None) -> Path:
    """Where the build for these sources, compiler (and its version), flags and CPU lives."""
    flags = default_flags() if flags is None else flags
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256()
    for part in (*(f.read_text() for f in SOURCES + HEADERS), compiler, version, " ".join(flags), cpu_flags()):
        key.update(part.encode() + b"\0")
    return cache_root() / "kernels" / key.hexdigest()[:16] / "cpu.so"


def build(compiler: str, flags: Optional[Sequence[str]] = None) -> Path:
    """The library's path, compiling it first if it is not cached. Concurrent builds (several
    processes) each write a temporary file and rename it into place: the last one wins, whole."""
    flags = default_flags() if flags is None else flags
    path = library_path(compiler, flags)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="cpu.", suffix=".so.tmp")
    os.close(fd)
    command: List[str] = [compiler, *flags, *map(str, SOURCES), "-o", tmp]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{result.stderr}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: Path) -> ctypes.CDLL:
    """The library with its functions' argument types declared (ctypes releases the GIL in calls)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.llk_isa.restype = ctypes.c_char_p
    lib.llk_isa.argtypes = []
    lib.llk_threads.restype = ctypes.c_int
    lib.llk_threads.argtypes = []
    lib.llk_set_threads.restype = None
    lib.llk_set_threads.argtypes = [ctypes.c_int]
    lib.llk_linear_f32.restype = None
    lib.llk_linear_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.llk_linear_q8.restype = None
    lib.llk_linear_q8.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, i64]
    lib.llk_linear_q4.restype = None
    lib.llk_linear_q4.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64]
    lib.llk_linear_parts.restype = None
    lib.llk_linear_parts.argtypes = [ptr, i64, ptr, ptr, i64]
    lib.llk_decode_layers.restype = ctypes.c_int
    lib.llk_decode_layers.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, ptr]
    return lib


def native_library() -> Optional[ctypes.CDLL]:
    """The built library, or None after one warning if there is no compiler or the build fails."""
    compiler = find_compiler()
    if compiler is None:
        log.warning(
            "llama.kernels: no C++ compiler found ($CXX, c++, g++, clang++): small-batch CPU products "
            "fall back to torch and run slower; install one (e.g. apt-get install g++) or set $CXX"
        )
        return None
    try:
        return load(build(compiler))
    except (BuildError, OSError) as e:
        log.debug("%s", e)
        last_line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning(
            "llama.kernels: building %s with %s failed (%s): small-batch CPU products fall back to "
            "torch and run slower; install a working C++17 compiler (e.g. apt-get install g++) or set $CXX",
            " and ".join(f.name for f in SOURCES), compiler, last_line,
        )
        return None
