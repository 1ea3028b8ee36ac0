"""Kernels, installed as `ftcore.kernels`, chosen by name in the config.

A loss kernel computes the lm_head matmul and the cross-entropy of the labelled rows:

    fn(hidden (N, H), weight (V, H), labels (N,), bias=None, ignore_index=-100, reduction="sum")
        -> scalar float32 tensor

The model calls it inside forward with reduction="sum" so that the training loop can normalise by
the global count of completion tokens. Triton is imported only when a Triton kernel is first used:
Triton decides interpreter mode (TRITON_INTERPRET=1) at import time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]

_LOSSES: dict[str, LossFn | Callable[[], LossFn]] = {}
_LAZY: set[str] = set()


def register_loss(name: str, fn: LossFn, *, lazy: bool = False) -> None:
    """Register a loss kernel under `name`. With lazy=True, `fn` is a zero-argument factory that
    returns the kernel on first use (so its imports, e.g. triton, happen late)."""
    _LOSSES[name] = fn
    if lazy:
        _LAZY.add(name)
    else:
        _LAZY.discard(name)


def get_loss(name: str) -> LossFn:
    if name not in _LOSSES:
        raise ValueError(f"unknown loss kernel {name!r}; registered: {', '.join(sorted(_LOSSES))}")
    if name in _LAZY:
        _LOSSES[name] = _LOSSES[name]()
        _LAZY.discard(name)
    return _LOSSES[name]


def available_losses() -> list[str]:
    return sorted(_LOSSES)


def torch_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
    """The reference: full logits in the input dtype, cross-entropy in float32."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


register_loss("torch", torch_linear_cross_entropy)
