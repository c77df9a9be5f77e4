"""Speed switches and the measurements that choose them: a matmul peak, a per-device bf16
probe, channels-last memory layout, ``torch.compile``, activation checkpointing, and worker
counts sized to the machine. The CPU fast paths of single operations and the process-level
settings (retained freed memory, the fast exit) are in :mod:`medvit.cpu_ops`.

Each switch is measured, not assumed: whether bf16 pays differs between CPUs (native
AVX512-BF16/AMX versus emulated), GPUs and models, so ``bf16: auto`` times the model's own
training step in both precisions (:func:`probe_bf16_step`, interleaved so a busy machine
biases neither side) and caches the verdict in ``$MEDVIT_CACHE_DIR`` (default
``~/.cache/medvit``), so every later run of the same model and batch on the same machine,
torch and device makes the same choice (runs stay reproducible). :func:`probe_bf16` (a bare
matmul) decides for multi-process runs, where every rank must choose alike. Both probes keep
their verdicts in one file, ``bf16_probe.json`` (:func:`cached_verdict`, :func:`store_verdict`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
from torch import nn

from medvit.fileio import atomic_write_json
from medvit.system import available_cpus

PROBE_MARGIN = 1.1   # bf16 must be at least 10% faster than fp32 to be chosen


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def default_matmul_size(device: torch.device) -> int:
    """Side n of the n x n matmuls that measure a device's peak: large enough to reach it."""
    return 4096 if device.type == "cuda" else 1024


def matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                 repeats: int = 5) -> float:
    """Best achieved FLOP/s of an ``n x n @ n x n`` matmul over ``repeats`` calls (after one warm-up).

    Args:
        device: where to run it.
        dtype: ``torch.float32`` or ``torch.bfloat16``.
        n: matrix side (default 1024 on CPU, 4096 on GPU: large enough to reach the peak).
        repeats: timed calls; the best one counts (least disturbed by other processes).
    """
    device = torch.device(device)
    n = n or default_matmul_size(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_peak(device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Measured matmul peak in FLOP/s: ``{"fp32": ..., "bf16": ...}``, the yardstick of the
    "fraction of peak" figures (a model cannot beat the best dense matmul of its device)."""
    return {"fp32": matmul_flops(device, torch.float32, n, repeats),
            "bf16": matmul_flops(device, torch.bfloat16, n, repeats)}


# -------------------------------------------------------------------------------- bf16 probe


@dataclass(frozen=True)
class BF16Probe:
    """Result of :func:`probe_bf16`.

    Attributes:
        key: the machine/torch/device the verdict holds for.
        fp32_gflops, bf16_gflops: measured matmul rates (GFLOP/s).
        speedup: ``bf16_gflops / fp32_gflops``.
        use_bf16: the verdict (``speedup >= PROBE_MARGIN``).
        source: ``"measured"`` now or ``"cache"``.
    """

    key: str
    fp32_gflops: float
    bf16_gflops: float
    speedup: float
    use_bf16: bool
    source: str


def device_key(device: torch.device | str) -> str:
    """A string naming the hardware and software a speed measurement depends on."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.lower().startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"{name} x{torch.get_num_threads()} threads"
    return f"{device.type}|{name}|torch {torch.__version__}"


def cache_dir() -> Path:
    """Where measured verdicts are kept: ``$MEDVIT_CACHE_DIR``, else ``~/.cache/medvit``."""
    return Path(os.environ.get("MEDVIT_CACHE_DIR") or Path.home() / ".cache" / "medvit")


# One file holds every bf16 verdict, keyed by :func:`device_key` (the matmul probe) or by
# ``device_key|model_key|steps vN`` (the step probe); each entry is its result's fields but
# ``key`` and ``source``.
BF16_CACHE_FILE = "bf16_probe.json"
# step verdicts written by earlier medvit versions: read (never written), so a machine keeps
# the verdicts it measured before the two probes shared one file
_LEGACY_STEP_CACHE_FILE = "bf16_steps.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    data = _read_cache(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass  # a read-only home: the verdict still holds for this process


_Verdict = TypeVar("_Verdict", "BF16Probe", "StepProbe")


def cached_verdict(key: str, kind: type[_Verdict]) -> _Verdict | None:
    """The bf16 verdict cached under ``key`` as a ``kind`` with ``source="cache"``, or None when
    there is none (or it is in an older format: measure again)."""
    for name in (BF16_CACHE_FILE, _LEGACY_STEP_CACHE_FILE):
        hit = _read_cache(cache_dir() / name).get(key)
        if isinstance(hit, dict):
            try:
                return kind(**{**hit, "key": key, "source": "cache"})
            except TypeError:
                pass  # an older format: measure again
    return None


def store_verdict(result: BF16Probe | StepProbe) -> None:
    """Keep a measured bf16 verdict in ``<cache_dir>/bf16_probe.json`` under its key."""
    entry = {k: v for k, v in asdict(result).items() if k not in ("key", "source")}
    _write_cache(cache_dir() / BF16_CACHE_FILE, result.key, entry)


def probe_bf16(device: torch.device | str = "cpu", use_cache: bool = True, n: int | None = None,
               repeats: int = 6) -> BF16Probe:
    """Measure whether bf16 matmuls beat fp32 on ``device``; cache the verdict on disk.

    The two precisions alternate call by call (best of ``repeats`` each), so load from other
    processes affects both alike. The verdict is read back from the cache on later calls (same
    machine, thread count, torch and device), keeping ``bf16: auto`` stable between runs; delete
    ``<cache_dir>/bf16_probe.json`` (which holds the step probe's verdicts too) to measure again.

    Args:
        device: the training device.
        use_cache: read and write the cache (``False``: always measure, write nothing).
        n: matrix side (default 1024 CPU / 4096 GPU).
        repeats: timed calls per precision.
    """
    device = torch.device(device)
    key = device_key(device)
    cached = cached_verdict(key, BF16Probe) if use_cache else None
    if cached is not None:
        return cached
    n = n or default_matmul_size(device)
    mats = {dt: (torch.randn(n, n, device=device).to(dt), torch.randn(n, n, device=device).to(dt))
            for dt in (torch.float32, torch.bfloat16)}
    best = {dt: float("inf") for dt in mats}
    for i in range(repeats + 1):
        for dt, (a, b) in mats.items():
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            if i:  # the first round warms up
                best[dt] = min(best[dt], time.perf_counter() - t0)
    fp32, bf16 = (2 * n**3 / best[dt] / 1e9 for dt in (torch.float32, torch.bfloat16))
    result = BF16Probe(key, round(fp32, 2), round(bf16, 2), round(bf16 / fp32, 3), bf16 / fp32 >= PROBE_MARGIN,
                       "measured")
    if use_cache:
        store_verdict(result)
    return result


@dataclass(frozen=True)
class StepProbe:
    """Result of :func:`probe_bf16_step`.

    Attributes:
        key: the machine/torch/device and model/batch the verdict holds for.
        fp32_ms, bf16_ms: best measured time of one training step (forward + backward).
        speedup: ``fp32_ms / bf16_ms``.
        use_bf16: the verdict (``speedup >= PROBE_MARGIN``).
        source: ``"measured"`` now or ``"cache"``.
    """

    key: str
    fp32_ms: float
    bf16_ms: float
    speedup: float
    use_bf16: bool
    source: str


# Part of every cached step verdict's key: raised when medvit changes what a bf16 step runs
# (2: unfused attention under CPU autocast), so verdicts measured before are not reused.
STEP_PROBE_REVISION = 2


def probe_bf16_step(step: Callable[[bool], Any], device: torch.device | str, model_key: str, repeats: int = 3,
                    use_cache: bool = True) -> StepProbe:
    """Measure whether whole training steps of one model run faster under bf16 autocast.

    A bare matmul (:func:`probe_bf16`) is an optimistic proxy: casts, norms and small kernels
    can make a model's bf16 step slower than its fp32 step on a CPU whose bf16 matmuls are
    twice as fast. ``step(bf16)`` runs one forward + backward of the real model on a real
    batch; fp32 and bf16 steps alternate (one warm-up each, then best of ``repeats``), so load
    from other processes affects both alike. The verdict is cached per machine and
    ``model_key`` (architecture, parameter count, batch shape) in ``<cache_dir>/bf16_probe.json``
    beside the matmul verdicts.

    Args:
        step: runs one training step in bf16 (``True``) or fp32 (``False``); the caller keeps
            it free of side effects (no optimizer step, gradients cleared).
        device: the training device.
        model_key: what besides the machine the timing depends on.
        repeats: timed steps per precision.
        use_cache: read and write the cache.
    """
    device = torch.device(device)
    key = f"{device_key(device)}|{model_key}|steps v{STEP_PROBE_REVISION}"
    cached = cached_verdict(key, StepProbe) if use_cache else None
    if cached is not None:
        return cached
    best = {False: float("inf"), True: float("inf")}
    for i in range(repeats + 1):
        for bf16 in (False, True):
            sync(device)
            t0 = time.perf_counter()
            step(bf16)
            sync(device)
            if i:  # the first round warms up (allocator, kernel selection)
                best[bf16] = min(best[bf16], time.perf_counter() - t0)
    speedup = best[False] / best[True]
    result = StepProbe(key, round(best[False] * 1e3, 3), round(best[True] * 1e3, 3), round(speedup, 3),
                       speedup >= PROBE_MARGIN, "measured")
    if use_cache:
        store_verdict(result)
    return result


# ----------------------------------------------------------------------------- layouts


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Put 4-D parameters/buffers (2-D conv weights) in ``channels_last`` and 5-D ones (3-D conv
    weights) in ``channels_last_3d``, in place; returns ``model``.

    Convolutions on CPU (oneDNN) and on GPU tensor cores prefer channels-last; the model's
    outputs and ``state_dict`` values are unchanged (only the strides differ).
    """
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is None or tensor.dim() not in (4, 5):
                continue
            fmt = torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d
            tensor.data = tensor.data.contiguous(memory_format=fmt)
    return model


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) or (B, C, D, H, W) batch in channels-last layout (other tensors unchanged)."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def compile_model(model: nn.Module, enabled: bool = True, **kwargs: Any) -> nn.Module:
    """``model.compile()`` in place (TorchInductor; CPU and GPU) when ``enabled``; returns ``model``.

    In place, so the parameter names, ``state_dict`` and checkpoints stay those of the eager
    model. Compilation happens at the first call (tens of seconds); it pays for long runs
    only, so it is off by default.
    """
    if enabled:
        model.compile(**kwargs)
    return model


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """On a CUDA device, let fp32 matmuls and convolutions run on TF32 tensor cores (Ampere and
    later; ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``,
    process-wide) when ``enabled``, or keep them in full fp32. Returns whether the flags were
    set: a CPU device is left as it is.

    TF32 keeps fp32's range with a 10-bit mantissa in the multiplications (sums stay fp32), the
    precision PyTorch already gives cuDNN convolutions by default. On an H100 it
    made fp32 training steps 2.0-3.0x (MAE ViT-B/16, batch 128-512) and 2.3x (CSwin-UNet,
    32x128x128) faster (benchmarks/bench_gpu.py); reruns stay bit-identical.
    """
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return True


def enable_activation_checkpointing(model: nn.Module, block_types: Iterable[type] | None = None) -> int:
    """Recompute the activations of every block during the backward pass instead of storing them.

    Uses the model's own switch where it has one (timm: ``set_grad_checkpointing``), otherwise
    wraps the ``forward`` of each module whose type is in ``block_types`` (default: the repeated
    blocks of timm ViTs, the MAE, CSwin and DCT models) with :func:`torch.utils.checkpoint.checkpoint`.

    Returns:
        The number of blocks wrapped (0 when none was found; the model is then unchanged).
    """
    from torch.utils.checkpoint import checkpoint

    if block_types is None:
        block_types = _default_block_types()
    types = tuple(block_types)
    count = 0
    for module in model.modules():
        if types and isinstance(module, types) and not getattr(module, "_medvit_ckpt", False):
            original = module.forward

            def wrapped(*args: Any, _f=original, **kw: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kw)
                return _f(*args, **kw)

            module.forward = wrapped  # type: ignore[method-assign]
            module._medvit_ckpt = True
            count += 1
    return count


def _default_block_types() -> list[type]:
    types: list[type] = []
    try:
        from timm.models.vision_transformer import Block
        types.append(Block)
    except ImportError:
        pass
    for module, name in (("medvit.models.cswin", "CSwinBlock"), ("medvit.models.dct", "DCTHistoBlock")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return types


# ---------------------------------------------------------------------------- workers


@functools.lru_cache(maxsize=1)
def auto_num_workers(device: torch.device | str = "cpu", cpus: int | None = None) -> int:
    """DataLoader workers sized to the machine.

    With the decoded-image cache, workers only run augmentation. On CPU training they compete
    with the model's own threads for the same cores, so they pay only on larger machines:
    a quarter of the cores (at most 4) from 8 cores on, else 0. On a GPU the CPU is otherwise
    idle: every core but one, at most 8.
    """
    cpus = available_cpus() if cpus is None else int(cpus)
    if torch.device(device).type == "cuda":
        return max(0, min(8, cpus - 1))
    return min(4, cpus // 4) if cpus >= 8 else 0


def resolve_num_workers(setting: int | str, device: torch.device | str = "cpu") -> int:
    """``train.num_workers``: an integer as is, ``"auto"`` through :func:`auto_num_workers`."""
    return auto_num_workers(device) if setting == "auto" else int(setting)


def fused_adamw_supported(groups: Sequence[dict[str, Any]]) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` accepts these parameter groups: every
    parameter a floating-point tensor on the CPU or a CUDA device. The fused step is one kernel
    over all parameters (faster than the default ``foreach`` step on the CPU:
    benchmarks/RESULTS.md); the update is the same AdamW, equal to float rounding."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
