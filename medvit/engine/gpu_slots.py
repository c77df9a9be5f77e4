"""One GPU per concurrent job on a multi-GPU workstation.

Snakemake's ``--resources gpu=N`` limits how many GPU jobs run at once, but it does not say
which GPU a job should use: every job sees all of them, and ``device: auto`` would put them
all on GPU 0. A model job therefore claims a slot before CUDA starts: the first GPU index whose
lock file (``<lock dir>/gpu<i>.lock``) no other process holds, locked with ``fcntl`` for the
life of the process (the operating system releases it when the job ends, however it ends),
and sets ``CUDA_VISIBLE_DEVICES`` to that index. With at most N GPU jobs at once there is
always a free slot; if all are taken (jobs started outside Snakemake) the job waits.

Nothing is done when ``CUDA_VISIBLE_DEVICES`` is already set (a cluster scheduler or the
user chose), when the study runs on the CPU, or when the machine shows fewer than two GPUs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

LOCK_DIR_ENV = "MEDVIT_GPU_LOCK_DIR"
_held: list[IO] = []  # open lock files: the locks last as long as the process


def count_host_gpus() -> int:
    """NVIDIA GPUs this machine shows (``/dev/nvidia<i>`` devices), without starting CUDA."""
    return sum(os.path.exists(os.path.join(os.sep, "dev", f"nvidia{i}")) for i in range(64))


def default_lock_dir() -> Path:
    """``$MEDVIT_GPU_LOCK_DIR``, else a per-user folder under the system's temporary folder
    (one machine's jobs share it; the slots are per machine)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"medvit-gpu-slots-{os.getuid()}")


def try_claim(n_gpus: int, lock_dir: str | Path) -> int | None:
    """Lock the first free slot ``0..n_gpus-1`` for this process; None when all are held."""
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n_gpus):
        handle = open(folder / f"gpu{index}.lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held.append(handle)
        return index
    return None


def release_all() -> None:
    """Release every slot this process holds (tests; a job's slots go when it exits)."""
    while _held:
        handle = _held.pop()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def assign_gpu(n_gpus: int | None = None, lock_dir: str | Path | None = None, env: dict | None = None,
               wait_seconds: float = 3600.0, poll: float = 2.0) -> int | None:
    """Give this process one GPU of a multi-GPU machine (see the module docstring).

    Args:
        n_gpus: GPUs to share (default: :func:`count_host_gpus`).
        lock_dir: where the slot locks live (default: :func:`default_lock_dir`).
        env: the environment to set ``CUDA_VISIBLE_DEVICES`` in (default ``os.environ``).
        wait_seconds: how long to wait for a free slot before running without one.

    Returns:
        the GPU index claimed, or None when nothing was done.
    """
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    n = count_host_gpus() if n_gpus is None else int(n_gpus)
    if n < 2:
        return None
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    deadline = time.monotonic() + wait_seconds
    while True:
        index = try_claim(n, folder)
        if index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(index)
            logger.info("GPU slot %d of %d (CUDA_VISIBLE_DEVICES=%d)", index, n, index)
            return index
        if time.monotonic() >= deadline:
            logger.warning("all %d GPU slots in %s are held; running with every GPU visible", n, folder)
            return None
        time.sleep(poll)
