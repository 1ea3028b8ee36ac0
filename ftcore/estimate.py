"""Predicting the peak memory of a training step before a run: arithmetic on the model shape, no
tensors and no GPU.

    estimate_peak_bytes(model_cfg, ...)  the peak of a training step, phase by phase, with a breakdown
    estimate_report(cfg, world_size)     the same for a run config (`ftcore bench --estimate CONFIG`),
                                         deciding FSDP, the loss and the optimizer with the very
                                         functions the training run uses

It follows what ftcore's model actually allocates, op by op (see _block_saved), and is tested
against measured peaks of tiny CPU runs (tests/test_memory.py, ftcore.memory.AllocationTrace);
bench/bench_step.py prints it beside the measured CUDA peak. It is one model of one step, so it
stays one file (over the project's ~400 lines): each phase's sum reads beside the others.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ftcore.model import CPU_BF16_ATTENTION_MIN_HEAD_DIM

MiB = 2 ** 20
GiB = 2 ** 30


# ================================================================================================
# predicting
#
# The peak of a training step is the largest of a few moments, each a sum of what is alive then
# (params, optimizer states and the batch are alive at all of them):
#
#   forward, last block    every block's saved activations; inside a checkpointed block, its own
#                          intermediates; autocast's bf16 weight copies (cached for the forward)
#   forward, loss          the same, plus the loss's forward (torch: a bf16 and two fp32 (n, V))
#   loss backward          the loss's backward workspace (torch: three fp32 (n, V) tensors)
#   final norm backward    the lm_head gradient and RMSNorm's fp32 backward temporaries
#   backward, last block   the first block to run backward: activations all there (plus one block
#                          recomputed under checkpointing), its SwiGLU backward temporaries
#   backward, first block  the last block to run backward: nearly every gradient exists
#   embedding backward     every gradient, plus the embedding's dense (V, H) gradient that is added
#                          in place to a tied lm_head's (or an accumulated) gradient
#   root reduce-scatter    FSDP: the root's unsharded gradient and its fp32 reduce-scatter buffer
#   optimizer              params + grads + AdamW states (+ a non-fused AdamW's temporaries)
#
# Gradients are set to None after each step (zero_grad(set_to_none=True)), so they exist in the
# forward only under gradient accumulation. Sizes in bytes; n = B*T tokens of one micro-batch.
# What each piece is made of was checked tensor by tensor against tiny CPU runs
# (tests/test_memory.py); where CPU kernels allocate scratch of their own (bf16 matmuls in oneDNN,
# mixed-dtype elementwise ops), the estimate follows the GPU, which does not.

PRECISIONS = ("fp32", "bf16-autocast", "bf16-mixed", "bf16")
AC_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of each kind of tensor under a precision mode."""
    master: int     # parameters as the optimizer sees them, their gradients, each AdamW state
    compute: int    # matmul inputs and outputs, attention, SwiGLU
    residual: int   # the residual stream between blocks (and the embedding output)
    autocast: bool  # per-op casts: bf16 copies of weights and of each matmul's input
    unsharded: int  # FSDP's all-gathered parameters (the MixedPrecisionPolicy's param_dtype)


