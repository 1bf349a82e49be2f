"""The benchmark script runs end to end and reports every row (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(table, result) of a quick run on the tiny synthetic model."""
    out_json = tmp_path_factory.mktemp("bench") / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", "tiny", "--quick", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads(out_json.read_text())


def row_labels(table: str):
    return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]


def test_bench_quick_prints_every_row_and_valid_json(quick_run):
    table, result = quick_run
    rows = row_labels(table)
    for label in ("load time", "load peak RSS", "prefill 32 tokens", "prefill 128 tokens", "decode batch 1", "decode batch 4",
                  "ragged batch", "even batch", "decode batch 1, one busy process beside it",
                  "decode batch 4, one busy process beside it", "prefill 128 tokens, bf16 weights",
                  "decode batch 1, bf16 weights", "decode batch 4, bf16 weights", "prefill 128 tokens, int8 weights",
                  "decode batch 1, int8 weights", "decode batch 4, int8 weights", "decode batch 1, bf16 weights, compiled step"):
        assert any(r.startswith(label) for r in rows), f"no row {label!r} in:\n{table}"
    # Where decode steps run natively, compile=True compiles nothing: no compiled rows for fp32 and int8.
    native = bench.native_products()
    for label in ("decode batch 1, compiled step", "decode batch 1, int8 weights, compiled step"):
        assert any(r.startswith(label) for r in rows) != native, f"row {label!r} (native step: {native}) in:\n{table}"
    assert set(result["ours"]) == {"prefill_32", "prefill_128", "decode_b1", "decode_b4", "ragged", "even"}
    assert all(v > 0 for v in result["ours"].values())
    assert set(result["contended"]) == {"decode_b1", "decode_b4"} and all(v > 0 for v in result["contended"].values())
    assert native or (result["compiled"]["decode_b1"] > 0 and result["compiled"]["compile_seconds"] > 0)
    for weight_format in ("bf16", "int8"):
        measured = result["weight_formats"][weight_format]
        assert min(measured["prefill_128"], measured["decode_b1"], measured["decode_b4"]) > 0
        assert 0 <= measured["greedy_agreement"] <= 1
        if weight_format == "bf16" or not native:
            assert measured["compiled"]["decode_b1"] > 0 and 0 <= measured["compiled"]["greedy_agreement"] <= 1
    assert result["load_peak_rss_bytes"] > result["weight_bytes"] > 0


def test_llama_cpp_figures_get_their_own_columns(quick_run):
    _, result = quick_run
    ours = result["ours"]
    result["llama_cpp"] = {
        "exact": {"prefill_32": ours["prefill_32"] / 2, "prefill_128": ours["prefill_128"], "decode_b1": ours["decode_b1"] * 2},
        "f16": {"decode_b1": result["weight_formats"]["bf16"]["decode_b1"] / 4, "prefill_128": result["weight_formats"]["bf16"]["prefill_128"]},
    }
    lines = bench.render_table(result).splitlines()
    assert lines[2].endswith("| llama.cpp | ours / llama.cpp |")
    cells = {line.split("|")[1].strip().split(" (")[0]: line.split("|")[-3:-1] for line in lines if line.startswith("| ")}
    assert [c.strip() for c in cells["prefill 32 tokens"]][1] == "2.00"
    assert [c.strip() for c in cells["decode batch 1"]][1] == "0.50"
    assert [c.strip() for c in cells["decode batch 1, bf16 weights"]][1] == "4.00"
    assert [c.strip() for c in cells["prefill 128 tokens, bf16 weights"]][1] == "1.00"
    assert [c.strip() for c in cells["decode batch 4"]] == ["", ""]


def test_a_compact_formats_decode_ceiling_streams_its_bytes_at_least_as_fast_as_the_compute_dtypes(quick_run):
    _, result = quick_run
    compute_rate = result["decode_ceiling_tok_s"] * result["streamed_params"] * 4  # fp32 bytes a second
    for weight_format in ("bf16", "int8"):
        ceiling = result["weight_formats"][weight_format]["decode_ceiling_tok_s"]
        assert ceiling * result["streamed_params"] * bench.FORMAT_BYTES[weight_format] >= 0.999 * compute_rate, weight_format


def test_decode_ceiling_streams_a_decode_steps_bytes_not_one_cached_matrix():
    made, read = [], []

    def make():
        made.append(torch.zeros(256))  # 1 KiB
        return made[-1]

    bench._stream_bandwidth(10 * 1024, make, lambda w: read.append(w), quick=True)
    assert len(made) == 10  # distinct weights adding up to the step's bytes
    assert len({w.data_ptr() for w in read}) == 10 and len(read) % 10 == 0


def test_meta_to_gguf_writes_the_weights_our_gguf_reader_reads_back(llama3_ckpt, vocab_gguf, tmp_path):
    import json

    from meta_to_gguf import write_gguf

    from llama.checkpoints.source import read_as_meta

    src = tmp_path / "scaled"
    src.mkdir()
    params = {**json.loads((llama3_ckpt / "params.json").read_text()), "use_scaled_rope": True}
    (src / "params.json").write_text(json.dumps(params))
    (src / "consolidated.00.pth").symlink_to(llama3_ckpt / "consolidated.00.pth")
    out = write_gguf(src, vocab_gguf("llama-bpe"), tmp_path / "m.gguf")

    theirs_params, theirs = read_as_meta(out)
    ours_params, ours = read_as_meta(src)
    assert theirs_params["use_scaled_rope"] and set(theirs) == set(ours)
    assert {k: theirs_params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")} == {
        k: ours_params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
    }
    for key in ours:
        assert torch.equal(theirs[key], ours[key].float()), key


def test_decode_rounds_take_batch_sizes_and_llama_cpp_in_turns():
    calls = []

    class Rival:
        def decode_round(self):
            calls.append("llama.cpp")

    rates = bench.decode_rates(lambda prompts, n: calls.append((len(prompts), n)), {"decode": 4, "decode_prompt": 2},
                               rival=Rival())
    timed_rounds = [c for c in calls if c == "llama.cpp" or c[1] == 4]  # not the warm-up and prefill generations
    assert timed_rounds == [(1, 4), (4, 4), "llama.cpp"] * bench.RIVAL_ROUNDS
    assert set(rates) == {"decode_b1", "decode_b4"}
