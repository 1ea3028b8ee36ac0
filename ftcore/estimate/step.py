"""The peak of one training step, phase by phase: each term of memory (gradients, activations,
autocast's weight copies, the loss, FSDP's buffers, temporaries) is one function giving its bytes
at every phase, and a phase's total is their sum beside the parameters, optimizer states and batch.
"""
from __future__ import annotations

import dataclasses

import torch

from ftcore.estimate import activations as act
from ftcore.estimate.shapes import Dtypes, Shape, precision_dtypes, shard
from ftcore.model import CPU_BF16_ATTENTION_MIN_HEAD_DIM, expand_kv_for_sdpa

AC_MODES = ("none", "full", "selective")

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

PHASES = ("forward, last block", "forward, loss", "loss backward", "final norm backward",
          "backward, last block", "backward, first block", "embedding backward", "root reduce-scatter",
          "optimizer")
BACKWARD = PHASES[2:7]
TERMS = ("params", "optimizer", "inputs", "grads", "activations", "weight_copies", "loss", "fsdp", "transient")


def gradients(s: Shape, dt: Dtypes, world: int, fsdp: bool, accum_steps: int) -> dict[str, int]:
    """This rank's gradients (FSDP: reduced shards). Backward creates them from the loss down to the
    embedding; under accumulation the earlier micro-batches' are there from the start."""
    all_grads = shard(s.total_params, world) * dt.master
    accumulated = all_grads if accum_steps > 1 else 0
    block = shard(s.block_params, world) * dt.master
    embedding = shard(s.V * s.H, world) * dt.master
    if fsdp:  # the root's and the running block's unsharded gradients are fsdp_buffers'
        made = {"final norm backward": 0, "last block": 0, "first block": (s.L - 1) * block, "embedding": s.L * block}
    else:
        head = embedding + s.H * dt.master  # lm_head (tied: the embedding) and the final norm, from the loss backward
        w_down = s.H * s.I * dt.master  # at a block's SwiGLU backward its w_down gradient exists
        made = {"final norm backward": head, "last block": head + w_down,
                "first block": all_grads - block - (0 if s.tied else embedding) + w_down, "embedding": all_grads}
    made = {"final norm backward": made["final norm backward"], "backward, last block": made["last block"],
            "backward, first block": made["first block"], "embedding backward": made["embedding"]}
    out = {ph: max(accumulated, made.get(ph, 0)) for ph in PHASES}
    out["root reduce-scatter"] = out["optimizer"] = all_grads
    return out


def activation_bytes(s: Shape, dt: Dtypes, ac: str, compiled: bool) -> tuple[dict[str, int], dict[str, int]]:
    """What the forward leaves for backward, at each phase, and one block's part of it by item."""
    per_layer = act.block_saved(s, dt, ac, compiled)
    layer = sum(per_layer.values())
    final = act.norm_saved(s, dt, 0)
    final.pop(next(k for k in final if k.startswith("norm output")))  # the loss accounts for h
    final_norm = sum(final.values())
    # cos/sin (B, 1, T, hd) in the residual dtype, saved by every layer's RoPE; the embedding's
    # int64 ids are the caller's tensor; freqs/emb/position ids are forward locals
    rope_cos_sin = 2 * dt.residual * s.B * s.T * s.hd
    rope_temps = 4 * s.B * s.T * s.hd // 2 + 4 * s.B * s.T * s.hd + 8 * s.T
    saved = s.L * layer + final_norm + rope_cos_sin
    # the last block's output is a local of forward while the loss runs; in fp32 it is the final
    # norm's saved input anyway, in bf16 the norm saves an fp32 copy instead
    last_output = dt.residual * s.n * s.H if dt.residual != 4 else 0
    # a checkpointed block being recomputed holds what its eager forward would have saved, and
    # under autocast its weights recast to bf16 (w_down's copy is freed before the SwiGLU backward)
    recompute = act.recompute_extra(s, dt, ac)
    if ac != "none" and dt.autocast:
        recompute += 2 * s.block_linear_params - 2 * s.H * s.I
    out = dict.fromkeys(PHASES, 0)
    out.update({"forward, last block": s.L * layer + rope_cos_sin + rope_temps + act.block_forward_extra(s, dt, ac),
                "forward, loss": saved + rope_temps + last_output,
                "loss backward": saved, "final norm backward": saved,
                "backward, last block": saved - final_norm + recompute,
                "backward, first block": layer + rope_cos_sin + recompute})
    return out, per_layer


