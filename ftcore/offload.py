"""Activation offloading: what autograd saves for backward waits in pinned CPU memory instead of on
the GPU, from the forward that saves it to the backward that uses it.

    offload = ActivationOffload(device)      # one per run, entered around each forward
    with offload:
        loss = model(**batch)
    loss.backward()

Forward (pack hook): each saved tensor of at least `min_bytes` that is not a parameter (parameters
stay on the GPU anyway) is copied device -> pinned host on a side stream, so the copy overlaps the
forward's compute. The device tensor is kept alive until its copy is done; once more than
`max_inflight_bytes` are being copied, the compute stream waits for the oldest copies. That wait is
what bounds the memory: without it a forward faster than PCIe would free nothing.

Backward (unpack hook): saved tensors come back roughly in the reverse order they were saved, so
when tensor i is needed, tensors i-1, i-2, ... are already being copied host -> device on a second
side stream, up to `prefetch_bytes` ahead, overlapping the copies with backward compute. Tensors
saved last in forward whose copies were still in flight are used from the device directly.

Only what autograd saves through saved-tensor hooks is offloaded. torch's non-reentrant activation
checkpointing keeps each block's inputs (and, selective, the outputs it saves) in its own storage,
so with activation checkpointing on, this moves only what is saved outside the checkpointed blocks.

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
    """What autograd keeps in place of an offloaded tensor: its host copy. When autograd frees the
    graph, this goes too, and so does the host memory."""
    __slots__ = ("id", "host", "nbytes", "__weakref__")

    def __init__(self, id: int, host: torch.Tensor, nbytes: int):
        self.id, self.host, self.nbytes = id, host, nbytes


def _is_parameter(t: torch.Tensor) -> bool:
    # a weight is saved as the Parameter or as a view of it (linear saves weight.t())
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, device: torch.device, min_bytes: int = 1 << 20, max_inflight_bytes: int = 1 << 30,
                 prefetch_bytes: int = 1 << 30):
        self.device = torch.device(device)
        self.min_bytes, self.max_inflight_bytes, self.prefetch_bytes = min_bytes, max_inflight_bytes, prefetch_bytes
        self.streams = torch.get_device_module(self.device)
        self.d2h, self.h2d = self.streams.Stream(), self.streams.Stream()
        self.pin = self.device.type == "cuda"
        self.next_id = 0
        self.saved = weakref.WeakValueDictionary()  # id -> _Offloaded, while autograd holds it
        self.inflight: OrderedDict[int, tuple] = OrderedDict()  # id -> (device tensor, copy-done event)
        self.inflight_bytes = 0
        self.ready: dict[int, tuple] = {}  # id -> (device tensor, copy-done event), brought back ahead of use
        self.ready_bytes = 0
        self.fetch_from = -1  # the next id to prefetch, counting down
        self.in_backward = False
        self.offloaded_bytes = 0  # total copied out, for tests and benchmarks
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._retire(0)  # copies left from an earlier forward: settle them (their tensors can come back from host)
        return super().__enter__()

    # --- forward -------------------------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if t.device != self.device or nbytes < self.min_bytes or _is_parameter(t):
            return t
        host = torch.empty_like(t, device="cpu", pin_memory=self.pin)
        self.d2h.wait_stream(self.streams.current_stream())  # t has been computed
        with self.streams.stream(self.d2h):
            host.copy_(t, non_blocking=True)
        packed = _Offloaded(self.next_id, host, nbytes)
        self.next_id += 1
        self.saved[packed.id] = packed
        self.inflight[packed.id] = (t, self.d2h.record_event())
        self.inflight_bytes += nbytes
        self.offloaded_bytes += nbytes
        self._retire(self.max_inflight_bytes)
        return packed

    def _retire(self, limit: int) -> None:
        """Let go of the oldest in-flight device tensors until at most `limit` bytes are left. The
        compute stream waits for each one's copy first, so their memory is not reused before the
        copy has read it."""
        while self.inflight and self.inflight_bytes > limit:
            _, (t, done) = self.inflight.popitem(last=False)
            self.streams.current_stream().wait_event(done)
            self.inflight_bytes -= t.numel() * t.element_size()

    # --- backward ------------------------------------------------------------------------------

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if not self.in_backward:
            self._begin_backward()
        if packed.id in self.inflight:  # saved late in forward: it never left the device
            t, done = self.inflight.pop(packed.id)
            self.inflight_bytes -= packed.nbytes
        else:
            if packed.id not in self.ready:  # not prefetched (backward went out of order): fetch now
                self._fetch(packed)
            t, done = self.ready.pop(packed.id)
            self.ready_bytes -= packed.nbytes
        self._prefetch(packed.id - 1)  # the next ones backward will need
        cur = self.streams.current_stream()
        cur.wait_event(done)  # in flight: t outlives the copy that reads it; fetched: t has arrived
        if t.is_cuda:
            t.record_stream(cur)  # (fetched) allocated on the copy stream, used on this one
        return t

    def _begin_backward(self) -> None:
        self.in_backward = True
        self.h2d.wait_stream(self.d2h)  # a host copy is read back only once written
        self.fetch_from = self.next_id - 1
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self.in_backward = False
        self.ready.clear()  # prefetched but never used (its node did not run): free it
        self.ready_bytes = 0

    def _fetch(self, packed: _Offloaded) -> None:
        with self.streams.stream(self.h2d):
            t = packed.host.to(self.device, non_blocking=True)
        self.ready[packed.id] = (t, self.h2d.record_event())
        self.ready_bytes += packed.nbytes

    def _prefetch(self, below: int) -> None:
        self.fetch_from = min(self.fetch_from, below)
        while self.fetch_from >= 0 and self.ready_bytes < self.prefetch_bytes:
            packed = self.saved.get(self.fetch_from)
            self.fetch_from -= 1
            if packed is not None and packed.id not in self.ready and packed.id not in self.inflight:
                self._fetch(packed)
