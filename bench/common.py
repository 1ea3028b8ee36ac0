"""What the benchmarks share: the checkout on sys.path, the step timer, the machine's name,
the versions of what ran, the GPU's peak, sizes in words, the stop of a part cut short."""
from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

GiB = 2 ** 30


PEAK_BF16_TFLOPS = [  # dense bf16 tensor-core peak, by device-name substring (first match)
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("H800", 989.4), ("H20", 148.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    for key, tf in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tf
    return None


class StepTimer:
    """Times on the device's clock: CUDA events on a GPU (no sync inside a step; the sync comes when
    the times are read), perf_counter on a CPU (where ops are synchronous). `mark()` stamps a point
    of a step (bench_step's forward / backward / update split); `timer(fn, iters, warmup)` is the
    median milliseconds of fn() (bench_loss, gpu_env)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return 1e3 * (b - a)

    def split_ms(self) -> list[tuple[float, ...]]:
        return [tuple(self.ms(a, b) for a, b in zip(marks, marks[1:])) for marks in self.steps]

    def __call__(self, fn, iters: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            a = self.mark()
            fn()
            times.append(self.ms(a, self.mark()))
        return statistics.median(times)


def gpu_info() -> tuple[str | None, int | None]:
    """The GPU's name and memory from nvidia-smi: the parent process never touches CUDA, so no
    context of its own sits on the GPU while the rows run (the rows report the same from torch)."""
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        name, mib = (x.strip() for x in line.split(","))
        return name, int(float(mib)) * 2 ** 20
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return None, None


def cpu_info() -> str:
    """The CPU's model name, cores, torch's threads and its native bf16 features."""
    from ftcore.hardware import cpu_bf16_features
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    bf16 = ", ".join(cpu_bf16_features()) or "no native bf16"
    return f"CPU ({name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {bf16})"


def versions() -> dict:
    """The versions of what the benchmarks use and compare with, where installed."""
    from importlib.metadata import PackageNotFoundError, version
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            pass
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def row_versions(v: dict) -> dict:
    """What every result row records of versions(): a row's numbers depend on these two most (the
    kernels and, before torch 2.13, the correctness of CPU offload with the optimizer in backward)."""
    return {"torch": v.get("torch"), "triton": v.get("triton")}


def stop_on_sigterm() -> None:
    """bench/gpu_check.sh ends a part that outruns its cap with `timeout`'s SIGTERM: raised here as
    KeyboardInterrupt instead of ending the process, so the part still writes the rows it has and
    marks the one in progress as cut."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def fmt_size(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2 ** 20:.1f} MiB"
