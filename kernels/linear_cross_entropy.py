"""Fused lm_head + cross-entropy that pays only for the labelled rows.

    loss = linear_cross_entropy(hidden (N, H), weight (V, H), labels (N,), reduction="sum")

How it works, and why:

1. Gather the labelled rows first. In instruction tuning most tokens are prompt (label -100); their
   logits would be computed and thrown away. `nonzero` on the label mask picks the rows that carry
   a target, and every matmul below runs on those rows only.
2. Walk those rows in chunks sized from a memory budget, so the (rows, V) logits never exist at
   once (8192 x 128256 bf16 logits are 2 GiB, 4 GiB more in fp32).
3. Per chunk: logits = h @ W^T (cuBLAS, input dtype); one kernel computes the fp32 logsumexp, the
   loss and the softmax gradient, in place over the logits; then d_hidden = d_logits @ W and
   d_weight += d_logits^T @ h (cuBLAS). The gradients are done in the forward pass: nothing is
   saved but them, nothing is recomputed, and backward only multiplies by grad_output (a scalar).
4. d_weight is accumulated over chunks in fp32 when the weight is bf16/fp16: adding chunk
   products into a bf16 buffer loses the small ones, a known cause of divergence elsewhere. The
   accumulator stays fp32 until backward, where scaling by grad_output and rounding to bf16 are
   one pass. (Each chunk's matmul reads and writes it: fewer, bigger chunks make that cheaper,
   which is what `memory_budget` trades.)

The per-chunk step is pluggable: `impl="triton"` is the fused Triton kernel
(cross_entropy_triton.py), `impl="torch"` the same maths in plain torch ops (the "chunked" loss:
runs anywhere, and is the baseline the Triton kernel has to beat).

Host syncs: exactly one, the `nonzero` that sizes the gather (the number of labelled rows decides
the matmul shapes, and cuBLAS takes shapes from the host). It makes the CPU wait until the GPU has
finished the work queued before the loss (the model's forward), then the CPU launches the loss
kernels; the cost is the launch latency that would otherwise be hidden, measured by
bench/bench_loss.py. A sync-free variant would have to run the matmuls in Triton and read the
count on the device (programs past it exit early); cuBLAS is faster than that at these sizes.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.autograd.function import once_differentiable

# Bytes of scratch per call beyond the gradients (and an fp32 d_weight accumulator): the logits
# chunk and its d_hidden rows. The "torch" step holds an fp32 copy of the chunk on top.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# The per-chunk step: loss + d_logits, in place. Both implementations share one contract:
#   step(logits (rows, V), labels (rows,), grad_scale, z_loss, label_smoothing) -> loss (rows,) fp32
# and leave grad_scale * d(loss)/d(logits) in `logits`, in the logits' dtype. block_v is the
# Triton kernel's vocab tile (None = its default; the torch step has no use for it); with
# write_grad=False (evaluation) only the loss is computed.

def softmax_xent_grad_torch_(logits, labels, grad_scale, z_loss=0.0, label_smoothing=0.0,
                             block_v=None, write_grad=True):
    """Plain torch: fp32 copy of the chunk, logsumexp, softmax, one-hot, cast back."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    x_label = x.gather(1, labels[:, None]).squeeze(1)
    V = x.shape[1]
    loss = lse - (1.0 - label_smoothing) * x_label
    if label_smoothing:
        loss = loss - label_smoothing / V * x.sum(1)
    p_scale = 1.0
    if z_loss:
        loss = loss + z_loss * lse * lse
        p_scale = 1.0 + 2.0 * z_loss * lse[:, None]
    if not write_grad:
        return loss
    g = x.sub_(lse[:, None]).exp_().mul_(p_scale)  # softmax, reusing the fp32 copy
    g.scatter_add_(1, labels[:, None], g.new_full((len(labels), 1), -(1.0 - label_smoothing)))
    if label_smoothing:
        g.sub_(label_smoothing / V)
    logits.copy_(g.mul_(grad_scale))
    return loss


