"""Fused SwiGLU activation, forward and backward in Triton: y = silu(gate) * up.

The MLP keeps its three cuBLAS matmuls (gate, up, down); what is fused is the elementwise part in
between. Eager torch runs silu and the product as two kernels and saves three (rows, I) tensors
for backward: gate (silu's input), silu(gate) and up (the product's inputs); its backward is three
kernels (two products and silu's backward). Here one kernel reads gate and up and writes y; the
Function saves gate and up only and the backward recomputes the sigmoid, which is free next to
the memory traffic: one kernel reads dy, gate, up and writes d_gate and d_up.

Rounding: silu(gate) is rounded to gate's dtype before the product, as torch's two ops do, so a
bf16 model gives the same numbers with or without this kernel (up to the last bit of exp).

This module imports triton at the top; ftcore.kernels imports it only when the "triton" swiglu is
first used, because triton decides interpreter mode (TRITON_INTERPRET=1) at import time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import require_triton_device


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # flat elementwise: int64 offsets, (rows, I) passes 2^31 at 8192 x 262144
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    # d_up = dy * silu(g);  d_gate = dy * u * silu'(g),  silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = (g * s).to(gate_ptr.dtype.element_ty).to(tl.float32)  # the value the forward multiplied
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty),
             mask=mask)


def _block(n: int, device: torch.device, block: int | None) -> int:
    if block is None:
        # GPU: 1024 elements, 8 per thread of 4 warps (16-byte bf16 vectors). CPU: the
        # interpreter pays per program, so big blocks.
        return 1024 if device.type == "cuda" else min(65536, triton.next_power_of_2(max(n, 1)))
    if block & (block - 1):
        raise ValueError(f"swiglu: block must be a power of 2, got {block}")
    return block


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, block):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
        gate, up = gate.contiguous(), up.contiguous()  # no-ops for linear outputs
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        ctx.block = _block(n, gate.device, block)
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, ctx.block),)](gate, up, y, n, BLOCK=ctx.block)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, ctx.block),)](gate, up, dy, dgate, dup, n,
                                                              BLOCK=ctx.block)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """silu(gate) * up, fused. gate and up of the same shape (the MLP's two projections). block
    (elements per program, a power of 2) overrides the default, for tests and tuning."""
    require_triton_device(gate, "swiglu")
    return SwiGLUFunction.apply(gate, up, block)
