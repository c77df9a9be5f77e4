"""Facts about the machine that need no torch (cheap to import from data tools)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask: SLURM and containers restrict it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_has_nvidia_gpu() -> bool:
    """Whether this machine shows an NVIDIA GPU (a ``/dev/nvidiaN`` device), without importing
    torch; ``CUDA_VISIBLE_DEVICES`` set empty or to -1 hides them, as it does from CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(os.path.join(os.sep, "dev", f"nvidia{i}")) for i in range(16))


__all__ = ["available_cpus", "host_has_nvidia_gpu"]
