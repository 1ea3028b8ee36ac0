"""Fused RMSNorm, forward and backward in Triton.

    y = rms_norm(x (..., H), weight (H,), eps)

The same rounding as ftcore.model.rms_norm (and HF's LlamaRMSNorm): normalise in fp32, round to
x's dtype, multiply by the weight. The product is taken in fp32 and rounded once into the output
dtype, which is torch's promotion of x's and the weight's (bf16 x bf16 -> bf16; under autocast the
residual stream, and so x, is fp32).

Why fuse: eager torch runs the norm as about six elementwise kernels (float, pow, mean, add+rsqrt,
mul, cast, mul), several of them over an fp32 copy of the (rows, H) activation, saves that copy,
the rsqrt and the normalised tensor for backward, and its backward is as many kernels again. Here
the forward reads x once and writes y once; it saves x (which the residual stream keeps alive
anyway) and one fp32 rstd per row. The backward reads x, dy and the rstd once and writes dx once.

The weight's gradient is a sum over all rows. Each backward program walks its own contiguous
range of rows and keeps a partial sum in fp32 registers; torch adds the (programs, H) partials
and rounds once into the weight's dtype. No atomics: the result does not depend on scheduling.

This module imports triton at the top; ftcore.kernels imports it only when the "triton" rmsnorm is
first used, because triton decides interpreter mode (TRITON_INTERPRET=1) at import time.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import require_triton_device


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,   # x, y (rows, H), rows contiguous; w (H,); rstd (rows,) fp32
    stride_x, stride_y, rows, H, eps,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # A tile of BLOCK_R whole rows per program: the row's sum of squares needs all of it.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask, cmask = r < rows, cols < H
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)  # masked columns are 0: they add nothing
    # round the normalised value to x's dtype first, as the torch module does
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = n * w[None, :]
    tl.store(y_ptr + r[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr,  # dw: (programs, H) fp32 partial sums
    stride_x, stride_dy, stride_dx, rows, H, rows_per_program,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # With xhat = x * rstd and g = dy * w:
    #   dx = rstd * (g - xhat * mean(g * xhat))     (rstd depends on every x of the row)
    #   dw = sum over rows of dy * round(xhat)      (what the forward multiplied the weight by)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # rows_per_program is a multiple of BLOCK_R
    for i in range(0, rows_per_program, BLOCK_R):
        r = first + i + tl.arange(0, BLOCK_R)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / H
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + r[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(dw_ptr + pid * H + cols, dw, mask=cmask)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiling(rows: int, H: int, device: torch.device, block_rows: int | None):
    block_h = triton.next_power_of_2(H)
    if block_h > 65536:
        raise ValueError(f"rms_norm: hidden size {H} is too large for one tile per row (max 65536)")
    if block_rows is None:
        # GPU: ~4096 elements per tile (2 rows of a 2048 hidden, 1 row from 4096 up), enough
        # loads in flight without spilling registers. CPU: the interpreter pays per program, so
        # one big tile.
        tile = 4096 if device.type == "cuda" else 65536
        block_rows = max(1, min(triton.next_power_of_2(rows), tile // block_h))
    elif block_rows & (block_rows - 1):
        raise ValueError(f"rms_norm: block_rows must be a power of 2, got {block_rows}")
    num_warps = 4 if block_rows * block_h <= 1024 else 8 if block_rows * block_h <= 8192 else 16
    return block_rows, block_h, num_warps


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, block_rows, programs):
        H = x.shape[-1]
        if weight.shape != (H,):
            raise ValueError(f"rms_norm: weight must be ({H},) to match x {tuple(x.shape)}, "
                             f"got {tuple(weight.shape)}")
        x2 = x.reshape(-1, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        weight = weight.contiguous()
        rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_r, block_h, num_warps = _tiling(rows, H, x.device, block_rows)
        if rows:
            _rmsnorm_fwd_kernel[(triton.cdiv(rows, block_r),)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), rows, H, eps,
                BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.block, ctx.programs = x.shape, (block_r, block_h, num_warps), programs
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, H = x2.shape
        block_r, block_h, num_warps = ctx.block
        dy2 = dy.reshape(-1, H)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        if rows == 0:
            return dx.view(ctx.x_shape), torch.zeros_like(weight), None, None, None
        # Programs for the weight's partial sums: a few per SM on the GPU (each walks a range of
        # rows; more programs = more partials for torch to add, fewer = less parallelism).
        programs = ctx.programs or (4 * _sm_count(x2.device.index or 0) if x2.is_cuda else 1)
        per_program = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r
        programs = triton.cdiv(rows, per_program)  # each program has at least one row
        partial = torch.empty(programs, H, dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(programs,)](
            x2, weight, dy2, rstd, dx, partial, x2.stride(0), dy2.stride(0), dx.stride(0),
            rows, H, per_program, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps)
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, block_rows: int | None = None,
             programs: int | None = None) -> torch.Tensor:
    """weight * round_to_x_dtype(x * rsqrt(mean(x^2, -1) + eps)), fused. block_rows (rows per
    tile, a power of 2) and programs (backward programs, i.e. weight-gradient partials) override
    the defaults; they are there for tests and tuning."""
    require_triton_device(x, "rmsnorm")
    return RMSNormFunction.apply(x, weight, float(eps), block_rows, programs)