def weight_copies(s: Shape, dt: Dtypes, ac: str) -> dict[str, int]:
    """autocast's bf16 copies of the linears' weights: cached for the whole forward, kept by autograd
    until the block's backward unless the block is checkpointed (then recast in the recompute,
    counted with the activations); w_down's copy is freed before the block's SwiGLU backward."""
    if not dt.autocast:
        return dict.fromkeys(PHASES, 0)
    layer = 2 * s.block_linear_params
    w_down = 2 * s.H * s.I
    kept = s.L * layer if ac == "none" else 0
    out = dict.fromkeys(PHASES, 0)
    out.update({"forward, last block": s.L * layer, "forward, loss": s.L * layer,
                "loss backward": kept, "final norm backward": kept})
    if ac == "none":
        out.update({"backward, last block": kept - w_down, "backward, first block": layer - w_down})
    return out


def fsdp_buffers(s: Shape, dt: Dtypes, world: int) -> dict[str, int]:
    """FSDP2's unsharded parameters and gradients. The root unit (embedding/lm_head, final norm) is
    unsharded for the whole forward and backward (reshard_after_forward=False); a block is
    all-gathered in the param dtype when it runs (world 1: copied from its shard), the next one
    all-gathered ahead (world > 1 only: at world 1 the copy waits until the block runs). Gradients
    come out unsharded in the param dtype; after a block's backward they are copied into an fp32
    reduce-scatter input, kept until the next block's reduce-scatter, and reduced into the fp32
    sharded gradient. The root's gradient (lm_head + embedding, tied) stays unsharded to the end."""
    u = dt.unsharded
    root = s.root_params * u
    in_flight = s.block_params * u * (1 if world == 1 else 2)
    root_grad = s.V * s.H * u
    reduce_scatter_input = s.block_params * 4
    w_down_grad = s.H * s.I * u
    return {"forward, last block": root + in_flight, "forward, loss": root, "loss backward": root,
            "final norm backward": root + root_grad,
            "backward, last block": root + root_grad + in_flight + w_down_grad,
            "backward, first block": root + root_grad + in_flight + w_down_grad + reduce_scatter_input,
            "embedding backward": root + root_grad + s.V * s.H * u + reduce_scatter_input,
            "root reduce-scatter": root_grad + s.root_params * 4, "optimizer": 0}


def transients(s: Shape, dt: Dtypes, *, dense_embedding_grad: bool, optimizer_temp: int) -> dict[str, int]:
    """Temporaries of one op at a time: RMSNorm's fp32 backward (pow, mean, rsqrt, mul), a block's
    backward at its SwiGLU, the embedding's dense (V, H) gradient that is added in place to a tied
    lm_head's (or an accumulated) one, the optimizer step's."""
    n, H = s.n, s.H
    block = act.block_backward_temp(s, dt)
    out = dict.fromkeys(PHASES, 0)
    out.update({"final norm backward": 20 * n * H - dt.residual * n * H,
                "backward, last block": block, "backward, first block": block,
                "embedding backward": (s.V * H * dt.master if dense_embedding_grad else 0) + dt.residual * n * H,
                "optimizer": optimizer_temp})
    return out


