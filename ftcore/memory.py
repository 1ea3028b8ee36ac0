"""Memory measurement: peak bytes on the training device."""
from __future__ import annotations

import torch


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_mem_bytes(device: torch.device) -> int:
    """CUDA: peak allocated by the caching allocator. CPU: the process's peak resident set (VmHWM),
    the closest thing the OS keeps."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
