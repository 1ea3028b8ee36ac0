"""bench/gpu_check.sh --dry-run: every part of the one-command GPU visit on the CPU (tiny shapes,
Triton interpreted, peers absent), and bench/record_gpu.py turning its folder into the tables and
plots, so that a typo never costs a GPU minute."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "tests", "loss", "step", "ladder", "big", "compiled"]


@pytest.mark.slow
def test_the_dry_run_exercises_every_part_and_the_recorder(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("FTCORE_TEST_CUDA",)}
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--dry-run", "--budget-s", "400"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = {line.split("\t")[0]: line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()}
    assert list(parts)[:len(PARTS)] == PARTS and "total" in parts
    for name in PARTS:
        assert parts[name][1] == "0", (name, parts[name], p.stdout[-3000:])
    # what comes back is few files (the device tool returns at most 8), the logs in one archive
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and "work.tar.gz" in files and "RESULTS.md" in files, files
    md = (out / "RESULTS.md").read_text()
    for section in ("GPU check on", "pytest -m gpu", "Workload A", "Workload B, eager", "The memory ladder",
                    "The Llama-3-8B shape", "Compiled rows"):
        assert section in md, section
    assert "not measured" not in md.split("### Workload A")[1].split("###")[0].split("Ratios")[0]
    assert "| ladder-bf16 |" in md and "| ladder-offload |" in md and "skipped" in md  # offload needs CUDA
    assert "missed" in md or "met" in md
    if any(line.startswith("Plots:") for line in md.splitlines()):
        assert (out / "step-throughput.png").is_file() and (out / "ladder-memory.png").is_file()
    # the recorder reads a returned folder again (work/ only inside the archive) and files the
    # section into a RESULTS.md, newest first
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n\n## 2026-01-01: older\n\nold\n")
    again = subprocess.run([sys.executable, "bench/record_gpu.py", str(out), "--append", str(results)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    text = results.read_text()
    assert text.index("GPU check on") < text.index("## 2026-01-01: older") and text.startswith("# Results")
