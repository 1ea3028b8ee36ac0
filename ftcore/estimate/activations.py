"""What one block, the final norm and the loss keep alive, op by op, in ftcore/model.py's code:
the bytes autograd saves from the forward until the backward, and the temporaries of the forward
and backward of a block and of each loss implementation. Checked tensor by tensor against tiny CPU
runs (tests/test_memory.py)."""
from __future__ import annotations

import torch

from ftcore.estimate.shapes import Dtypes, Shape

# activations: what autograd saves, per op, in ftcore/model.py's Block
#
#   RMSNorm   xf = x.float(); xn = xf * rsqrt(mean(xf^2) + eps); out = weight * xn.to(x.dtype)
#             saves xf (pow and mul: x itself when x is fp32, else an fp32 copy), rsqrt (B,T,1)
#             fp32, xn in x's dtype (the weight's gradient needs it); the output is saved by the
#             linears that read it: once, or under autocast once per linear (each casts it to
#             bf16 itself: q, k, v save three copies, gate and up two).
#   q, k, v   linear: saves its input (above) and the weight (a parameter; under autocast a bf16
#             copy, see weight copies). RoPE's muls save cos/sin only (shared by all layers).
#   SDPA      (flash on CUDA, flash-for-CPU; no T x T matrix) saves q and k after RoPE, v, the
#             output and the logsumexp (B, nh, T) fp32. Under autocast RoPE's output is fp32
#             (bf16 q times fp32 cos) and SDPA saves its own bf16 casts of q and k. In fp32 on
#             CUDA grouped k and v are expanded to every query head first (memory-efficient
#             kernel), and SDPA saves them expanded.
#   o         its input is SDPA's output (same storage: the output is laid out (B,T,nh,hd)).
#   residual  adds save nothing; the sum is saved as the next norm's input.
#   SwiGLU    gate output (silu saves its input), silu output and up output (the product saves
#             both), the product (w_down saves its input).
#
# Under activation checkpointing, a block keeps only its input x ("full"), or x plus the outputs of
# its matmuls and of SDPA ("selective": parallel._SAVE_OPS); backward recomputes the rest one block
# at a time. Under torch.compile (AOTAutograd's min-cut partitioner) the pointwise work is
# recomputed in backward and only cheap-to-keep tensors are saved: a prediction, see block_saved.


def norm_saved(s: Shape, dt: Dtypes, consumers: int) -> dict[str, int]:
    n, H = s.n, s.H
    out = consumers * dt.compute * n * H if dt.autocast else dt.residual * n * H
    return {"norm input (fp32)": 4 * n * H, "norm rsqrt": 4 * n, "norm xn": dt.residual * n * H,
            "norm output" + (f" (x{consumers} bf16 casts)" if dt.autocast else ""): out}


def _attn_saved(s: Shape, dt: Dtypes) -> dict[str, int]:
    n, c = s.n, dt.compute
    if s.kv_expanded:  # SDPA saves k and v as expanded to every query head (fp32 on CUDA)
        return {"q, k after rope (k expanded)": c * n * 2 * s.qd, "v (expanded)": c * n * s.qd,
                "attention output": c * n * s.qd, "logsumexp": 4 * s.B * s.nh * s.T}
    if s.attn_fp32:  # SDPA saves its fp32 copies and fp32 output; o saves the bf16 cast of that
        return {"q, k after rope (fp32)": 4 * n * (s.qd + s.kvd), "v (fp32)": 4 * n * s.kvd,
                "attention output (fp32)": 4 * n * s.qd, "o input (bf16 cast)": c * n * s.qd,
                "logsumexp": 4 * s.B * s.nh * s.T}
    return {"q, k after rope": c * n * (s.qd + s.kvd), "v": c * n * s.kvd,
            "attention output": c * n * s.qd, "logsumexp": 4 * s.B * s.nh * s.T}


def _mlp_saved(s: Shape, dt: Dtypes) -> dict[str, int]:
    return {"gate, silu, up, product": 4 * dt.compute * s.n * s.I}


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def block_saved(s: Shape, dt: Dtypes, ac: str, compiled: bool) -> dict[str, int]:
    """Bytes one block keeps from its forward until its backward, by item (weight copies apart)."""
    n, c, r, H, I = s.n, dt.compute, dt.residual, s.H, s.I
    if ac == "full":
        return {"block input": r * n * H}
    if ac == "selective":
        return {"block input": r * n * H,
                "q, k, v projections": c * n * (s.qd + 2 * s.kvd),
                "o, down projections": 2 * c * n * H,
                "gate, up projections": 2 * c * n * I,
                "attention output": (4 if s.attn_fp32 else c) * n * s.qd, "logsumexp": 4 * s.B * s.nh * s.T}
    if compiled:
        # What AOTAutograd's min-cut partitioner keeps (read from its forward graph's outputs,
        # TORCH_LOGS=aot_graphs): the block input, both rsqrt, each norm's output once in the
        # compute dtype (the per-linear casts are fused into one), q and k after RoPE, v, SDPA's
        # output and logsumexp, o's output (x + o rebuilds the mid residual), gate, up and their
        # product; norms, RoPE, silu and the residual sums are recomputed in backward. Under
        # autocast it also keeps the bf16 weight copies (counted with the eager ones).
        return {"block input": r * n * H, "norm rsqrt": 8 * n,
                "normed inputs": 2 * c * n * H, "q, k after rope": c * n * (s.qd + s.kvd), "v": c * n * s.kvd,
                "o projection": c * n * H, "attention output": c * n * s.qd,
                "logsumexp": 4 * s.B * s.nh * s.T, "gate, up, product": 3 * c * n * I}
    return _merge(norm_saved(s, dt, 3), _attn_saved(s, dt), norm_saved(s, dt, 2), _mlp_saved(s, dt))


