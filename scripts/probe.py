"""Peak-memory and CPU-time probes shared by the measuring scripts (bench.py, logit_memory.py).

CPU: the process's resident set (VmRSS) and its peak (VmHWM) from /proc/self/status; the peak
is reset to the current RSS by writing 5 to /proc/self/clear_refs where the kernel allows it.
CUDA: torch.cuda's allocated and max allocated memory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def status_mib(key: str) -> float | None:
    """`VmRSS`, `VmHWM`, ... of /proc/self/status in MiB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return status_mib("VmRSS")


def reset_peak(device: torch.device) -> str:
    """Start a fresh peak; returns what the later peak covers."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max allocated since the reset"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "peak RSS since the reset"
    except OSError:
        return "peak RSS of the whole process (no reset possible)"


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mib("VmHWM")


def sync(device: torch.device) -> float:
    """time.perf_counter() after the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cpu_share(before, after, seconds: float) -> float | None:
    """Share of the machine's CPU time used by other processes between two cpu_seconds():
    timings are only comparable when it is near 0 (a busy 2-core machine slows an
    OpenMP-threaded run far more than the share itself)."""
    if before is None or after is None or seconds <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (seconds * (os.cpu_count() or 1)))
