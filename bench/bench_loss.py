"""Fused linear cross-entropy, side by side: time, extra memory and error, forward + backward.

Workload A (the default): N = 8192 tokens (4 sequences of 2048), H = 2048, V = 128256, bf16;
completion fraction 1.0 (every token labelled) and 0.25 (the first 75% of each sequence is prompt,
label -100). Methods, each only when it imports and runs on this device:

    triton     ftcore's fused kernel (labelled rows only, grads in forward, Triton softmax/grad)
    chunked    the same algorithm in plain torch ops (fp32 logits per chunk)
    torch      plain torch: full logits, F.cross_entropy
    compile    torch.compile of plain torch
    liger      Liger Kernel's LigerFusedLinearCrossEntropyLoss            (pip install liger-kernel)
    cce        Apple's cut-cross-entropy linear_cross_entropy           (pip install cut-cross-entropy)
    torch-lce  torch.nn.functional.linear_cross_entropy, chunked options (newer torch releases)

Columns: median ms over --iters (CUDA events); extra peak memory in MiB above the inputs and the
gradients the call leaves behind, and how much of it is an fp32 d_weight accumulator (ftcore's,
when a bf16 weight is processed in several chunks); norm-relative error of the loss, d_hidden and
d_weight against a float64 reference. The floor is 6*N_labelled*H*V FLOPs at the bf16 matmul rate
measured in the same command. For ftcore's kernel the cost of its one host sync is estimated too:
the loss timed behind a long matmul, minus both timed alone.

Rows are measured fraction by fraction, the compiled ones last (compiling takes the longest), and
--out is rewritten after every row; --budget-s skips the rows left once it is spent, and a SIGTERM
(bench/gpu_check.sh's cap) marks the row in progress as cut: either way the JSON lists every row.
Each row records the torch and triton versions.

    python bench/bench_loss.py --out bench/loss.json          # GPU, workload A
    python bench/bench_loss.py --smoke                         # tiny shapes on CPU, end to end
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # --budget-s counts from here, imports included

from common import StepTimer, row_versions, stop_on_sigterm, versions  # noqa: E402
import torch  # noqa: E402  (after common: the checkout on sys.path)

from ftcore.files import write_atomic  # noqa: E402
from ftcore.model import IGNORE_INDEX  # noqa: E402

SMOKE = dict(seqs=2, seq_len=32, H=48, V=300, iters=2, warmup=1)
WORKLOAD_A = dict(seqs=4, seq_len=2048, H=2048, V=128256, iters=20, warmup=5)
MiB = 2**20


def get_methods(device):
    """name -> (description, fn(hidden, weight, labels) -> mean loss), for what runs here."""
    from ftcore import kernels
    out = {}
    def mean(fn):  # the registry's losses default to reduction="sum" (the model's use)
        return lambda h, w, y: fn(h, w, y, reduction="mean")

    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            out["triton"] = ("ftcore triton", mean(kernels.get_loss("triton")))
        except ImportError as e:
            print(f"# skip triton: {e}", file=sys.stderr)
    out["chunked"] = ("ftcore chunked torch", mean(kernels.get_loss("chunked")))
    out["torch"] = ("plain torch", mean(kernels.get_loss("torch")))
    out["compile"] = ("torch.compile", mean(kernels.get_loss("compile")))
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

            def liger_fn(h, w, y):
                loss = liger(w, h, y)
                return loss[0] if isinstance(loss, tuple) else loss
            out["liger"] = ("Liger fused linear CE", liger_fn)
        except ImportError:
            print("# skip liger: liger_kernel not importable", file=sys.stderr)
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            out["cce"] = ("cut-cross-entropy", lambda h, w, y: cce(h, w, y, ignore_index=IGNORE_INDEX,
                                                                         reduction="mean"))
        except ImportError:
            print("# skip cce: cut_cross_entropy not importable", file=sys.stderr)
    F = torch.nn.functional
    if hasattr(F, "linear_cross_entropy"):
        opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        opts = opts() if opts is not None else None  # its chunked path, where this torch has one
        out["torch-lce"] = ("F.linear_cross_entropy" + (" (chunked)" if opts else ""),
                            lambda h, w, y: F.linear_cross_entropy(
                                h, w, y, reduction="mean", ignore_index=IGNORE_INDEX, options=opts))
    else:
        print("# skip torch-lce: this torch has no F.linear_cross_entropy", file=sys.stderr)
    return out


def make_workload(cfg, fraction, dtype, device, seed=0):
    from ftcore.kernels.testing import make_loss_inputs
    n = cfg["seqs"] * cfg["seq_len"]
    hidden, weight, labels, _ = make_loss_inputs(n, cfg["H"], cfg["V"], dtype, device, "all", seed=seed)
    labels = labels.view(cfg["seqs"], cfg["seq_len"])
    labels[:, : round((1 - fraction) * cfg["seq_len"])] = IGNORE_INDEX  # prompt first, completion last
    return hidden, weight, labels.reshape(-1)


def fwd_bwd(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss


def rel(a, b):
    from ftcore.kernels.testing import rel_err
    return rel_err(a, b)


def measure(fn, hidden, weight, labels, ref, timer, iters, warmup):
    """Errors (one call), extra peak memory (one call), then the median time."""
    loss = fwd_bwd(fn, hidden, weight, labels)
    errs = dict(err_loss=rel(loss, ref[0]), err_d_hidden=rel(hidden.grad, ref[1]),
                err_d_weight=rel(weight.grad, ref[2]))
    extra = None
    if hidden.is_cuda:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, hidden, weight, labels)
        torch.cuda.synchronize()
        grads = hidden.grad.nbytes + weight.grad.nbytes
        extra = (torch.cuda.max_memory_allocated() - base - grads) / MiB
    ms = timer(lambda: fwd_bwd(fn, hidden, weight, labels), iters, warmup)
    hidden.grad = weight.grad = None
    return dict(ms=ms, extra_mib=extra, **errs)


def reference(hidden, weight, labels):
    """Loss, d_hidden, d_weight in float64 (upstream gradient 1)."""
    from ftcore.kernels.testing import reference_linear_cross_entropy
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = reference_linear_cross_entropy(h, w, labels, reduction="mean")
    loss.backward()
    return loss.detach(), h.grad, w.grad


def matmul_tflops(device, dtype, H, V, timer, rows=4096):
    """The bf16 matmul rate here: (rows, H) @ (H, V), the lm_head's shape."""
    a = torch.randn(rows, H, device=device, dtype=dtype)
    b = torch.randn(H, V, device=device, dtype=dtype)
    ms = timer(lambda: a @ b, iters=10, warmup=3)
    return 2 * rows * H * V / (ms * 1e-3) / 1e12


