"""`ftcore plot RUN_DIR`: the curves of a run's metrics.jsonl as RUN_DIR/curves.png.

Four panels, against the optimizer step: training loss with the validation loss on top, learning
rate, tokens/s, peak memory. matplotlib is an optional extra (`pip install -e ".[plot]"`); eval.md
shows the picture when it exists (an `ftcore plot` after training, then re-running the report with
`ftcore eval`, or plotting before the final report is written).
"""
from __future__ import annotations

import json
from pathlib import Path

from ftcore.config import ConfigError
from ftcore.evaluation.report import CURVES


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, validation records) of a metrics.jsonl; a torn last line is skipped."""
    steps, vals = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (vals if "val_loss" in rec else steps).append(rec)
    return steps, vals


def plot_run(run_dir, out: str | Path | None = None) -> Path:
    """Draws RUN_DIR/metrics.jsonl into `out` (default RUN_DIR/curves.png); returns the path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"ftcore plot: no metrics.jsonl in {run_dir} (is it a run directory?)")
    steps, vals = read_metrics(metrics)
    if not steps:
        raise ConfigError(f"ftcore plot: {metrics} holds no step records yet")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("ftcore plot needs matplotlib: pip install -e \".[plot]\"") from None

    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    (loss_ax, lr_ax), (tok_ax, mem_ax) = axes
    loss_ax.plot(x, [r["loss"] for r in steps], lw=0.8, label="train")
    if vals:
        loss_ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", label="validation")
    loss_ax.set_ylabel("loss (completion tokens)")
    loss_ax.legend()
    lr_ax.plot(x, [r["lr"] for r in steps])
    lr_ax.set_ylabel("learning rate")
    tok_ax.plot(x, [r["tokens_per_s"] for r in steps], lw=0.8)
    tok_ax.set_ylabel("tokens/s")
    mem_ax.plot(x, [r["peak_mem_bytes"] / 2**30 for r in steps])
    mem_ax.set_ylabel("peak memory (GiB)")
    for ax in (tok_ax, mem_ax):
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / CURVES
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
