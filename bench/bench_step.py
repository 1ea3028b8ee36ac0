"""Training steps of a real-shaped model, one memory/speed strategy at a time, peers side by side.

Workload B: a randomly initialised model of a real shape (default Llama-3.2-1B), micro-batch 4 x
2048 random token ids, the first 75% of each row labelled -100 (labels aligned: labels[t] is the
target of position t), gradient clipping at 1.0, one micro-batch per step; a few warmup steps, then
timed steps. An ftcore row is the `ftcore train` config of its keys (run_config): the model goes
through ftcore.train.parallelize, the optimizer is ftcore.optim.build_optimizer's (torch's AdamW,
fused on CUDA, or ftcore's AdamW for bf16 weights), the step is ftcore.step's (forward_backward, optimizer_step); the
transformers rows use torch's AdamW as their users do.

The matrix (--rows picks by name; default: all): a baseline (fp32 master weights + bf16 autocast,
no activation checkpointing, the plain torch loss), one strategy changed at a time, the best
combinations, and transformers' LlamaForCausalLM of the same shape with its usual options (when
importable). Compiled rows are slow to start, so they run last; each row runs in its own process
(a clean peak, OOMs and compile caches isolated): a row that fails is reported, not fatal.

Per row: tokens/s, useful MFU (bench/README.md has the FLOP formula), forward / backward /
optimizer time (CUDA events), peak allocated and reserved memory, and ftcore.memory's estimate
beside the measured peak. The markdown table is printed last; results.json and plots go to --out.

    python bench/bench_step.py --budget-s 420                     # GPU: ends within 7 min, rows past it skipped
    python bench/bench_step.py --rows loss-compile,compile,best-compile,hf-compile
    python bench/bench_step.py --sweep --rows baseline,ac-full,best   # + peak vs seq len / batch
    python bench/bench_step.py --preset llama-3-8b --estimate-only     # memory only, no run
    python bench/bench_step.py --smoke --out /tmp/b                    # tiny shape on CPU, CI
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # --budget-s counts from here, imports included

from common import ROOT, cpu_info, fmt_size, gpu_info, peak_tflops, row_versions, stop_on_sigterm, versions  # noqa: E402
import torch  # noqa: E402  (after common: the checkout on sys.path)
from ftcore.files import write_atomic  # noqa: E402

from child import ChildSpec, launch  # noqa: E402
from matrix import CPU_ROWS, LADDER_ROWS, PRESETS, ROWS, SMOKE_ROWS, Row, estimate_row, model_config, why_unavailable  # noqa: E402,F401

GiB = 2 ** 30


def fmt_table(results: dict) -> str:
    rows = results["rows"]
    meta = results["meta"]
    unit, div = ("GiB", GiB) if max([r.get("peak_alloc") or 0 for r in rows] + [r.get("est_peak") or 0 for r in rows]
                               + [0]) >= GiB else ("MiB", 2 ** 20)
    base = next((r for r in rows if r["name"] == "baseline" and r.get("status") == "ok"), None)

    def num(x, f="{:.1f}"):
        return "—" if x is None else f.format(x)

    head = ["row", "what changes", "tokens/s", "× base", "MFU", "fwd ms", "bwd ms", "opt ms",
            f"peak alloc {unit}", f"reserved {unit}", f"estimate {unit}", "est. err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            est = num(r["est_peak"] / div, "{:.2f}") if r.get("est_peak") else "—"
            lines.append(f"| {r['name']} | {r['what']} | {r.get('status')}: {r.get('error', '')[:80]} | | | | | | | | {est} | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        err = (r["est_peak"] / r["peak_alloc"] - 1) * 100 if r.get("est_peak") and r.get("peak_alloc") else None
        lines.append("| " + " | ".join([
            r["name"], r["what"], f"{r['tokens_per_s']:,.0f}", num(ratio, "{:.2f}"),
            num(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"), num(r["fwd_ms"]), num(r["bwd_ms"]), num(r["opt_ms"]),
            num(r["peak_alloc"] / div, "{:.2f}"), num(r["peak_reserved"] and r["peak_reserved"] / div, "{:.2f}"),
            num(r.get("est_peak") and r["est_peak"] / div, "{:.2f}"), num(err, "{:+.1f}%"),
        ]) + " |")
    w = meta["workload"]
    header = [
        f"**{meta['preset']}** ({meta['params'] / 1e6:,.0f}M params), micro-batch {w['micro_batch']} x {w['seq_len']}, "
        f"{w['n_labelled']} labelled tokens ({100 * w['labelled_fraction']:.0f}%), {w['steps']} timed steps after "
        f"{w['warmup']} warmup; {meta['device']}; {meta['date']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"command: `{meta['command']}`",
        f"MFU: useful matmul FLOPs ({meta['flops_per_step']['useful'] / 1e12:.2f} TFLOP/step; lm_head for labelled "
        f"rows only) / step time / {num(meta['peak_tflops'])} TFLOP/s bf16 peak; estimate = ftcore.memory "
        "(peers: not modelled); est. err = estimate / peak alloc - 1",
    ]
    return "\n".join(header + [""] + lines)


def fmt_estimates(results: dict) -> str:
    lines = ["| row | what changes | estimate GiB | peak during | biggest parts |", "|---|---|---|---|---|"]
    cap = results["meta"].get("device_memory")
    for r in results["rows"]:
        if not r.get("est_peak"):
            continue
        parts = sorted(r["est_breakdown"].items(), key=lambda kv: -kv[1])[:3]
        fits = "" if not cap else (" (fits)" if r["est_peak"] < cap else " (exceeds the GPU)")
        lines.append(f"| {r['name']} | {r['what']} | {r['est_peak'] / GiB:.2f}{fits} | {r['est_phase']} | "
                     + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="model shape (default: llama-3.2-1b on CUDA, cpu-50m on a CPU)")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all on CUDA; on a CPU "
                    + ",".join(CPU_ROWS) + ")")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the preset's, else 4")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's, else 2048")
    ap.add_argument("--prompt-frac", type=float, default=None, help="leading share of each row labelled -100 "
                    "(default: the preset's, else 0.75)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="end within this many seconds: later rows are skipped, a running row is stopped")
    ap.add_argument("--row-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: from the GPU name)")
    ap.add_argument("--sweep", action="store_true", help="also: peak memory vs sequence length and micro-batch")
    ap.add_argument("--sweep-rows", default="baseline,ac-full,best")
    ap.add_argument("--sweep-seq", default="512,1024,2048,4096,8192")
    ap.add_argument("--sweep-mb", default="1,2,4,8,16")
    ap.add_argument("--memory-snapshot", action="store_true", help="CUDA: snapshot_ROW.pickle for pytorch.org/memory_viz")
    ap.add_argument("--profile", action="store_true", help="trace_ROW.json.gz (chrome://tracing, perfetto)")
    ap.add_argument("--estimate-only", action="store_true", help="print the memory estimates, run nothing")
    ap.add_argument("--run", action="store_true", help="run a memory-only preset (llama-3-8b) anyway")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU, 2 steps, a few rows (CI)")
    ap.add_argument("--no-plots", action="store_true", help="results.json and results.md only (gpu_check.sh plots later)")
    args = ap.parse_args(argv)

    if args.smoke:
        args.preset, args.device, args.micro_batch, args.seq_len = "tiny", "cpu", 2, 64
        args.steps, args.warmup = 2, 1
        args.rows = args.rows or ",".join(SMOKE_ROWS)
        args.sweep_seq, args.sweep_mb, args.sweep_rows = "32,64", "1,2", "baseline"
    # torch.cuda.is_available() asks the driver without creating a context
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    args.preset = args.preset or ("llama-3.2-1b" if device == "cuda" else "cpu-50m")
    preset = PRESETS[args.preset]
    args.micro_batch = args.micro_batch or preset.get("micro_batch", 4)
    args.seq_len = args.seq_len or preset.get("seq_len", 2048)
    args.prompt_frac = preset.get("prompt_frac", 0.75) if args.prompt_frac is None else args.prompt_frac
    cfg = model_config(args.preset)
    by_name = {r.name: r for r in ROWS}
    names = ([n.strip() for n in args.rows.split(",") if n.strip()]
             or (CPU_ROWS if device == "cpu" else [r.name for r in ROWS]))
    sweep_names = [n.strip() for n in args.sweep_rows.split(",") if n.strip()] if args.sweep else []
    unknown = [n for n in names + sweep_names if n not in by_name]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(by_name)}")
    selected = sorted((by_name[n] for n in names), key=lambda r: r.slow)  # compiled rows last
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    B, T = args.micro_batch, args.seq_len
    n_labelled = B * (T - int(args.prompt_frac * T))
    frac = n_labelled / (B * T)
    flops = cfg.step_flops(B, T, n_labelled)
    gpu_name, gpu_mem = gpu_info() if device == "cuda" else (None, None)
    dev_name = (gpu_name or "CUDA GPU") if device == "cuda" else cpu_info()
    ptf = args.peak_tflops or (peak_tflops(dev_name) if device == "cuda" else None)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": dev_name, "versions": versions(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "preset": args.preset, "model": dataclasses.asdict(cfg), "params": cfg.num_params(),
        "workload": {"micro_batch": B, "seq_len": T, "prompt_frac": args.prompt_frac, "n_labelled": n_labelled,
                     "labelled_fraction": frac, "steps": args.steps, "warmup": args.warmup},
        "flops_per_step": flops, "peak_tflops": ptf,
        "device_memory": gpu_mem,
    }
    results = {"meta": meta, "rows": []}

    if args.estimate_only or (PRESETS[args.preset].get("memory_only") and not args.run):
        for row in selected:
            rec = {"name": row.name, "what": row.what, "status": "estimate only"}
            rec.update(estimate_row(row, cfg, B, T, frac, device) or {})
            results["rows"].append(rec)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{args.preset}: estimates only ({meta['params'] / 1e9:.2f}B params, micro-batch {B} x {T})\n")
        print(fmt_estimates(results))
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # compiled rows reuse their kernels on a rerun
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str((out / "cache" / "inductor").resolve()))
    env.setdefault("TRITON_CACHE_DIR", str((out / "cache" / "triton").resolve()))
    # micro_batch x seq_len: the workload's shape (a sweep child resolves "auto" for it too)
    base_spec = ChildSpec(row=Row("(sweep)", ""), cfg=cfg, device=device, prompt_frac=args.prompt_frac,
                          out=str(out.resolve()), micro_batch=B, seq_len=T)

    t_start = STARTED if argv is None else time.perf_counter()  # as a command, from its start
    stop_on_sigterm()
    done: list[dict] = results["rows"]
    save_results(results, selected, out)  # the plan, before anything can be cut
    try:
        for i, row in enumerate(selected):
            rec = {"name": row.name, "what": row.what, "row": dataclasses.asdict(row), **row_versions(meta["versions"])}
            run_row(rec, row, args, base_spec, env, time.perf_counter() - t_start)
            rec.update(estimate_row(row, cfg, B, T, frac, device) or {})
            if rec.get("device_name"):  # what torch itself saw
                meta["device"], meta["device_memory"] = rec["device_name"], rec["device_memory"]
                ptf = meta["peak_tflops"] = args.peak_tflops or peak_tflops(rec["device_name"])
            if rec.get("status") == "ok" and ptf:
                rec["mfu"] = flops["useful"] / rec["step_s"] / (ptf * 1e12)
            done.append(rec)
            save_results(results, selected, out)  # row by row: a part cut short keeps what it has
            print(f"[{i + 1}/{len(selected)}] {row.name}: {row_message(rec)} ({time.perf_counter() - t_start:.0f} s)",
                  file=sys.stderr, flush=True)
        if args.sweep:
            results["sweep"] = run_sweep(args, cfg, device, base_spec, env, t_start, frac)
    except KeyboardInterrupt:  # SIGTERM (gpu_check.sh's timeout) or Ctrl-C: keep what ran, say what did not
        cut = f"the command was stopped after {time.perf_counter() - t_start:.0f} s (SIGTERM or Ctrl-C)"
        for j, row in enumerate(selected[len(done):]):  # the first one was running
            done.append({"name": row.name, "what": row.what, "row": dataclasses.asdict(row),
                         **row_versions(meta["versions"]), "status": "skipped" if j else "cut", "error": cut})
        save_results(results, selected, out)
        print(fmt_table(results))
        return 130
    save_results(results, selected, out)
    if not args.no_plots:
        try:
            from plot import plot_results  # bench/plot.py, next to this file
            notes = plot_results(results, out)
        except ImportError as e:
            notes = [f"plots skipped: {e} (pip install -e '.[bench]')"]
        for n in notes:
            print(n, file=sys.stderr)
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    if results.get("sweep"):
        print(fmt_sweep(results["sweep"]) + "\n")
    print(fmt_table(results))  # last: the table is the end of stdout
    return 0


def run_row(rec: dict, row: Row, args, base_spec: ChildSpec, env: dict, elapsed: float) -> None:
    """One row in its own process, within what is left of --budget-s (the row is stopped there)."""
    reason = why_unavailable(row, base_spec.device)
    if reason:
        rec.update(status="skipped", error=reason)
    elif elapsed >= args.budget_s - 1:
        rec.update(status="skipped", error=f"budget ({args.budget_s:.0f} s) spent")
    else:
        spec = dataclasses.replace(base_spec, row=row, steps=args.steps, warmup=args.warmup,
                                   memory_snapshot=args.memory_snapshot, profile=args.profile)
        t0 = time.perf_counter()
        rec.update(launch(spec, min(args.row_timeout_s, args.budget_s - elapsed), env))
        rec["wall_s"] = time.perf_counter() - t0


def row_message(rec: dict) -> str:
    msg = rec.get("status")
    if msg == "ok":
        msg = f"{rec['tokens_per_s']:,.0f} tok/s, peak {fmt_size(rec['peak_alloc'])}"
        if rec.get("est_peak"):
            msg += f" (estimate {fmt_size(rec['est_peak'])}, {100 * (rec['est_peak'] / rec['peak_alloc'] - 1):+.1f}%)"
    elif rec.get("error"):
        msg += f": {rec['error']}"
    return msg


def save_results(results: dict, selected: list, out: Path) -> None:
    """results.json and results.md as they stand: the rows run so far, then the rows still to run
    (status "not run"), each file replaced whole."""
    pending = [{"name": r.name, "what": r.what, "status": "not run", "error": ""} for r in selected[len(results["rows"]):]]
    now = {**results, "rows": results["rows"] + pending}
    write_atomic(out / "results.json", json.dumps(now, indent=1))
    write_atomic(out / "results.md", fmt_table(now) + "\n")


def run_sweep(args, cfg, device: str, base_spec: ChildSpec, env: dict, t_start: float, frac: float) -> list[dict]:
    """Peak memory vs sequence length (at --micro-batch) and vs micro-batch (at --seq-len), for a
    few strategies: measured (one process per strategy, smallest shape first, stopping at the
    first OOM) beside the estimate at every point, including those that did not fit."""
    by_name = {r.name: r for r in ROWS}
    seqs = [int(x) for x in args.sweep_seq.split(",")]
    mbs = [int(x) for x in args.sweep_mb.split(",")]
    points = sorted({(args.micro_batch, t) for t in seqs} | {(b, args.seq_len) for b in mbs}, key=lambda p: p[0] * p[1])
    out = []
    for name in [n.strip() for n in args.sweep_rows.split(",") if n.strip()]:
        row = by_name[name]
        reason = why_unavailable(row, device)
        elapsed = time.perf_counter() - t_start
        if row.impl != "ftcore":
            reason = "the sweep compares with the estimate: ftcore rows only"
        elif not reason and elapsed >= args.budget_s - 1:
            reason = f"budget ({args.budget_s:.0f} s) spent"
        if reason:
            print(f"sweep {name}: skipped ({reason})", file=sys.stderr)
            continue
        spec = dataclasses.replace(base_spec, row=row, sweep=points)
        res = launch(spec, min(args.row_timeout_s, args.budget_s - elapsed), env)
        measured = {(p["micro_batch"], p["seq_len"]): p for p in res.get("sweep", [])}
        for B, T in points:
            e = estimate_row(row, cfg, B, T, frac, device)
            m = measured.get((B, T), {"status": res.get("status") if res.get("status") != "ok" else "not run"})
            out.append({"row": name, "micro_batch": B, "seq_len": T, "est_peak": e["est_peak"], **m})
        print(f"sweep {name}: {sum(1 for p in measured.values() if p['status'] == 'ok')}/{len(points)} points "
              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return out


def fmt_sweep(sweep: list[dict]) -> str:
    lines = ["| row | micro-batch | seq len | peak alloc GiB | estimate GiB | est. err |", "|---|---|---|---|---|---|"]
    for p in sweep:
        got = p.get("peak_alloc")
        measured = f"{got / GiB:.3f}" if got else p.get("status", "—")
        err = f"{100 * (p['est_peak'] / got - 1):+.1f}%" if got else "—"
        lines.append(f"| {p['row']} | {p['micro_batch']} | {p['seq_len']} | {measured} | {p['est_peak'] / GiB:.3f} | {err} |")
    return "\n".join(lines)



if __name__ == "__main__":
    sys.exit(main())
