"""Memory: measuring the peak, and predicting it before a run.

Measuring
    peak_mem_bytes / reset_peak   the training device's peak (CUDA allocator; CPU: peak RSS)
    LiveTensorBytes               exact bytes of live tensor storages on any device, peak included,
                                  counted op by op (a dispatch mode): what torch.cuda.max_memory_allocated
                                  reports on a GPU, measurable on a CPU too. Tests and CPU bench rows use it.
    saved_tensor_bytes            bytes that autograd saves for backward during a forward
    record_memory_history / dump_memory_snapshot   a CUDA snapshot for https://pytorch.org/memory_viz

Predicting
    estimate_peak_bytes(model_cfg, ...)  the peak of a training step, phase by phase, with a breakdown
    estimate_report(cfg, world_size)     the same for a run config (`ftcore bench --estimate CONFIG`)

The estimator is arithmetic on the model shape, no tensors and no GPU. It follows what ftcore's
model actually allocates, op by op (see _block_saved), and is tested against LiveTensorBytes on tiny
CPU runs (tests/test_memory.py); bench/bench_step.py prints it beside the measured CUDA peak.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch

MiB = 2 ** 20
GiB = 2 ** 30


# ================================================================================================
# measuring

def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_mem_bytes(device: torch.device) -> int:
    """CUDA: peak allocated by the caching allocator. CPU: the process's peak resident set (VmHWM),
    the closest thing the OS keeps."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, counted exactly on any device.

        with LiveTensorBytes() as mem:
            mem.track(model.parameters())      # tensors that existed before: count them too
            step()
            mem.mark("forward")                # optional: peak per segment between marks
        mem.peak, mem.live, mem.segments

    Every aten op's outputs are looked at as the op returns; a storage is counted once (views share
    it) and uncounted when it is freed (a weakref on the storage). The autograd engine runs backward
    ops under the same mode, so gradients and backward temporaries are counted too. This is the
    quantity the CUDA caching allocator reports as "allocated" (which rounds each block up to 512
    bytes), without the allocator: so a CPU run measures what a GPU run of the same ops would hold.
    Kernels that allocate privately (cuBLAS workspaces, NCCL buffers) are invisible to it."""

    def __init__(self):
        super().__init__()
        self._sizes: dict[int, list] = {}  # id(storage) -> [weakref, nbytes]
        self.live = 0
        self.peak = 0
        self.segments: list[tuple[str, int]] = []  # (mark, peak since the previous mark)
        self._segment_peak = 0

    def _count(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(t, "_local_tensor"):  # a DTensor: its local shard holds the memory
            t = t._local_tensor
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return
        n = st.nbytes()
        key = id(st)
        entry = self._sizes.get(key)
        if entry is not None and entry[0]() is st:
            if entry[1] != n:  # resized in place (out= ops, FSDP's resize_ of unsharded params)
                self.live += n - entry[1]
                entry[1] = n
        else:
            def freed(_ref, key=key, sizes=self._sizes):
                e = sizes.pop(key, None)
                if e is not None:
                    self.live -= e[1]
            self._sizes[key] = [weakref.ref(st, freed), n]
            self.live += n
        if self.live > self.peak:
            self.peak = self.live
        if self.live > self._segment_peak:
            self._segment_peak = self.live

    def track(self, tensors) -> None:
        """Count tensors created before the mode was entered (parameters, optimizer states)."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            self._count(t)
            if isinstance(t, torch.Tensor) and t.grad is not None:
                self._count(t.grad)

    def mark(self, name: str) -> None:
        self.segments.append((name, self._segment_peak))
        self._segment_peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._count(t)
        # in-place and out= ops may grow an existing storage
        if func._schema.is_mutable:
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self._count(t)
        return out


