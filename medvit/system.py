"""Facts about the machine that need no torch (cheap to import from data tools)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask: SLURM and containers restrict it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


__all__ = ["available_cpus"]
