"""One optimizer step, as the loop and both benches run it: forward_backward over the step's
micro-batches, then optimizer_step (clip, the non-finite rule, update, zero).

The loss of a step is the sum of per-token cross-entropy over every completion token of the step
(all micro-batches, all ranks) divided by that global count (docs/design.md, "Rules of the loss").
"""
from __future__ import annotations

import contextlib
import math

import torch

from ftcore.config import Config
from ftcore.optim import OptimizerInBackward
from ftcore.parallel import all_reduce_sum


class NonFiniteError(RuntimeError):
    pass



class NonFiniteSkips:
    """train.nonfinite: stop at a non-finite loss or gradient norm, or skip the update, but never
    more than train.max_skipped_steps steps in a row."""

    def __init__(self, cfg: Config, bar):
        self.mode, self.limit, self.bar, self.in_a_row = cfg.train.nonfinite, cfg.train.max_skipped_steps, bar, 0

    def update_allowed(self, step: int, loss: float, gnorm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(gnorm):
            self.in_a_row = 0
            return True
        if self.mode == "stop":
            raise NonFiniteError(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({gnorm}); "
                                 "lower train.lr or set train.nonfinite=skip")
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"step {step + 1}: {self.in_a_row} non-finite steps in a row were skipped "
                                 f"(train.max_skipped_steps={self.limit}); lower train.lr")
        if self.bar is not None:
            self.bar.write(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({gnorm}), update skipped")
        return False


# ------------------------------------------------------------------------------------------------
# the step

def forward_backward(model, batches: list[dict], num_targets: int, autocast, reduce_scale: float = 1.0,
                     around_forward=contextlib.nullcontext()) -> torch.Tensor:
    """Forward and backward of every micro-batch of this rank: each micro-batch's loss sum scaled
    by 1 / the step's global target count (all micro-batches, all ranks), so the gradients add up
    to those of the step's mean token loss. Returns this rank's loss sum, on the device (no host
    sync). model: the module the step runs (DDP around the model under several processes without
    FSDP). reduce_scale undoes the averaging of gradients over ranks that FSDP and DDP do
    (parallel.grad_scale_for_reduction); around_forward is entered around each forward (the
    activation offloading hooks of ftcore.offload; a benchmark's timer)."""
    scale = reduce_scale / max(num_targets, 1)  # a step with no completion token: zero loss, zero grad
    loss_sum = None
    for i, batch in enumerate(batches):
        # under DDP the gradients are all-reduced once a step, in the last micro-batch's backward
        accumulating = model.no_sync() if i < len(batches) - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with accumulating:
            with autocast, around_forward:
                micro_loss_sum, _ = model(**batch)
            (micro_loss_sum * scale).backward()
        loss_sum = micro_loss_sum.detach() if loss_sum is None else loss_sum + micro_loss_sum.detach()
    return loss_sum


def clip_gradients(model, optimizer, grad_clip: float, device: torch.device) -> torch.Tensor:
    """The global gradient norm, on `device`, after clipping to grad_clip (0 = no clipping). With
    the optimizer stepped in backward the gradients are gone: their norm was summed in the hooks."""
    if isinstance(optimizer, OptimizerInBackward):
        return optimizer.pop_grad_norm().to(device)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    return grad_norm.to(device)  # it is on the CPU with train.cpu_offload


def optimizer_step(model, optimizer, loss_sum: torch.Tensor, num_targets: int, grad_clip: float,
                   skips: NonFiniteSkips, step: int = 0) -> tuple[float, float]:
    """The update after forward_backward: clip, the non-finite rule, step, zero. Returns the step's
    loss (all ranks reduced) and gradient norm. The .tolist() is the step's one host sync, and it
    is there for the non-finite rule: whether to step is decided on the host, from both numbers."""
    grad_norm = clip_gradients(model, optimizer, grad_clip, loss_sum.device)
    all_reduce_sum(loss_sum)
    loss, gnorm = torch.stack([loss_sum.float() / max(num_targets, 1), grad_norm.float()]).tolist()
    if skips.update_allowed(step, loss, gnorm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, gnorm


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return batch
    # from pinned memory the copy is truly asynchronous (torch's caching host allocator makes the
    # pinning cheap after the first steps); from pageable memory non_blocking would still block
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
