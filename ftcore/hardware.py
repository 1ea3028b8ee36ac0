"""What this machine computes fast, and the choices `train.loss = "auto"` and
`train.precision = "auto"` make from it.

Loss: the fused lm_head + cross-entropy over the labelled rows only is the fastest correct loss on
every device: the Triton kernel on CUDA, its plain-torch twin ("chunked") elsewhere.

Precision on a CPU: bf16 autocast (fp32 master weights and optimizer states) pays only where the CPU
multiplies bf16 natively (AMX-BF16 or AVX512-BF16; without them oneDNN emulates bf16 and it is
slower than fp32) *and* the matmuls are wide enough for the faster multiply to outweigh autocast's
casts. Measured on a 2-core Xeon with AMX (bench/RESULTS.md, "where bf16 autocast pays"): a training
step in bf16 autocast takes 1.10x fp32's time at hidden size 32, 0.96x at 64, 0.67x at 128 and
0.45x at 512, so the rule is bf16 from hidden size BF16_MIN_HIDDEN_SIZE = 64.
On CUDA, bf16 autocast wherever the GPU supports bf16.

FTCORE_CPU_BF16=0 or 1 overrides the detection (to try the other path, and for tests).
"""
from __future__ import annotations

import functools
import os

import torch

BF16_MIN_HIDDEN_SIZE = 64


FEATURES = (("AMX-BF16", "amx_bf16", "_is_amx_tile_supported"), ("AVX512-BF16", "avx512_bf16", "_is_avx512_bf16_supported"))


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native bf16 matmul features this CPU reports ("AMX-BF16", "AVX512-BF16"): from the
    kernel's /proc/cpuinfo flags (their exact names), else from torch's cpuinfo probes (for AMX
    the tile unit, which every AMX CPU so far pairs with AMX-BF16)."""
    flags = _proc_cpuinfo_flags()
    if flags:
        return tuple(name for name, flag, _ in FEATURES if flag in flags)
    return tuple(name for name, _, probe in FEATURES if getattr(torch.cpu, probe, lambda: False)())


def _proc_cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """(whether bf16 matmuls run natively here, the evidence in words)."""
    forced = os.environ.get("FTCORE_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"FTCORE_CPU_BF16={forced}"
    if forced:
        raise ValueError(f"FTCORE_CPU_BF16 must be 0 or 1, got {forced!r}")
    features = cpu_bf16_features()
    return bool(features), ("CPU has " + " and ".join(features)) if features else "CPU has no AMX-BF16 or AVX512-BF16"


def auto_loss(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        return "triton", "fused Triton loss over the labelled rows"
    return "chunked", "the labelled rows only, in plain torch: Triton needs a GPU"


def auto_precision(device: torch.device, hidden_size: int) -> tuple[str, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-autocast", "the GPU has bf16"
        return "fp32", "the GPU has no bf16"
    native, why = cpu_native_bf16()
    if not native:
        return "fp32", why
    if hidden_size < BF16_MIN_HIDDEN_SIZE:
        return "fp32", f"{why}, but at hidden size {hidden_size} (< {BF16_MIN_HIDDEN_SIZE}) autocast's casts cost more than it saves"
    return "bf16-autocast", f"{why}, hidden size {hidden_size} >= {BF16_MIN_HIDDEN_SIZE}"


def resolve_auto(train_cfg, device: torch.device, hidden_size: int) -> list[str]:
    """Replaces "auto" in train_cfg.loss and train_cfg.precision by the choice for this device and
    model width; returns one line per choice made, to print."""
    said = []
    if train_cfg.loss == "auto":
        train_cfg.loss, why = auto_loss(device)
        said.append(f"train.loss = auto -> {train_cfg.loss} ({why})")
    if train_cfg.precision == "auto":
        train_cfg.precision, why = auto_precision(device, hidden_size)
        said.append(f"train.precision = auto -> {train_cfg.precision} ({why})")
    return said
