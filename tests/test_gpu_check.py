"""bench/gpu_check.sh --dry-run: every part of the one-command GPU visit on the CPU (tiny shapes,
Triton interpreted, peers absent) within a 60 s budget, one part made too slow for its cap on
purpose, and bench/record_gpu.py turning the folder into the tables and plots, so that neither a
typo nor a part cut short ever costs a GPU minute."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "kernels", "loss", "step", "ladder", "big"]  # the default call, in priority order
LATER = ["tests", "compiled"]  # a second call's
BUDGET = 60
# what each part leaves in work/, row by row
RESULTS = {"env": "env.json", "kernels": "kernels.jsonl", "loss": "loss.json", "step": "step/results.json",
           "ladder": "ladder/results.json", "big": "big/results.json"}
ROW_STATUSES = {"ok", "timeout", "cut", "skipped", "not run"}  # never "failed": a crash is a bug


def _work(out: Path, tmp: Path) -> Path:
    with tarfile.open(out / "work.tar.gz") as tar:
        tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
    return tmp / "work"


@pytest.mark.slow
def test_the_dry_run_keeps_every_parts_rows_within_its_budget(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("FTCORE_TEST_CUDA",)}
    # step made slow on purpose: 8 s cannot hold its eleven rows (nor, on a busy machine, one)
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--dry-run", "--budget-s", str(BUDGET),
                        "--cap", "step=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * BUDGET)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = {line.split("\t")[0]: line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()}
    assert list(parts) == PARTS + LATER + ["total"]
    assert int(parts["total"][2]) <= BUDGET, parts["total"]  # the caps and the budget held
    assert int(parts["step"][2]) <= 8 + 10, parts["step"]  # at most its cap, and timeout's kill grace
    for name in LATER:
        assert parts[name][1] == "skipped" and "not in --parts" in parts[name][3]
    ran = [name for name in PARTS if parts[name][1] != "skipped"]  # "skipped": the budget was spent before it
    assert ran[:4] == PARTS[:4], parts  # the budget reaches the first parts whatever the load
    for name in ran:
        assert parts[name][1] in ("0", "124"), (name, parts[name], p.stdout[-3000:])

    # what comes back is few files (the device tool returns at most 8), the logs in one archive;
    # every part that ran left its results, the one cut short included
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and "work.tar.gz" in files and "RESULTS.md" in files, files
    work = _work(out, tmp_path / "x")
    for name in ran:
        assert (work / RESULTS[name]).is_file(), (name, sorted(str(f.relative_to(work)) for f in work.rglob("*")))
    step = json.loads((work / "step/results.json").read_text())
    rows = step["rows"]
    assert [r["name"] for r in rows] == "hf,best,hf-liger-gc,best-ac,baseline,hf-liger,bf16-mixed,bf16,ac-full,loss-triton,best-kernels".split(",")
    assert {r["status"] for r in rows} <= ROW_STATUSES and any(r["status"] != "ok" for r in rows), rows
    assert (work / "step/results.md").read_text().count("\n| ") == len(rows) + 1
    for name in ("loss", "ladder", "big"):
        if name in ran:
            rows = json.loads((work / RESULTS[name]).read_text())["rows"]
            assert rows and {r.get("status", "ok") for r in rows} <= ROW_STATUSES, (name, rows)

    md = (out / "RESULTS.md").read_text()
    for section in ("GPU check on", "pytest -m gpu`, the kernels", "Workload A", "Workload B, eager",
                    "The memory ladder", "Compiled rows: not measured"):
        assert section in md, section
    assert "| hf-liger-gc |" in md and "| best-kernels |" in md  # the cut part's rows, every one
    assert "torch " in md.split("### Workload B")[1].splitlines()[0]  # each table states its versions
    # the recorder reads a returned folder again (work/ only inside the archive) and files the
    # section into a RESULTS.md, newest first
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n\n## 2026-01-01: older\n\nold\n")
    again = subprocess.run([sys.executable, "bench/record_gpu.py", str(out), "--append", str(results)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    text = results.read_text()
    assert text.index("GPU check on") < text.index("## 2026-01-01: older") and text.startswith("# Results")

    # the second call's parts: the other `-m gpu` tests and the compiled rows
    out2 = tmp_path / "out2"
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(out2), "--dry-run", "--budget-s", "30", "--parts", ",".join(LATER)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = {line.split("\t")[0]: line.split("\t") for line in (out2 / "parts.tsv").read_text().splitlines()}
    assert all(parts[name][1] == "skipped" for name in PARTS) and all(parts[name][1] in ("0", "124") for name in LATER), parts
    work = _work(out2, tmp_path / "x2")
    assert (work / "tests.jsonl").is_file() and json.loads((work / "compiled/results.json").read_text())["rows"]
    md = (out2 / "RESULTS.md").read_text()
    assert "pytest -m gpu`, the other tests:" in md and "### Compiled rows: tiny" in md
