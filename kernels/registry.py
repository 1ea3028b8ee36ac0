"""The kernel registry, imported as `ftcore.kernels` (the package re-exports it).

Every kernel lives in one registry keyed by (kind, name): kind "loss" holds the lm_head +
cross-entropy implementations that `train.loss` picks; the layer kinds "rmsnorm", "rope" and
"swiglu" hold what `train.kernels` picks for the model's layers. A user registers their own the
same way:

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

Layer kernels, each "torch" (the model's own functions, kernels/reference.py) and
"triton" (fused forward and backward, rmsnorm.py / rope.py / swiglu.py):

    rmsnorm  fn(x (..., H), weight (H,), eps) -> weight * round(x * rsqrt(mean(x^2) + eps))
    rope     fn(q (B, Hq, T, D), k (B, Hk, T, D), cos, sin (B, 1, T, D) or broadcastable)
                 -> (q, k) rotated, rotate-half convention
    swiglu   fn(gate, up) -> silu(gate) * up
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from . import reference
from .linear_cross_entropy import linear_cross_entropy  # no triton import: the kernel loads lazily

LossFn = Callable[..., torch.Tensor]
LAYER_KINDS = ("rmsnorm", "rope", "swiglu")  # the model's layers that `train.kernels` can swap

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


# --- layer kernels ---------------------------------------------------------------------------

def require_triton_device(x: torch.Tensor, kind: str) -> None:
    """A Triton kernel runs on CUDA tensors, or on CPU ones under the interpreter."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the triton {kind} kernel needs CUDA tensors, or TRITON_INTERPRET=1 set "
                           f"before triton is imported to run on CPU; on CPU use {kind} 'torch'")


def _lazy(module: str, name: str) -> Callable[[], Callable]:
    """A factory that imports `name` from `module` on first use: the Triton modules, because
    triton reads TRITON_INTERPRET at import."""
    def factory():
        import importlib
        return getattr(importlib.import_module(module, __package__), name)
    return factory


register_kernel("rmsnorm", "torch", reference.rms_norm)
register_kernel("rope", "torch", reference.apply_rope_qk)
register_kernel("swiglu", "torch", reference.swiglu)
register_kernel("rmsnorm", "triton", _lazy(".rmsnorm", "rms_norm"), lazy=True)
register_kernel("rope", "triton", _lazy(".rope", "rope"), lazy=True)
register_kernel("swiglu", "triton", _lazy(".swiglu", "swiglu"), lazy=True)