def recompute_extra(s: Shape, dt: Dtypes, ac: str) -> int:
    """Bytes a checkpointed block adds while it is recomputed and run backward: the tensors its
    eager forward would have saved that the checkpoint did not keep."""
    eager = sum(block_saved(s, dt, "none", False).values())
    x_shared = dt.residual * s.n * s.H if dt.residual == 4 else 0  # x is the first norm's saved xf
    if ac == "full":
        return eager - x_shared
    if ac == "selective":
        # cached outputs reused by the recompute: v, gate, up, SDPA's outputs; q and k after RoPE
        # and everything pointwise are new. The cache entries of q, k and o are handed to the
        # recompute and freed once RoPE and the residual add have used them.
        c, n = dt.compute, s.n
        reused = x_shared + c * n * (s.kvd + 2 * s.I + s.qd) + 4 * s.B * s.nh * s.T
        return eager - reused - c * n * (s.qd + s.kvd + s.H)
    return 0


def block_forward_extra(s: Shape, dt: Dtypes, ac: str) -> int:
    """Tensors alive inside a block's forward beyond what it keeps: for a checkpointed block, at the
    SwiGLU product (mid residual, normed input, gate and up outputs (swiglu's arguments), silu's
    output, the product); for an eager block, at its last residual add (the down projection's
    output and the block's output)."""
    n, c, r = s.n, dt.compute, dt.residual
    if ac == "full":
        return 2 * r * n * s.H + 4 * c * n * s.I
    if ac == "selective":  # gate and up are cached (counted); down's output is not made yet
        return 2 * r * n * s.H + 2 * c * n * s.I - c * n * s.H
    return c * n * s.H + r * n * s.H


def block_backward_temp(s: Shape, dt: Dtypes) -> int:
    """The peak of a block's own backward above its saved tensors, at the SwiGLU: the incoming
    residual gradient, d(product), d(silu), d(up), while the product itself (and, under autocast,
    the bf16 copies of the gradient and of w_down) has been freed; the attention backward
    (dq, dk, dv) is smaller for Llama shapes."""
    n, c = s.n, dt.compute
    mlp = dt.residual * n * s.H + 2 * c * n * s.I
    attn = dt.residual * n * s.H + c * n * (s.qd + 2 * s.kvd) + 4 * n * s.qd
    return max(mlp, attn)


# the loss: what each implementation holds in forward, keeps for backward, and adds in backward

def loss_memory(s: Shape, dt: Dtypes, loss: str, n_labelled: int, memory_budget: int | None) -> dict:
    n, H, V, c = s.n, s.H, s.V, dt.compute
    # the final norm's output h is a local of Transformer.forward while the loss runs; under
    # autocast Transformer.loss_sum hands the kernel bf16 copies of h and of the lm_head weight
    h_out = dt.residual * n * H
    cast_h = 2 * n * H if dt.autocast else 0
    cast_w = 2 * V * H if dt.autocast else 0
    inputs_kept = cast_h + cast_w if dt.autocast else h_out  # what a plain linear saves
    if loss == "torch":
        # F.linear -> logits (c); .float() -> fp32 logits; log_softmax -> fp32 output (saved);
        # backward: nll_loss's dense fp32 grad, then log_softmax's fp32 grad, with the output
        fwd = h_out + cast_h + cast_w + 8 * n * V
        saved = 4 * n * V + inputs_kept
        bwd = saved + 8 * n * V
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head_rows": n}
    if loss == "compile":
        # inductor: one matmul (the logits, saved in the compute dtype), fused fp32 softmax kernels
        # that keep the logsumexp; backward writes d(logits) over the saved logits (a donated
        # buffer) and makes d(hidden), d(weight); autocast's cast then makes the fp32 gradient
        fwd = h_out + cast_h + cast_w + c * n * V + 8 * n
        saved = c * n * V + 8 * n + inputs_kept
        bwd = max(saved + c * n * H + c * V * H, c * n * H + c * V * H + (4 * V * H if dt.autocast else 0))
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head_rows": n}
    if loss in ("triton", "chunked"):
        # kernels/linear_cross_entropy.py: labelled rows only, in chunks, gradients in forward
        nl = n_labelled
        from ftcore.kernels.linear_cross_entropy import DEFAULT_MEMORY_BUDGET, chunk_rows_for  # no triton import
        C = chunk_rows_for(nl, V, H, torch.bfloat16 if c == 2 else torch.float32, memory_budget or DEFAULT_MEMORY_BUDGET)
        rows = min(C, nl)
        single = nl <= C
        d_hidden = c * n * H
        acc = 0 if single else 4 * V * H  # fp32 d_weight accumulator over chunks
        logits = c * rows * V
        step = logits + (4 * rows * V + 16 * rows if loss == "chunked" else 0)  # the torch step's fp32 copy
        mm = logits + c * rows * H + (c * V * H if single else 0)  # d_hidden rows, d_weight
        index = n + 8 * nl + 8 * rows + c * rows * H  # mask, row ids, chunk labels, chunk rows
        fwd = h_out + cast_h + cast_w + d_hidden + acc + index + max(step, mm)
        saved = d_hidden + (c * V * H if single else 4 * V * H)
        # backward scales the saved gradients into new tensors; then, under autocast, the cast of
        # the weight turns d_weight into the fp32 gradient
        bwd = max(saved + c * n * H + c * V * H, c * n * H + c * V * H + (4 * V * H if dt.autocast else 0))
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head_rows": nl, "chunk rows": rows}
    raise ValueError(f"loss {loss!r}: the estimator knows torch, compile, chunked and triton")
