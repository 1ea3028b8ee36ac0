"""What this machine computes fast, and the choices `train.loss = "auto"` and
`train.precision = "auto"` make from it.

Loss: the fused lm_head + cross-entropy over the labelled rows only is the fastest correct loss on
every device: the Triton kernel on CUDA, its plain-torch twin ("chunked") elsewhere.

Precision on a CPU is a measurement, not a flag. bf16 autocast (fp32 master weights and optimizer
states) pays only where this CPU multiplies bf16 faster than fp32 at the model's widths, by enough
to cover autocast's casts and the parts of a step that bf16 does not speed up. The flags do not
tell: a 2-core Xeon with AMX-BF16 multiplies bf16 2-4x faster than fp32, one with AVX512-BF16 but
no AMX multiplies it 0.6x as fast (160 vs 280 GFLOP/s), and small matmuls gain nothing on either.
So `auto` times one linear layer of the model's shape (forward and backward, the micro-batch's
rows) in both precisions, a fraction of a second, and caches the result per machine (CPU, torch,
threads, shape) in ~/.cache/ftcore/. A step in bf16 autocast beats fp32 where that layer takes at
most BF16_MAX_TIME_RATIO of fp32's time (bench/RESULTS.md: "where bf16 autocast pays").
On CUDA, bf16 autocast wherever the GPU supports bf16.

FTCORE_CPU_BF16=0 or 1 overrides the measurement (to try the other path, and for tests).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_MAX_TIME_RATIO = 0.7
PROBE_FLOP = 4e9   # per timed pass, about 15 ms in fp32 on one modern core pair: the rows are capped to it
PROBE_MIN_ROWS = 256

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


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forced_cpu_bf16() -> bool | None:
    """FTCORE_CPU_BF16=0/1, or None when unset."""
    forced = os.environ.get("FTCORE_CPU_BF16", "").strip()
    if forced and forced not in ("0", "1"):
        raise ValueError(f"FTCORE_CPU_BF16 must be 0 or 1, got {forced!r}")
    return None if not forced else forced == "1"


@dataclass(frozen=True)
class MatmulShape:
    """The model's widest linear layer (hidden -> intermediate) and the rows of one micro-batch."""
    hidden_size: int
    intermediate_size: int
    rows: int

    @classmethod
    def of(cls, widths, rows: int) -> "MatmulShape":
        """From anything with hidden_size and intermediate_size (ModelConfig, [pretrain])."""
        return cls(widths.hidden_size, widths.intermediate_size, rows)


@dataclass
class Bf16Probe:
    fp32_ms: float
    bf16_ms: float
    rows: int       # the rows timed: the micro-batch's, capped to PROBE_FLOP per pass
    measured: str   # date

    @property
    def ratio(self) -> float:
        return self.bf16_ms / self.fp32_ms


