"""Time llama.kernels' products against torch's on this CPU: a table of ms and weight GB/s.

    PYTHONPATH=. python benchmarks/kernels.py [--threads N] [--busy] [--quick]

--busy runs a busy-looping process beside the timings (another process competing for a core).
Each figure is the median of repeated calls; GB/s is the weight's bytes over that time.
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
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama import kernels

log = logging.getLogger("benchmarks.kernels")

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 2048), (8192, 2048)]
ROWS = (1, 2, 4, 16)


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    model = fields.get("model name", platform.processor())
    flags = fields.get("flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
    return f"{model}; {' '.join(sorted(simd))}"


def median_seconds(fn: Callable[[], object], budget: float = 0.3, most: int = 200) -> float:
    fn()
    times: List[float] = []
    end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < end and len(times) < most):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cell(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e3:8.3f} ms {nbytes / seconds / 1e9:5.1f} GB/s"


def rows_f32(n: int, k: int, m: int) -> List[Tuple[str, Optional[float], int]]:
    w = torch.randn(n, k)
    x = torch.randn(m, k)
    mv = (lambda: torch.mv(w, x[0])) if m == 1 else None
    return [
        ("F.linear fp32", median_seconds(lambda: F.linear(x, w)), w.nbytes),
        ("torch.mv fp32", median_seconds(mv) if mv else None, w.nbytes),
        ("linear_f32", median_seconds(lambda: kernels.linear_f32(x, w)), w.nbytes),
    ]


def rows_quantized(n: int, k: int, m: int) -> List[Tuple[str, Optional[float], int]]:
    w = torch.randn(n, k)
    x = torch.randn(m, k)
    q, scale = kernels.quantize_q8(w)
    xb = x.to(torch.bfloat16)
    scale_b = scale.to(torch.bfloat16)
    p = kernels.quantize_q4(w)
    q4_bytes = p.qs.nbytes + p.d.nbytes + p.m.nbytes
    return [
        ("_weight_int8pack_mm bf16", median_seconds(lambda: torch._weight_int8pack_mm(xb, q, scale_b)), q.nbytes),
        ("linear_q8", median_seconds(lambda: kernels.linear_q8(x, q, scale)), q.nbytes + scale.nbytes),
        ("linear_q4", median_seconds(lambda: kernels.linear_q4(x, p)), q4_bytes),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--busy", action="store_true", help="time with a busy-looping process beside")
    parser.add_argument("--quick", action="store_true", help="m = 1 and 4 only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        log.info("CPU: %s", cpu_description())
        log.info("torch %s, %d threads, kernels: %s%s; load average before: %.1f", torch.__version__, args.threads,
                 kernels.isa(), ", one busy process beside" if busy else "", os.getloadavg()[0])
        log.info("%-12s %3s  %-26s %s", "shape (n,k)", "m", "product", "time, weight bytes / time")
        for n, k in SHAPES:
            for m in (1, 4) if args.quick else ROWS:
                for name, seconds, nbytes in rows_f32(n, k, m) + rows_quantized(n, k, m):
                    if seconds is not None:
                        log.info("%-12s %3d  %-26s %s", f"{n}x{k}", m, name, cell(seconds, nbytes))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
