"""Plots of bench_step.py's results.json (matplotlib, the optional `bench` extra).

    python bench/plot.py runs/bench/results.json        # writes the PNGs next to it

throughput.png   tokens/s per row (ftcore and peers)
memory.png       peak allocated (and reserved) per row, the estimate as a marker
sweep.png        peak memory vs sequence length and vs micro-batch, measured (solid) and estimated (dashed)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2 ** 30


def _unit(values) -> tuple[str, float]:
    return ("GiB", GiB) if max(values, default=0) >= GiB else ("MiB", 2 ** 20)


def plot_results(results: dict, out_dir) -> list[str]:
    """Write the plots; return one line per file written (or why none was)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install -e '.[bench]')"]
    out_dir = Path(out_dir)
    notes = []
    meta = results["meta"]
    title = f"{meta['preset']}, {meta['workload']['micro_batch']} x {meta['workload']['seq_len']} tokens, {meta['device']}"
    ok = [r for r in results["rows"] if r.get("status") == "ok"]
    if ok:
        names = [r["name"] for r in ok]
        colors = ["tab:orange" if r["name"].startswith("hf") else "tab:blue" for r in ok]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok) + 2), 4))
        ax.bar(names, [r["tokens_per_s"] for r in ok], color=colors)
        ax.set_ylabel("tokens/s")
        ax.set_title("throughput (blue: ftcore, orange: transformers)\n" + title, fontsize=9)
        ax.tick_params(axis="x", rotation=60)
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok) + 2), 4))
        x = range(len(ok))
        unit, div = _unit([r["peak_alloc"] for r in ok])
        ax.bar(x, [r["peak_alloc"] / div for r in ok], color=colors, label="peak allocated")
        res = [(i, r["peak_reserved"] / div) for i, r in zip(x, ok) if r.get("peak_reserved")]
        if res:
            ax.scatter([i for i, _ in res], [v for _, v in res], marker="_", s=300, color="k", label="peak reserved")
        est = [(i, r["est_peak"] / div) for i, r in zip(x, ok) if r.get("est_peak")]
        if est:
            ax.scatter([i for i, _ in est], [v for _, v in est], marker="x", color="tab:red", label="estimate")
        ax.set_xticks(list(x), names, rotation=60)
        ax.set_ylabel(unit)
        ax.set_title("peak memory\n" + title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "memory.png", dpi=120)
        plt.close(fig)
        notes += [f"plot: {out_dir / 'throughput.png'}", f"plot: {out_dir / 'memory.png'}"]

    sweep = results.get("sweep") or []
    if sweep:
        w = meta["workload"]
        unit, div = _unit([p.get("peak_alloc") or p["est_peak"] for p in sweep])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, fixed_key, fixed in ((axes[0], "seq_len", "micro_batch", w["micro_batch"]),
                                          (axes[1], "micro_batch", "seq_len", w["seq_len"])):
            for i, name in enumerate(dict.fromkeys(p["row"] for p in sweep)):
                pts = sorted((p for p in sweep if p["row"] == name and p[fixed_key] == fixed), key=lambda p: p[key])
                color = f"C{i}"
                got = [(p[key], p["peak_alloc"] / div) for p in pts if p.get("peak_alloc")]
                if got:
                    ax.plot(*zip(*got), "o-", color=color, label=f"{name} measured")
                ax.plot([p[key] for p in pts], [p["est_peak"] / div for p in pts], "--", color=color,
                        label=f"{name} estimate")
            if meta.get("device_memory"):
                ax.axhline(meta["device_memory"] / div, color="gray", lw=0.8, label="GPU memory")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(key.replace("_", " ") + f" ({fixed_key.replace('_', ' ')} {fixed})")
            ax.set_ylabel(f"peak allocated, {unit}")
            ax.legend(fontsize=7)
        fig.suptitle("peak memory vs shape: " + title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "sweep.png", dpi=120)
        plt.close(fig)
        notes.append(f"plot: {out_dir / 'sweep.png'}")
    return notes


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench/results.json")
    for line in plot_results(json.loads(path.read_text()), path.parent):
        print(line)
