"""Optimizers: the plain AdamW, AdamW with bf16 states and stochastic rounding, and the step in backward.

build_optimizer(model, cfg, device) picks, from [train]:

    fp32 weights, optimizer_state_dtype=float32   torch.optim.AdamW (fused): the plain path
    bf16 weights (precision=bf16), or bf16 states, ftcore.optim.AdamW: the maths of each step in fp32,
      or stochastic_rounding                       each result written back in its tensor's own dtype
                                                   (stochastically rounded with stochastic_rounding)
    optimizer_in_backward                          OptimizerInBackward: one of the above per parameter,
                                                   stepped by the parameter's post-accumulate-grad hook

optimizer_state_dtype says what the states are, whatever the weights: precision=bf16 with float32
states keeps fp32 states for bf16 weights (torch's AdamW would keep them in the weights' bf16).

Bytes per parameter that the optimizer holds (states) and makes the step hold (gradients):

    exp_avg + exp_avg_sq    8 (float32 states)  or 4 (bfloat16 states)
    gradients               all of them at the end of backward (2 or 4 B/param) in the plain path;
                            with optimizer_in_backward only those whose step has not run yet: about
                            one FSDP unit's shards, or without FSDP one or two parameters' (plus a
                            tied embedding's, alive from the loss to the embedding's backward)
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from torch.torch_version import TorchVersion

from ftcore.config import Config, ConfigError
from ftcore.parallel import all_reduce_sum

# Elements per fp32 working buffer in ftcore.optim.AdamW. A step works on slices of at most this
# many elements at a time, so its temporaries (fp32 copies of weight, grad and states, the
# denominator, the rounding noise: at most 6 x 64 MiB) stay small next to the weights, whatever the
# tensor sizes (an 8B model's embedding alone is 525M elements).
CHUNK = 1 << 24


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def pretrain_lr_lambda(steps: int):
    """The quickstart base's schedule: linear warmup over steps // 20, cosine over all steps, never
    below 0.1. Not lr_lambda: changing it would change every quickstart base model and its story."""
    warmup = max(1, steps // 20)

    def f(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))
        return min((step + 1) / warmup, cosine) * 0.9 + 0.1

    return f


def build_optimizer(model, cfg: Config, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # norms and biases
    make = functools.partial(_adamw, cfg, fused=fused_adamw(cfg, device))
    opt = (OptimizerInBackward(groups, make, before_step=grad_copy_wait(cfg, device))
           if cfg.train.optimizer_in_backward else make(groups))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


# FSDP2's CPU offload copies each reduced gradient to pinned host memory without blocking, and runs
# the post-accumulate-grad hooks right after queueing the copy; until pytorch/pytorch#180666
# ("[FSDP2] Fix post_accumulate_grad_hook staleness under CPUOffloadPolicy", first released in torch
# 2.13: 2.12.0's foreach_reduce still copies non-blocking) the hook could read the gradient while the
# copy was still writing it, and optimizer-in-backward stepped with stale values.
GRAD_COPY_FIXED_IN = "2.13"


def grad_copy_wait(cfg: Config, device: torch.device):
    """What the hooks of optimizer_in_backward must call before reading a CPU-offloaded gradient on
    a torch without that fix: a wait for the device (the copy runs on FSDP's reduce stream, so the
    whole device, not the current stream). None where nothing needs waiting for."""
    t = cfg.train
    if not (t.optimizer_in_backward and t.cpu_offload) or device.type == "cpu":
        return None
    if TorchVersion(torch.__version__) >= GRAD_COPY_FIXED_IN:
        return None
    return functools.partial(torch.get_device_module(device).synchronize, device)


def fused_adamw(cfg: Config, device: torch.device) -> bool:
    """torch's fused AdamW: one pass over each parameter's p, g, m, v. On CUDA, and on a CPU too,
    where the default single-tensor step is ~7 passes (4.4x slower at 50M parameters on 2 cores:
    147 vs 34 ms, bench/notes.md). Not with CPU offload, a path only tested the way it was built."""
    return device.type in ("cuda", "cpu") and not cfg.train.cpu_offload


def uses_torch_adamw(cfg: Config, params_fp32: bool) -> bool:
    """torch's AdamW for fp32 weights and states; else ftcore's AdamW (bf16 states, stochastic
    rounding), which works in fp32 slices of CHUNK elements."""
    t = cfg.train
    return params_fp32 and t.optimizer_state_dtype == "float32" and not t.stochastic_rounding


def _adamw(cfg: Config, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    t = cfg.train
    state_dtype = getattr(torch, t.optimizer_state_dtype)
    if uses_torch_adamw(cfg, all(p.dtype == torch.float32 for g in groups for p in g["params"])):
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    return AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), state_dtype=state_dtype,
                 stochastic_rounding=t.stochastic_rounding)


def check_optimizer_in_backward(cfg: Config, accum: int, ddp: bool = False) -> None:
    """train.optimizer_in_backward steps each parameter as its gradient arrives: one micro-batch per
    step, and not under DDP, whose all-reduce of a gradient is still in flight when the gradient's
    hook runs (FSDP's hook sees the reduced shard)."""
    t = cfg.train
    if t.optimizer_in_backward and ddp:
        raise ConfigError("train.optimizer_in_backward with several processes needs FSDP (train.fsdp = auto or on): "
                          "under DDP (train.fsdp=off) a parameter would step before its gradient is all-reduced")
    if t.optimizer_in_backward and accum != 1:
        raise ConfigError(
            f"train.optimizer_in_backward needs one micro-batch per step (no gradient accumulation), but "
            f"train.global_batch_size={t.global_batch_size} is {accum} micro-batches of {t.micro_batch_size} "
            f"per process: set train.micro_batch_size={t.micro_batch_size * accum}")


# ------------------------------------------------------------------------------------------------
# AdamW with low-precision storage

def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (FSDP2 parameters, gradients and states are DTensors; checked by
    their method, as importing torch.distributed.tensor costs every command ~0.6 s)."""
    return t.to_local() if hasattr(t, "to_local") else t


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (bf16) <- src (fp32), rounded to one of its two bf16 neighbours at random, the upper one
    with probability equal to src's distance from the lower one in bf16 ulps. Unbiased: E[dst] = src,
    so an update smaller than half an ulp still moves the weight on average, where round-to-nearest
    drops it every time. bf16 is the top half of an fp32's bits: add 16 random bits to the bottom
    half, and the carry into the top half happens with exactly that probability; then truncate."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device)
    noise.add_(src.view(torch.int32)).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    dst.copy_(noise.view(torch.float32))  # exact: the dropped bits are zero


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, the maths of torch.optim.AdamW) whose arithmetic runs in fp32
    whatever the storage: weights, gradients and states are read as fp32, updated, and written back
    in their own dtype. exp_avg / exp_avg_sq are stored in `state_dtype`. With stochastic_rounding
    every fp32 -> bf16 write-back (weights and states) is stochastically rounded.

    Foreach over slices of at most CHUNK elements (see CHUNK), on each rank's local shards."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.float32,
                 stochastic_rounding: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.stochastic_rounding = state_dtype, stochastic_rounding

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ftcore.optim.AdamW.step takes no closure")
        for group in self.param_groups:
            b1, b2 = group["betas"]
            slices, bucket_numel = [], 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # on the CPU, like torch's: read without a sync
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                step = state["step"].item()
                corrections = (1 - b1 ** step, math.sqrt(1 - b2 ** step))
                flat = [_local(t).view(-1) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
                flat.append(_local(p.grad).reshape(-1))
                for pieces in zip(*(t.split(CHUNK) for t in flat)):
                    if bucket_numel + pieces[0].numel() > CHUNK and slices:
                        self._update(slices, group)
                        slices, bucket_numel = [], 0
                    slices.append((*pieces, *corrections))
                    bucket_numel += pieces[0].numel()
            if slices:
                self._update(slices, group)

    def _update(self, slices: list[tuple], group: dict) -> None:
        params, exp_avgs, exp_avg_sqs, grads, bias1, bias2_sqrt = (list(x) for x in zip(*slices))
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        # .float() copies a bf16 tensor and is the tensor itself for an fp32 one (updated in place)
        p32, m32, v32, g32 = ([t.float() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, grads))
        if wd:
            torch._foreach_mul_(p32, 1 - lr * wd)
        torch._foreach_lerp_(m32, g32, 1 - b1)
        torch._foreach_mul_(v32, b2)
        torch._foreach_addcmul_(v32, g32, g32, 1 - b2)
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, m32, denom, [-lr / c for c in bias1])
        for dst, src in zip(params + exp_avgs + exp_avg_sqs, p32 + m32 + v32):
            if dst is src:
                continue
            if self.stochastic_rounding and dst.dtype == torch.bfloat16:
                stochastic_round_(dst, src)
            else:
                dst.copy_(src)  # round to nearest

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch.optim.Optimizer casts loaded states to the parameter's dtype: put them back in ours
        for state in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k] = state[k].to(self.state_dtype)


# ------------------------------------------------------------------------------------------------
# the optimizer step in backward

class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by that parameter's post-accumulate-grad hook as soon as
    its gradient is complete, which then frees the gradient: instead of every gradient being alive
    at the end of backward, only those not yet stepped are. Under FSDP2 the hooks are on the sharded
    DTensor parameters, and FSDP fires them after the reduce-scatter.

    To the training loop, the scheduler and torch.distributed.checkpoint this is one optimizer:
    param_groups are the per-parameter optimizers' own group dicts (so the scheduler's lr reaches
    them), state is one dict shared with them (so state_dict() is Optimizer's own), and step() steps
    the parameters that hold a gradient: none in training (the hooks have freed them), all of them
    when DCP initialises the state with zero gradients before a load. load_state_dict splits the
    loaded groups and states back over the per-parameter optimizers.

    Without a global gradient there is no global-norm clipping; the norm is still measured (the sum
    of squares accumulated in the hooks): pop_grad_norm(). before_step, when given, is called by
    each hook before it reads the gradient (grad_copy_wait)."""

    def __init__(self, param_groups: list[dict], make_optimizer, before_step=None):
        self.optimizers = [make_optimizer([dict(g, params=[p])]) for g in param_groups for p in g["params"]]
        self.before_step = before_step
        super().__init__([opt.param_groups[0] for opt in self.optimizers], {})
        self._link()
        first = self.optimizers[0].param_groups[0]["params"][0]
        self._sharded = hasattr(first, "to_local")  # then each rank's sum is over its shards only
        self._norm_device = _local(first).device
        self._grad_sq = None
        for opt in self.optimizers:
            opt.param_groups[0]["params"][0].register_post_accumulate_grad_hook(self._hook(opt))

    def _hook(self, opt):
        def step_and_free(p: torch.Tensor) -> None:
            if self.before_step is not None:
                self.before_step()
            sq = torch.linalg.vector_norm(_local(p.grad), dtype=torch.float32).square()
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            opt.step()
            p.grad = None
        return step_and_free

    def _link(self) -> None:
        self.param_groups = [opt.param_groups[0] for opt in self.optimizers]
        self.state = defaultdict(dict)
        for opt in self.optimizers:
            self.state.update(opt.state)
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        for opt in self.optimizers:
            if opt.param_groups[0]["params"][0].grad is not None:
                opt.step()

    def pop_grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients of the backward since the last call (every rank
        calls it: under FSDP it is an all-reduce)."""
        sq, self._grad_sq = self._grad_sq, None
        if sq is None:
            sq = torch.zeros((), device=self._norm_device)
        if self._sharded:
            all_reduce_sum(sq)
        return sq.sqrt()

    def load_state_dict(self, state_dict):
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, expected one per "
                             f"parameter ({len(self.optimizers)}): was it saved with train.optimizer_in_backward?")
        for opt, group in zip(self.optimizers, groups):
            (pid,) = group["params"]
            opt.load_state_dict({"state": {0: state[pid]} if pid in state else {},
                                 "param_groups": [dict(group, params=[0])]})
        self._link()
