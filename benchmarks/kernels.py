"""Time llama.kernels' products against each other and torch's on this CPU: ms, weight GB/s and
speed-up over our fp32 kernel.

    PYTHONPATH=. python benchmarks/kernels.py [--threads 1,2] [--busy] [--quick]

The candidates of one shape are timed call by call in turn (round robin), so that a change in the
machine's load hits them alike; each figure is the median of those calls. GB/s is the weight's
bytes (with its scales) over that time. --busy runs a busy-looping process beside the timings.
"""

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from llama import kernels

log = logging.getLogger("benchmarks.kernels")

SHAPES = [(576, 1536), (1536, 576), (2048, 2048), (8192, 2048), (49152, 576)]
ROWS = (1, 4, 16)


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    model = fields.get("model name", platform.processor())
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    flags = fields.get("flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
    return f"{model}{family}; {' '.join(sorted(simd))}"


def interleaved_medians(fns: Dict[str, Callable[[], object]], budget: float = 1.0, most: int = 300) -> Dict[str, float]:
    """Median seconds per call of each fn, calling them in turn until the budget is spent."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    end = time.perf_counter() + budget
    rounds = 0
    while rounds < 7 or (time.perf_counter() < end and rounds < most):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def candidates(n: int, k: int, m: int) -> Dict[str, Tuple[Callable[[], object], int]]:
    """name -> (call, weight bytes)."""
    w = torch.randn(n, k)
    x = torch.randn(m, k)
    q, scale = kernels.quantize_q8(w)
    p = kernels.quantize_q4(w)
    xb, scale_b = x.to(torch.bfloat16), scale.to(torch.bfloat16)
    return {
        "F.linear fp32": (lambda: F.linear(x, w), w.nbytes),
        "linear_f32": (lambda: kernels.linear_f32(x, w), w.nbytes),
        "linear_q8": (lambda: kernels.linear_q8(x, q, scale), q.nbytes + scale.nbytes),
        "linear_q4": (lambda: kernels.linear_q4(x, p), p.qs.nbytes + p.d.nbytes + p.m.nbytes),
        "_weight_int8pack_mm bf16": (lambda: torch._weight_int8pack_mm(xb, q, scale_b), q.nbytes + scale_b.nbytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=",".join(sorted({"1", str(len(os.sched_getaffinity(0)))})),
                        help="comma-separated thread counts (default: 1 and all CPUs)")
    parser.add_argument("--busy", action="store_true", help="time with a busy-looping process beside")
    parser.add_argument("--quick", action="store_true", help="m = 1 only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        log.info("CPU: %s", cpu_description())
        log.info("torch %s, kernels: %s%s; load average before: %.1f", torch.__version__, kernels.isa(),
                 ", one busy process beside" if busy else "", os.getloadavg()[0])
        log.info("%-3s %-12s %3s  %-26s %s", "thr", "shape (n,k)", "m", "product", "median, weight GB/s, x linear_f32")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            kernels.set_num_threads(threads)
            for n, k in SHAPES:
                for m in (1,) if args.quick else ROWS:
                    fns = candidates(n, k, m)
                    seconds = interleaved_medians({name: fn for name, (fn, _) in fns.items()})
                    for name, (_, nbytes) in fns.items():
                        log.info("%-3d %-12s %3d  %-26s %8.3f ms %5.1f GB/s %5.2fx", threads, f"{n}x{k}", m, name,
                                 seconds[name] * 1e3, nbytes / seconds[name] / 1e9, seconds["linear_f32"] / seconds[name])
        log.info("load average after: %.1f", os.getloadavg()[0])
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