def _triton_step(logits, labels, grad_scale, z_loss=0.0, label_smoothing=0.0, block_v=None,
                 write_grad=True):
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton loss needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported to run on CPU; on CPU use loss 'torch' or 'chunked'")
    from .cross_entropy_triton import softmax_xent_grad_  # lazy: triton reads TRITON_INTERPRET at import
    STATS["rows_through_kernel"] += logits.shape[0]
    return softmax_xent_grad_(logits, labels, grad_scale, z_loss, label_smoothing, block_v,
                              write_grad)


STEPS = {"triton": _triton_step, "torch": softmax_xent_grad_torch_}
STATS = {"rows_through_kernel": 0}  # debug counter: tests check ignored rows never reach the kernel


# ---------------------------------------------------------------------------------------------

def _addmm_fp32_(acc, a, b):
    """acc += a @ b with acc fp32 and a, b possibly bf16, without rounding a @ b to bf16 first."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
    elif acc.is_cuda and _has_mixed_addmm():
        # cuBLAS multiplies bf16 x bf16 into an fp32 C, accumulating in fp32 (torch >= 2.8)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)  # no mixed-dtype addmm here: each chunk's product is rounded once


@functools.cache
def _has_mixed_addmm():
    """Whether this torch has addmm(..., out_dtype=float32) for bf16 on CUDA, in place. Asked once,
    on a tiny case; an unsupported op fails at dispatch, so no sync is needed to find out."""
    try:
        acc = torch.zeros(16, 16, device="cuda")
        a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError):
        return False


@contextlib.contextmanager
def _ieee_fp32():
    """fp32 inputs get IEEE fp32 matmuls, never TF32, whatever the global setting says."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def chunk_rows_for(n_rows, V, H, dtype, memory_budget=DEFAULT_MEMORY_BUDGET):
    """Rows per chunk so that the scratch (logits chunk + its d_hidden rows) fits the budget.

    With more than one chunk a bf16 weight also needs the fp32 d_weight accumulator (V*H*4 bytes,
    which the budget does not count). If all rows fit in budget + that accumulator, one chunk is
    both leaner and faster: d_weight is then a single matmul straight into the weight's dtype."""
    elt = torch.finfo(dtype).bits // 8
    per_row = V * elt + 2 * H * elt
    accumulator = V * H * 4 if dtype != torch.float32 else 0
    if n_rows * per_row <= memory_budget + accumulator:
        return max(n_rows, 1)
    rows = memory_budget // per_row
    return max(16, rows // 16 * 16)  # multiples of 16 keep cuBLAS on its tensor-core paths


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, z_loss, label_smoothing,
                impl, chunk_rows, memory_budget, block_v, need_grads):
        V, H = weight.shape
        step = STEPS[impl]

        # 1. Labelled rows only. The single host sync of the loss: nonzero sizes its output.
        rows = torch.nonzero(labels != ignore_index).squeeze(1)
        n = rows.numel()
        # mean over zero rows is 0, not NaN: an all-prompt batch must not poison the step
        grad_scale = 1.0 / n if (reduction == "mean" and n > 0) else 1.0

        want_dh, want_dw, want_db = (want and n > 0 for want in need_grads)
        d_hidden = torch.zeros_like(hidden) if want_dh else None
        d_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if want_db else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        C = chunk_rows or chunk_rows_for(n, V, H, hidden.dtype, memory_budget)
        single = n <= C
        # Several chunks: d_weight sums their products in fp32 (and stays fp32 until backward,
        # which scales and rounds it once). One chunk: a single matmul straight into the weight's
        # dtype, which accumulates in fp32 inside cuBLAS anyway.
        d_weight = None
        if want_dw and not single:
            d_weight = torch.zeros(V, H, dtype=torch.float32, device=weight.device)

        with _ieee_fp32() if hidden.dtype == torch.float32 else contextlib.nullcontext():
            for start in range(0, n, C):
                idx = rows[start:start + C]
                h = hidden.index_select(0, idx)                      # (c, H)
                y = labels.index_select(0, idx)                      # (c,)
                # 2. logits of the chunk in the input dtype (cuBLAS accumulates in fp32)
                logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
                # 3. loss, and d_logits in place of the logits
                loss += step(logits, y, grad_scale, z_loss, label_smoothing, block_v,
                             want_dh or want_dw or want_db).sum()
                d_logits = logits
                if want_dh:
                    d_hidden.index_copy_(0, idx, d_logits @ weight)
                if want_dw:
                    if single:
                        d_weight = d_logits.t() @ h
                    else:
                        _addmm_fp32_(d_weight, d_logits.t(), h)
                if want_db:
                    d_bias += d_logits.sum(0, dtype=torch.float32)
                del logits, d_logits

        if reduction == "mean" and n > 0:
            loss /= n
        # shapes and dtypes only (the tensors themselves would stay alive): the gradients come
        # out in the inputs' dtypes, zeros when no row is labelled
        ctx.like = [(t.shape, t.dtype, t.device) if t is not None else None
                    for t in (hidden, weight, bias)]
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss

    @staticmethod
    @once_differentiable  # the gradients were computed in forward; they have no graph of their own
    def backward(ctx, grad_output):
        grads = []
        for saved, like, needed in zip(ctx.saved_tensors, ctx.like, (ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1], ctx.needs_input_grad[3])):
            if not needed:
                grads.append(None)
            elif saved is None:  # no labelled row: a zero gradient, never None
                shape, dtype, device = like
                grads.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                # grad_output is a 0-dim fp32 device tensor (e.g. 1 / global token count); no sync.
                # As a 1-dim operand it makes the multiply run in fp32 and round once into the
                # output dtype (an fp32 accumulator becomes the bf16 gradient in this one pass);
                # a 0-dim CUDA operand would be rounded to bf16 first, up to 0.4% off everywhere.
                shape, dtype, device = like
                out = torch.empty(shape, dtype=dtype, device=device)
                grads.append(torch.mul(saved, grad_output.reshape(1), out=out))
        d_hidden, d_weight, d_bias = grads
        return (d_hidden, d_weight, None, d_bias) + (None,) * 9


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", bias=None, *,
                         z_loss=0.0, label_smoothing=0.0, impl="triton", chunk_rows=None,
                         memory_budget=DEFAULT_MEMORY_BUDGET, block_v=None):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, fused and chunked.

    hidden (..., H), weight (V, H), labels (...,) int, bias (V,) or None. Rows labelled
    `ignore_index` cost nothing; other labels must lie in [0, V) (not checked: a check would cost
    a host sync). reduction "mean" divides by the number of labelled rows (0 when
    there are none), "sum" does not. Returns an fp32 scalar. z_loss adds z * logsumexp^2 per row;
    label_smoothing mixes eps of the uniform distribution into the target, as F.cross_entropy.
    impl: "triton" (fused kernel) or "torch" (same algorithm, plain torch ops per chunk).
    chunk_rows overrides the chunk size that `memory_budget` (bytes of scratch) would choose;
    block_v the Triton kernel's vocab tile (both there for tests and tuning)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (gradients are "
                         "computed in the forward pass, which a per-row loss cannot use)")
    if impl not in STEPS:
        raise ValueError(f"impl must be one of {sorted(STEPS)}, got {impl!r}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (V, {H}) to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the lm_head would run in the autocast dtype; do the same explicitly (the
        # casts are differentiable, so an fp32 weight still gets an fp32 gradient) and keep
        # autocast from recasting the matmuls inside the Function.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, bias,
                                        z_loss=z_loss, label_smoothing=label_smoothing, impl=impl,
                                        chunk_rows=chunk_rows, memory_budget=memory_budget,
                                        block_v=block_v)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    hidden = hidden.reshape(-1, H)
    labels = labels.reshape(-1).long()  # int64 for index_select / gather / the kernel's loads
    weight = weight.contiguous()  # no-op for a parameter; FSDP's unsharded weight is contiguous
    if bias is not None:
        bias = bias.to(hidden.dtype)
    # Gradients are computed in forward only for the inputs that will get one: under no_grad
    # (evaluation) or with a frozen lm_head the matching matmuls are skipped.
    grad_on = torch.is_grad_enabled()
    need_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                  grad_on and bias is not None and bias.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction,
                                    float(z_loss), float(label_smoothing), impl, chunk_rows,
                                    memory_budget, block_v, need_grads)
