"""Kernels, installed as `ftcore.kernels`, chosen by name in the config.

Every kernel lives in one registry keyed by (kind, name): kind "loss" holds the lm_head +
cross-entropy implementations that `train.loss` picks; later kinds ("rmsnorm", "rope", "swiglu")
use the same two calls. A user registers their own the same way:

    from ftcore.kernels import register_loss
    register_loss("mine", my_fn)          # then train.loss = "mine"

A loss kernel computes the lm_head matmul and the cross-entropy of the labelled rows:

    fn(hidden (N, H), weight (V, H), labels (N,), bias=None, ignore_index=-100, reduction="sum")
        -> scalar float32 tensor

The model calls it inside forward with reduction="sum" so that the training loop can normalise by
the global count of completion tokens. Triton is imported only when a Triton kernel is first used:
Triton decides interpreter mode (TRITON_INTERPRET=1) at import time.

Registered losses: "torch" (reference: full logits), "chunked" (labelled rows only, chunked,
gradients in forward, plain torch), "triton" (the same with the fused Triton kernel; CUDA, or CPU
under TRITON_INTERPRET=1), "compile" (torch.compile of the reference).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .linear_cross_entropy import linear_cross_entropy  # no triton import: the kernel loads lazily

LossFn = Callable[..., torch.Tensor]

_KERNELS: dict[tuple[str, str], Callable] = {}
_LAZY: set[tuple[str, str]] = set()


def register_kernel(kind: str, name: str, fn: Callable, *, lazy: bool = False) -> None:
    """Register `fn` as kernel `name` of `kind` (replacing any previous one). With lazy=True, `fn`
    is a zero-argument factory called on first use, so its imports (e.g. triton) happen late."""
    key = (kind, name)
    _KERNELS[key] = fn
    if lazy:
        _LAZY.add(key)
    else:
        _LAZY.discard(key)


def get_kernel(kind: str, name: str) -> Callable:
    key = (kind, name)
    if key not in _KERNELS:
        raise ValueError(f"unknown {kind} kernel {name!r}; registered: "
                         f"{', '.join(available_kernels(kind)) or 'none'}")
    if key in _LAZY:
        _KERNELS[key] = _KERNELS[key]()
        _LAZY.discard(key)
    return _KERNELS[key]


def available_kernels(kind: str) -> list[str]:
    return sorted(name for k, name in _KERNELS if k == kind)


def register_loss(name: str, fn: LossFn, *, lazy: bool = False) -> None:
    register_kernel("loss", name, fn, lazy=lazy)


def get_loss(name: str) -> LossFn:
    return get_kernel("loss", name)


def available_losses() -> list[str]:
    return available_kernels("loss")


def torch_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
    """The reference: full logits in the input dtype, cross-entropy in float32. A mean over zero
    labelled rows is 0 (F.cross_entropy would give NaN)."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return loss


def _fused(impl: str) -> LossFn:
    """The registry's argument order (bias 4th) onto linear_cross_entropy (bias a keyword)."""
    def loss(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum", **kw):
        return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, bias,
                                    impl=impl, **kw)
    loss.__name__ = f"linear_cross_entropy_{impl}"
    return loss


def _triton_factory() -> LossFn:
    from . import cross_entropy_triton  # noqa: F401  (fail here, clearly, if triton is missing)
    return _fused("triton")


def _compile_factory() -> LossFn:
    return torch.compile(torch_linear_cross_entropy)


register_loss("torch", torch_linear_cross_entropy)
register_loss("chunked", _fused("torch"))
register_loss("triton", _triton_factory, lazy=True)
register_loss("compile", _compile_factory, lazy=True)
