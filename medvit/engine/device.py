"""Device selection and bf16 autocast, the same code path on CPU and GPU.

bf16 ("brain float", 8 exponent bits like fp32) needs no loss scaling, so autocast is the
only switch. Whether it pays depends on the hardware:

* CUDA GPUs from Ampere on (``torch.cuda.is_bf16_supported(including_emulation=False)``):
  bf16 tensor cores, usually a large speed-up.
* CPUs with native bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16): faster for
  most models (per-model figures: benchmarks/RESULTS.md).
* CPUs without them: bf16 is emulated and far slower (orders of magnitude for a matmul), so
  ``bf16: auto`` leaves it off there.

Native support is not the whole story (a busy or small core can still run bf16 slower), so
``bf16: auto`` also measures: a bf16 versus fp32 matmul, once per machine, cached
(:func:`medvit.engine.speed.probe_bf16`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from typing import ContextManager

import torch

from medvit.cpu_ops.attention import UnfusedAttention
from medvit.engine.speed import probe_bf16
from medvit.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:<index>"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ConfigError):
    """The requested device or precision is not available on this machine."""


def check_device_name(name: str) -> str:
    """Normalise a device name (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``) without
    checking the hardware; raise :class:`DeviceError` naming the allowed values otherwise."""
    text = str(name).strip().lower()
    if not _DEVICE_RE.match(text):
        raise DeviceError(f"device: {name!r} is not allowed; allowed: {DEVICE_CHOICES}")
    return text


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a config's device name into a :class:`torch.device` that exists here.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:<index>"``; ``None`` means ``"auto"``.

    Raises:
        DeviceError: CUDA was asked for and is not available, or the index does not exist.
    """
    text = check_device_name("auto" if name is None else str(name))
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        hint = ""
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            hint = f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
        raise DeviceError(
            f"device: {name!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}{hint}); "
            "use device: auto to fall back to the CPU, or run on a GPU node")
    device = torch.device(text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device: {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 in hardware (x86 AVX512-BF16/AMX-BF16, Arm BF16).

    Read from ``/proc/cpuinfo``; ``False`` where that is not available (macOS, Windows),
    so ``bf16: auto`` stays in fp32 there.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """Decide whether to autocast to bf16.

    Args:
        setting: ``True``, ``False`` or ``"auto"``: on where :func:`bf16_supported` and a
            bf16 matmul measured faster than fp32 (:func:`medvit.engine.speed.probe_bf16`,
            measured once per machine and cached).
        device: the training device.

    Raises:
        DeviceError: ``True`` on a CUDA GPU without bf16 support (pre-Ampere), where
            autocast would silently fall back or fail.
        ConfigError: ``setting`` is none of the allowed values.
    """
    if setting == "auto":
        # Native support is necessary, not sufficient (e.g. a small GPU/CPU where bf16 matmuls
        # still run slower): the probe measures it once per machine and caches the verdict.
        if not bf16_supported(device):
            return False
        return probe_bf16(device).use_bf16
    if setting is True:
        if device.type == "cuda" and not bf16_supported(device):
            raise DeviceError(f"bf16: true, but {torch.cuda.get_device_name(device)} has no bf16 support; "
                              "use bf16: auto or bf16: false")
        return True
    if setting is False:
        return False
    raise ConfigError(f"bf16: {setting!r} is not allowed; allowed: true, false, auto")


def autocast_context(device: torch.device, enabled: bool) -> ContextManager:
    """``torch.autocast`` to bf16 on ``device`` when ``enabled``, else a no-op context.

    Inside it, matmuls and convolutions run in bf16 while reductions and losses that
    autocast lists as fp32 (softmax, cross-entropy, norms) stay in fp32. Parameters and
    gradients stay fp32, so no loss scaling is needed. On the CPU it also computes
    ``F.scaled_dot_product_attention`` unfused
    (:class:`medvit.cpu_ops.attention.UnfusedAttention`, the same function).
    """
    if not enabled:
        return contextlib.nullcontext()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type != "cpu":
        return amp
    stack = contextlib.ExitStack()
    stack.enter_context(amp)
    stack.enter_context(UnfusedAttention())
    return stack
