"""Fused rotary embedding of q and k, forward and backward in Triton.

    q_out, k_out = rope(q (B, Hq, T, D), k (B, Hk, T, D), cos, sin)

The rotate-half convention of ftcore.model.apply_rope (and HF Llama): with x = [x1, x2] (halves of
the head dimension) and cos = [c1, c2], sin = [s1, s2] (the model's halves are equal),

    out = x * cos + rotate_half(x) * sin = [x1 c1 - x2 s1,  x2 c2 + x1 s2]

cos and sin are (B, 1, T, D) as the model builds them, or anything that broadcasts to it
((1, 1, T, D), (T, D)). The backward is the transpose, a rotation by -sin:

    dx = [dy1 c1 + dy2 s2,  dy2 c2 - dy1 s1]

Why fuse: eager torch makes, per tensor, a rotate_half copy (chunk, neg, cat) and three products
and a sum, each a full pass over q or k; its backward repeats that. Here each of q and k is read
once and written once, in either direction, and nothing is saved but cos and sin (which the
model shares across all layers). Out of place: q and k are views of the projections' outputs,
and an in-place rotation would save one allocation at the price of autograd bookkeeping.

Layout: the model's q is a transposed view, (B, T, H, D) in memory. The output is allocated in the
input's layout (empty_like keeps the strides of a dense tensor) and the kernel walks rows in
memory order (b, t, h), so consecutive rows share cos/sin and the loads are coalesced.

Output dtype: torch's promotion of x's and cos's (under autocast q is bf16 and cos fp32, and the
eager model's rotation comes out fp32; this one does too). The product is taken in fp32 and
rounded once.

This module imports triton at the top; ftcore.kernels imports it only when the "triton" rope is
first used, because triton decides interpreter mode (TRITON_INTERPRET=1) at import time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import require_triton_device


@triton.jit
def _rope_kernel(
    x_ptr, y_ptr, cos_ptr, sin_ptr,
    stride_b, stride_h, stride_t,    # of x and of y (same layout), the last dim contiguous
    stride_cb, stride_ct,            # of cos and of sin over (batch, position)
    rows, H, T, HALF,                # rows = B * T * H, in the order (b, t, h)
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = r % H
    t = (r // H) % T
    b = r // (H * T)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < HALF)[None, :]
    x_off = (b * stride_b + h * stride_h + t * stride_t)[:, None] + d[None, :]
    c_off = (b * stride_cb + t * stride_ct)[:, None] + d[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + x_off, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + x_off + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
            backward: bool, block_rows: int | None) -> torch.Tensor:
    """One launch: x (B, H, T, D) in any layout with a contiguous last dim -> a new tensor in the
    same layout (the kernel writes it with x's strides)."""
    B, H, T, D = x.shape
    y = torch.empty_like(x, dtype=out_dtype)
    if y.stride() != x.stride() or x.stride(-1) != 1:  # not dense (e.g. a slice): copy it
        x = x.contiguous()
        y = torch.empty_like(x, dtype=out_dtype)
    rows, half = B * T * H, D // 2
    block_d = triton.next_power_of_2(half)
    if block_rows is None:
        # GPU: 2048 elements per half-tile (32 rows of a 64-dim head), 8 per thread of 8 warps,
        # six fp32 operands in registers. CPU: the interpreter pays per program, so big tiles.
        tile = 2048 if x.is_cuda else 65536
        block_rows = max(1, min(triton.next_power_of_2(rows), tile // block_d))
    elif block_rows & (block_rows - 1):
        raise ValueError(f"rope: block_rows must be a power of 2, got {block_rows}")
    if rows:
        _rope_kernel[(triton.cdiv(rows, block_rows),)](
            x, y, cos, sin, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
            rows, H, T, half, BACKWARD=backward, BLOCK_R=block_rows, BLOCK_D=block_d,
            num_warps=8 if block_rows * block_d >= 2048 else 4)
    return y


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, block_rows):
        ctx.dtypes, ctx.block_rows = (q.dtype, k.dtype), block_rows
        ctx.save_for_backward(cos, sin)
        q_out = _rotate(q, cos, sin, torch.promote_types(q.dtype, cos.dtype), False, block_rows)
        k_out = _rotate(k, cos, sin, torch.promote_types(k.dtype, cos.dtype), False, block_rows)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        (q_dtype, k_dtype), block_rows = ctx.dtypes, ctx.block_rows
        dq = dk = None
        if dq_out is not None and ctx.needs_input_grad[0]:
            dq = _rotate(dq_out, cos, sin, q_dtype, True, block_rows)
        if dk_out is not None and ctx.needs_input_grad[1]:
            dk = _rotate(dk_out, cos, sin, k_dtype, True, block_rows)
        return dq, dk, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), fused. q (B, Hq, T, D), k (B, Hk, T, D);
    cos, sin broadcastable to (B, 1, T, D). Gradients flow to q and k; cos and sin are constants
    (the model computes them from positions) and asking for their gradient is an error. block_rows
    (rows of D per program, a power of 2) overrides the default, for tests and tuning."""
    require_triton_device(q, "rope")
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"rope: q and k must be (B, H, T, D) with the same B, T, D; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"rope: the head dimension must be even, got {D}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the triton kernel gives no gradient for cos and sin; use the torch "
                         "rope if they are learned")
    try:
        cos, sin = cos.expand(B, 1, T, D), sin.expand(B, 1, T, D)
    except RuntimeError:
        raise ValueError(f"rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not broadcast "
                         f"to {(B, 1, T, D)}") from None
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:  # the kernel takes one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return RopeFunction.apply(q, k, cos, sin, block_rows)
