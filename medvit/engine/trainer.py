"""One training loop for every stage (classification, segmentation, pretraining, distillation).

:class:`Trainer` follows nnU-Net's design: one class whose steps are hook methods, and a
stage that needs something different subclasses it and overrides a hook
(:meth:`Trainer.forward` for a model that takes more than the image,
:meth:`Trainer.train_step` for distillation, :meth:`Trainer.build_optimizer` for other
betas, :meth:`Trainer.validate` for a patient-level metric) instead of adding flags.

What every run gets:

* AdamW without weight decay on biases, norms and the model's ``no_weight_decay()`` names;
  optional parameter groups with ``lr_scale`` (layer-wise LR decay).
* Linear warm-up then cosine decay to ``min_lr``, stepped per optimizer step.
* Gradient accumulation, gradient-norm clipping, bf16 autocast (CPU and CUDA).
* Seeded, resumable data order: epoch ``e`` shuffles with a generator seeded from
  ``(seed, e)``; datasets with ``set_epoch(e)`` are told the epoch.
* A checkpoint every epoch (``checkpoints/last``, the one before it kept as
  ``checkpoints/prev``) and the best one on validation (``checkpoints/best``, with
  ``checkpoints/best_prev``; without a validation set the last epoch is the best and
  ``best`` is not written), all written atomically; ``fit(resume=True)`` continues a
  killed run from the next epoch and ends with the same weights as a run that was not
  interrupted (same seed, machine and settings).
* Progress bars with ETA on stderr and ``train.log`` in the output folder.
* Preemption: a SIGTERM (SLURM preempting the job or reaching ``--signal=TERM@<s>`` before
  its time limit) is acted on at the next optimizer step: the trainer writes
  ``checkpoints/last`` with the position inside the epoch and raises
  :class:`TrainingInterrupted`; ``fit(resume=True)`` continues from that very step and ends
  with the same weights as an uninterrupted run.
* Several processes under ``torchrun`` (see :mod:`medvit.engine.distributed`):
  DistributedDataParallel (gloo on CPUs, NCCL on GPUs), ``batch_size`` is the global batch,
  split across the processes; rank 0 alone writes checkpoints and ``train.log`` and draws
  the progress bars. The result equals a single-process run with the same global batch
  (up to float rounding), except for BatchNorm statistics on CPU (per process; on GPU the
  model's BatchNorm layers become SyncBatchNorm).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medvit.cpu_ops.process import retain_freed_memory
from medvit.engine.checkpoint import (
    CorruptCheckpointError,
    LoadedCheckpoint,
    apply_checkpoint,
    checkpoint_files,
    copy_checkpoint,
    count_parameters,
    load_model_state,
    read_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from medvit.engine.device import (
    autocast_context,
    bf16_supported,
    check_device_name,
    resolve_bf16,
    resolve_device,
)
from medvit.engine.distributed import (
    GlobalBatchSampler,
    all_reduce_sum,
    any_process,
    barrier,
    setup_distributed,
)
from medvit.engine.seed import (
    derive_seed,
    get_rng_state,
    make_generator,
    seed_everything,
    set_rng_state,
    worker_init_fn,
)
from medvit.engine.speed import (
    apply_channels_last,
    channels_last_input,
    compile_model,
    fused_adamw_supported,
    probe_bf16_step,
    resolve_num_workers,
    set_tf32,
)
from medvit.errors import CheckpointError, ConfigError, MedvitError
from medvit.fileio import atomic_write_text, folder_lock

logger = logging.getLogger("medvit.train")

# Settings that change the arithmetic of training: a checkpoint written with other values
# is refused on resume. num_workers, device and log_every may change between runs.
RESUME_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "min_lr", "grad_clip",
               "accumulate", "bf16", "seed", "deterministic")


MAX_EPOCHS = 1000
"""Most epochs one training may run (the study schema caps ``epochs`` at the same value): a
typo such as ``epochs: 1000000000000`` must not make a job run for ever."""


class TrainingError(MedvitError):
    """Training cannot go on (empty training set, non-finite loss, malformed batches)."""


class TrainingInterrupted(TrainingError):
    """A SIGTERM stopped training; ``checkpoints/last`` holds the step it stopped at.

    Attributes:
        checkpoint: the checkpoint written on the signal (``.../checkpoints/last``).
        epoch: 0-based epoch it stopped in.
        batch: micro-batches of that epoch already trained.
    """

    def __init__(self, checkpoint: Path, epoch: int, batch: int, signum: int):
        self.checkpoint, self.epoch, self.batch = checkpoint, epoch, batch
        name = signal.Signals(signum).name
        where = f"epoch {epoch + 1}, after batch {batch}" if batch else f"the end of epoch {epoch}"
        super().__init__(f"training stopped by {name} at {where}; checkpoint saved to {checkpoint}. "
                         "Run the same command again to resume from it")


# --------------------------------------------------------------------------------- config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings: the study config's ``tasks.<task>.train`` block plus the study's
    ``seed``, ``deterministic`` and ``device``.

    Attributes:
        epochs: passes over the training set (1 to :data:`MAX_EPOCHS`).
        batch_size: samples per forward pass (>= 1); the optimizer sees
            ``batch_size * accumulate`` samples per step.
        lr: peak learning rate, reached at the end of warm-up (> 0).
        weight_decay: AdamW decoupled weight decay (>= 0), not applied to biases, norms and
            the model's ``no_weight_decay()`` parameters.
        warmup_epochs: linear warm-up length in epochs (0 <= warmup_epochs <= epochs;
            fractions allowed).
        min_lr: learning rate at the last step of the cosine decay (0 <= min_lr <= lr).
        grad_clip: maximum gradient L2 norm; ``None`` or 0 disables clipping.
        accumulate: micro-batches per optimizer step (>= 1).
        bf16: ``True``, ``False`` or ``"auto"`` (on where the device runs bf16 natively and
            this model's training step measured faster in bf16, see :meth:`Trainer._choose_bf16`).
        num_workers: DataLoader worker processes (0 = load in the main process; ``"auto"``:
            sized to the machine and device by :func:`medvit.engine.speed.auto_num_workers`).
        seed: the run's seed (model init is the stage's business; everything random in
            training derives from it).
        deterministic: deterministic algorithms (see :func:`medvit.engine.seed.seed_everything`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.
        log_every: write a step line to ``train.log`` every this many optimizer steps (0: only
            the per-epoch lines).
        channels_last: channels-last memory layout for the model's conv weights and the input
            batches (:func:`medvit.engine.speed.apply_channels_last`); same results, faster
            convolutions on some devices (docs/performance.md).
        compile: ``torch.compile`` the model in place before training (compiles at the first
            step; pays on long runs).
        retain_freed_memory: keep freed CPU memory in the process for the next step instead of
            returning it to the kernel (:func:`medvit.cpu_ops.process.retain_freed_memory`,
            process-wide, glibc only): no page faults per step, faster CPU steps, same peak memory.
        tf32: on a CUDA device, fp32 matmuls and convolutions on TF32 tensor cores
            (:func:`medvit.engine.speed.set_tf32`; speed-ups in benchmarks/RESULTS.md);
            ``False`` keeps full fp32. No effect on the CPU.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0
    accumulate: int = 1
    bf16: bool | str = False
    num_workers: int | str = 0
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    log_every: int = 50
    channels_last: bool = False
    compile: bool = False
    retain_freed_memory: bool = True
    tf32: bool = True

    def __post_init__(self) -> None:
        def fail(key: str, allowed: str) -> None:
            value = getattr(self, key)
            where = key if key in ("seed", "deterministic", "device") else f"train.{key}"
            hint = ""
            if isinstance(value, str) and allowed.startswith("a number"):
                hint = " (a string: YAML reads 1e-6 as text, write 1.0e-6)"
            raise ConfigError(f"{where}: {value!r} is not allowed{hint}; allowed: {allowed}")

        if not _is_int(self.epochs) or not 1 <= self.epochs <= MAX_EPOCHS:
            fail("epochs", f"an integer >= 1 and <= {MAX_EPOCHS}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            fail("batch_size", "an integer >= 1")
        if not _is_number(self.lr) or self.lr <= 0:
            fail("lr", "a number > 0")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "a number >= 0")
        if not _is_number(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            fail("warmup_epochs", f"a number from 0 to epochs ({self.epochs})")
        if not _is_number(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"a number from 0 to lr ({self.lr})")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or self.grad_clip < 0):
            fail("grad_clip", "null, 0 (off) or a number > 0")
        if not _is_int(self.accumulate) or self.accumulate < 1:
            fail("accumulate", "an integer >= 1")
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            fail("bf16", "true, false, auto")
        if self.num_workers != "auto" and (not _is_int(self.num_workers) or self.num_workers < 0):
            fail("num_workers", "an integer >= 0 or auto")
        if not _is_int(self.seed):
            fail("seed", "an integer")
        if not isinstance(self.deterministic, bool):
            fail("deterministic", "true, false")
        if not isinstance(self.device, str):
            fail("device", "auto, cpu, cuda, cuda:<index>")
        check_device_name(self.device)
        if not _is_int(self.log_every) or self.log_every < 0:
            fail("log_every", "an integer >= 0")
        for key in ("channels_last", "compile", "retain_freed_memory", "tf32"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true, false")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping whose keys are exactly this class's fields (missing keys take
        the defaults).

        Raises:
            ConfigError: an unknown key (naming the allowed ones) or an invalid value.
        """
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; allowed: {cls.keys()}")
        return cls(**dict(d))

    @classmethod
    def from_study(cls, study: Mapping[str, Any], train: Mapping[str, Any] | None = None) -> TrainConfig:
        """Merge a task's ``train`` block with the study's ``seed``, ``deterministic`` and
        ``device`` (a key given in ``train`` wins)."""
        merged = {k: study[k] for k in ("seed", "deterministic", "device") if k in study}
        merged.update(train or {})
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_epoch: 1-based epoch whose weights are loaded in the model at the end.
        best_metric: its validation metric (None without validation set).
        train_seconds: seconds spent training and validating, summed over every run that
            contributed (resumed runs included; checkpoint writing excluded).
        history: one dict per completed epoch: ``epoch`` (1-based), ``train_loss``,
            ``val_loss`` (the training loss on the validation set; None without one, or when
            the loss cannot be computed there), ``val_metric``, ``lr`` (first group, after the
            epoch's last step), ``seconds``. Also written as ``history.csv`` beside the
            checkpoints (columns named after the validation metric), with ``curves.png``.
        epochs_run: epochs trained by this call (0 when the checkpoint was already final).
        completed: all ``epochs`` are done (False after ``max_epochs_this_run`` stopped it).
        resumed_from: the epoch of the checkpoint this call resumed from, or None.
    """

    best_epoch: int
    best_metric: float | None
    train_seconds: float
    history: list[dict[str, Any]]
    epochs_run: int
    completed: bool
    resumed_from: int | None = None


# ------------------------------------------------------------------------------- schedule


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based).

    The schedule is evaluated at the end of the step, so no step runs at zero:
    ``(step + 1) / warmup_steps`` during warm-up (reaching 1 at its last step), then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (step + 1 - warmup_steps) / (total_steps - warmup_steps)``, which reaches
    ``min_ratio`` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, max(0.0, (step + 1 - warmup_steps) / decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at_step(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` for a group whose peak is ``base_lr``."""
    return base_lr * warmup_cosine_factor(step, total_steps, warmup_steps, min_lr / base_lr)


# -------------------------------------------------------------------------------- helpers


def _improved(metric: float | None, best: float | None, best_epoch: int | None) -> bool:
    """Higher is better; ties keep the earlier epoch; NaN never wins over a number."""
    if best_epoch is None or metric is None:
        return True
    if math.isnan(metric):
        return False
    return best is None or math.isnan(best) or metric > best


def _concat(items: list[Any]) -> Any:
    """Concatenate per-batch outputs along dim 0 (tensors, or tuples/lists/dicts of them)."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([t.reshape(1) if t.dim() == 0 else t for t in items])
    if isinstance(first, Mapping):
        return {k: _concat([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([it[i] for it in items]) for i in range(len(first)))
    return items


def _to_cpu_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu() if obj.is_floating_point() else obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu_float(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cpu_float(v) for v in obj)
    return obj


def _fmt_seconds(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds))))


HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_metric", "lr", "seconds")
"""Columns of ``history.csv``; ``val_metric`` is written under the metric's own name."""


def write_history(path: str | Path, history: Sequence[Mapping[str, Any]], metric_name: str = "val_metric") -> Path:
    """Write the per-epoch history as CSV (atomically): ``epoch, train_loss, val_loss,
    <metric_name>, lr, seconds``; undefined values are empty cells."""
    names = [metric_name if c == "val_metric" else c for c in HISTORY_COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    for rec in history:
        row = []
        for c in HISTORY_COLUMNS:
            v = rec.get(c)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            row.append("" if not ok else (str(int(v)) if c == "epoch" else f"{float(v):.6g}"))
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def write_curves(path: str | Path, history: Sequence[Mapping[str, Any]], metric_name: str = "val_metric",
                 best_epoch: int | None = None) -> Path | None:
    """``curves.png``: losses and the validation metric per epoch (a missing plotting
    backend only skips the figure; the history CSV holds the numbers)."""
    try:
        from medvit.evaluation.figures import learning_curves_figure  # matplotlib: ~2 s, only when drawing
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        logger.warning("curves.png not drawn: %s", exc)
        return None
    return learning_curves_figure({"": (list(history), metric_name, best_epoch)}, path)


class _TqdmHandler(logging.Handler):
    """Warnings on the terminal without breaking the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


# -------------------------------------------------------------------------------- trainer


class Trainer:
    """Train a model on a map-style dataset of dict samples, select it on a validation set.

    Args:
        model: any ``nn.Module``; moved to the config's device. Its parameters with
            ``requires_grad=False`` are frozen (not given to the optimizer).
        train_dataset: map-style dataset (``__len__`` and ``__getitem__``) whose samples are
            dicts with at least ``image`` and ``label`` (tensors) and optionally
            ``patient_id`` (str) and other keys; ``(image, label)`` tuples are accepted too.
            If it has ``set_epoch(epoch)`` (0-based), it is called before every epoch, so its
            random augmentations can be made a function of (seed, epoch, index).
        val_dataset: the same for validation (None: no validation, the last epoch is the best).
        config: a :class:`TrainConfig` (or a mapping for :meth:`TrainConfig.from_dict`).
        out_dir: folder for ``checkpoints/`` and ``train.log`` (created).
        loss_fn: ``loss_fn(outputs, batch) -> scalar tensor``; ``batch`` is the whole dict
            on the device, so a loss can use any key.
        val_metric_fn: ``val_metric_fn(outputs, targets) -> float``, higher is better;
            ``outputs`` are the model's outputs over the validation set concatenated along
            dim 0 (float32, CPU) and ``targets`` the ``label`` values likewise. Its
            ``metric_name`` attribute, when set, names the metric in the log, ``history.csv``
            and ``curves.png`` (default ``val_metric``).
        collate_fn: DataLoader ``collate_fn`` (default: PyTorch's).
        param_groups: optimizer groups for :meth:`build_optimizer`: dicts with ``params``
            and optionally ``lr_scale`` (multiplies ``config.lr``; e.g. layer-wise decay),
            ``lr``, ``weight_decay`` (given: used for every parameter of the group; absent:
            the no-decay rule applies), ``name``. Together they must cover every trainable
            parameter.
        progress: show tqdm bars on stderr (refreshed every 30 s when stderr is not a
            terminal, e.g. SLURM logs).
    """

    def __init__(self, model: nn.Module, train_dataset: Dataset, val_dataset: Dataset | None,
                 config: TrainConfig | Mapping[str, Any], out_dir: str | Path,
                 loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor],
                 val_metric_fn: Callable[[Any, Any], float] | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 param_groups: Sequence[Mapping[str, Any]] | None = None, progress: bool = True):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.dist, self.device = setup_distributed(resolve_device(self.config.device))
        # bf16 "auto" in one process: time this model's own step in both precisions at the
        # start of fit() (_choose_bf16); with several processes every rank must choose alike,
        # so the machine-wide matmul probe decides.
        self._probe_bf16 = (self.config.bf16 == "auto" and not self.dist.enabled
                            and bf16_supported(self.device))
        self.bf16 = False if self._probe_bf16 else resolve_bf16(self.config.bf16, self.device)
        if self.dist.enabled and self.device.type == "cuda":
            # BatchNorm statistics over the global batch, as in a single-process run
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.num_workers = resolve_num_workers(self.config.num_workers, self.device)
        if self.config.retain_freed_memory:
            # a process-level setting (glibc's malloc, for the rest of this process), applied
            # here because the training config chooses it; later Trainers change nothing
            retain_freed_memory()
        set_tf32(self.device, self.config.tf32)
        self.model = model.to(self.device)
        if self.config.channels_last:
            apply_channels_last(self.model)
        compile_model(self.model, self.config.compile)
        self._ddp: DistributedDataParallel | None = None
        if self.dist.enabled:
            if self.config.batch_size < self.dist.world_size:
                raise ConfigError(f"train.batch_size: {self.config.batch_size} is the global batch and must be at "
                                  f"least the number of processes ({self.dist.world_size})")
            self._ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.ddp_find_unused_parameters)
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.loss_fn = loss_fn
        self.val_metric_fn = val_metric_fn
        self.val_metric_name = str(getattr(val_metric_fn, "metric_name", None) or "val_metric")
        self._val_loss: list[float] | None = None  # [loss sum, samples] of the running validation
        self.collate_fn = collate_fn
        self.param_groups = param_groups
        self.progress = progress
        if val_dataset is not None and val_metric_fn is None:
            raise TrainingError("a validation set needs a val_metric_fn (higher is better)")
        try:
            n_train = len(train_dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TrainingError("the training dataset must be map-style (have __len__)") from None
        if n_train == 0:
            raise TrainingError("the training set is empty: no sample to train on")
        # A last batch of one sample breaks BatchNorm in training mode: drop it (one sample
        # per epoch, a different one each epoch since the order is shuffled).
        self.drop_last = n_train % self.config.batch_size == 1 and n_train > 1
        micro = len(GlobalBatchSampler(n_train, self.config.batch_size, 0, drop_last=self.drop_last,
                                       world_size=self.dist.world_size))
        if micro == 0:
            raise TrainingError(f"{n_train} training samples make no batch for {self.dist.world_size} processes")
        self.micro_batches_per_epoch = micro
        self.steps_per_epoch = math.ceil(micro / self.config.accumulate)
        self.total_steps = self.steps_per_epoch * self.config.epochs
        self.warmup_steps = int(round(self.config.warmup_epochs * self.steps_per_epoch))

        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.epoch = 0                 # 0-based index of the epoch being trained
        self.epochs_done = 0           # completed epochs (1-based number of the last one)
        self.global_step = 0           # optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_metric: float | None = None
        self.train_seconds = 0.0
        self._trained_params: list[nn.Parameter] = []
        self._last_valid = False       # checkpoints/last is known to be valid (written or verified)
        self._best_valid = False
        self._epochs_run = 0
        self._max_epochs_this_run: int | None = None
        self._run_start = 0.0
        self._run_steps = 0
        self._resume_batch = 0         # micro-batches of epoch `epochs_done` done before a SIGTERM
        self._resume_partial: dict[str, float] = {}
        self._signal: int | None = None
        self._parent_pid: int | None = None
        self._epoch_t0 = 0.0

    # Set True in a subclass whose model leaves some trainable parameters unused in a forward
    # pass (DistributedDataParallel then looks for them every step, which costs time).
    ddp_find_unused_parameters = False

    # ------------------------------------------------------------------ building blocks

    def initialize(self) -> None:
        """Build the optimizer and scheduler (once; :meth:`fit` calls it)."""
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()
            self._trained_params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.scheduler = self.build_scheduler(self.optimizer)

    def _no_decay_names(self) -> set[str]:
        hook = getattr(self.model, "no_weight_decay", None)
        return set(hook()) if callable(hook) else set()

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (PyTorch's fused kernel where it runs: one pass
        over all parameters, faster than the default per-tensor loops on the CPU).

        Without ``param_groups``: two groups, weight decay on weights with >= 2 dimensions,
        none on biases, norm parameters (1-D) and ``model.no_weight_decay()`` names (timm's
        convention, e.g. ``pos_embed``, ``cls_token``). With ``param_groups``: each group is
        split the same way unless it sets ``weight_decay``; ``lr = config.lr * lr_scale``.
        """
        cfg = self.config
        names = {id(p): n for n, p in self.model.named_parameters()}
        no_decay_names = self._no_decay_names()
        source = self.param_groups or [{"params": list(self.model.parameters())}]
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for i, spec in enumerate(source):
            params = [p for p in spec["params"] if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            scale = float(spec.get("lr_scale", 1.0))
            extra = {"lr": float(spec.get("lr", cfg.lr * scale)), "lr_scale": scale,
                     "name": spec.get("name", f"group{i}")}
            if "weight_decay" in spec:
                groups.append({"params": params, "weight_decay": float(spec["weight_decay"]), **extra})
                continue
            decay = [p for p in params if p.ndim >= 2 and names.get(id(p)) not in no_decay_names]
            no_decay = [p for p in params if not (p.ndim >= 2 and names.get(id(p)) not in no_decay_names)]
            groups.append({"params": decay, "weight_decay": cfg.weight_decay, **extra})
            groups.append({"params": no_decay, "weight_decay": 0.0, **extra, "name": extra["name"] + "_no_decay"})
        groups = [g for g in groups if g["params"]]
        left_out = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in seen]
        if left_out:
            raise TrainingError(f"param_groups leave {len(left_out)} trainable parameter(s) out "
                                f"(e.g. {left_out[:3]}): add them to a group or set requires_grad=False")
        if not groups:
            raise TrainingError("the model has no trainable parameter")
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw_supported(groups))

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear warm-up, then cosine decay to ``min_lr`` (scaled like each group's peak),
        one scheduler step per optimizer step (see :func:`warmup_cosine_factor`)."""
        total, warmup = self.total_steps, self.warmup_steps
        min_ratio = self.config.min_lr / self.config.lr

        def factor(step: int) -> float:
            return warmup_cosine_factor(step, total, warmup, min_ratio)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def build_dataloader(self, dataset: Dataset, train: bool, epoch: int, start_batch: int = 0) -> DataLoader:
        """A DataLoader whose order and worker seeds depend only on (seed, train/val, epoch).

        Training batches come from a :class:`GlobalBatchSampler`: the epoch's order is the
        same for any number of processes, and this process gets its share of each global
        batch; ``start_batch`` skips the global batches a preempted run already trained.
        Validation batches are the whole validation set, in order, on every process.
        """
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        cfg = self.config
        workers = self.num_workers
        if workers > 0 and callable(getattr(dataset, "warm_cache", None)):
            # Workers are new processes each epoch: whatever they decode is lost when they end.
            # Decoding once here, before they fork, is what makes later epochs decode nothing.
            dataset.warm_cache(num_workers=workers)
        generator = make_generator(derive_seed(cfg.seed, "train-loader" if train else "val-loader", epoch))
        common: dict[str, Any] = {"num_workers": workers, "collate_fn": self.collate_fn,
                                  "pin_memory": self.device.type == "cuda", "generator": generator,
                                  "worker_init_fn": worker_init_fn if workers > 0 else None}
        if not train:
            return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, **common)
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size,  # type: ignore[arg-type]
                                     derive_seed(cfg.seed, "train-order", epoch), shuffle=True,
                                     drop_last=self.drop_last, rank=self.dist.rank, world_size=self.dist.world_size,
                                     start_batch=start_batch)
        return DataLoader(dataset, batch_sampler=sampler, **common)

    # ---------------------------------------------------------------------------- steps

    def _to_device(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device, non_blocking=True)
        if isinstance(obj, Mapping):
            return {k: self._to_device(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_device(v) for v in obj)
        return obj

    def prepare_batch(self, batch: Any) -> dict[str, Any]:
        """A loader's batch as a dict on the device (``(image, label)`` pairs become a dict)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            batch = {"image": batch[0], "label": batch[1]}
        if not isinstance(batch, Mapping) or "image" not in batch:
            got = f"a dict with keys {list(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
            raise TrainingError(f"a batch must be a dict with an 'image' entry (and 'label'); got {got}")
        batch = self._to_device(dict(batch))
        if self.config.channels_last and isinstance(batch["image"], torch.Tensor):
            batch["image"] = channels_last_input(batch["image"])
        return batch

    def forward(self, batch: dict[str, Any]) -> Any:
        """The model's outputs for a batch (default: ``model(batch["image"])``)."""
        return self.model(batch["image"])

    def train_step(self, batch: dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one micro-batch under autocast.

        Args:
            batch: the batch dict on the device.
            scale: factor of the loss for the backward pass (1 / micro-batches of the
                accumulation group), so accumulated gradients are those of the mean loss.

        Returns:
            the unscaled loss, detached.

        Raises:
            TrainingError: the loss is NaN or infinite.
        """
        with autocast_context(self.device, self.bf16):
            outputs = self.forward(batch)
            loss = self.loss_fn(outputs, batch)
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"the loss is {loss.item()} at epoch {self.epoch + 1}, optimizer step {self.global_step + 1}: "
                "training diverged. Lower train.lr, keep train.grad_clip on, or set train.bf16: false")
        (loss.float() * scale).backward()
        return loss.detach().float()

    def optimizer_step(self) -> None:
        """Clip the gradient norm, step the optimizer and the scheduler, clear the gradients."""
        assert self.optimizer is not None and self.scheduler is not None
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._trained_params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def validation_step(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(outputs, targets) of one validation batch, float32 on the CPU."""
        with autocast_context(self.device, self.bf16):
            outputs = self.forward(batch)
            self._add_val_loss(outputs, batch)
        return _to_cpu_float(outputs), _to_cpu_float(batch.get("label"))

    def _add_val_loss(self, outputs: Any, batch: dict[str, Any]) -> None:
        """Add one validation batch's training loss to the running validation loss (stops
        for the rest of the pass when the loss cannot be computed on validation outputs, e.g.
        a loss that needs training-only outputs)."""
        if self._val_loss is None:
            return
        try:
            loss = float(self.loss_fn(outputs, batch))
        except Exception as exc:  # noqa: BLE001 - the validation loss is informative only
            logger.debug("validation loss not computed: %s", exc)
            self._val_loss = None
            return
        image = batch.get("image") if isinstance(batch, dict) else None
        n = int(image.shape[0]) if isinstance(image, torch.Tensor) and image.ndim else 1
        self._val_loss[0] += loss * n
        self._val_loss[1] += n

    def _bar(self, inner: bool = False, **kwargs: Any) -> tqdm:
        """A progress bar on stderr. In a log file (stderr not a terminal) only the epoch bar
        is drawn, at most every 30 s: step bars would add two lines per epoch."""
        interactive = sys.stderr.isatty()
        disable = not self.progress or (inner and not interactive) or not self.dist.is_main
        return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True,
                    mininterval=0.1 if interactive else 30.0, **kwargs)

    @contextlib.contextmanager
    def _parallel_model(self, sync: bool) -> Any:
        """In a distributed run, make ``self.model`` the DistributedDataParallel wrapper for a
        training step (its gradients are then averaged across processes in the backward pass;
        ``sync=False`` skips that for a micro-batch whose gradients are accumulated)."""
        if self._ddp is None:
            yield
            return
        raw = self.model
        self.model = self._ddp  # type: ignore[assignment]
        try:
            with contextlib.nullcontext() if sync else self._ddp.no_sync():
                yield
        finally:
            self.model = raw

    def train_epoch(self, epoch: int) -> float:
        """Train one epoch (from micro-batch ``start`` when resuming a preempted run); return
        its mean training loss over samples (over all processes).

        Raises:
            TrainingInterrupted: a SIGTERM arrived; ``checkpoints/last`` holds this step.
        """
        assert self.optimizer is not None
        cfg = self.config
        start, partial = self._resume_batch, self._resume_partial
        self._resume_batch, self._resume_partial = 0, {}
        (self._ddp or self.model).train()
        loader = self.build_dataloader(self.train_dataset, train=True, epoch=epoch, start_batch=start)
        global_sizes = loader.batch_sampler.global_sizes()  # type: ignore[union-attr]
        n = start + len(loader)
        # the sums over all processes of the batches trained before a SIGTERM, counted once
        loss_sum = float(partial.get("loss_sum", 0.0)) if self.dist.is_main else 0.0
        samples = float(partial.get("samples", 0)) if self.dist.is_main else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        with self._bar(inner=True, total=n, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       leave=False) as bar:
            for j, raw in enumerate(loader):
                i = start + j
                batch = self.prepare_batch(raw)
                size = int(batch["image"].shape[0]) if isinstance(batch["image"], torch.Tensor) else 1
                group_start = i - i % cfg.accumulate
                scale = 1.0 / min(cfg.accumulate, n - group_start)
                if self.dist.enabled:
                    # DDP averages gradients over processes: weighting by this process's share
                    # of the global batch makes that the gradient of the global mean loss.
                    scale *= size * self.dist.world_size / global_sizes[j]
                sync = (i + 1) % cfg.accumulate == 0 or i + 1 == n
                with self._parallel_model(sync):
                    loss = self.train_step(batch, scale=scale)
                value = float(loss)
                loss_sum += value * size
                samples += size
                if sync:
                    self.optimizer_step()
                    self.global_step += 1
                    self._run_steps += 1
                    if cfg.log_every and self.global_step % cfg.log_every == 0:
                        self._log_step(epoch, i + 1, n, value)
                    if i + 1 < n and self._signal_pending():
                        self._save_on_signal(epoch, i + 1, loss_sum, samples)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        loss_sum, samples = all_reduce_sum([loss_sum, samples], self.dist)
        return loss_sum / max(samples, 1)

    @torch.no_grad()
    def validate(self) -> float | None:
        """The validation metric of the current weights (higher is better); None without a
        validation set."""
        if self.val_dataset is None or len(self.val_dataset) == 0:  # type: ignore[arg-type]
            return None
        self.model.eval()
        loader = self.build_dataloader(self.val_dataset, train=False, epoch=self.epoch)
        outputs, targets = [], []
        self._val_loss = [0.0, 0]
        with self._bar(inner=True, total=len(loader), desc="validation", unit="batch", leave=False) as bar:
            for raw in loader:
                out, tgt = self.validation_step(self.prepare_batch(raw))
                outputs.append(out)
                targets.append(tgt)
                bar.update(1)
        assert self.val_metric_fn is not None
        return float(self.val_metric_fn(_concat(outputs), _concat(targets)))

    # ------------------------------------------------------------------------- hooks

    def on_epoch_start(self, epoch: int) -> None:
        """Called before epoch ``epoch`` (0-based) trains."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Called after epoch ``epoch`` (0-based) is validated and checkpointed."""

    def should_stop(self, epoch: int) -> bool:
        """Whether to stop before epoch ``epoch`` (0-based); by default after
        ``max_epochs_this_run`` epochs of this :meth:`fit` call (e.g. to fit a SLURM time
        limit: the next ``fit(resume=True)`` continues)."""
        return self._max_epochs_this_run is not None and self._epochs_run >= self._max_epochs_this_run

    def checkpoint_state(self) -> dict[str, Any]:
        """The non-tensor training state stored with every checkpoint."""
        return {"epoch": self.epochs_done, "global_step": self.global_step, "best_epoch": self.best_epoch,
                "best_metric": self.best_metric, "history": self.history, "train_seconds": self.train_seconds,
                "rng": get_rng_state(), "config": self.config.to_dict(),
                "train_samples": len(self.train_dataset),  # type: ignore[arg-type]
                "steps_per_epoch": self.steps_per_epoch}

    # ------------------------------------------------------------------- checkpoints

    def _stem(self, name: str) -> Path:
        return self.checkpoint_dir / name

    def _present(self, name: str) -> bool:
        return any(f.exists() for f in checkpoint_files(self._stem(name)))

    def _set_aside(self, names: Iterable[str]) -> None:
        for name in names:
            for f in checkpoint_files(self._stem(name)):
                if f.exists():
                    f.replace(f.with_name(f.name + ".corrupt"))

    def _find_resume_checkpoint(self) -> tuple[str, LoadedCheckpoint] | None:
        """The newest valid checkpoint among ``last`` and ``prev``."""
        present = [n for n in ("last", "prev") if self._present(n)]
        for name in present:
            try:
                return name, read_checkpoint(self._stem(name))
            except CorruptCheckpointError as exc:
                logger.warning("checkpoint %s is unusable: %s", name, exc)
        if present:
            logger.warning("no valid checkpoint in %s: starting from scratch; the unusable files were renamed "
                           "to *.corrupt", self.checkpoint_dir)
            barrier(self.dist)  # every process has read them before rank 0 renames them
            if self.dist.is_main:
                self._set_aside(("last", "prev", "best", "best_prev"))
        return None

    def _check_compatible(self, ckpt: LoadedCheckpoint) -> None:
        state, now = ckpt.state, self.config.to_dict()
        saved = state.get("config") or {}
        diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS if saved.get(k) != now[k]]
        n_train = len(self.train_dataset)  # type: ignore[arg-type]
        if state.get("train_samples") != n_train:
            diffs.append(f"training samples: {state.get('train_samples')} -> {n_train}")
        if diffs:
            raise CheckpointError(
                f"{ckpt.path} was written by a run with other settings ({'; '.join(diffs)}); resuming would mix "
                f"two trainings. Delete {self.checkpoint_dir} or call fit(resume=False) to start over")

    def _restore(self, name: str, ckpt: LoadedCheckpoint) -> None:
        self._check_compatible(ckpt)
        state = apply_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        self.epochs_done = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_epoch = state["best_epoch"]
        self.best_metric = state["best_metric"]
        self.train_seconds = float(state["train_seconds"])
        self._resume_batch = int(state.get("batch", 0))
        self._resume_partial = dict(state.get("partial") or {})
        set_rng_state(state["rng"])
        self._last_valid = name == "last"
        self._best_valid = self._recover_best()

    @property
    def _validates(self) -> bool:
        return self.val_dataset is not None and len(self.val_dataset) > 0  # type: ignore[arg-type]

    def _recover_best(self) -> bool:
        """Make ``checkpoints/best`` hold epoch ``best_epoch`` again after a crash (from
        ``best_prev`` if the crash hit while ``best`` was being replaced)."""
        if self.best_epoch is None:
            return False
        if not self._validates:
            return True  # no validation: the best epoch is the last one, held by checkpoints/last
        for name in ("best", "best_prev"):
            if not self._present(name):
                continue
            try:
                ckpt = read_checkpoint(self._stem(name))
            except CorruptCheckpointError as exc:
                logger.warning("checkpoint %s is unusable: %s", name, exc)
                continue
            if ckpt.state.get("epoch") == self.best_epoch:
                if name == "best_prev" and self.dist.is_main:
                    copy_checkpoint(self._stem("best_prev"), self._stem("best"))
                return True
        logger.warning("the best checkpoint (epoch %s) is lost; the best will be selected again from the "
                       "epochs that follow", self.best_epoch)
        self.best_epoch, self.best_metric = None, None
        return False

    def _save(self, improved: bool) -> None:
        """Checkpoint the finished epoch. ``best`` is written before ``last``, and each is
        copied to its ``*prev`` before being replaced, so whatever instant a crash hits,
        a valid ``last`` or ``prev`` and the best of the run survive. Rank 0 writes, the other
        processes wait for it."""
        if not self.dist.is_main:
            self._best_valid = self._best_valid or improved
            self._last_valid = True
            barrier(self.dist)
            return
        if improved and self._validates:  # without validation `last` is the best: no second copy
            if self._best_valid:
                copy_checkpoint(self._stem("best"), self._stem("best_prev"))
            save_checkpoint(self._stem("best"), self.model,
                            state={"epoch": self.epochs_done, "metric": self.best_metric})
            self._best_valid = True
        if self._last_valid:
            copy_checkpoint(self._stem("last"), self._stem("prev"))
        save_checkpoint(self._stem("last"), self.model, self.optimizer, self.scheduler, self.checkpoint_state())
        self._last_valid = True
        barrier(self.dist)

    # ------------------------------------------------------------------- preemption

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is None:
            logger.warning("received %s: checkpointing at the next optimizer step, then stopping",
                           signal.Signals(signum).name)
        self._signal = signum

    def _signal_pending(self) -> bool:
        """Whether a SIGTERM reached this process or (distributed) any other one, or the
        process that started this one has died (treated as a SIGHUP: an orphaned trainer
        must not go on writing results after its workflow has gone)."""
        if self._signal is None and self._parent_pid is not None and os.getppid() != self._parent_pid:
            logger.warning("the parent process (pid %d) has died: checkpointing and stopping", self._parent_pid)
            self._signal = signal.SIGHUP
        return any_process(self._signal is not None, self.dist)

    def _save_on_signal(self, epoch: int, batch: int, loss_sum: float, samples: float) -> None:
        """Write ``checkpoints/last`` at micro-batch ``batch`` of epoch ``epoch`` (0-based) and
        raise :class:`TrainingInterrupted`."""
        loss_sum, samples = all_reduce_sum([loss_sum, samples], self.dist)
        seconds = time.perf_counter() - self._epoch_t0
        if self.dist.is_main:
            if self._last_valid:
                copy_checkpoint(self._stem("last"), self._stem("prev"))
            state = {**self.checkpoint_state(), "batch": batch,
                     "partial": {"loss_sum": loss_sum, "samples": samples, "seconds": seconds}}
            save_checkpoint(self._stem("last"), self.model, self.optimizer, self.scheduler, state)
            logger.info("SIGTERM: saved checkpoints/last at epoch %d, batch %d of %d (step %d)", epoch + 1, batch,
                        self.micro_batches_per_epoch, self.global_step)
        barrier(self.dist)
        raise TrainingInterrupted(self._stem("last"), epoch, batch, self._signal or signal.SIGTERM)

    @contextlib.contextmanager
    def _signal_handler(self) -> Any:
        """Catch SIGTERM while training (only possible in the main thread)."""
        self._signal = None
        self._parent_pid = os.getppid()
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _load_best(self) -> None:
        if self.best_epoch is None or self.best_epoch == self.epochs_done:
            return  # the model already holds the best (or only) weights
        ckpt = read_checkpoint(self._stem("best"))
        load_model_state(self.model, ckpt.model_state, source=ckpt.path)

    # --------------------------------------------------------------------------- fit

    def _log_step(self, epoch: int, batch: int, n: int, loss: float) -> None:
        assert self.optimizer is not None
        elapsed = time.perf_counter() - self._run_start
        remaining = self.total_steps - self.global_step
        eta = elapsed / max(self._run_steps, 1) * remaining
        logger.info("epoch %d/%d batch %d/%d step %d loss %.4f lr %.3e eta %s", epoch + 1, self.config.epochs,
                    batch, n, self.global_step, loss, self.optimizer.param_groups[0]["lr"], _fmt_seconds(eta))

    def _open_log(self) -> list[logging.Handler]:
        if not self.dist.is_main:  # rank 0 keeps the log; the others report warnings only
            logger.setLevel(logging.WARNING)
            return []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.out_dir / "train.log", mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers: list[logging.Handler] = [file_handler]
        if not logging.getLogger().handlers:  # the CLI did not configure logging: warnings to the terminal
            term = _TqdmHandler(logging.WARNING)
            term.setFormatter(logging.Formatter("warning: %(message)s"))
            handlers.append(term)
        for h in handlers:
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
        return handlers

    def _start(self, resume: bool) -> int | None:
        """Seed, then restore the newest valid checkpoint (resume) or clear old ones."""
        seed_everything(self.config.seed, self.config.deterministic)
        if resume:
            found = self._find_resume_checkpoint()
            if found is not None:
                name, ckpt = found
                self._restore(name, ckpt)
                within = f", batch {self._resume_batch} of epoch {self.epochs_done + 1}" if self._resume_batch else ""
                logger.info("resumed from %s (epoch %d of %d%s)%s", ckpt.path.relative_to(self.out_dir),
                            self.epochs_done, self.config.epochs, within,
                            "; checkpoints/last was unusable" if name == "prev" else "")
                barrier(self.dist)
                return self.epochs_done
        # A fresh start: checkpoints of an earlier run must not mix with this one's, and a
        # Trainer that already trained starts its optimizer, schedule and records anew.
        barrier(self.dist)  # no process is still reading them
        if self.dist.is_main:
            for name in ("last", "prev", "best", "best_prev"):
                remove_checkpoint(self._stem(name))
        self.optimizer = self.scheduler = None
        self.initialize()
        self.epochs_done = self.global_step = 0
        self.history, self.best_epoch, self.best_metric, self.train_seconds = [], None, None, 0.0
        self._last_valid = self._best_valid = False
        self._resume_batch, self._resume_partial = 0, {}
        barrier(self.dist)
        return None

    def fit(self, resume: bool = True, max_epochs_this_run: int | None = None) -> TrainResult:
        """Train to ``config.epochs`` and leave the best validation weights in the model.

        Args:
            resume: continue from ``checkpoints/last`` (or ``prev`` when ``last`` is
                corrupt) if one exists; its settings must match (:data:`RESUME_KEYS` and the
                number of training samples), else :class:`CheckpointError`. When no valid
                checkpoint is left, corrupt files are renamed to ``*.corrupt`` and training
                starts over. ``False`` deletes old checkpoints and starts over.
            max_epochs_this_run: stop after this many epochs (the result's ``completed``
                is then False; call again to continue).

        Returns:
            a :class:`TrainResult`.
        """
        handlers = self._open_log()
        stack = contextlib.ExitStack()
        try:
            if self.dist.is_main:  # one writer per model folder, whichever process it is
                stack.enter_context(folder_lock(self.out_dir))
            stack.enter_context(self._signal_handler())
            self.initialize()
            if self._probe_bf16:
                self._choose_bf16()
            self._max_epochs_this_run = max_epochs_this_run
            self._epochs_run = 0
            resumed_from = self._start(resume)
            self._log_header(resumed_from)
            self._run()
            completed = self.epochs_done >= self.config.epochs
            if self.best_epoch is None:  # every validation metric was NaN, or the best was lost
                self.best_epoch = self.epochs_done
                logger.warning("no best checkpoint to load; keeping the weights of epoch %d", self.epochs_done)
            self._load_best()
            if completed:
                logger.info("done: best epoch %d (%s %s), %s of training", self.best_epoch, self.val_metric_name,
                            self.best_metric, _fmt_seconds(self.train_seconds))
            if self.dist.is_main and self.history:
                write_history(self.out_dir / "history.csv", self.history, self.val_metric_name)
                write_curves(self.out_dir / "curves.png", self.history, self.val_metric_name, self.best_epoch)
            return TrainResult(best_epoch=self.best_epoch, best_metric=self.best_metric,
                               train_seconds=self.train_seconds, history=list(self.history),
                               epochs_run=self._epochs_run, completed=completed, resumed_from=resumed_from)
        except MedvitError as exc:
            logger.error("%s", exc)   # the CLI prints it too; the log keeps it beside the epochs
            raise
        finally:
            stack.close()
            for h in handlers:
                logger.removeHandler(h)
                h.close()

    def _choose_bf16(self) -> None:
        """``bf16: auto``: time training steps of this model on its first training batch in
        fp32 and bf16 (:func:`medvit.engine.speed.probe_bf16_step`) and keep the faster. The
        probe leaves no trace: weights, buffers (BatchNorm statistics), gradients and the
        random state are restored, so a run's numbers do not depend on it."""
        from torch.utils.data import default_collate

        self._probe_bf16 = False
        n = min(self.config.batch_size, len(self.train_dataset))  # type: ignore[arg-type]
        if n == 0:
            return
        batch = self.prepare_batch((self.collate_fn or default_collate)([self.train_dataset[i] for i in range(n)]))
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        was_training = self.model.training
        self.model.train()

        def step(bf16: bool) -> None:
            self.bf16 = bf16
            self.train_step(batch)
            self.model.zero_grad(set_to_none=True)

        params, _ = count_parameters(self.model)
        shape = tuple(batch["image"].shape) if isinstance(batch["image"], torch.Tensor) else ()
        try:
            probe = probe_bf16_step(step, self.device, f"{type(self.model).__name__}|{params}|{shape}")
        finally:
            self.model.load_state_dict(state)
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.bf16 = probe.use_bf16
        logger.info("bf16 auto: a training step takes %.1f ms in fp32 and %.1f ms in bf16 (%.2fx, %s): bf16 %s",
                    probe.fp32_ms, probe.bf16_ms, probe.speedup, probe.source, "on" if self.bf16 else "off")

    def _log_header(self, resumed_from: int | None) -> None:
        params, trainable = count_parameters(self.model)
        n_val = len(self.val_dataset) if self.val_dataset is not None else 0  # type: ignore[arg-type]
        logger.info("%s: %s on %s (bf16 %s), %d params (%d trainable), %d train / %d val samples, "
                    "%d optimizer steps per epoch", "resume" if resumed_from is not None else "start",
                    type(self.model).__name__, self.device, "on" if self.bf16 else "off", params, trainable,
                    len(self.train_dataset), n_val, self.steps_per_epoch)  # type: ignore[arg-type]
        logger.info("config %s", self.config.to_dict())

    def _run(self) -> None:
        cfg = self.config
        self._run_start, self._run_steps = time.perf_counter(), 0
        with self._bar(total=cfg.epochs, initial=self.epochs_done, desc="epochs", unit="epoch") as bar:
            for epoch in range(self.epochs_done, cfg.epochs):
                if self.should_stop(epoch):
                    logger.info("stopping after epoch %d of %d as asked; fit(resume=True) continues",
                                self.epochs_done, cfg.epochs)
                    break
                self.epoch = epoch
                self.on_epoch_start(epoch)
                self._epoch_t0 = time.perf_counter() - float(self._resume_partial.get("seconds", 0.0))
                train_loss = self.train_epoch(epoch)
                self._val_loss = None
                metric = self.validate()
                val_loss = (self._val_loss[0] / self._val_loss[1] if self._val_loss and self._val_loss[1]
                            and math.isfinite(self._val_loss[0]) else None)
                seconds = time.perf_counter() - self._epoch_t0
                assert self.optimizer is not None
                record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_metric": metric,
                          "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
                self.history.append(record)
                if self.dist.is_main:
                    write_history(self.out_dir / "history.csv", self.history, self.val_metric_name)
                self.epochs_done = epoch + 1
                self.train_seconds += seconds
                improved = _improved(metric, self.best_metric, self.best_epoch)
                if improved:
                    self.best_epoch, self.best_metric = epoch + 1, metric
                t1 = time.perf_counter()
                self._save(improved)
                self._epochs_run += 1
                eta = (time.perf_counter() - self._run_start) / self._epochs_run * (cfg.epochs - epoch - 1)
                logger.info("epoch %d/%d train_loss %.4f val_loss %s %s %s lr %.3e time %.2fs checkpoint %.2fs "
                            "best %s (epoch %d) eta %s", epoch + 1, cfg.epochs, train_loss,
                            "n/a" if val_loss is None else f"{val_loss:.4f}", self.val_metric_name,
                            "n/a" if metric is None else f"{metric:.4f}", record["lr"], seconds,
                            time.perf_counter() - t1,
                            "n/a" if self.best_metric is None else f"{self.best_metric:.4f}", self.best_epoch,
                            _fmt_seconds(eta))
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", val="n/a" if metric is None else f"{metric:.4f}",
                                refresh=False)
                self.on_epoch_end(epoch, record)
                if epoch + 1 < cfg.epochs and self._signal_pending():
                    # the epoch's checkpoint is written: stop here, a rerun starts the next epoch
                    raise TrainingInterrupted(self._stem("last"), epoch + 1, 0, self._signal or signal.SIGTERM)
