"""bench/bench_step.py end to end on a CPU: the tiny shape, a few rows each in its own process, the
table printed last, results.json, the sweep, a failing row reported instead of fatal, a command
stopped by SIGTERM keeping its rows."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_step  # noqa: E402
import common  # noqa: E402
import matrix  # noqa: E402
from child import ChildSpec, launch  # noqa: E402
from ftcore.model import ModelConfig  # noqa: E402


@pytest.mark.slow
def test_smoke_table_json_and_sweep(tmp_path):
    p = subprocess.run([sys.executable, "bench/bench_step.py", "--smoke", "--sweep", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    # the matrix's table is the last thing on stdout, one line per row, in order
    lines = p.stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| row | what changes"))
    table = lines[start + 2:]
    assert [line.split("|")[1].strip() for line in table] == matrix.SMOKE_ROWS
    assert all(line.count("|") == lines[start].count("|") for line in table)

    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["preset"] == "tiny" and res["meta"]["workload"]["n_labelled"] == 2 * 16
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == matrix.SMOKE_ROWS
    for name, r in rows.items():
        if r["row"]["impl"] == "hf" and importlib.util.find_spec("transformers") is None:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["peak_alloc"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert (r.get("est_peak") is not None) == (r["row"]["impl"] == "ftcore")
        if r["row"]["impl"] == "ftcore" and r["row"]["loss"] == "torch":
            # the estimator against the measured CPU peak, through the whole bench (where CPU-only
            # bf16 matmul scratch is small beside the logits: bench/README.md)
            assert abs(r["est_peak"] / r["peak_alloc"] - 1) < 0.01, (name, r["est_peak"], r["peak_alloc"])

    sweep = res["sweep"]
    assert {(s["micro_batch"], s["seq_len"]) for s in sweep} == {(2, 32), (2, 64), (1, 64)}
    assert all(s["status"] == "ok" and s["peak_alloc"] > 0 and s["est_peak"] > 0 for s in sweep)
    by_shape = {(s["micro_batch"], s["seq_len"]): s["peak_alloc"] for s in sweep}
    assert by_shape[(1, 64)] < by_shape[(2, 64)]

    if importlib.util.find_spec("matplotlib") is not None:
        assert all((tmp_path / f).is_file() for f in ("throughput.png", "memory.png", "sweep.png"))
    else:
        assert "plots skipped" in p.stderr


def test_a_failing_row_is_reported_not_fatal(tmp_path):
    row = matrix.Row("broken", "a loss kernel that does not exist", loss="no-such-loss")
    spec = ChildSpec(row=row, cfg=ModelConfig(**matrix.PRESETS["tiny"]["cfg"]), device="cpu", prompt_frac=0.75,
                     out=str(tmp_path), micro_batch=1, seq_len=16, steps=1, warmup=1)
    assert ChildSpec.from_json(spec.to_json()) == spec
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = launch(spec, timeout=120, env=env)
    assert res["status"] == "failed" and "no-such-loss" in res["error"]

    results = {"meta": {"preset": "tiny", "params": 1, "device": "cpu", "date": "-", "versions": {}, "command": "-",
                        "peak_tflops": None, "flops_per_step": {"useful": 1.0},
                        "workload": {"micro_batch": 1, "seq_len": 16, "n_labelled": 4, "labelled_fraction": 0.25,
                                     "steps": 1, "warmup": 1}},
               "rows": [{**res, "what": row.what, "est_peak": 123456}]}
    table = bench_step.fmt_table(results).splitlines()
    assert table[-1].startswith("| broken |") and "failed" in table[-1]
    assert table[-1].count("|") == table[-3].count("|")


def test_a_command_stopped_by_sigterm_keeps_its_rows(tmp_path):
    """bench/gpu_check.sh ends a part that outruns its cap with SIGTERM: bench_step then still
    writes every row, the one running marked cut, the ones not reached skipped."""
    p = subprocess.Popen([sys.executable, "bench/bench_step.py", "--smoke", "--rows", "baseline,bf16", "--no-plots",
                          "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "results.json").exists() and time.monotonic() < deadline:  # the plan: rows start next
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # a row's process takes seconds to start: the first row is running
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("baseline", "cut"), ("bf16", "skipped")]
    assert all(r["torch"] == torch.__version__ for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "| baseline |" in md and "| cut: the command was stopped" in md and "| bf16 | pure bf16" in md
    assert out.rstrip().splitlines()[-1].startswith("| bf16 |")  # the table, last on stdout as ever


def test_estimate_only_for_a_shape_that_does_not_fit(tmp_path, capsys):
    assert bench_step.main(["--preset", "llama-3-8b", "--rows", "baseline,bf16,best-ac,hf", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "estimates only" in out and "| baseline |" in out and "| best-ac |" in out
    assert "| hf |" not in out  # peers are not estimated
    res = json.loads((tmp_path / "results.json").read_text())
    est = {r["name"]: r.get("est_peak") for r in res["rows"]}
    assert est["bf16"] < est["baseline"] and est["hf"] is None


def test_flop_count_of_llama_3_2_1b():
    cfg = matrix.model_config("llama-3.2-1b")
    B, T = 4, 2048
    f = cfg.step_flops(B, T, n_labelled=B * 512)
    # issue 8's "~7.8 GFLOP per token" counts every token's logits; the useful count only labelled ones
    assert abs(f["all_logits"] / (B * T) / 1e9 - 7.82) < 0.01
    assert abs(f["useful"] / (B * T) / 1e9 - 6.64) < 0.01
    assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0