def sync_cost_ms(fn, hidden, weight, labels, timer, iters, warmup):
    """What the host sync in ftcore's loss costs: time (long matmul; loss) minus the two alone.
    Without the sync the CPU would queue the loss while the matmul runs; with it, the GPU idles
    for the launch latency of whatever comes right after the sync."""
    n = 8192
    a = torch.randn(n, n, device=hidden.device, dtype=torch.bfloat16)
    big = lambda: a @ a  # noqa: E731  ~1.5 ms on an H100
    t_big = timer(big, iters, warmup)
    t_loss = timer(lambda: fwd_bwd(fn, hidden, weight, labels), iters, warmup)
    t_both = timer(lambda: (big(), fwd_bwd(fn, hidden, weight, labels)), iters, warmup)
    return t_both - t_big - t_loss


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU is fine (Triton interpreted)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--methods", default=None,
                   help="comma list of: triton,chunked,torch,compile,liger,cce,torch-lce "
                        "(default: all that import; --smoke leaves out compile)")
    p.add_argument("--fractions", default="1.0,0.25")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here (after every row)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="measure no method after this many seconds (the rows left are listed as skipped)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Triton picks interpreter mode when imported (it is imported lazily, below)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg = dict(SMOKE if args.smoke else WORKLOAD_A)
    if args.iters:
        cfg["iters"] = args.iters
    dtype = getattr(torch, args.dtype)
    timer = StepTimer(device)

    methods = get_methods(device)
    if args.methods:
        wanted = args.methods.split(",")
    else:  # compiling takes minutes on a small CPU: the smoke run leaves it out unless asked
        wanted = [m for m in methods if not (args.smoke and m == "compile")]
    methods = {k: v for k, v in methods.items() if k in wanted}

    H, V = cfg["H"], cfg["V"]
    vs = versions()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
                versions=vs, **row_versions(vs), command=" ".join(sys.argv),
                shape=dict(N=cfg["seqs"] * cfg["seq_len"], H=H, V=V, dtype=args.dtype), matmul_tflops=None)
    # compiling takes the longest (tens of seconds a shape): every other row first, so that a budget
    # spent by then costs the compiled rows only
    fractions = [float(f) for f in args.fractions.split(",")]
    plan = [(f, m) for f in fractions for m in methods if m != "compile"] + \
           [(f, "compile") for f in fractions if "compile" in methods]
    rows = []
    stop_on_sigterm()
    save(args.out, meta, rows, plan, methods)  # the plan, before anything can be cut
    t_start, work = STARTED if argv is None else time.perf_counter(), None  # as a command, from its start
    try:
        tflops = meta["matmul_tflops"] = matmul_tflops(device, dtype, H, V, timer)
        print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; "
              f"N={meta['shape']['N']} H={H} V={V} {args.dtype}; matmul {tflops:.3g} TFLOP/s\n")
        print("| fraction | method | median ms | x floor | extra peak MiB | of which fp32 dW acc MiB "
              "| err loss | err d_hidden | err d_weight |")
        print("|---|---|---|---|---|---|---|---|---|")
        for fraction, key in plan:
            if time.perf_counter() - t_start >= args.budget_s:
                r = dict(ms=None, status="skipped", error=f"budget ({args.budget_s:.0f} s) spent")
            else:
                if work is None or work["fraction"] != fraction:
                    work = None  # the last fraction's tensors go before the next ones are made
                    work = workload(cfg, fraction, dtype, device, tflops)
                    if not any(r["method"] == "floor" and r["fraction"] == fraction for r in rows):
                        rows.append(dict(fraction=fraction, method="floor", ms=work["floor"], **row_versions(vs)))
                        print(f"| {fraction} | floor (6·N·H·V at the matmul rate) | {work['floor']:.2f} | 1.00 | | | | | |")
                r = measure_method(key, methods[key][1], work, dtype, device, timer, cfg)
            r.update(fraction=fraction, method=key, name=methods[key][0], **row_versions(vs))
            rows.append(r)
            print_row(r, work["floor"] if work else None)
            save(args.out, meta, rows, plan, methods)  # row by row: a part cut short keeps what it has
    except KeyboardInterrupt:  # SIGTERM (gpu_check.sh's timeout) or Ctrl-C: keep what ran, say what did not
        cut = f"the command was stopped after {time.perf_counter() - t_start:.0f} s (SIGTERM or Ctrl-C)"
        measured = {(r["fraction"], r["method"]) for r in rows}
        for j, (fraction, key) in enumerate(p for p in plan if p not in measured):
            rows.append(dict(fraction=fraction, method=key, name=methods[key][0], ms=None,
                             status="skipped" if j else "cut", error=cut, **row_versions(vs)))
        save(args.out, meta, rows, plan, methods)
        return rows
    for r in rows:
        if "sync_cost_ms" in r:
            print(f"\nfraction {r['fraction']}: ftcore triton's host sync costs "
                  f"~{r['sync_cost_ms']:.3f} ms (loss behind a long matmul, minus both alone)")
    return rows


