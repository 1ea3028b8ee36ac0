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
