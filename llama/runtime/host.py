"""The machine this process runs on: how many CPU threads it computes with, where per-machine
builds (kernels, compiled code, the demo model) are cached, memory in 2 MB pages for weights.

torch sizes its thread pool by the host's cores. In a container, under `taskset`, or with several
torchrun processes on one CPU that oversubscribes the cores, and every parallel product then
waits at OpenMP barriers for a thread that is not running (a 10x slowdown was measured on a
busy 2-core AMD machine). The count here comes from the process's CPU affinity and its cgroup
quota, shared among the processes of one torchrun node; LLAMA_NUM_THREADS or `threads=` overrides.
"""

import contextlib
import ctypes
import logging
import math
import mmap
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from llama.runtime.distributed import itemsize

logger = logging.getLogger(__name__)

ENV = "LLAMA_NUM_THREADS"


def cache_root() -> Path:
    """Where this package keeps what it builds once per machine (kernels, compiled code, the demo):
    $LLAMA_CACHE, else ~/.cache/llama."""
    return Path(os.environ.get("LLAMA_CACHE") or Path.home() / ".cache" / "llama")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota if one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs' worth of time the cgroup allows (cgroup v2 cpu.max, or v1 cfs quota/period), None if unlimited."""
    v2 = root / "cpu.max"
    v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if v1_quota.is_file() and v1_period.is_file():
            quota_us = int(v1_quota.read_text())
            return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    except (OSError, ValueError):
        pass
    return None


def choose_threads(threads: Optional[int] = None) -> int:
    """threads if given, else $LLAMA_NUM_THREADS, else the available CPUs shared among this node's processes."""
    if threads is None and os.environ.get(ENV):
        value = os.environ[ENV]
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{ENV}={value!r} is not a whole number: set it to the number of threads to use") from None
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive whole number, got {threads!r}")
        return threads
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, available_cpus() // local_processes)


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU thread count to choose_threads(threads) and return it; log it once."""
    n = choose_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if not getattr(configure_threads, "logged", False):
        source = "threads=" if threads is not None else (ENV if os.environ.get(ENV) else "CPU affinity / quota")
        logger.info("Computing with %d CPU thread%s (from %s)", n, "" if n == 1 else "s", source)
        configure_threads.logged = True
    return n


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch computes with n CPU threads inside the block (None: unchanged).

    A decode step whose products run on llama.kernels' own pool leaves torch only small ops
    (norms, RoPE, attention over one token), which gain nothing from more threads, while torch's
    OpenMP threads, spinning between them, take the cores from the kernels' threads: on 2 AMD EPYC
    (Zen 5) cores SmolLM2 decodes 1.3x faster at batch 1 and 1.5x at batch 4 with torch on one.
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def libc_function(name: str, argtypes: list) -> Optional[Callable[..., int]]:
    """A function of a Linux process's C library with its argument types declared, or None where
    there is none (other systems; musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


_malloc_trim = libc_function("malloc_trim", [ctypes.c_size_t])


def release_freed_memory() -> None:
    """Give the C heap's freed pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Replacing many mid-sized tensors by copies (the fused projections of a compact model) leaves
    their freed memory in the heap, counted in the process's resident memory: SmolLM2's Q4_1
    GGUF kept ~30 MB that way, a third of the file.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


# madvise(address, length, advice), or None off Linux.
madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
_ALIGN = 64  # a cache line: the kernels' vector loads never straddle two


class HugePageArena:
    """CPU memory for a model's weights, in one anonymous mapping that Linux backs with 2 MB pages.

    A decode step streams every weight from memory once per token. With 4 KB pages that is a TLB
    miss every 4 KB, and the hardware prefetcher stops at each page's end; the fp32 products of the
    Llama 3.2 1B shape streamed 1.05-1.09x faster from 2 MB pages on a 2-core EPYC (Zen 5), where
    llama.cpp's memory-mapped file already had them. Transparent huge pages are often enabled only
    for memory that asks (madvise), which torch's allocator does not: this arena asks, and where
    the kernel has them off or none are free, it is ordinary memory.
    """

    def __init__(self, nbytes: int):
        self._memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bytes = torch.frombuffer(self._memory, dtype=torch.uint8)
        self._next = -self._bytes.data_ptr() % HUGE_PAGE  # huge pages cover 2 MB-aligned ranges
        madvise(self._bytes.data_ptr(), len(self._memory), _MADV_HUGEPAGE)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena (it keeps the whole mapping alive)."""
        count = math.prod(shape)
        size = count * itemsize(dtype)
        if self._next + size > self._bytes.numel():
            raise MemoryError(f"HugePageArena: {size} bytes asked, {self._bytes.numel() - self._next} left")
        start = self._next
        self._next = -(-(start + size) // _ALIGN) * _ALIGN
        return self._bytes[start:start + size].view(dtype).view(tuple(shape))

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """t's values in the arena."""
        return self.empty(t.shape, t.dtype).copy_(t)

    @staticmethod
    def size_for(nbytes: Iterable[int]) -> int:
        """The bytes an arena needs for tensors of these sizes (each starts on a cache line)."""
        return sum(-(-n // _ALIGN) * _ALIGN for n in nbytes)


def huge_page_arena(nbytes: int) -> Optional[HugePageArena]:
    """An arena of nbytes where the OS can give 2 MB pages on request (Linux), else None: torch's
    own allocations are as good there."""
    if madvise is None or nbytes <= 0:
        return None
    try:
        return HugePageArena(nbytes)
    except (OSError, ValueError):  # address space refused (ulimit -v, overcommit policy)
        return None