def precision_dtypes(precision: str) -> Dtypes:
    if precision == "fp32":
        return Dtypes(master=4, compute=4, residual=4, autocast=False, unsharded=4)
    if precision == "bf16-autocast":  # fp32 weights, bf16 matmuls; norms/residual stay fp32
        return Dtypes(master=4, compute=2, residual=4, autocast=True, unsharded=4)
    if precision == "bf16-mixed":     # fp32 shards, FSDP all-gathers bf16: the whole forward in bf16
        return Dtypes(master=4, compute=2, residual=2, autocast=False, unsharded=2)
    if precision == "bf16":           # everything bf16, AdamW states too
        return Dtypes(master=2, compute=2, residual=2, autocast=False, unsharded=2)
    raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    I: int
    V: int
    L: int
    nh: int
    nkv: int
    hd: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied: bool
    total_params: int  # ModelConfig.num_params: the one parameter count
    attn_fp32: bool = False  # bf16 attention computed in fp32 (CPU, small heads: model.Attention)

    @classmethod
    def of(cls, cfg, micro_batch_size: int, seq_len: int) -> "Shape":
        return cls(micro_batch_size, seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                   cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias,
                   cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings, cfg.num_params())

    @property
    def n(self) -> int:
        return self.B * self.T

    @property
    def qd(self) -> int:
        return self.nh * self.hd

    @property
    def kvd(self) -> int:
        return self.nkv * self.hd

    @property
    def block_linear_params(self) -> int:
        """Weights and biases of a block's seven linears (what autocast casts to bf16)."""
        H, I, qd, kvd = self.H, self.I, self.qd, self.kvd
        p = H * qd + 2 * H * kvd + qd * H + 3 * H * I
        p += (qd + 2 * kvd) * self.qkv_bias + H * self.o_bias + (2 * I + H) * self.mlp_bias
        return p

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.H  # + the two RMSNorm weights

    @property
    def root_params(self) -> int:
        """Embedding, final norm and (untied) lm_head: FSDP's root unit."""
        return self.V * self.H * (1 if self.tied else 2) + self.H


# ------------------------------------------------------------------------------------------------
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
#             (bf16 q times fp32 cos) and SDPA saves its own bf16 casts of q and k.
#   o         its input is SDPA's output (same storage: the output is laid out (B,T,nh,hd)).
#   residual  adds save nothing; the sum is saved as the next norm's input.
#   SwiGLU    gate output (silu saves its input), silu output and up output (the product saves
#             both), the product (w_down saves its input).
#
# Under activation checkpointing, a block keeps only its input x ("full"), or x plus the outputs of
# its matmuls and of SDPA ("selective": parallel._SAVE_OPS); backward recomputes the rest one block
# at a time. Under torch.compile (AOTAutograd's min-cut partitioner) the pointwise work is
# recomputed in backward and only cheap-to-keep tensors are saved: a prediction, see _block_saved.


def _norm_saved(s: Shape, dt: Dtypes, consumers: int) -> dict[str, int]:
    n, H = s.n, s.H
    out = consumers * dt.compute * n * H if dt.autocast else dt.residual * n * H
    return {"norm input (fp32)": 4 * n * H, "norm rsqrt": 4 * n, "norm xn": dt.residual * n * H,
            "norm output" + (f" (x{consumers} bf16 casts)" if dt.autocast else ""): out}


def _attn_saved(s: Shape, dt: Dtypes) -> dict[str, int]:
    n, c = s.n, dt.compute
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


def _block_saved(s: Shape, dt: Dtypes, ac: str, compiled: bool) -> dict[str, int]:
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
    return _merge(_norm_saved(s, dt, 3), _attn_saved(s, dt), _norm_saved(s, dt, 2), _mlp_saved(s, dt))


def _recompute_extra(s: Shape, dt: Dtypes, ac: str) -> int:
    """Bytes a checkpointed block adds while it is recomputed and run backward: the tensors its
    eager forward would have saved that the checkpoint did not keep."""
    eager = sum(_block_saved(s, dt, "none", False).values())
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


def _block_forward_extra(s: Shape, dt: Dtypes, ac: str) -> int:
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


def _block_backward_temp(s: Shape, dt: Dtypes) -> int:
    """The peak of a block's own backward above its saved tensors, at the SwiGLU: the incoming
    residual gradient, d(product), d(silu), d(up), while the product itself (and, under autocast,
    the bf16 copies of the gradient and of w_down) has been freed; the attention backward
    (dq, dk, dv) is smaller for Llama shapes."""
    n, c = s.n, dt.compute
    mlp = dt.residual * n * s.H + 2 * c * n * s.I
    attn = dt.residual * n * s.H + c * n * (s.qd + 2 * s.kvd) + 4 * n * s.qd
    return max(mlp, attn)


