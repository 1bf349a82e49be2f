"""The benchmark script runs end to end and reports every row (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_prints_every_row_and_valid_json(tmp_path):
    out_json = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", "tiny", "--quick", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")]
    for label in ("load time", "load peak RSS", "prefill 32 tokens", "prefill 128 tokens", "decode batch 1", "decode batch 4",
                  "ragged batch", "even batch", "decode batch 1, bf16 weights", "decode batch 1, int8 weights"):
        assert any(r.startswith(label) for r in rows), f"no row {label!r} in:\n{run.stdout}"
    result = json.loads(out_json.read_text())
    assert set(result["ours"]) == {"prefill_32", "prefill_128", "decode_b1", "decode_b4", "ragged", "even"}
    assert all(v > 0 for v in result["ours"].values())
    for weight_format in ("bf16", "int8"):
        measured = result["weight_formats"][weight_format]
        assert measured["decode_b1"] > 0 and 0 <= measured["greedy_agreement"] <= 1
    assert result["load_peak_rss_bytes"] > result["weight_bytes"] > 0