def loss_bytes(lm: dict) -> dict[str, int]:
    out = dict.fromkeys(PHASES, 0)
    out.update({"forward, loss": lm["forward"], "loss backward": lm["backward"]})
    return out


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
    not modelled for compiled blocks); "cuda" expands grouped K/V heads for fp32 attention
    (model.expand_kv_for_sdpa), which SDPA then saves at the query heads' width.

    Returns {"peak_bytes", "peak_phase", "phases": {phase: bytes}, "breakdown": {component: bytes
    at the peak}, "per_layer": {activation item: bytes}, "notes": [...]}."""
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: expected one of {AC_MODES}")
    dt = precision_dtypes(precision)
    fsdp = fsdp or precision == "bf16-mixed"
    s = Shape.of(model_cfg, micro_batch_size, seq_len)
    if device_type == "cpu" and dt.compute == 2 and s.hd < CPU_BF16_ATTENTION_MIN_HEAD_DIM:
        s = dataclasses.replace(s, attn_fp32=True)
    compute_dtype = torch.float32 if dt.compute == 4 else torch.bfloat16
    if s.nkv < s.nh and expand_kv_for_sdpa(device_type, compute_dtype, masked=False, q_len=seq_len):
        s = dataclasses.replace(s, kv_expanded=True)
    ac = activation_checkpointing
    world = world_size if fsdp else 1
    n_labelled = int(round(labelled_fraction * s.n))

    # the single-tensor AdamW makes two temporaries the size of a parameter (sqrt, then / bias
    # correction), one parameter at a time; fused and foreach make none that size
    if optimizer_temp_bytes is None:
        biggest = max(s.V * s.H, s.H * s.I, s.H * s.qd)
        optimizer_temp_bytes = 0 if fused_optimizer else 2 * biggest * dt.master
    lm = act.loss_memory(s, dt, loss, n_labelled, loss_memory_budget)
    activations, per_layer = activation_bytes(s, dt, ac, compile)
    params = shard(s.total_params, world) * dt.master
    # AdamW exp_avg, exp_avg_sq: torch's in the parameters' dtype (plus a scalar step each)
    optimizer = 2 * shard(s.total_params, world) * (optimizer_state_bytes or dt.master)
    terms = {
        "params": dict.fromkeys(PHASES, params), "optimizer": dict.fromkeys(PHASES, optimizer),
        "inputs": dict.fromkeys(PHASES, 16 * s.n),  # int64 input ids and labels of the micro-batch
        "grads": gradients(s, dt, world, fsdp, grad_accum_steps),
        "activations": activations,
        "weight_copies": weight_copies(s, dt, ac),
        "loss": loss_bytes(lm),
        "fsdp": fsdp_buffers(s, dt, world) if fsdp else dict.fromkeys(PHASES, 0),
        "transient": transients(s, dt, dense_embedding_grad=not fsdp and (s.tied or grad_accum_steps > 1),
                                optimizer_temp=optimizer_temp_bytes),
    }
    phases = {ph: {t: int(terms[t][ph]) for t in TERMS if terms[t][ph]}
              for ph in PHASES if fsdp or ph != "root reduce-scatter"}
    totals = {ph: sum(parts.values()) for ph, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    notes = []
    if compile:
        notes.append("compiled blocks: saved tensors as AOTAutograd's partitioner chose them on CPU (torch 2.13); "
                     "the backward's temporaries are assumed to be eager's")
    if compile and ac != "none":
        notes.append("compiled + checkpointed blocks: estimated as eager checkpointing (within ~6% on CPU)")
    if fsdp:
        notes.append(f"FSDP (world {world}): all-gather/reduce-scatter buffers modelled per block")
    return {
        "peak_bytes": totals[peak_phase], "peak_phase": peak_phase, "phases": totals,
        # what the forward leaves for backward: activations, autocast weight copies, the loss's
        # saved tensors (on top of params, optimizer states, FSDP's root unit)
        "saved_for_backward": activations["loss backward"] + terms["weight_copies"]["loss backward"] + lm["saved"],
        "breakdown": phases[peak_phase], "phase_breakdown": phases, "per_layer": per_layer,
        "per_layer_bytes": sum(per_layer.values()), "params": s.total_params, "lm_head_rows": lm["lm_head_rows"],
        "notes": notes,
    }
