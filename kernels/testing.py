"""Checks a kernel's forward and backward against a float64 torch reference.

    from ftcore.kernels.testing import check_loss_kernel
    check_loss_kernel(my_loss)                  # small odd shapes, fp32 and bf16, raises on failure
    check_loss_kernel(my_loss, device="cuda", shapes=[(4099, 2048, 128256)], dtypes=[torch.bfloat16],
                      versus=get_loss("torch"))  # full size: judged against plain torch's own error

Errors are norm-relative, ||ours - ref|| / ||ref||, as everywhere in ftcore. The reference runs in
float64 on the same (already rounded) inputs, so what is measured is the kernel's own error. Two
ways to pass: `tol` alone (|ours - ref| <= tol; defaults 1e-5 for fp32, 1e-2 for bf16/fp16), or,
with `versus=baseline`, |ours - ref| <= |baseline - ref| + tol: at big sizes bf16 inputs put a
floor under every implementation's error, and the honest question is whether we add to it.

On CPU a Triton kernel runs under the interpreter: TRITON_INTERPRET=1 must be set before triton is
first imported (tests/conftest.py does it). `check_kernel` is the generic part, for any kernel
with a float64 reference (rmsnorm, rope, ...); `check_loss_kernel` builds the loss cases.
The layer kernels' references are below (reference_rms_norm, reference_rope, reference_swiglu):

    check_kernel(my_rms_norm, reference_rms_norm, [("rows=37 H=72", (x, weight), {"eps": 1e-5})])

Under the interpreter (triton 3.x) a cast from fp32 to bf16 truncates instead of rounding to
nearest, so a kernel's bf16 error there is about twice what it is on the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}

# (N, H, V): odd N, H not a power of 2, V not a multiple of any power-of-2 block; one row; tiny V.
SMALL_SHAPES = [(67, 48, 300), (33, 40, 129), (1, 24, 5)]


@dataclass
class Result:
    name: str
    errors: dict[str, float]          # output / grad name -> norm-relative error vs the reference
    limits: dict[str, float]          # the same names -> the error allowed
    problems: list[str] = field(default_factory=list)  # NaN, missing grad, graph cut, ...

    @property
    def passed(self) -> bool:
        return not self.problems and all(self.errors[k] <= self.limits[k] for k in self.errors)


class KernelCheckError(AssertionError):
    pass


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||; where ref is exactly zero, a must be exactly zero too (0 or inf)."""
    a, ref = a.detach().double(), ref.detach().double()
    diff = (a - ref).norm().item()
    norm = ref.norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _run(fn, args, kwargs, upstream_seed=1234):
    """fn(*args, **kwargs), then backward with a fixed upstream gradient (not 1, so that a kernel
    that ignores grad_output is caught). Returns (output, grads of the floating-point args)."""
    args = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = fn(*args, **kwargs)
    g = torch.Generator(device=out.device).manual_seed(upstream_seed)
    upstream = torch.rand(out.shape, generator=g, device=out.device, dtype=torch.float32) + 0.5
    problems = []
    if not out.requires_grad:
        problems.append("output is not connected to the graph (requires_grad=False)")
        return out.detach(), [None] * sum(map(_is_float, args)), problems
    out.backward(upstream.to(out.dtype))
    return out.detach(), [a.grad for a in args if _is_float(a)], problems


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def check_kernel(fn: Callable, reference: Callable, cases: Iterable[tuple[str, tuple, dict]], *,
                 tol: float | None = None, versus: Callable | None = None,
                 grad_names: Sequence[str] | None = None, raise_on_fail: bool = True) -> list[Result]:
    """Compare fn against reference (run on float64 copies of the floating-point args) for each
    case (name, args, kwargs): the output and the gradient of every floating-point arg that is
    not None. tol None -> DEFAULT_TOL of the case's dtype (the first floating-point arg's)."""
    results = []
    for name, args, kwargs in cases:
        dtype = next(a.dtype for a in args if _is_float(a))
        limit = DEFAULT_TOL[dtype] if tol is None else tol
        out, grads, problems = _run(fn, args, kwargs)
        ref_args = [a.detach().double() if _is_float(a) else a for a in args]
        ref_out, ref_grads, _ = _run(reference, ref_args, kwargs)
        names = list(grad_names or [f"grad{i}" for i in range(len(ref_grads))])
        errors, limits = {}, {}
        pairs = [("out", out, ref_out)] + list(zip(names, grads, ref_grads))
        if versus is not None:
            base_out, base_grads, _ = _run(versus, args, kwargs)
            base = dict(zip(["out"] + names, [base_out] + base_grads))
        for key, ours, ref in pairs:
            if ref is None:       # e.g. no bias in this case
                continue
            if ours is None:
                problems.append(f"{key} is None (expected a tensor, zeros if nothing flows)")
                continue
            if not torch.isfinite(ours).all():
                problems.append(f"{key} has NaN/inf")
            errors[key] = rel_err(ours, ref)
            floor = 0.0
            if versus is not None and base[key] is not None:
                floor = rel_err(base[key], ref)  # the baseline's own error in this dtype
            limits[key] = limit + floor
        results.append(Result(name, errors, limits, problems))
    if raise_on_fail and not all(r.passed for r in results):
        failed = sum(not r.passed for r in results)
        raise KernelCheckError(f"kernel check failed in {failed} of {len(results)} cases:\n"
                               + format_report(results))
    return results


