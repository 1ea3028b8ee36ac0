"""The folder bench/gpu_check.sh wrote, as the tables of bench/RESULTS.md and the plots: the date,
the GPU, the versions, the command and the time of each part; the `-m gpu` tests; workload A
(the fused loss) and workload B (training steps) with every ratio to the peers measured in the
same call and the targets of the GPU issues marked met or missed; the memory ladder; the
Llama-3-8B steps; the compiled rows.

    python bench/record_gpu.py OUT                      # writes OUT/RESULTS.md and OUT/*.png
    python bench/record_gpu.py OUT --append bench/RESULTS.md   # and files it there, newest first
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

GiB = 2 ** 30


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(v, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _target(ok: bool | None, what: str) -> str:
    return f"- {'met' if ok else 'missed' if ok is not None else 'not measured'}: {what}"


def header(env: dict | None, parts: list[list[str]]) -> list[str]:
    if env is None:
        return ["## GPU check: no environment record (part 1 did not run)", ""]
    d, v, m = env["device"], env["versions"], env["measured"]
    title = f"## {env['date'][:10]}: GPU check on {d['name']} (bench/gpu_check.sh)"
    lines = [title, "", f"Device: {d['name']}" + (f", {d['memory_bytes'] / GiB:.0f} GiB, driver {d.get('driver')}, "
                                                  f"compute capability {d.get('capability')}" if d.get("kind") == "cuda" else " (a CPU: the dry run)"),
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             (f"Measured in the same call: bf16 matmul {m['bf16_tflops']:.1f} TFLOP/s ({m['matmul_shape']}^3), "
              f"copy {m['copy_gbps']:.0f} GB/s (read + write)." if m else "Rates not measured: part 1 was cut."), "",
             "Command: `bench/gpu_check.sh OUT` (one device call), then `python bench/record_gpu.py OUT`. Parts:", ""]
    return lines + _table(["part", "exit", "seconds", "result"], parts)


def _versions(v: dict) -> str:
    """torch and triton, as every table states them (a row's numbers depend on both)."""
    return f"torch {v.get('torch') or '—'}, triton {v.get('triton') or '—'}"


def tests_section(path: Path, title: str) -> list[str]:
    """A pytest part from its --report-jsonl lines: one per finished test, so a part cut short
    still shows what ran."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return [f"### {title}: no report", ""]
    start = next((r for r in records if r.get("session") == "start"), {})
    end = next((r for r in records if r.get("session") in ("finished", "interrupted")), None)
    collected = next((r["collected"] for r in records if "collected" in r), None)
    tests = [r for r in records if "test" in r]
    n = {k: sum(r["outcome"] == k for r in tests) for k in ("passed", "failed", "error", "skipped")}
    ended = ("cut short: the cap stopped it" if end is None or end["session"] == "interrupted"
             else f"exit {end['exitstatus']}")
    lines = [f"### {title}: {n['passed']} passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped "
             f"of {_f(collected, 'd')} collected ({ended}; {_versions(start)})", ""]
    bad = [r for r in tests if r["outcome"] in ("failed", "error")]
    return lines + [f"- {r['outcome']}: `{r['test']}`: {r['message'][:200]}" for r in bad] + ([""] if bad else [])


def loss_section(res: dict | None) -> list[str]:
    if not res:
        return ["### Workload A (fused loss): not measured", ""]
    s = res["meta"]["shape"]
    lines = [f"### Workload A: fused lm_head + cross-entropy, N {s['N']}, H {s['H']}, V {s['V']}, {s['dtype']}, "
             f"forward + backward ({_versions(res['meta'])})", ""]
    rows, by = [], {}
    for r in res["rows"]:
        by[(r["fraction"], r["method"])] = r
        if r["method"] == "floor":
            continue
        note = f"{r['status']}: {r.get('error', '')}" if r.get("status") not in (None, "ok") else r.get("error", "")
        rows.append([str(r["fraction"]), r.get("name", r["method"]), _f(r.get("ms")), _f(r.get("extra_mib"), ".0f"),
                     _f(r.get("acc_mib"), ".0f"), _f(r.get("err_loss"), ".1e"), _f(r.get("err_d_weight"), ".1e"),
                     note[:80]])
    lines += _table(["fraction", "method", "ms", "extra peak MiB", "fp32 dW acc MiB", "err loss", "err dW", "error"], rows)

    def ratio(fr, a, b):
        x, y = by.get((fr, a), {}).get("ms"), by.get((fr, b), {}).get("ms")
        return x / y if x and y else None
    r25_cce, r1_cmp, r1_cce = ratio(0.25, "triton", "cce"), ratio(1.0, "triton", "compile"), ratio(1.0, "triton", "cce")
    lines += [f"Ratios in this call: ftcore triton / cut-cross-entropy {_f(r25_cce)} at fraction 0.25 and "
              f"{_f(r1_cce)} at 1.0; ftcore triton / torch.compile {_f(r1_cmp)} at 1.0.",
              _target(None if r25_cce is None else r25_cce <= 0.67, "fraction 0.25 <= 0.67 x cut-cross-entropy"),
              _target(None if r1_cmp is None else r1_cmp <= 1.02, "fraction 1.0 <= 1.02 x torch.compile"),
              _target(None if r1_cce is None else r1_cce <= 0.65, "fraction 1.0 <= 0.65 x cut-cross-entropy")]
    for (fr, m), r in by.items():
        if "sync_cost_ms" in r:
            lines.append(f"- the host sync of ftcore's kernel costs ~{r['sync_cost_ms']:.3f} ms at fraction {fr}")
    return lines + [""]


def _ok(rows, name):
    return next((r for r in rows if r["name"] == name and r.get("status") == "ok"), None)


def step_table(res: dict, title: str) -> list[str]:
    w = res["meta"]["workload"]
    lines = [f"### {title}: {res['meta']['preset']}, micro-batch {w['micro_batch']} x {w['seq_len']}, "
             f"{w['prompt_frac']:.0%} prompt, {w['steps']} timed steps ({_versions(res['meta']['versions'])})", ""]
    rows = []
    for r in res["rows"]:
        if r.get("status") != "ok":
            rows.append([r["name"], r.get("what", ""), r.get("status", "?"), "", "", "", (r.get("error") or "")[:60]])
            continue
        est = r.get("est_peak")
        rows.append([r["name"], r.get("what", ""), f"{r['tokens_per_s']:,.0f}", f"{r['peak_alloc'] / GiB:.2f}",
                     _f(est / GiB if est else None), _f(100 * (est / r["peak_alloc"] - 1) if est else None, "+.1f"), ""])
    return lines + _table(["row", "what", "tokens/s", "peak GiB", "estimate GiB", "est. err %", "note"], rows)


def step_section(res: dict | None) -> list[str]:
    if not res:
        return ["### Workload B (training steps): not measured", ""]
    rows = res["rows"]
    lines = step_table(res, "Workload B, eager")
    hf, liger_gc = _ok(rows, "hf"), _ok(rows, "hf-liger-gc")
    ours = [r for r in rows if r.get("status") == "ok" and not r["name"].startswith("hf")]
    no_ac = [r for r in ours if r["name"] not in ("ac-full", "best-ac")]
    ac = [r for r in ours if r["name"] in ("ac-full", "best-ac")]
    best = max(no_ac, key=lambda r: r["tokens_per_s"], default=None)
    best_ac = max(ac, key=lambda r: r["tokens_per_s"], default=None)
    for peer in ("hf", "hf-liger", "hf-gc", "hf-liger-gc"):
        p = _ok(rows, peer)
        if p:
            lines.append(f"- vs {peer} ({p['tokens_per_s']:,.0f} tokens/s, {p['peak_alloc'] / GiB:.1f} GiB): "
                         + ", ".join(f"{r['name']} {r['tokens_per_s'] / p['tokens_per_s']:.2f}x" for r in ours))
    r1 = best["tokens_per_s"] / hf["tokens_per_s"] if best and hf else None
    r2 = best_ac["tokens_per_s"] / liger_gc["tokens_per_s"] if best_ac and liger_gc else None
    lines += [_target(None if r1 is None else r1 >= 1.63 and best["peak_alloc"] <= 28 * GiB,
                      f"best eager row without checkpointing >= 1.63 x HF eager at <= 28 GiB "
                      f"({best['name'] if best else '—'}: {_f(r1)}x, {_f(best['peak_alloc'] / GiB if best else None)} GiB)"),
              _target(None if r2 is None else r2 >= 1.45 and best_ac["peak_alloc"] <= 20 * GiB,
                      f"best row with full checkpointing >= 1.45 x HF + Liger + checkpointing at <= 20 GiB "
                      f"({best_ac['name'] if best_ac else '—'}: {_f(r2)}x, "
                      f"{_f(best_ac['peak_alloc'] / GiB if best_ac else None)} GiB)")]
    errs = [abs(r["est_peak"] / r["peak_alloc"] - 1) for r in ours if r.get("est_peak")]
    lines.append(_target(max(errs) <= 0.10 if errs else None,
                         f"the estimator within 10 % of every measured peak (worst {_f(100 * max(errs) if errs else None, '.1f')} %)"))
    return lines + [""]


def ladder_section(ladder: dict | None, big: dict | None) -> list[str]:
    lines = []
    if ladder:
        lines += step_table(ladder, "The memory ladder (each rung adds one strategy)")
        fits = [r for r in ladder["rows"] if r.get("status") == "ok" and r["peak_alloc"] <= 12 * GiB]
        lean = min(fits, key=lambda r: r["peak_alloc"], default=None)
        lines += [_target(bool(fits) if ladder["rows"] else None,
                          f"full fine-tune of the {ladder['meta']['preset']} shape within <= 12 GiB peak"
                          + (f" ({lean['name']}: {lean['peak_alloc'] / GiB:.2f} GiB, {lean['tokens_per_s']:,.0f} tokens/s)" if lean else "")), ""]
    else:
        lines += ["### The memory ladder: not measured", ""]
    if big:
        lines += step_table(big, "The Llama-3-8B shape, the leanest rungs")
        ok = [r for r in big["rows"] if r.get("status") == "ok"]
        lines += [_target(any(r["peak_alloc"] <= 80 * GiB for r in ok) if big["rows"] else None,
                          f"a full fine-tune step of the {big['meta']['preset']} shape within <= 80 GiB peak measured"), ""]
    return lines


def compiled_section(res: dict | None) -> list[str]:
    if not res:
        return ["### Compiled rows: not measured", ""]
    lines = step_table(res, "Compiled rows")
    hf = _ok(res["rows"], "hf-compile")
    ours = [r for r in res["rows"] if r.get("status") == "ok" and not r["name"].startswith("hf")]
    best = max(ours, key=lambda r: r["tokens_per_s"], default=None)
    r = best["tokens_per_s"] / hf["tokens_per_s"] if best and hf else None
    return lines + [_target(None if r is None else r >= 1.25,
                            f"best compiled row >= 1.25 x HF + torch.compile ({best['name'] if best else '—'}: {_f(r)}x)"), ""]


def plots(work: Path, out: Path) -> list[str]:
    """throughput and memory of the eager matrix and of the ladder, as OUT/*.png."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from plot import plot_results
    except ImportError:
        return []
    made = []
    for name in ("step", "ladder"):
        res = _load(work / name / "results.json")
        if not res:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                plot_results(res, tmp)
            except Exception as e:  # a row set it cannot draw: the tables stand
                print(f"record_gpu: {name} plots skipped ({type(e).__name__}: {e})", file=sys.stderr)
            for png in sorted(Path(tmp).glob("*.png")):
                shutil.move(str(png), out / f"{name}-{png.name}")
                made.append(f"{name}-{png.name}")
    return made


def record(out: Path) -> str:
    work = out / "work"
    if not work.is_dir() and (out / "work.tar.gz").is_file():  # a folder that came back from the GPU machine
        import tarfile
        tmp = Path(tempfile.mkdtemp())
        with tarfile.open(out / "work.tar.gz") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
                tar.extractall(tmp, filter="data")
            else:  # older: refuse what the "data" filter would (absolute paths, "..", links)
                bad = [m.name for m in tar.getmembers() if m.name.startswith("/") or ".." in Path(m.name).parts
                       or m.issym() or m.islnk()]
                if bad:
                    raise SystemExit(f"{out / 'work.tar.gz'}: unsafe member {bad[0]!r}")
                tar.extractall(tmp)
        work = tmp / "work"
    parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines() if line.strip()] \
        if (out / "parts.tsv").is_file() else []
    lines = header(_load(work / "env.json"), parts)
    lines += tests_section(work / "kernels.jsonl", "`FTCORE_TEST_CUDA=1 pytest -m gpu`, the kernels")
    lines += tests_section(work / "tests.jsonl", "`FTCORE_TEST_CUDA=1 pytest -m gpu`, the other tests")
    lines += loss_section(_load(work / "loss.json"))
    lines += step_section(_load(work / "step" / "results.json"))
    lines += ladder_section(_load(work / "ladder" / "results.json"), _load(work / "big" / "results.json"))
    lines += compiled_section(_load(work / "compiled" / "results.json"))
    pngs = plots(work, out)
    if pngs:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in pngs), ""]
    md = "\n".join(lines)
    (out / "RESULTS.md").write_text(md + "\n")
    return md


def append(md: str, results_md: Path) -> None:
    """After RESULTS.md's introduction (the text before its first '## '): newest first."""
    text = results_md.read_text()
    i = text.find("\n## ")
    text = text + "\n" + md if i < 0 else text[:i + 1] + md + "\n" + text[i + 1:]
    results_md.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--append", default=None, metavar="RESULTS.md")
    args = ap.parse_args()
    md = record(Path(args.out))
    if args.append:
        append(md, Path(args.append))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
