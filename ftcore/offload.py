"""Activation offloading: what the decoder blocks save for backward waits in pinned CPU memory
instead of on the GPU, from the forward that saves it to the backward that uses it.

    offload = ActivationOffload(device, head=model.norm)   # one per run, entered around each forward
    with offload:
        loss = model(**batch)
    loss.backward()

What moves is what saves memory, once:
- activations only: a parameter, a view of one (linear saves weight.t()) or autocast's cast of one
  is sized by the model, not the batch, and exists anyway (or is remade cheaper than moved twice);
- each storage once, however many nodes save it or views of it (q, k and v save the same normed
  input; attention's output is saved again as o's input): its views come back as views of one copy;
- nothing from the `head` on (the final norm, then the loss: its logits, or the fused loss's
  precomputed gradients): backward uses it the moment it starts, so a copy would come straight back.

Forward (pack hook): the storage of each saved tensor (of at least `min_bytes`, on the device) is
copied device -> pinned host on a side stream, so the copy overlaps the forward's compute. The
device memory is kept alive until its copy is done; once more than `max_inflight_bytes` are being
copied, the compute stream waits for the oldest copies. That wait is what bounds the memory:
without it a forward faster than PCIe would free nothing.

Backward (unpack hook): saved tensors come back roughly in the reverse order they were saved, so
when tensor i is needed, tensors i-1, i-2, ... are already being copied host -> device on a second
side stream, up to `prefetch_bytes` ahead, overlapping the copies with backward compute. Tensors
saved last in forward whose copies were still in flight are used from the device directly. A
storage brought back stays until the last node that saved it has run.

Under non-reentrant activation checkpointing torch saves each block's inputs through these hooks
too (and keeps nothing else), so with checkpointing the block inputs are what moves.

The stream calls are device-generic (torch.get_device_module): on CUDA they are real streams and
events; torch.cpu's are no-ops, which lets the CPU tests check the bookkeeping. Training refuses
the switch on a CPU device, where it would only copy memory to itself.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from ftcore.config import ConfigError, TrainConfig


def check_offload(train: TrainConfig, device: torch.device) -> None:
    """Both offloads (activations here, FSDP's parameters and optimizer states: train.cpu_offload)
    move memory from the GPU to the host: on a CPU they would copy memory to itself."""
    for switch in ("activation_offload", "cpu_offload"):
        if getattr(train, switch) and device.type != "cuda":
            raise ConfigError(f"train.{switch} needs CUDA (the device is {device.type})")


class _Offloaded:
    """One storage's bytes, copied out once for every saved tensor that views it: the pinned host
    copy and, while they are on the device (being copied out, or brought back for their users), the
    device bytes. When autograd frees the graph, this goes too, and so does the host memory."""
    __slots__ = ("id", "host", "nbytes", "where", "uses", "device", "arrived", "__weakref__")

    def __init__(self, id: int, raw: torch.Tensor, host: torch.Tensor):
        self.id, self.host, self.nbytes, self.where = id, host, raw.numel(), raw.device
        self.uses = 1            # the saved tensors on it not unpacked yet
        self.device = raw        # on the device: until retired, then again from fetch to last use
        self.arrived = None      # fetched: the event of its host -> device copy, until first used


class _View:
    """What autograd keeps in place of a saved tensor: where it lies in an offloaded storage."""
    __slots__ = ("copy", "dtype", "shape", "stride", "offset")

    def __init__(self, copy: _Offloaded, t: torch.Tensor):
        self.copy, self.dtype, self.shape, self.stride, self.offset = (
            copy, t.dtype, t.shape, t.stride(), t.storage_offset())

    def on(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.view(self.dtype).as_strided(self.shape, self.stride, self.offset)


def _is_weight(t: torch.Tensor) -> bool:
    base = t if t._base is None else t._base
    if isinstance(base, nn.Parameter):
        return True
    fn = base.grad_fn  # autocast's cast of a parameter: ToCopy straight from the parameter's leaf
    return fn is not None and fn.name() == "ToCopyBackward0" and any(
        isinstance(getattr(node, "variable", None), nn.Parameter) for node, _ in fn.next_functions)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, device: torch.device, head: nn.Module | None = None, min_bytes: int = 1 << 20,
                 max_inflight_bytes: int = 1 << 30, prefetch_bytes: int = 1 << 30):
        self.device = torch.device(device)  # a bare "cuda" is fine: tensors match by device type
        self.min_bytes, self.max_inflight_bytes, self.prefetch_bytes = min_bytes, max_inflight_bytes, prefetch_bytes
        self.streams = torch.get_device_module(self.device)
        self.d2h, self.h2d = self.streams.Stream(), self.streams.Stream()
        self.pin = self.device.type == "cuda"
        self.next_id = self.first_id = 0  # ids of this forward's tensors start at first_id
        self.saved = weakref.WeakValueDictionary()  # id -> _Offloaded, while autograd holds it
        self.same: dict[tuple, tuple] = {}  # this forward's (id(storage), version) -> weakrefs (storage, copy)
        self.inflight: OrderedDict[int, tuple] = OrderedDict()  # id -> (_Offloaded, copy-done event)
        self.inflight_bytes = 0
        self.ready: dict[int, _Offloaded] = {}  # brought back, not yet used by all its users
        self.ready_bytes = 0
        self.fetch_from = -1  # the next id to prefetch, counting down
        self.in_backward = self.in_head = False
        self.offloaded_bytes = 0  # total copied out, for tests and benchmarks
        if head is not None:
            head.register_forward_pre_hook(self._head_starts)
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._retire(0)  # copies left from an earlier forward: settle them (their tensors can come back from host)
        self.first_id, self.in_head = self.next_id, False
        self.same.clear()
        return super().__enter__()

    def _head_starts(self, module, args) -> None:
        self.in_head = True

    # --- forward -------------------------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        if self.in_head or t.device.type != self.device.type or _is_weight(t):
            return t
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage of its own
            return t
        if storage.nbytes() < self.min_bytes or storage.nbytes() % t.element_size():
            return t
        key = (id(storage), t._version)  # the same bytes, not changed in place since
        seen = self.same.get(key)
        # the same storage, still alive (so its memory is not reused by another), already copied
        copy = seen[1]() if seen is not None and seen[0]() is storage else None
        if copy is not None:
            copy.uses += 1
            return _View(copy, t)
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        host = torch.empty_like(raw, device="cpu", pin_memory=self.pin)
        self.d2h.wait_stream(self.streams.current_stream())  # t has been computed
        with self.streams.stream(self.d2h):
            host.copy_(raw, non_blocking=True)
        copy = _Offloaded(self.next_id, raw, host)
        self.next_id += 1
        self.saved[copy.id] = copy
        self.same[key] = (weakref.ref(storage), weakref.ref(copy))
        self.inflight[copy.id] = (copy, self.d2h.record_event())
        self.inflight_bytes += copy.nbytes
        self.offloaded_bytes += copy.nbytes
        self._retire(self.max_inflight_bytes)
        return _View(copy, t)

    def _retire(self, limit: int) -> None:
        """Let go of the oldest in-flight device tensors until at most `limit` bytes are left. The
        compute stream waits for each one's copy first, so their memory is not reused before the
        copy has read it."""
        while self.inflight and self.inflight_bytes > limit:
            _, (copy, done) = self.inflight.popitem(last=False)
            self.streams.current_stream().wait_event(done)
            copy.device = None
            self.inflight_bytes -= copy.nbytes

    # --- backward ------------------------------------------------------------------------------

    def _unpack(self, saved):
        if not isinstance(saved, _View):
            return saved
        if not self.in_backward:
            self._begin_backward()
        copy, cur = saved.copy, self.streams.current_stream()
        if copy.id in self.inflight:  # saved late in forward: it never left the device
            _, done = self.inflight.pop(copy.id)
            self.inflight_bytes -= copy.nbytes
            cur.wait_event(done)  # its memory outlives the copy that reads it
        elif copy.device is None:  # not prefetched (backward went out of order), or used again: fetch now
            self._fetch(copy)
        raw = copy.device
        if copy.arrived is not None:  # fetched: allocated on the copy stream, used on this one
            cur.wait_event(copy.arrived)
            copy.arrived = None
            if raw.is_cuda:
                raw.record_stream(cur)
        copy.uses -= 1
        if copy.uses <= 0:  # its last user: the device copy goes when autograd is done with it
            copy.device = None
            if self.ready.pop(copy.id, None) is not None:
                self.ready_bytes -= copy.nbytes
        self._prefetch(copy.id - 1)  # the next ones backward will need
        return saved.on(raw)

    def _begin_backward(self) -> None:
        self.in_backward = True
        self.h2d.wait_stream(self.d2h)  # a host copy is read back only once written
        self.fetch_from = self.next_id - 1
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self.in_backward = False
        for copy in self.ready.values():  # prefetched but never used (its node did not run): free it
            copy.device = copy.arrived = None
        self.ready.clear()
        self.ready_bytes = 0

    def _fetch(self, copy: _Offloaded) -> None:
        with self.streams.stream(self.h2d):
            copy.device = copy.host.to(copy.where, non_blocking=True)
        copy.arrived = self.h2d.record_event()
        self.ready[copy.id] = copy
        self.ready_bytes += copy.nbytes

    def _prefetch(self, below: int) -> None:
        self.fetch_from = min(self.fetch_from, below)
        while self.fetch_from >= self.first_id and self.ready_bytes < self.prefetch_bytes:
            copy = self.saved.get(self.fetch_from)
            self.fetch_from -= 1
            if copy is not None and copy.device is None:
                self._fetch(copy)