def probe_rows(shape: MatmulShape) -> int:
    per_row = 6 * shape.hidden_size * shape.intermediate_size  # forward and both backward matmuls
    return min(shape.rows, max(PROBE_MIN_ROWS, int(PROBE_FLOP // per_row)))


def time_bf16_vs_fp32(hidden_size: int, intermediate_size: int, rows: int, rounds: int = 3) -> tuple[float, float]:
    """Best-of-`rounds` ms of one linear layer's forward and backward (x (rows, hidden) @ W.T),
    in fp32 and under bf16 autocast, the two interleaved so that a busy neighbour slows both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden_size, generator=g, requires_grad=True)
    w = torch.randn(intermediate_size, hidden_size, generator=g, requires_grad=True)
    grad_out = {False: torch.randn(rows, intermediate_size, generator=g)}
    grad_out[True] = grad_out[False].bfloat16()
    best = {False: float("inf"), True: float("inf")}
    for round_ in range(rounds + 1):  # round 0 warms up (oneDNN picks and caches its kernels)
        for bf16 in (False, True):
            x.grad = w.grad = None
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.linear(x, w)
            y.backward(grad_out[bf16])
            if round_:
                best[bf16] = min(best[bf16], (time.perf_counter() - t0) * 1e3)
    return best[False], best[True]


def probe_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ftcore" / "cpu_bf16_probe.json"


def probe_key(shape: MatmulShape, threads: int | None = None) -> str:
    """What the result depends on: the CPU, torch (its oneDNN), the threads, the shape."""
    features = "+".join(cpu_bf16_features()) or "no bf16 flags"
    threads = threads or torch.get_num_threads()
    return (f"{cpu_model_name()} ({features}) | torch {torch.__version__} | {threads} threads | "
            f"{shape.hidden_size}x{shape.intermediate_size}, {probe_rows(shape)} rows")


def _read_probe_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again


def bf16_probe(shape: MatmulShape) -> tuple[Bf16Probe, bool]:
    """(the probe for this shape on this machine, whether it came from the cache)."""
    path, key = probe_cache_path(), probe_key(shape)
    cache = _read_probe_cache(path)
    try:
        return Bf16Probe(**cache[key]), True
    except (KeyError, TypeError):
        pass
    rows = probe_rows(shape)
    fp32_ms, bf16_ms = time_bf16_vs_fp32(shape.hidden_size, shape.intermediate_size, rows)
    probe = Bf16Probe(round(fp32_ms, 3), round(bf16_ms, 3), rows, datetime.date.today().isoformat())
    cache[key] = asdict(probe)
    try:
        from ftcore.files import write_atomic
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home: the probe still decides, it is only measured again next time
    return probe, False


def cpu_bf16_pays(shape: MatmulShape) -> tuple[bool, str]:
    """(whether bf16 autocast pays on this CPU at this shape, the evidence in words)."""
    forced = forced_cpu_bf16()
    if forced is not None:
        return forced, f"FTCORE_CPU_BF16={int(forced)}"
    probe, cached = bf16_probe(shape)
    features = " and ".join(cpu_bf16_features()) or "no AMX-BF16 or AVX512-BF16"
    when = f"probe of {probe.measured}, cached in {probe_cache_path()}" if cached else "probe just now"
    pays = probe.ratio <= BF16_MAX_TIME_RATIO
    return pays, (f"a {shape.hidden_size}x{shape.intermediate_size} matmul of {probe.rows} rows takes "
                  f"{probe.ratio:.2f}x fp32's time in bf16 here ({probe.bf16_ms:.1f} vs {probe.fp32_ms:.1f} ms; "
                  f"CPU has {features}; {when}); bf16 pays at <= {BF16_MAX_TIME_RATIO}x")


def auto_loss(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        return "triton", "fused Triton loss over the labelled rows"
    return "chunked", "the labelled rows only, in plain torch: Triton needs a GPU"


def auto_precision(device: torch.device, shape: MatmulShape) -> tuple[str, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-autocast", "the GPU has bf16"
        return "fp32", "the GPU has no bf16"
    pays, why = cpu_bf16_pays(shape)
    return ("bf16-autocast" if pays else "fp32"), why


def resolve_auto(train_cfg, device: torch.device, shape: MatmulShape) -> list[str]:
    """Replaces "auto" in train_cfg.loss and train_cfg.precision by the choice for this device and
    model shape; returns one line per choice made, to print."""
    said = []
    if train_cfg.loss == "auto":
        train_cfg.loss, why = auto_loss(device)
        said.append(f"train.loss = auto -> {train_cfg.loss} ({why})")
    if train_cfg.precision == "auto":
        train_cfg.precision, why = auto_precision(device, shape)
        said.append(f"train.precision = auto -> {train_cfg.precision} ({why})")
    return said


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> str | None:
    """On a CPU with glibc: keep freed memory for the next allocation instead of handing it back
    to the kernel. By default glibc maps blocks above a (dynamic) threshold of its own and returns
    the top of the heap once 128 KiB+ are free, so a training step's activations and gradients,
    freed and allocated again every step, come back as fresh pages: hundreds of thousands of page
    faults a step, each zeroed by the kernel. At the SmolLM2-135M step (8 x 256, bf16 autocast,
    2-core Xeon) 440-590k faults a step became 90-150k and the step ~15% shorter (3.65 -> 3.1 s);
    fp32 ~3% (bench/RESULTS.md). The price: the process keeps its peak heap (it is reused).
    Blocks of 32 MiB and more (glibc's limit) are still mapped per allocation. FTCORE_KEEP_FREED_MEMORY=0
    leaves malloc alone. Returns what was done, to print, or None."""
    import ctypes
    import platform
    if os.environ.get("FTCORE_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20)))
    return "malloc keeps freed memory for reuse (mmap threshold 32 MiB, trim threshold 1 GiB)" if ok else None