def workload(cfg, fraction, dtype, device, tflops) -> dict:
    """Workload A at one completion fraction: the inputs, their float64 reference, the FLOP floor."""
    hidden, weight, labels = make_workload(cfg, fraction, dtype, device)
    hidden.requires_grad_(), weight.requires_grad_()
    n = int((labels != IGNORE_INDEX).sum())
    return dict(fraction=fraction, hidden=hidden, weight=weight, labels=labels, n=n,
                ref=reference(hidden, weight, labels), floor=6 * n * cfg["H"] * cfg["V"] / (tflops * 1e12) * 1e3)


def measure_method(key, fn, work, dtype, device, timer, cfg) -> dict:
    """One method's row; a method that fails (OOM, unsupported) is reported, not fatal to the table."""
    from ftcore.kernels.linear_cross_entropy import chunk_rows_for
    hidden, weight, labels, n, V, H = work["hidden"], work["weight"], work["labels"], work["n"], cfg["V"], cfg["H"]
    acc = None  # known for ftcore's own: an fp32 accumulator when several bf16 chunks
    if key in ("triton", "chunked"):
        several = dtype != torch.float32 and chunk_rows_for(n, V, H, dtype) < n
        acc = V * H * 4 / MiB if several else 0.0
    try:
        r = measure(fn, hidden, weight, labels, work["ref"], timer, cfg["iters"], cfg["warmup"])
        r["status"] = "ok"
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        r = dict(ms=None, extra_mib=None, err_loss=None, err_d_hidden=None, err_d_weight=None, status="failed",
                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    r["acc_mib"] = acc
    if key == "triton" and device.type == "cuda" and r["ms"] is not None:
        r["sync_cost_ms"] = sync_cost_ms(fn, hidden, weight, labels, timer, cfg["iters"], cfg["warmup"])
    return r


def print_row(r: dict, floor: float) -> None:
    ratio = r["ms"] / floor if r.get("ms") is not None else None
    print(f"| {r['fraction']} | {r['name']} | {fmt(r.get('ms'), '.2f')} | {fmt(ratio, '.2f')} | "
          f"{fmt(r.get('extra_mib'), '.0f')} | {fmt(r.get('acc_mib'), '.0f')} | {fmt(r.get('err_loss'), '.1e')} | "
          f"{fmt(r.get('err_d_hidden'), '.1e')} | {fmt(r.get('err_d_weight'), '.1e')} |"
          + (f" {r['status']}: {r['error']}" if r.get("error") else ""), flush=True)


def save(out, meta: dict, rows: list[dict], plan: list[tuple], methods: dict) -> None:
    """The JSON as it stands: the rows measured so far, then the rest of the plan ("not run")."""
    if out:
        done = {(r["fraction"], r["method"]) for r in rows}
        pending = [dict(fraction=f, method=m, name=methods[m][0], ms=None, status="not run")
                   for f, m in plan if (f, m) not in done]
        write_atomic(Path(out), json.dumps(dict(meta=meta, rows=rows + pending), indent=1))


if __name__ == "__main__":
    main()
