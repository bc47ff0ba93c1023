"""How many torch threads a command uses: ``--threads N``, else ``OMP_NUM_THREADS``, else the
cores that are actually free now.

Idle OpenMP threads spin on a shared core: with the second core of a 2-core machine busy,
``polyquant quantize default --method hqq`` took 292-319 s at the default thread count against
6-25 s at one thread (issue 20). Counting the allowed cores that were idle over a short sample
of ``/proc/stat`` gives one thread on a busy machine and every core on an idle one.
"""
from __future__ import annotations

import os
import time

__all__ = ["free_cores", "resolve_threads", "apply_threads"]


def _cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU ``(idle, total)`` jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + (nums[4] if len(nums) > 4 else 0)  # idle + iowait
            out[name] = (idle, sum(nums))
    return out


def free_cores(sample_s: float = 0.25) -> int:
    """Allowed cores that were idle over the last ``sample_s`` seconds (at least 1)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
    try:
        a = _cpu_times()
        time.sleep(sample_s)
        b = _cpu_times()
    except (OSError, ValueError):  # pragma: no cover - no /proc
        return max(1, len(allowed))
    idle = 0.0
    for c in allowed:
        k = f"cpu{c}"
        if k in a and k in b and b[k][1] > a[k][1]:
            idle += (b[k][0] - a[k][0]) / (b[k][1] - a[k][1])
    return max(1, min(len(allowed), int(idle + 0.25)))


def resolve_threads(requested: int | None) -> tuple[int, str]:
    """``(threads, why)``: the flag, else ``OMP_NUM_THREADS``, else the free cores."""
    if requested is not None:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return free_cores(), "free cores"


def apply_threads(requested: int | None) -> dict:
    """Set torch's thread count; returns what to record (``{"threads": n, "chosen_by": why}``)."""
    import torch
    n, why = resolve_threads(requested)
    torch.set_num_threads(n)
    return {"threads": n, "chosen_by": why}
