"""`ftcore plot RUN_DIR [RUN_DIR ...] [--out FILE]`: the curves of runs' metrics.jsonl.

Four panels, against the optimizer step: training loss (each record's window mean) with the
validation loss on top, learning rate, tokens/s, peak memory. One run: RUN_DIR/curves.png by
default. Several runs (two precisions, two seeds): overlaid in one figure, one colour per run,
labelled by its directory, written to --out. matplotlib is an optional extra (`pip install -e
".[plot]"`); eval.md shows a run's picture when it exists (an `ftcore plot` after training, then
re-running the report with `ftcore eval`, or plotting before the final report is written).
"""
from __future__ import annotations

import json
from pathlib import Path

from ftcore.config import ConfigError
from ftcore.evaluation.report import CURVES
from ftcore.files import atomic_path


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


def _read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"ftcore plot: no metrics.jsonl in {run_dir} (is it a run directory?)")
    steps, vals = read_metrics(metrics)
    if not steps:
        raise ConfigError(f"ftcore plot: {metrics} holds no step records yet")
    return steps, vals


def plot_run(run_dir, out: str | Path | None = None) -> Path:
    """Draws RUN_DIR/metrics.jsonl into `out` (default RUN_DIR/curves.png); returns the path."""
    return plot_runs([run_dir], out)


def plot_runs(run_dirs, out: str | Path | None = None) -> Path:
    """Draws the metrics.jsonl of every run directory into one figure, `out` (required for several
    runs; for one, RUN_DIR/curves.png by default); returns the path."""
    run_dirs = [Path(d) for d in run_dirs]
    if out is None and len(run_dirs) > 1:
        raise ConfigError(f"ftcore plot: {len(run_dirs)} runs go into one figure: say where with --out FILE.png")
    runs = [(d, *_read_run(d)) for d in run_dirs]
    out = Path(out) if out is not None else run_dirs[0] / CURVES
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ConfigError("ftcore plot needs matplotlib: pip install -e \".[plot]\"") from None
    kind = out.suffix[1:].lower()
    if kind not in FigureCanvasBase.get_supported_filetypes():
        raise ConfigError(f"ftcore plot: --out {out}: the suffix names the format, one of "
                          f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))}")
    if not out.parent.is_dir():
        raise ConfigError(f"ftcore plot: --out {out}: the directory {out.parent} does not exist")

    one = len(runs) == 1
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    (loss_ax, lr_ax), (tok_ax, mem_ax) = axes
    for i, (run_dir, steps, vals) in enumerate(runs):
        color, name = f"C{i % 10}", str(run_dir)
        x = [r["step"] for r in steps]
        loss_ax.plot(x, [r["loss"] for r in steps], lw=0.8, color=color, label="train" if one else name)
        if vals:
            loss_ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-" if one else "o--",
                         color="C1" if one else color, label="validation" if one else f"{name} (validation)")
        lr_ax.plot(x, [r["lr"] for r in steps], color=color)
        tok_ax.plot(x, [r["tokens_per_s"] for r in steps], lw=0.8, color=color)
        mem_ax.plot(x, [r["peak_mem_bytes"] / 2**30 for r in steps], color=color)
    loss_ax.set_ylabel("loss (completion tokens)")
    loss_ax.legend(fontsize=None if one else "x-small")
    lr_ax.set_ylabel("learning rate")
    tok_ax.set_ylabel("tokens/s")
    mem_ax.set_ylabel("peak memory of a step (GiB)")
    for ax in (tok_ax, mem_ax):
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dirs[0]) if one else f"{len(runs)} runs")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=kind, dpi=110)
    plt.close(fig)
    return out
