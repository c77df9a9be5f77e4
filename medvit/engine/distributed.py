"""Multi-process training under ``torchrun``: the process group, the batch sampler that
shards every global batch across processes, and the collectives the :class:`Trainer` needs.

A run with ``torchrun --nproc-per-node N ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`setup_distributed` joins them into one process group (NCCL on GPUs, one GPU per
process; gloo on CPUs). Without those variables (or with ``WORLD_SIZE=1``) every function
here is the single-process identity, so the same code runs both ways.

Semantics the Trainer keeps across process counts: ``train.batch_size`` is the GLOBAL batch.
:class:`GlobalBatchSampler` draws the epoch's order once from ``(seed, epoch)`` (the same
order for every process count), cuts it into global batches and gives process ``r`` the
samples ``r, r + N, r + 2N, ...`` of each batch. The training split itself was made per
patient before any sharding (``split.csv``), so a process only ever sees training-split
samples, and the union of the shards is exactly the single-process batch. Each process
weights its loss by ``local_size * N / global_size``, so after DistributedDataParallel
averages the gradients they are those of the global batch's mean loss, even for a short last
batch; the optimizer step, schedule and clipping are then those of a single-process run with
the same global batch.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from medvit.engine.device import DeviceError
from medvit.engine.seed import make_generator


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run.

    Attributes:
        rank: global index of the process (0 .. world_size - 1).
        world_size: number of processes (1: not distributed).
        local_rank: index of the process on its node (its GPU index).
        backend: ``"nccl"``, ``"gloo"`` or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and metrics."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistInfo:
    """The :class:`DistInfo` of the process group this process belongs to (single process
    when none is initialised)."""
    if not is_initialized():
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=str(dist.get_backend()))


def is_main_process() -> bool:
    """True in rank 0 and in a single-process run."""
    return current().is_main


def setup_distributed(device: torch.device, timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment.

    Args:
        device: the device the config resolved to; on CUDA each process takes the GPU of its
            ``LOCAL_RANK`` instead.
        timeout_minutes: how long a collective may wait for the other processes.

    Returns:
        (the process's :class:`DistInfo`, its device). Single process (no ``WORLD_SIZE`` or
        ``WORLD_SIZE=1``): ``(DistInfo(), device)`` unchanged.

    Raises:
        DeviceError: more processes on this node than GPUs.
    """
    if env_world_size() <= 1 and not is_initialized():
        return DistInfo(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"process LOCAL_RANK={local_rank} has no GPU: this node has "
                              f"{torch.cuda.device_count()}; start torchrun with --nproc-per-node <= that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=timeout_minutes))
    return current(), device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64 on the CPU for gloo, on the
    process's GPU for NCCL)."""
    if not info.enabled:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def any_process(flag: bool, info: DistInfo) -> bool:
    """True on every process when ``flag`` is True on at least one (e.g. a SIGTERM that
    reached only some of them), so all stop at the same step."""
    if not info.enabled:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], info)[0] > 0


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one process: the process's share of each global batch.

    The order of epoch ``e`` is ``torch.randperm(n)`` from a generator seeded with ``seed``
    (the caller derives it from the run seed and ``e``), or ``0 .. n-1`` without shuffle; it
    does not depend on the number of processes. Global batch ``b`` holds the order's items
    ``b * batch_size`` to ``(b + 1) * batch_size - 1``; process ``rank`` gets every
    ``world_size``-th of them starting at ``rank``.

    Args:
        n: dataset length.
        batch_size: GLOBAL batch size.
        seed: shuffling seed of this epoch.
        shuffle: shuffle (training) or keep the dataset order.
        drop_last: drop the last global batch when it is shorter than ``batch_size``.
        rank, world_size: this process and the number of processes.
        start_batch: skip the first global batches (resuming in the middle of an epoch);
            the order itself is unchanged.

    A global batch with fewer samples than processes would leave a process without data (and
    the others waiting for its gradients): it is dropped when ``world_size > 1``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0 .. {world_size - 1}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size, self.start_batch = rank, world_size, int(start_batch)

    def order(self) -> list[int]:
        """The epoch's global order of dataset indices."""
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=make_generator(self.seed)).tolist()

    def _sizes(self) -> list[int]:
        sizes = [self.batch_size] * (self.n // self.batch_size)
        rest = self.n % self.batch_size
        if rest and not self.drop_last and not (self.world_size > 1 and rest < self.world_size):
            sizes.append(rest)
        return sizes

    def global_batches(self) -> list[list[int]]:
        """Every global batch of the epoch (before ``start_batch`` is skipped)."""
        order = self.order()
        return [order[i * self.batch_size:i * self.batch_size + size] for i, size in enumerate(self._sizes())]

    def global_sizes(self) -> list[int]:
        """Sizes of the global batches this sampler yields (after ``start_batch``)."""
        return self._sizes()[self.start_batch:]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch:]:
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(0, len(self._sizes()) - self.start_batch)
