"""Process group, FSDP2 sharding or DDP, and activation checkpointing.

Several processes always train one model: FSDP2 (train.fsdp = auto / on) shards it; with
train.fsdp = off every rank holds the whole model and DDP all-reduces the gradients in backward.
Order matters and follows torchtitan: activation checkpointing, then torch.compile, then FSDP, all
per transformer block, so each block is one unit of recompute, of compilation and of all-gather.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ftcore.config import Config, ConfigError


@dataclass
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a 1-D DeviceMesh when FSDP is on

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto", need_group: bool = False, cpu_collectives: bool = False) -> Process:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...). Without torchrun
    a single process; with need_group it still gets a 1-rank group (FSDP needs one). cpu_collectives:
    CPU tensors are reduced too (FSDP CPU offload keeps gradients there), so gloo serves them beside nccl."""
    device = pick_device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "gloo" if device.type != "cuda" else "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
    elif need_group and not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)
    return Process(device=device)


def use_fsdp(cfg: Config, world_size: int) -> bool:
    """Whether a run shards with FSDP2: train.fsdp=on, or auto with several processes, bf16-mixed
    (FSDP's MixedPrecisionPolicy) or cpu_offload (FSDP's CPUOffloadPolicy)."""
    if cfg.train.precision == "bf16-mixed" and cfg.train.fsdp == "off":
        raise ConfigError("train.precision=bf16-mixed needs FSDP (train.fsdp = auto or on)")
    return cfg.train.fsdp == "on" or (cfg.train.fsdp == "auto" and (
        world_size > 1 or cfg.train.precision == "bf16-mixed" or cfg.train.cpu_offload))


def use_ddp(cfg: Config, world_size: int) -> bool:
    """Several processes without FSDP: each holds the whole model, and DDP keeps them one model."""
    return world_size > 1 and not use_fsdp(cfg, world_size)


def barrier(proc: Process) -> None:
    if dist.is_initialized() and proc.world_size > 1:
        dist.barrier()


def any_rank(flag: bool, proc: Process) -> bool:
    """Whether `flag` holds on any rank; every rank must call it (it is a collective, and a barrier)."""
    if not (dist.is_initialized() and proc.world_size > 1):
        return flag
    t = torch.tensor([int(flag)], device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_main(obj, proc: Process):
    """Rank 0's `obj` (picklable) on every rank; every rank must call it."""
    if not (dist.is_initialized() and proc.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# FSDP2

def apply_fsdp(model: torch.nn.Module, proc: Process, precision: str, reshard_after_forward: bool = True,
               cpu_offload: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    proc.mesh = init_device_mesh(proc.device.type, (proc.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16-mixed" else MixedPrecisionPolicy())
    # cpu_offload: sharded params (so the optimizer step and its states) and gradients live in pinned
    # CPU memory; each unit's shard is copied to the GPU for its all-gather
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=proc.mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    # the root unit holds embed, final norm and lm_head: a tied embedding/lm_head weight must live
    # in one unit. It is needed again right after forward (loss, then backward), so keep it whole.
    fully_shard(model, mesh=proc.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model


def grad_scale_for_reduction(proc: Process) -> float:
    """FSDP and DDP both average gradients over ranks; the loss is already divided by the global
    token count of the step, so each rank multiplies its loss by the world size to turn that average
    back into a sum. (A divide factor of 1 would say the same, but it needs PREMUL_SUM, which gloo
    lacks.) One process: nothing is reduced, the factor is 1."""
    return float(proc.world_size)


# ------------------------------------------------------------------------------------------------
# DDP

def apply_ddp(model: torch.nn.Module, proc: Process) -> torch.nn.Module:
    """The module the step runs under several processes without FSDP: DDP around `model`, which
    stays what the optimizer, checkpoints and the export see (their parameter names carry no
    `module.` prefix). DDP broadcasts rank 0's weights once here, then all-reduces (averages) the
    gradients bucket by bucket during backward; gradients are views into its buckets, so it adds
    no second copy of them. ftcore.step.forward_backward skips the all-reduce on every micro-batch
    but the last (no_sync)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


# ------------------------------------------------------------------------------------------------
# activation checkpointing

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    # keep what is expensive to recompute (matmuls, attention); recompute norms, rope, silu, adds
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward. The block's forward is replaced on the
    instance (not wrapped in another module) so parameter names, and so checkpoints and HF export,
    are unchanged."""
    if mode == "none":
        return
    for block in model.layers:
        inner = block.forward
        if mode == "full":
            def forward(*args, _inner=inner, **kw):
                return checkpoint(_inner, *args, use_reentrant=False, **kw)
        elif mode == "selective":
            def forward(*args, _inner=inner, **kw):
                return checkpoint(_inner, *args, use_reentrant=False, context_fn=_selective_context, **kw)
        else:
            raise ValueError(f"train.activation_checkpointing={mode!r}: expected none, full or selective")
        block.forward = forward


def apply_compile(model: torch.nn.Module) -> None:
    for block in model.layers:
        block.compile()
