"""The estimate for a run config (`ftcore bench --estimate CONFIG`): the step the run trains,
decided with the run's own functions (FSDP, the loss, the optimizer), plus loading and export."""
from __future__ import annotations

import dataclasses

import torch

from ftcore.config import accumulation_steps
from ftcore.estimate.shapes import GiB, MiB, Shape, shard
from ftcore.estimate.step import estimate_peak_bytes
from ftcore.hardware import MatmulShape, resolve_auto
from ftcore.optim import CHUNK, fused_adamw, uses_torch_adamw
from ftcore.parallel import use_fsdp
from ftcore.source import checkpoint_dtype, model_config_for


def _fmt(b: float) -> str:
    return f"{b / GiB:8.2f} GiB" if abs(b) >= GiB else f"{b / MiB:8.1f} MiB"


def estimate_load_bytes(model_cfg, *, world_size: int, fsdp: bool, param_bytes: int, file_bytes: int) -> dict[str, int]:
    """Per-rank peak of loading the weights and rank 0's peak of the final export.

    Loading under FSDP (weights.load_into_shards): this rank's shards, plus the rows it owns of one
    tensor read in the file's dtype before conversion. Without FSDP (load_pretrained): the whole
    model, plus one tensor in the file's dtype (and the file's pages while it is mapped, which the
    OS may count as resident). Export (export.export_hf): every rank its own shards and one
    gathered tensor, which rank 0 writes as it arrives (weights.save_pretrained holds no more)."""
    s = Shape.of(model_cfg, 1, 1)
    world = world_size if fsdp else 1
    largest = max(s.V * s.H, s.I * s.H, s.qd * s.H)
    own = shard(s.total_params, world) * param_bytes
    load = own + shard(largest, world) * file_bytes
    export = own + largest * param_bytes
    return {"load": load, "export": export, "own": own}


def estimate_run(cfg, model_cfg, world_size: int = 1, device: torch.device | None = None,
                 labelled_fraction: float = 1.0) -> dict:
    """estimate_peak_bytes for the step a run config trains, deciding FSDP, the loss and the
    optimizer with the run's own functions (not copies of them). device: default train.device,
    with auto meaning the GPU the estimate is for."""
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
        opt_temp = fp32_copies * 4 * min(CHUNK, shard(model_cfg.num_params(), shards))
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
