"""Memory: measuring the peak of a training step.

    peak_mem_bytes / reset_peak   the training device's peak since the last reset (CUDA allocator;
                                  CPU: the process's peak resident set); the loop resets it every step
    PeakRSSGrowth                 how far the process's peak resident memory rose over a block
    AllocationTrace               bytes allocated on the CPU and their peak, from the profiler's
                                  memory events: on a CPU, what torch.cuda.max_memory_allocated
                                  reports on a GPU. Tests and CPU bench rows use it.
    saved_tensor_bytes            bytes that autograd saves for backward during a forward
    record_memory_history / dump_memory_snapshot   a CUDA snapshot for https://pytorch.org/memory_viz

Predicting it before a run is ftcore.estimate's (estimate_peak_bytes, estimate_report).
"""
from __future__ import annotations

import contextlib

import torch


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


def _reset_peak_rss() -> bool:
    """Linux sets the peak resident set (VmHWM) back to the current one when 5 is written to
    /proc/self/clear_refs. False where it cannot (no /proc, not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mem_bytes(device: torch.device) -> int:
    """The device's peak since the last reset_peak (since the process began, without one). CUDA:
    bytes allocated by the caching allocator at the peak. CPU: the process's peak resident set
    (VmHWM), the closest thing the OS keeps: it also counts memory that malloc keeps from earlier
    work for reuse (hardware.keep_freed_memory), so it is an upper bound of what the work needed."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak for peak_mem_bytes at the memory in use now. False where the CPU's peak
    cannot be reset (then peak_mem_bytes keeps the process's peak since it began)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_peak_rss()


class PeakRSSGrowth:
    """How far this process's peak resident set (VmHWM) rose above its resident set at entry,
    over a block. growth_bytes is 0 where /proc is missing."""

    def __enter__(self):
        _reset_peak_rss()
        self.start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth_bytes = max(0, _proc_status_bytes("VmHWM") - self.start)
        return False


class AllocationTrace:
    """Bytes allocated on the CPU while a block runs, and their peak, from the profiler's memory
    events: the CPU allocator reports every allocation and free (size and pointer) to it.

        with AllocationTrace() as mem:
            forward(); mem.mark("forward")
            backward(); mem.mark("backward")
        mem.peak                  # peak of (allocated - freed) since the start, bytes
        mem.segments              # {"forward": peak within it, "backward": ...}
        mem.live_at               # {"forward": bytes still allocated at that mark, ...}

    Only allocations made inside the block count (frees of older blocks are matched by pointer and
    ignored), so add the bytes of what existed before (parameters, optimizer states, the batch).
    This is what torch.cuda.max_memory_allocated measures on a GPU (there rounded up to 512-byte
    blocks), without perturbing the run: a Python dispatch mode would see the same tensors but
    makes autograd accumulate gradients out of place (it holds references), the profiler does not.
    Kernels' own scratch differs between devices: on a CPU, bf16 matmuls (oneDNN) and mixed-dtype
    elementwise ops allocate temporaries that CUDA kernels do not; cuBLAS has its workspaces."""

    def __init__(self):
        self.peak = 0
        self.segments: dict[str, int] = {}
        self.live_at: dict[str, int] = {}  # bytes still allocated at each mark
        self._marks = 0

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def mark(self, name: str) -> None:
        """End a segment here: `segments[name]` is the peak since the previous mark."""
        with torch.profiler.record_function(f"ftcore.mark:{self._marks}:{name}"):
            pass
        self._marks += 1

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        from torch._C._profiler import _EventType

        def walk(events):
            for e in events:
                yield e
                yield from walk(e.children)

        events = sorted(walk(self._prof.profiler.kineto_results.experimental_event_tree()),
                        key=lambda e: e.start_time_ns)
        sizes: dict[int, int] = {}  # pointer -> bytes, for blocks allocated inside the block
        live = seg_peak = 0
        for e in events:
            if e.tag == _EventType.Allocation:
                f = e.extra_fields
                if f.device.type != "cpu":
                    continue
                if f.alloc_size > 0:
                    # two live blocks cannot share an address: one already here was freed where the
                    # profiler does not look (another thread, e.g. a collective's)
                    live -= sizes.pop(f.ptr, 0)
                    sizes[f.ptr] = f.alloc_size
                    live += f.alloc_size
                    self.peak = max(self.peak, live)
                    seg_peak = max(seg_peak, live)
                else:  # a free: count it only if the block was allocated in here
                    live -= sizes.pop(f.ptr, 0)
            elif e.name.startswith("ftcore.mark:"):
                key = e.name.split(":", 2)[2]
                self.segments[key], self.live_at[key] = seg_peak, live
                seg_peak = live
        return False


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if hasattr(t, "to_local"):  # a DTensor (FSDP): this rank's shard
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


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