def track_optimizer(mem: LiveTensorBytes, optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        mem.track([v for v in state.values() if isinstance(v, torch.Tensor)])


@contextlib.contextmanager
def saved_tensor_bytes(exclude=()):
    """Count the bytes autograd saves for backward while the block runs: unique storages, not
    counting `exclude` (e.g. the parameters, which exist anyway). Yields a dict filled on exit:
    {"bytes": total, "tensors": [(shape, dtype, nbytes, grad_fn name), ...]}. Exact and
    platform-independent; tensors saved inside a checkpointed region are not seen (the
    checkpoint's own hooks take them), so use it on models without activation checkpointing."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    out = {"bytes": 0, "tensors": []}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = st.nbytes()
            out["tensors"].append((tuple(t.shape), t.dtype, st.nbytes(),
                                   type(t.grad_fn).__name__ if t.grad_fn is not None else None))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def record_memory_history(max_entries: int = 200_000) -> None:
    """Start recording CUDA allocations (with Python stacks) for dump_memory_snapshot."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def dump_memory_snapshot(path) -> None:
    """Write the recorded history as a pickle that https://pytorch.org/memory_viz opens, and stop."""
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


# ================================================================================================
# predicting
#
# The peak of a training step is the largest of a few moments, each a sum of what is alive then:
#
#   forward           params, optimizer states, every layer's saved activations, the loss forward
#   loss backward     the same, with the loss's backward workspace (torch: 3 fp32 (N, V) tensors)
#   backward, last    the first block to run backward: activations still all there (plus one
#                     block recomputed under checkpointing), the lm_head gradient, the block's
#                     backward temporaries
#   backward, first   the last block to run backward: nearly every gradient exists
#   embedding         every gradient, plus a dense (V, H) embedding gradient when it is added to
#                     an existing one (tied lm_head, or gradient accumulation)
#   optimizer         params + grads + AdamW states (+ temporaries of a non-fused AdamW)
#
# Gradients are set to None after each step (zero_grad(set_to_none=True)), so they exist in the
# forward only under gradient accumulation. Sizes in bytes; n = B*T tokens of one micro-batch.

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

    @classmethod
    def of(cls, cfg, micro_batch_size: int, seq_len: int) -> "Shape":
        return cls(micro_batch_size, seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                   cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias,
                   cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings)

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

    @property
    def total_params(self) -> int:
        return self.L * self.block_params + self.root_params


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


def _norm_saved(s: Shape, d: Dtypes, consumers: int) -> dict[str, int]:
    n, H = s.n, s.H
    out = consumers * d.compute * n * H if d.autocast else d.residual * n * H
    return {"norm input (fp32)": 4 * n * H, "norm rsqrt": 4 * n, "norm xn": d.residual * n * H,
            "norm output" + (f" (x{consumers} bf16 casts)" if d.autocast else ""): out}


def _attn_saved(s: Shape, d: Dtypes) -> dict[str, int]:
    n, c = s.n, d.compute
    return {"q, k after rope": c * n * (s.qd + s.kvd), "v": c * n * s.kvd,
            "attention output": c * n * s.qd, "logsumexp": 4 * s.B * s.nh * s.T}


def _mlp_saved(s: Shape, d: Dtypes) -> dict[str, int]:
    return {"gate, silu, up, product": 4 * d.compute * s.n * s.I}


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def _block_saved(s: Shape, d: Dtypes, ac: str, compiled: bool) -> dict[str, int]:
    """Bytes one block keeps from its forward until its backward, by item (weight copies apart)."""
    n, c, r, H, I = s.n, d.compute, d.residual, s.H, s.I
    if ac == "full":
        return {"block input": r * n * H}
    if ac == "selective":
        return {"block input": r * n * H,
                "q, k, v projections": c * n * (s.qd + 2 * s.kvd),
                "o, down projections": 2 * c * n * H,
                "gate, up projections": 2 * c * n * I,
                "attention output": c * n * s.qd, "logsumexp": 4 * s.B * s.nh * s.T}
    if compiled:
        # Predicted for the min-cut partitioner: keep the block input, the bf16 matmul inputs
        # (normed activations), q/k/v, SDPA's outputs, o's output (x + o rebuilds the mid
        # residual) and gate/up; recompute norms, RoPE, silu, the product and the casts.
        return {"block input": r * n * H, "norm rsqrt": 8 * n,
                "normed inputs": 2 * c * n * H, "q, k, v": c * n * (s.qd + 2 * s.kvd),
                "o projection": c * n * H, "attention output": c * n * s.qd,
                "logsumexp": 4 * s.B * s.nh * s.T, "gate, up projections": 2 * c * n * I}
    return _merge(_norm_saved(s, d, 3), _attn_saved(s, d), _norm_saved(s, d, 2), _mlp_saved(s, d))


def _recompute_extra(s: Shape, d: Dtypes, ac: str) -> int:
    """Bytes a checkpointed block adds while it is recomputed and run backward: the tensors its
    eager forward would have saved that the checkpoint did not keep."""
    eager = sum(_block_saved(s, d, "none", False).values())
    x_shared = d.residual * s.n * s.H if d.residual == 4 else 0  # x is the first norm's saved xf
    if ac == "full":
        return eager - x_shared
    if ac == "selective":
        # cached outputs reused by the recompute: v, gate, up, SDPA's outputs; q and k after RoPE
        # and everything pointwise are new. The cache entries of q, k and o are handed to the
        # recompute and freed once RoPE and the residual add have used them.
        c, n = d.compute, s.n
        reused = x_shared + c * n * (s.kvd + 2 * s.I + s.qd) + 4 * s.B * s.nh * s.T
        return eager - reused - c * n * (s.qd + s.kvd + s.H)
    return 0


def _block_forward_extra(s: Shape, d: Dtypes, ac: str) -> int:
    """Tensors alive inside a block's forward beyond what it keeps: for a checkpointed block, at the
    SwiGLU product (mid residual, normed input, silu and up outputs, the product); for an eager
    block, at its last residual add (the down projection's output and the block's output)."""
    n, c, r = s.n, d.compute, d.residual
    if ac == "full":
        return 2 * r * n * s.H + 3 * c * n * s.I
    if ac == "selective":  # gate and up are cached (counted); down's output is not made yet
        return 2 * r * n * s.H + 2 * c * n * s.I - c * n * s.H
    return c * n * s.H + r * n * s.H


def _block_backward_temp(s: Shape, d: Dtypes) -> int:
    """The peak of a block's own backward above its saved tensors, at the SwiGLU: the incoming
    residual gradient, d(product), d(silu), d(up), while the product itself (and, under autocast,
    the bf16 copies of the gradient and of w_down) has been freed; the attention backward
    (dq, dk, dv) is smaller for Llama shapes."""
    n, c = s.n, d.compute
    mlp = d.residual * n * s.H + 2 * c * n * s.I
    attn = d.residual * n * s.H + c * n * (s.qd + 2 * s.kvd) + 4 * n * s.qd
    return max(mlp, attn)


# ------------------------------------------------------------------------------------------------
# the loss: what each implementation holds in forward, keeps for backward, and adds in backward

def _loss_model(s: Shape, d: Dtypes, loss: str, n_labelled: int, fsdp: bool, memory_budget: int | None) -> dict:
    n, H, V, c = s.n, s.H, s.V, d.compute
    # the final norm's output h is a local of Transformer.forward while the loss runs; under
    # autocast Transformer.loss_sum hands the kernel bf16 copies of h and of the lm_head weight
    h_out = d.residual * n * H
    cast_h = 2 * n * H if d.autocast else 0
    cast_w = 2 * V * H if d.autocast else 0
    inputs_kept = cast_h + cast_w if d.autocast else h_out  # what a plain linear saves
    if loss in ("torch",):
        # F.linear -> logits (c); .float() -> fp32 logits; log_softmax -> fp32 output (saved);
        # backward: nll_loss's dense fp32 grad, then log_softmax's fp32 grad, with the output
        fwd = h_out + cast_h + cast_w + 8 * n * V
        saved = 4 * n * V + inputs_kept
        bwd = saved + 8 * n * V
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": n}
    if loss == "compile":
        # predicted: one matmul (logits in the compute dtype, saved), fused fp32 softmax kernels
        # that keep the logsumexp; backward writes d(logits) in the compute dtype
        fwd = h_out + cast_h + cast_w + c * n * V + 8 * n
        saved = c * n * V + 8 * n + inputs_kept
        bwd = saved + c * n * V
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": n}
    if loss in ("triton", "chunked"):
        # kernels/linear_cross_entropy.py: labelled rows only, in chunks, gradients in forward
        nl = n_labelled
        try:
            from ftcore.kernels.linear_cross_entropy import DEFAULT_MEMORY_BUDGET, chunk_rows_for
        except ImportError:  # pragma: no cover - a copy of its rule, for a library without kernels
            DEFAULT_MEMORY_BUDGET, chunk_rows_for = 256 * MiB, None
        budget = memory_budget or DEFAULT_MEMORY_BUDGET
        if chunk_rows_for is not None:
            C = chunk_rows_for(nl, V, H, torch.bfloat16 if c == 2 else torch.float32, budget)
        else:
            C = max(nl, 1)
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
        bwd = max(saved + c * n * H + c * V * H, c * n * H + c * V * H + (4 * V * H if d.autocast else 0))
        return {"forward": fwd, "saved": saved, "backward": bwd, "lm_head rows": nl, "chunk rows": rows}
    raise ValueError(f"loss {loss!r}: the estimator knows torch, compile, chunked and triton")


# ------------------------------------------------------------------------------------------------

def estimate_peak_bytes(model_cfg, *, micro_batch_size: int, seq_len: int, precision: str = "bf16-autocast",
                        activation_checkpointing: str = "none", loss: str = "torch", world_size: int = 1,
                        fsdp: bool = False, labelled_fraction: float = 1.0, compile: bool = False,
                        grad_accum_steps: int = 1, fused_optimizer: bool = True,
                        loss_memory_budget: int | None = None) -> dict:
    """Predict the peak bytes of one training step of ftcore's Transformer on one rank.

    model_cfg: an ftcore.model.ModelConfig. precision: fp32 | bf16-autocast | bf16-mixed | bf16
    (bf16-mixed implies FSDP). activation_checkpointing: none | full | selective. loss: torch |
    compile | chunked | triton. labelled_fraction: share of tokens with a label (the fused losses
    only do lm_head work for those). compile: torch.compile of each block. fused_optimizer: AdamW
    fused (or foreach); False = the single-tensor AdamW (CPU default), which adds temporaries.

    Returns {"peak_bytes", "peak_phase", "phases": {phase: bytes}, "breakdown": {component: bytes
    at the peak}, "per_layer": {activation item: bytes}, "notes": [...]}."""
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: expected one of {AC_MODES}")
    d = precision_dtypes(precision)
    fsdp = fsdp or precision == "bf16-mixed"
    s = Shape.of(model_cfg, micro_batch_size, seq_len)
    ac = activation_checkpointing
    W = world_size if fsdp else 1
    n, H, V, L = s.n, s.H, s.V, s.L
    n_labelled = int(round(labelled_fraction * n))
    notes = []

    # persistent state (FSDP: this rank's shards)
    P = math.ceil(s.total_params / W) * d.master
    G = P
    O = 2 * P  # AdamW exp_avg, exp_avg_sq in the parameters' dtype (plus a scalar step each)
    g_block = math.ceil(s.block_params / W) * d.master
    g_root = math.ceil(s.root_params / W) * d.master
    g_embed = math.ceil(V * H / W) * d.master
    G_acc = G if grad_accum_steps > 1 else 0  # earlier micro-batches' gradients

    # activations
    per_layer = _block_saved(s, d, ac, compile)
    A_layer = sum(per_layer.values())
    final = _norm_saved(s, d, 0)
    final.pop(next(k for k in final if k.startswith("norm output")))  # the loss accounts for h
    A_final = sum(final.values())
    # cos/sin (B, 1, T, hd) in the residual dtype, saved by every layer's RoPE; the embedding's
    # int64 ids are the caller's tensor; freqs/emb/position ids are forward locals
    A_shared = 2 * d.residual * s.B * s.T * s.hd
    rope_temps = 4 * s.B * s.T * s.hd // 2 + 4 * s.B * s.T * s.hd + 8 * s.T
    A_all = L * A_layer + A_final + A_shared
    # the last block's output is a local of forward while the loss runs; in fp32 it is the final
    # norm's saved input anyway, in bf16 the norm saves an fp32 copy instead
    x_last = d.residual * n * H if d.residual != 4 else 0

    # bf16 weight copies made by autocast: cached for the whole forward, kept by autograd until the
    # block's backward unless the block is checkpointed (then recast in recompute)
    wc_layer = 2 * s.block_linear_params if (d.autocast and not compile) else 0
    wc_fwd = L * wc_layer
    wc_saved = wc_fwd if ac == "none" else 0
    wc_down = 2 * s.H * s.I if wc_layer else 0  # w_down's copy, freed before the SwiGLU backward

    lm = _loss_model(s, d, loss, n_labelled, fsdp, loss_memory_budget)
    recompute = _recompute_extra(s, d, ac) + (wc_layer - wc_down if ac != "none" else 0)
    temp = _block_backward_temp(s, d)

    # FSDP: the root unit (embedding/lm_head, final norm) stays unsharded from forward to the end of
    # backward; each block is all-gathered (world 1: copied) in the param dtype when it runs, the
    # next one prefetched in backward; gradients come out unsharded in the param dtype, are copied
    # into an fp32 reduce-scatter buffer and land in the fp32 sharded gradient.
    if fsdp:
        Ur = s.root_params * d.unsharded
        Ub = s.block_params * d.unsharded
        root_grad = V * H * d.unsharded  # the lm_head gradient accumulates here, unsharded
        fs_fwd = Ur + (Ub if W == 1 else 2 * Ub)
        fs_loss = Ur
        fs_bwd = Ur + root_grad + 2 * Ub + Ub + s.block_params * 4  # + block grads + RS buffer
        fs_emb = Ur + root_grad + V * H * d.unsharded              # + the dense embedding grad
        fs_root_rs = root_grad + s.root_params * 4                 # root resharded, RS buffer
        fs_root_grad = root_grad
        g_lm_early = 0
    else:
        fs_fwd = fs_loss = fs_bwd = fs_emb = fs_root_rs = fs_root_grad = 0
        g_lm_early = g_embed + H * d.master  # lm_head (tied: embedding) grad from the loss backward

    def phase(**parts) -> dict[str, int]:
        return {k: int(v) for k, v in parts.items() if v}

    dense_embed = V * H * d.master if (not fsdp and (s.tied or grad_accum_steps > 1)) else 0
    opt_temp = 0 if fused_optimizer else 2 * V * H * d.master  # sqrt / bias-correction temporaries
    inputs = 16 * n  # int64 input ids and labels of the micro-batch
    # at a block's SwiGLU backward its w_down gradient already exists (FSDP: in fs_bwd)
    g_down = 0 if fsdp else s.H * s.I * d.master
    phases = {
        "forward, last block": phase(params=P, optimizer=O, grads=G_acc, inputs=inputs,
                                     activations=L * A_layer + A_shared + rope_temps + _block_forward_extra(s, d, ac),
                                     weight_copies=wc_fwd, fsdp=fs_fwd),
        "forward, loss": phase(params=P, optimizer=O, grads=G_acc, inputs=inputs,
                               activations=A_all + rope_temps + x_last,
                               weight_copies=wc_fwd, loss=lm["forward"], fsdp=fs_loss),
        "loss backward": phase(params=P, optimizer=O, grads=G_acc, inputs=inputs, activations=A_all,
                               weight_copies=wc_saved, loss=lm["backward"], fsdp=fs_loss),
        # RMSNorm's backward (pow, mean, rsqrt, mul) makes a few fp32 (n, H) temporaries
        "final norm backward": phase(params=P, optimizer=O, grads=max(G_acc, g_lm_early), inputs=inputs,
                                     activations=A_all, weight_copies=wc_saved,
                                     transient=20 * n * H - d.residual * n * H, fsdp=fs_loss + fs_root_grad),
        "backward, last block": phase(params=P, optimizer=O, grads=max(G_acc, g_lm_early + g_down),
                                      inputs=inputs, activations=A_all - A_final + recompute,
                                      weight_copies=wc_saved - (wc_down if ac == "none" else 0),
                                      transient=temp, fsdp=fs_bwd),
        "backward, first block": phase(params=P, optimizer=O,
                                       grads=max(G_acc, G - g_block - (0 if s.tied else g_embed) + g_down),
                                       inputs=inputs, activations=A_layer + A_shared + recompute,
                                       weight_copies=wc_layer - wc_down if ac == "none" else 0,
                                       transient=temp, fsdp=fs_bwd),
        "embedding backward": phase(params=P, optimizer=O, grads=G, inputs=inputs,
                                    transient=dense_embed + d.residual * n * H, fsdp=fs_emb),
    }
    if fsdp:
        phases["root reduce-scatter"] = phase(params=P, optimizer=O, grads=G, inputs=inputs, fsdp=fs_root_rs)
    phases["optimizer"] = phase(params=P, optimizer=O, grads=G, inputs=inputs, transient=opt_temp)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    if compile:
        notes.append("compiled blocks: saved activations predicted for the min-cut partitioner")
    if loss == "compile":
        notes.append("compiled loss: workspace predicted (logits kept in the compute dtype)")
    if fsdp:
        notes.append(f"FSDP (world {W}): all-gather/reduce-scatter buffers modelled per block")
    return {
        "peak_bytes": totals[peak_phase], "peak_phase": peak_phase, "phases": totals,
        "breakdown": phases[peak_phase], "phase_breakdown": phases, "per_layer": per_layer,
        "per_layer_bytes": A_layer, "params": s.total_params, "lm_head_rows": lm["lm_head rows"],
        "notes": notes,
    }