# ------------------------------------------------------------------------------------------------
# the loss: what each implementation holds in forward, keeps for backward, and adds in backward

def _loss_model(s: Shape, dt: Dtypes, loss: str, n_labelled: int, memory_budget: int | None) -> dict:
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
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": n}
    if loss == "compile":
        # inductor: one matmul (the logits, saved in the compute dtype), fused fp32 softmax kernels
        # that keep the logsumexp; backward writes d(logits) over the saved logits (a donated
        # buffer) and makes d(hidden), d(weight); autocast's cast then makes the fp32 gradient
        fwd = h_out + cast_h + cast_w + c * n * V + 8 * n
        saved = c * n * V + 8 * n + inputs_kept
        bwd = max(saved + c * n * H + c * V * H, c * n * H + c * V * H + (4 * V * H if dt.autocast else 0))
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": n}
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
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": nl, "chunk rows": rows}
    raise ValueError(f"loss {loss!r}: the estimator knows torch, compile, chunked and triton")


# ------------------------------------------------------------------------------------------------

def estimate_peak_bytes(model_cfg, *, micro_batch_size: int, seq_len: int, precision: str = "bf16-autocast",
                        activation_checkpointing: str = "none", loss: str = "torch", world_size: int = 1,
                        fsdp: bool = False, labelled_fraction: float = 1.0, compile: bool = False,
                        grad_accum_steps: int = 1, fused_optimizer: bool = True,
                        optimizer_state_bytes: int | None = None, optimizer_temp_bytes: int | None = None,
                        loss_memory_budget: int | None = None, device_type: str = "cuda") -> dict:
    """Predict the peak bytes of one training step of ftcore's Transformer on one rank.

    model_cfg: an ftcore.model.ModelConfig. precision: fp32 | bf16-autocast | bf16-mixed | bf16
    (bf16-mixed implies FSDP). activation_checkpointing: none | full | selective. loss: torch |
    compile | chunked | triton. labelled_fraction: share of tokens with a label (the fused losses
    only do lm_head work for those). compile: torch.compile of each block. fused_optimizer: AdamW
    fused (or foreach); False = the single-tensor AdamW (CPU default), which adds temporaries.
    optimizer_state_bytes: bytes per element of exp_avg/exp_avg_sq (default: the parameters',
    as torch's AdamW); optimizer_temp_bytes: the optimizer step's temporaries, when known.
    device_type: "cpu" runs bf16 attention of small heads in fp32 (model.CPU_BF16_ATTENTION_MIN_HEAD_DIM;
    not modelled for compiled blocks).

    Returns {"peak_bytes", "peak_phase", "phases": {phase: bytes}, "breakdown": {component: bytes
    at the peak}, "per_layer": {activation item: bytes}, "notes": [...]}."""
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: expected one of {AC_MODES}")
    dt = precision_dtypes(precision)
    fsdp = fsdp or precision == "bf16-mixed"
    s = Shape.of(model_cfg, micro_batch_size, seq_len)
    if device_type == "cpu" and dt.compute == 2 and s.hd < CPU_BF16_ATTENTION_MIN_HEAD_DIM:
        s = dataclasses.replace(s, attn_fp32=True)
    ac = activation_checkpointing
    W = world_size if fsdp else 1
    n, H, V, L = s.n, s.H, s.V, s.L
    n_labelled = int(round(labelled_fraction * n))
    notes = []

    # persistent state (FSDP: this rank's shards)
    P = math.ceil(s.total_params / W) * dt.master
    G = P
    # AdamW exp_avg, exp_avg_sq: torch's in the parameters' dtype (plus a scalar step each)
    O = 2 * math.ceil(s.total_params / W) * (optimizer_state_bytes or dt.master)
    g_block = math.ceil(s.block_params / W) * dt.master
    g_embed = math.ceil(V * H / W) * dt.master
    G_acc = G if grad_accum_steps > 1 else 0  # earlier micro-batches' gradients
    # at a block's SwiGLU backward its w_down gradient already exists (FSDP: unsharded, below)
    g_down = 0 if fsdp else s.H * s.I * dt.master

    # activations
    per_layer = _block_saved(s, dt, ac, compile)
    A_layer = sum(per_layer.values())
    final = _norm_saved(s, dt, 0)
    final.pop(next(k for k in final if k.startswith("norm output")))  # the loss accounts for h
    A_final = sum(final.values())
    # cos/sin (B, 1, T, hd) in the residual dtype, saved by every layer's RoPE; the embedding's
    # int64 ids are the caller's tensor; freqs/emb/position ids are forward locals
    A_shared = 2 * dt.residual * s.B * s.T * s.hd
    rope_temps = 4 * s.B * s.T * s.hd // 2 + 4 * s.B * s.T * s.hd + 8 * s.T
    A_all = L * A_layer + A_final + A_shared
    # the last block's output is a local of forward while the loss runs; in fp32 it is the final
    # norm's saved input anyway, in bf16 the norm saves an fp32 copy instead
    x_last = dt.residual * n * H if dt.residual != 4 else 0

    # bf16 weight copies made by autocast: cached for the whole forward, kept by autograd until the
    # block's backward unless the block is checkpointed (then recast in recompute)
    wc_layer = 2 * s.block_linear_params if dt.autocast else 0
    wc_fwd = L * wc_layer
    wc_saved = wc_fwd if ac == "none" else 0
    wc_down = 2 * s.H * s.I if wc_layer else 0  # w_down's copy, freed before the SwiGLU backward

    lm = _loss_model(s, dt, loss, n_labelled, loss_memory_budget)
    recompute = _recompute_extra(s, dt, ac) + (wc_layer - wc_down if ac != "none" else 0)
    temp = _block_backward_temp(s, dt)

    # FSDP2: the root unit (embedding/lm_head, final norm) is unsharded for the whole forward and
    # backward (reshard_after_forward=False); a block is all-gathered in the param dtype when it
    # runs (world 1: copied from its shard), the next one all-gathered ahead (world > 1 only: at
    # world 1 the copy waits until the block runs). Gradients come out unsharded in the param
    # dtype; after a block's backward they are copied into an fp32 reduce-scatter input, which is
    # kept until the next block's reduce-scatter, and reduced into the fp32 sharded gradient.
    # The root's gradient (lm_head + embedding, tied) stays unsharded until the very end.
    if fsdp:
        Ur = s.root_params * dt.unsharded
        in_flight = s.block_params * dt.unsharded * (1 if W == 1 else 2)
        root_grad = V * H * dt.unsharded
        rs_in = s.block_params * 4
        g_down_u = s.H * s.I * dt.unsharded
        fs = {"forward": Ur + in_flight, "loss": Ur, "final norm": Ur + root_grad,
              "last block": Ur + root_grad + in_flight + g_down_u,
              "first block": Ur + root_grad + in_flight + g_down_u + rs_in,
              "embedding": Ur + root_grad + V * H * dt.unsharded + rs_in,
              "root reduce-scatter": root_grad + s.root_params * 4}
        g_after = {"last block": 0, "first block": (L - 1) * g_block, "embedding": L * g_block}
    else:
        fs = dict.fromkeys(("forward", "loss", "final norm", "last block", "first block", "embedding",
                            "root reduce-scatter"), 0)
        g_lm = g_embed + H * dt.master  # lm_head (tied: embedding) and final norm grads, from the loss backward
        g_after = {"last block": g_lm + g_down,
                   "first block": G - g_block - (0 if s.tied else g_embed) + g_down,
                   "embedding": G}

    def phase(**parts) -> dict[str, int]:
        return {k: int(v) for k, v in parts.items() if v}

    # a tied embedding's gradient is added in place to the lm_head's: a dense (V, H) temporary
    dense_embed = V * H * dt.master if (not fsdp and (s.tied or grad_accum_steps > 1)) else 0
    # the single-tensor AdamW makes two temporaries the size of a parameter (sqrt, then / bias
    # correction), one parameter at a time; fused and foreach make none that size
    biggest = max(V * H, H * s.I, H * s.qd)
    opt_temp = 0 if fused_optimizer else 2 * biggest * dt.master
    if optimizer_temp_bytes is not None:
        opt_temp = optimizer_temp_bytes
    inputs = 16 * n  # int64 input ids and labels of the micro-batch
    common = dict(params=P, optimizer=O, inputs=inputs)
    phases = {
        "forward, last block": phase(**common, grads=G_acc, weight_copies=wc_fwd, fsdp=fs["forward"],
                                     activations=L * A_layer + A_shared + rope_temps + _block_forward_extra(s, dt, ac)),
        "forward, loss": phase(**common, grads=G_acc, activations=A_all + rope_temps + x_last,
                               weight_copies=wc_fwd, loss=lm["forward"], fsdp=fs["loss"]),
        "loss backward": phase(**common, grads=G_acc, activations=A_all, weight_copies=wc_saved,
                               loss=lm["backward"], fsdp=fs["loss"]),
        # RMSNorm's backward (pow, mean, rsqrt, mul) makes a few fp32 (n, H) temporaries
        "final norm backward": phase(**common, grads=max(G_acc, 0 if fsdp else g_lm), activations=A_all,
                                     weight_copies=wc_saved, transient=20 * n * H - dt.residual * n * H,
                                     fsdp=fs["final norm"]),
        "backward, last block": phase(**common, grads=max(G_acc, g_after["last block"]),
                                      activations=A_all - A_final + recompute,
                                      weight_copies=wc_saved - (wc_down if ac == "none" else 0),
                                      transient=temp, fsdp=fs["last block"]),
        "backward, first block": phase(**common, grads=max(G_acc, g_after["first block"]),
                                       activations=A_layer + A_shared + recompute,
                                       weight_copies=wc_layer - wc_down if ac == "none" else 0,
                                       transient=temp, fsdp=fs["first block"]),
        "embedding backward": phase(**common, grads=max(G_acc, g_after["embedding"]),
                                    transient=dense_embed + dt.residual * n * H, fsdp=fs["embedding"]),
    }
    if fsdp:
        phases["root reduce-scatter"] = phase(**common, grads=G, fsdp=fs["root reduce-scatter"])
    phases["optimizer"] = phase(**common, grads=G, transient=opt_temp)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    if compile:
        notes.append("compiled blocks: saved tensors as AOTAutograd's partitioner chose them on CPU (torch 2.13); "
                     "the backward's temporaries are assumed to be eager's")
    if compile and ac != "none":
        notes.append("compiled + checkpointed blocks: estimated as eager checkpointing (within ~6% on CPU)")
    if fsdp:
        notes.append(f"FSDP (world {W}): all-gather/reduce-scatter buffers modelled per block")
    return {
        "peak_bytes": totals[peak_phase], "peak_phase": peak_phase, "phases": totals,
        # what the forward leaves for backward: activations, autocast weight copies, the loss's
        # saved tensors (on top of params, optimizer states, FSDP's root unit)
        "saved_for_backward": A_all + wc_saved + lm["saved"],
        "breakdown": phases[peak_phase], "phase_breakdown": phases, "per_layer": per_layer,
        "per_layer_bytes": A_layer, "params": s.total_params, "lm_head_rows": lm["lm_head rows"],
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------
# `ftcore bench --estimate CONFIG`

def _fmt(b: float) -> str:
    return f"{b / GiB:8.2f} GiB" if abs(b) >= GiB else f"{b / MiB:8.1f} MiB"


def estimate_load_bytes(model_cfg, *, world_size: int, fsdp: bool, param_bytes: int, file_bytes: int) -> dict[str, int]:
    """Per-rank peak of loading the weights and rank 0's peak of the final export.

    Loading under FSDP (weights.load_into_shards): this rank's shards, plus the rows it owns of one
    tensor read in the file's dtype before conversion. Without FSDP (load_pretrained): the whole
    model, plus one tensor in the file's dtype (and the file's pages while it is mapped, which the
    OS may count as resident). Export (checkpoint.export_hf): every rank its own shards and one
    gathered tensor, which rank 0 writes as it arrives (weights.save_pretrained holds no more)."""
    s = Shape.of(model_cfg, 1, 1)
    W = world_size if fsdp else 1
    largest = max(s.V * s.H, s.I * s.H, s.qd * s.H)
    own = math.ceil(s.total_params / W) * param_bytes
    load = own + math.ceil(largest / W) * file_bytes
    export = own + largest * param_bytes
    return {"load": load, "export": export, "own": own}


def model_config_for(cfg):
    """The model shape a run config trains: model.path's config.json, else the [pretrain] shape
    (the tokenizer trained there may end up a little smaller than pretrain.vocab_size)."""
    from ftcore.hf import read_config
    from ftcore.model import ModelConfig
    if cfg.model.path:
        return read_config(cfg.model.path)
    p = cfg.pretrain
    return ModelConfig(model_type="llama", vocab_size=p.vocab_size, hidden_size=p.hidden_size,
                       intermediate_size=p.intermediate_size, num_layers=p.num_layers, num_heads=p.num_heads,
                       num_kv_heads=p.num_kv_heads, tie_word_embeddings=True)


def estimate_run(cfg, model_cfg, world_size: int = 1, device: torch.device | None = None,
                 labelled_fraction: float = 1.0) -> dict:
    """estimate_peak_bytes for the step a run config trains, deciding FSDP, the loss and the
    optimizer with the run's own functions (not copies of them). device: default train.device,
    with auto meaning the GPU the estimate is for."""
    from ftcore.config import accumulation_steps
    from ftcore.hardware import MatmulShape, resolve_auto
    from ftcore.optim import CHUNK, fused_adamw, uses_torch_adamw
    from ftcore.train import use_fsdp
    device = device or torch.device("cpu" if cfg.train.device == "cpu" else "cuda")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))  # "auto" resolved on a copy
    resolve_auto(cfg.train, device, MatmulShape.of(model_cfg, cfg.train.micro_batch_size * cfg.data.max_seq_len))
    t = cfg.train
    loss, fsdp, accum = t.loss, use_fsdp(cfg, world_size), accumulation_steps(cfg, world_size)
    opt_temp = None
    if not uses_torch_adamw(cfg, params_fp32=t.precision != "bf16"):
        # ftcore's AdamW works on buckets of up to CHUNK elements: an fp32 copy of each bf16 operand
        # (weights and gradients, states stored in bf16) and the fp32 denominator
        bf16_params, bf16_states = t.precision == "bf16", t.optimizer_state_dtype == "bfloat16"
        fp32_copies = 2 * bf16_params + 2 * bf16_states + 1
        shards = world_size if fsdp else 1
        opt_temp = fp32_copies * 4 * min(CHUNK, math.ceil(model_cfg.num_params() / shards))
    e = estimate_peak_bytes(model_cfg, micro_batch_size=t.micro_batch_size, seq_len=cfg.data.max_seq_len,
                            precision=t.precision, activation_checkpointing=t.activation_checkpointing,
                            loss=loss, world_size=world_size, fsdp=fsdp,
                            labelled_fraction=labelled_fraction, compile=t.compile, grad_accum_steps=accum,
                            fused_optimizer=fused_adamw(cfg, device),
                            optimizer_state_bytes=2 if t.optimizer_state_dtype == "bfloat16" else 4,
                            optimizer_temp_bytes=opt_temp, device_type=device.type)
    param_bytes = 2 if t.precision == "bf16" else 4
    file_bytes = _file_dtype_bytes(cfg)
    load = estimate_load_bytes(model_cfg, world_size=world_size, fsdp=fsdp, param_bytes=param_bytes,
                               file_bytes=file_bytes)
    return {**e, "device": device, "loss": loss, "precision": t.precision, "fsdp": fsdp, "accum": accum,
            "load_bytes": load["load"], "export_bytes": load["export"], "file_bytes_per_param": file_bytes}


