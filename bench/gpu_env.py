"""Part 1 of bench/gpu_check.sh: the machine, measured in a few seconds. The GPU's name, driver and
memory, the versions of everything the checks use, and two rates the other parts are read
against: dense bf16 matmul TFLOP/s (8192^3) and device-to-device copy bandwidth (1 GiB).
On a CPU (the dry run) the same measures at small sizes.

    python bench/gpu_env.py --out OUT/env.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (the checkout on sys.path)
import torch

from ftcore.files import write_atomic


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "gguf", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def _time(fn, device, iters: int) -> float:
    """Median seconds of fn() over iters calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(device: torch.device) -> dict:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    s = _time(lambda: a @ b, device, 10)
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    c = _time(lambda: dst.copy_(src), device, 10)
    return {"matmul_shape": n, "bf16_tflops": 2 * n ** 3 / s / 1e12,
            "copy_bytes": copy_bytes, "copy_gbps": 2 * copy_bytes / c / 1e9}  # read + write


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"name": platform.processor() or platform.machine(), "kind": "cpu"}
    p = torch.cuda.get_device_properties(0)
    facts = {"name": torch.cuda.get_device_name(0), "kind": "cuda", "memory_bytes": p.total_memory,
             "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        facts["driver"] = q.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        facts["driver"] = None
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": gpu_facts(),
           "versions": versions(), "measured": None, "command": " ".join(sys.argv)}
    write_atomic(Path(args.out), json.dumps(env, indent=1))  # the facts first: a cut part still has them
    env["measured"] = measure(device)
    write_atomic(Path(args.out), json.dumps(env, indent=1))
    m = env["measured"]
    print(f"{env['device']['name']}: bf16 matmul {m['bf16_tflops']:.1f} TFLOP/s ({m['matmul_shape']}^3), "
          f"copy {m['copy_gbps']:.0f} GB/s; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