def format_report(results: list[Result]) -> str:
    lines = []
    for r in results:
        cells = [f"{k}={r.errors[k]:.2e}" + ("" if r.errors[k] <= r.limits[k]
                                              else f" (> {r.limits[k]:.1e})") for k in r.errors]
        status = "ok  " if r.passed else "FAIL"
        lines.append(f"{status} {r.name}: " + ", ".join(cells + r.problems))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Layer kernels: the maths of ftcore.model's rms_norm / apply_rope / swiglu, computed in the
# inputs' dtype all through when that is float64 (the model's rms_norm would drop to fp32)

def reference_rms_norm(x, weight, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_rope(q, k, cos, sin):
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotate(q), rotate(k)


def reference_swiglu(gate, up):
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Loss kernels: fn(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum") -> scalar

def reference_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100,
                                   reduction="sum", z_loss=0.0, label_smoothing=0.0,
                                   chunk_rows=1024):
    """The reference, by plain autograd in the inputs' dtype (the harness passes float64 copies).
    Rows are checkpointed in chunks so that a full-size case (e.g. 8193 x 262144) never holds all
    logits at once, forward or backward."""
    keep = labels != ignore_index
    # 0 * sum keeps the loss connected to every input, so that "no labelled row" gives zero
    # gradients (not None) to compare against
    total = 0.0 * (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0))

    def chunk_loss(h, w, b, y):
        logits = F.linear(h, w, b)
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum",
                               label_smoothing=label_smoothing)
        if z_loss:
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + z_loss * (lse.square() * (y != ignore_index)).sum()
        return loss

    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        if keep[sl].any():
            total = total + checkpoint(chunk_loss, hidden[sl], weight, bias, labels[sl],
                                       use_reentrant=False)
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1)
    return total


def make_loss_inputs(n, h, v, dtype=torch.float32, device="cpu", labelled="some", bias=False,
                     seed=0, ignore_index=-100):
    """hidden (n, h), weight (v, h), labels (n,), bias (v,) or None, rounded to dtype. Logits come
    out with std ~2, peaky enough that the softmax is not flat. labelled: "some" (the first ~60% of
    rows are prompt, as in instruction data, plus a few scattered), "none", "one", "all", or a
    fraction of rows labelled at the end."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * (2.0 / h ** 0.5)).to(dtype)
    b = (0.5 * torch.randn(v, generator=g, device=device)).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if labelled == "none":
        labels.fill_(ignore_index)
    elif labelled == "one":
        labels[torch.arange(n, device=device) != n // 2] = ignore_index
    elif labelled == "some":
        prompt = torch.arange(n, device=device) < int(0.6 * n)
        prompt |= torch.rand(n, generator=g, device=device) < 0.15
        labels[prompt] = ignore_index
        labels[-1] = torch.randint(0, v, (1,), generator=g, device=device)  # at least one
    elif isinstance(labelled, float):
        labels[: n - round(labelled * n)] = ignore_index
    elif labelled != "all":
        raise ValueError(f"labelled must be some|none|one|all or a fraction, got {labelled!r}")
    return hidden, weight, labels, b


def loss_cases(shapes=SMALL_SHAPES, dtypes=(torch.float32, torch.bfloat16), device="cpu",
               reductions=("sum", "mean"), bias=(False, True), labelled=("some", "none", "one"),
               ignore_index=-100, seed=0, **loss_kwargs):
    for (n, h, v) in shapes:
        for dtype in dtypes:
            for red in reductions:
                for with_bias in bias:
                    for lab in labelled:
                        hid, w, y, b = make_loss_inputs(n, h, v, dtype, device, lab, with_bias,
                                                        seed, ignore_index)
                        name = (f"N={n} H={h} V={v} {str(dtype)[6:]} {red} "
                                f"{'bias' if with_bias else 'no-bias'} labelled={lab}")
                        kwargs = dict(ignore_index=ignore_index, reduction=red, **loss_kwargs)
                        yield name, (hid, w, y, b), kwargs


def check_loss_kernel(fn: Callable, *, shapes=SMALL_SHAPES, dtypes=(torch.float32, torch.bfloat16),
                      device: str | None = None, reductions=("sum", "mean"), bias=(False, True),
                      labelled=("some", "none", "one"), ignore_index=-100, tol: float | None = None,
                      versus: Callable | None = None, seed=0, raise_on_fail=True,
                      **loss_kwargs) -> list[Result]:
    """Check a loss kernel (the registry's signature) on every combination of the arguments:
    loss, d_hidden, d_weight and d_bias against the float64 reference. Extra keyword arguments
    (z_loss=, label_smoothing=) go to both the kernel and the reference. Returns the results;
    raises KernelCheckError with a readable report if any case fails (unless raise_on_fail=False)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = loss_cases(shapes, dtypes, device, reductions, bias, labelled, ignore_index, seed,
                       **loss_kwargs)
    return check_kernel(fn, reference_linear_cross_entropy, cases, tol=tol, versus=versus,
                        grad_names=["d_hidden", "d_weight", "d_bias"], raise_on_fail=raise_on_fail)
