"""The Triton half of the fused linear cross-entropy: one pass of loss + softmax gradient over a
chunk of logits, in place.

The matmuls around it (logits = h @ W^T, d_hidden = d_logits @ W, d_weight = d_logits^T @ h) run in
cuBLAS through torch, which is as fast as a GEMM gets. What a fused kernel has to remove is the
elementwise traffic in between: plain torch upcasts the (rows, V) logits to fp32, takes a
logsumexp, a softmax, subtracts the one-hot and casts back -- five or six passes over fp32 memory.
Here each row is read twice (once for the logsumexp, once for the gradient; the second read mostly
hits L2) and written once, in the logits' own dtype, and the loss comes out on the side.

This module imports triton at the top; `ftcore.kernels` imports it only when the "triton" loss is
first used, because triton decides interpreter mode (TRITON_INTERPRET=1) at import time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_xent_grad_kernel(
    logits_ptr, stride_row,  # (rows, V) logits of one chunk, overwritten with d_logits
    labels_ptr,              # (rows,) int64 targets, all valid (ignored rows were never gathered)
    loss_ptr,                # (rows,) fp32 out: loss of each row, unscaled
    V, grad_scale, z_loss, smoothing,
    BLOCK_V: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    # One program per row. int64 row offset: rows * V passes 2^31 long before memory runs out
    # (8192 rows of a 262144 vocab already do).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)

    # Pass 1: online logsumexp in fp32. Each lane keeps its own running max and sum, so the loop
    # needs no cross-lane reduction; the lanes are combined once at the end. The running max starts
    # at a finite -1e30 rather than -inf so that exp(m_old - m_new) never sees inf - inf = NaN.
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    x_sum = tl.zeros([BLOCK_V], tl.float32)  # sum of logits, for label smoothing
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        if HAS_SMOOTHING:
            x_sum += tl.where(cols < V, x, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

    # Loss of the row. With smoothing eps the target is (1 - eps) one-hot + eps / V uniform:
    #   loss = lse - (1 - eps) x[label] - eps / V * sum(x)
    x_label = tl.load(row_ptr + label).to(tl.float32)
    if HAS_SMOOTHING:
        loss = lse - (1.0 - smoothing) * x_label - smoothing / V * tl.sum(x_sum, axis=0)
        target = 1.0 - smoothing
    else:
        loss = lse - x_label
        target = 1.0
    # z-loss (PaLM): z * lse^2 keeps the normaliser near 0; its gradient is 2 z lse softmax.
    p_scale = 1.0
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
        p_scale += 2.0 * z_loss * lse
    tl.store(loss_ptr + row, loss)

    # Pass 2: d_logits = grad_scale * (p_scale * softmax - target * onehot - eps / V), written over
    # the logits in their own dtype (bf16 logits -> bf16 gradient, as plain torch's backward has).
    # Skipped when no gradient is wanted (evaluation).
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = p_scale * tl.exp(x - lse) - tl.where(cols == label, target, 0.0)
            if HAS_SMOOTHING:
                g -= smoothing / V
            tl.store(row_ptr + cols, (g * grad_scale).to(row_ptr.dtype.element_ty), mask=mask)


def softmax_xent_grad_(logits: torch.Tensor, labels: torch.Tensor, grad_scale: float,
                       z_loss: float = 0.0, label_smoothing: float = 0.0,
                       block_v: int | None = None, write_grad: bool = True) -> torch.Tensor:
    """Per-row cross-entropy of `logits` (rows, V) against `labels` (rows,), returned as fp32
    (rows,); `logits` is overwritten with grad_scale * d(loss)/d(logits) if write_grad."""
    rows, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    if block_v is None:
        # Big blocks keep many loads in flight per program; 8 warps x 32 lanes x 16 elements.
        block_v = min(4096, triton.next_power_of_2(V))
    _softmax_xent_grad_kernel[(rows,)](
        logits, logits.stride(0), labels, loss, V, grad_scale, z_loss, label_smoothing,
        BLOCK_V=block_v, HAS_Z_LOSS=z_loss != 0.0, HAS_SMOOTHING=label_smoothing != 0.0,
        WRITE_GRAD=write_grad,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