def _file_dtype_bytes(cfg) -> int:
    """Bytes per parameter in the checkpoint's files (the [pretrain] base is saved in fp32)."""
    from ftcore.weights import checkpoint_dtype
    try:
        return checkpoint_dtype(cfg.model.path).itemsize if cfg.model.path else 4
    except (OSError, ValueError):
        return 4


def estimate_report(cfg, world_size: int = 1) -> str:
    """A text report of estimate_peak_bytes for a run config, on any machine."""
    t = cfg.train
    mc = model_config_for(cfg)
    e = estimate_run(cfg, mc, world_size)
    device, loss, fsdp, accum = e["device"], e["loss"], e["fsdp"], e["accum"]
    src = cfg.model.path or "[pretrain]"
    held = "its shards, read from the files row by row" if fsdp else "the whole model"
    load_lines = [
        "", f"loading the weights, per rank: {_fmt(e['load_bytes']).strip()}   ({held}, plus "
        f"{'the rows it owns of ' if fsdp else ''}one tensor in flight in the file's dtype, "
        f"{e['file_bytes_per_param']} B/param)",
        f"final export, rank 0: {_fmt(e['export_bytes']).strip()}   ({'its shards' if fsdp else 'the model'} and one "
        f"{'gathered ' if fsdp else ''}tensor, written as it arrives)",
    ]
    lines = [
        f"model: {src}: {mc.model_type}, {mc.num_layers} layers, hidden {mc.hidden_size}, intermediate "
        f"{mc.intermediate_size}, heads {mc.num_heads}/{mc.num_kv_heads} kv, vocab {mc.vocab_size}, "
        f"{'tied' if mc.tie_word_embeddings else 'untied'}; {e['params'] / 1e6:,.1f}M parameters",
        f"step: micro-batch {t.micro_batch_size} x {cfg.data.max_seq_len} tokens, {accum} accumulation "
        f"step(s), precision {e['precision']}, activation checkpointing {t.activation_checkpointing}, loss {loss}"
        f"{', compiled blocks' if t.compile else ''}, {'FSDP' if fsdp else 'no FSDP'}, world {world_size}, "
        f"{device.type}{' (train.device=auto: estimated for CUDA)' if t.device == 'auto' else ''}",
        "",
        f"peak per rank: {_fmt(e['peak_bytes']).strip()}   (during: {e['peak_phase']})",
    ]
    for k, v in e["breakdown"].items():
        lines.append(f"  {k:<28}{_fmt(v)}")
    lines += load_lines
    lines += ["", f"activations saved per layer: {_fmt(e['per_layer_bytes']).strip()}"]
    for k, v in e["per_layer"].items():
        lines.append(f"  {k:<28}{_fmt(v)}")
    lines += ["", "every phase of the step:"]
    for k, v in e["phases"].items():
        lines.append(f"  {k:<28}{_fmt(v)}{'   <- peak' if k == e['peak_phase'] else ''}")
    notes = list(e["notes"])
    if not cfg.model.path:
        notes.append("model.path is empty: this is the small base model `ftcore train` would pretrain; for a real "
                     "shape set model.path=DIR (a directory with its config.json is enough)")
    if loss in ("triton", "chunked"):
        notes.append("fused loss workspace assumes every token labelled (the worst case); prompt-masked "
                     "data needs less")
    unmodelled = [k for k in ("optimizer_in_backward", "activation_offload", "cpu_offload") if getattr(t, k, False)]
    unmodelled += [f"kernels.{kind}={name}" for kind, name in getattr(t, "kernels", {}).items() if name != "torch"]
    if unmodelled:
        notes.append(f"NOT included: train.{', train.'.join(unmodelled)} (the estimate is for the plain torch "
                     "path without them)")
    notes.append("not modelled: allocator rounding and fragmentation (reserved > allocated), cuBLAS/NCCL "
                 "workspaces, the CUDA context (~0.5 GiB outside torch's allocator)")
    lines += ["", *("note: " + n for n in notes)]
    return "\n".join(lines)
