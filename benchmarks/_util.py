"""Shared pieces of the benchmark scripts: the machine, timing, peak memory, model zoo, JSON.

Every script runs on CPU or CUDA (``--device auto`` picks CUDA when present) and has a
``--quick`` mode (tiny sizes, few steps) used by ``benchmarks/run_all.py --quick``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (the whole suite in minutes)")
    p.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results/<name>_<device>.json)")
    return p


def device_of(name: str) -> torch.device:
    """The benchmark's device; also makes the process-wide setting medvit's Trainer makes
    (``train.retain_freed_memory``, on by default) unless ``MEDVIT_BENCH_RETAIN_FREED_MEMORY=0``
    (bench_switches measures its gain in child processes that way)."""
    from medvit.cpu_ops.process import retain_freed_memory
    from medvit.engine.device import resolve_device

    if os.environ.get("MEDVIT_BENCH_RETAIN_FREED_MEMORY", "1") != "0":
        retain_freed_memory()
    return resolve_device(name)


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, GPU, library versions and the 1-minute load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.lower().startswith("model name")), cpu)
    except OSError:
        pass
    from medvit.engine.device import cpu_has_native_bf16
    from medvit.system import available_cpus

    info: dict[str, Any] = {"cpu": cpu, "cores": available_cpus(), "torch_threads": torch.get_num_threads(),
                            "cpu_native_bf16": cpu_has_native_bf16(), "device": str(device),
                            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                            "torch": torch.__version__, "python": platform.python_version()}
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tracked(model: nn.Module, opt: torch.optim.Optimizer, fn: Callable[[], Any]) -> tuple[float, float]:
    """(bytes live when ``fn`` starts, peak bytes while it runs), CPU, by torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def total(snap: dict) -> float:
        return float(sum(v.get("Total", 0) for v in snap.values()))

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        start = total(tracker.get_tracker_snapshot("current"))
        fn()
        peak = total(tracker.get_tracker_snapshot("peak"))
    return start, peak


def train_step_memory(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool = False
                      ) -> dict[str, Any]:
    """Memory (MiB) of a steady-state AdamW training step.

    Returns ``peak_mib`` (the whole step: parameters, gradients, optimizer state, activations,
    temporaries) and ``activations_mib`` (the forward + backward peak above what was live
    before it: what activation checkpointing saves; gradients are pre-allocated zeros so they
    are not counted). A first step runs untracked (it creates the optimizer state).
    CUDA: ``torch.cuda`` allocator statistics. CPU: torch's ``MemTracker`` (a dispatch mode that
    follows every tensor storage), since the CPU allocator keeps no statistics.
    """
    step = train_step_fn(model, x, device, bf16)
    opt = step.optimizer  # type: ignore[attr-defined]
    step()
    for p in model.parameters():  # gradients live before the pass: not counted as activations
        if p.requires_grad:
            p.grad = torch.zeros_like(p)

    def fwd_bwd() -> None:
        with autocast(device, bf16):
            loss = output_tensor(model(x)).float().mean()
        loss.backward()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fwd_bwd()
        act = torch.cuda.max_memory_allocated(device) - start
        opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda.max_memory_allocated"
    else:
        try:
            start, top = _tracked(model, opt, fwd_bwd)
            act = top - start
            opt.zero_grad(set_to_none=True)
            _, peak = _tracked(model, opt, step)
        except RuntimeError as exc:  # MemTracker's hooks fail on some frozen-backbone graphs (DVPT)
            opt.zero_grad(set_to_none=True)
            return {"peak_mib": None, "activations_mib": None, "method": f"not measured: MemTracker failed ({exc})"}
        method = "torch MemTracker (tensor storages)"
    return {"peak_mib": round(peak / 2**20, 1), "activations_mib": round(act / 2**20, 1), "method": method}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 1,
                warm_calls: int = 0) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn, round after round, so
    a change of machine load affects every contender alike (ratios stay meaningful).

    ``warm_calls`` untimed calls precede each timed call in a round, so the timed one finds
    the caches as a run of back-to-back steps leaves them, not as the previous contender did.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warm_calls):
                fn()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_with_peak(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int
                          ) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`interleaved` (one warm call before each timed one) with an n x n matmul in fp32
    and in bf16 among the contenders (n = 1024 on the CPU, 4096 on a GPU): returns the median
    seconds per call and the matmul peak in FLOP/s per dtype timed in the same rounds, so a
    slow spell of a shared machine (the peak can halve for seconds) moves the steps and their
    yardstick alike."""
    n = 4096 if device.type == "cuda" else 1024
    mats = {p: [torch.randn(n, n, device=device, dtype=dt) for _ in range(2)]
            for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    matmuls = {f"matmul_{p}": (lambda a=a, b=b: a @ b) for p, (a, b) in mats.items()}
    med = interleaved({**fns, **matmuls}, device, rounds=rounds, warm_calls=1)
    peaks = {p: 2 * n**3 / med.pop(f"matmul_{p}") for p in mats}
    return med, peaks


def autocast(device: torch.device, bf16: bool, fused_attention: bool = False):
    """medvit's bf16 autocast (:func:`medvit.engine.device.autocast_context`); with
    ``fused_attention`` plain ``torch.autocast``, which keeps PyTorch's fused attention
    kernel on the CPU (for the switch benchmark)."""
    from medvit.engine.device import autocast_context

    if bf16 and fused_attention:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return autocast_context(device, bf16)


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (MAE returns a dataclass with ``loss``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "loss"):
        return out.loss
    return out[0]


def train_step_fn(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool = False,
                  fused_attention: bool = False) -> Callable[[], None]:
    """One AdamW training step of ``model`` on ``x`` (loss: the output's mean, or MAE's loss);
    ``fused_attention``: see :func:`autocast`."""
    from medvit.engine.speed import fused_adamw_supported

    params = [p for p in model.parameters() if p.requires_grad]
    # the optimizer step medvit's Trainer takes (fused where supported)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw_supported([{"params": params}]))
    model.train()

    def step() -> None:
        with autocast(device, bf16, fused_attention):
            loss = output_tensor(model(x)).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool = False) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, bf16):
            model(x)
        model.train()
    return run


def train_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) on the batch ``x``, attention included
    (:func:`medvit.engine.compute.count_flops`)."""
    from medvit.engine.compute import count_flops

    model.train()
    flops = count_flops(lambda t: output_tensor(model(t)), x, backward=True)
    model.zero_grad(set_to_none=True)
    return flops


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    from medvit.fileio import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)
    print(f"wrote {path}")
    return path


def out_path(args: argparse.Namespace, name: str, device: torch.device) -> Path:
    return Path(args.out) if args.out else RESULTS / f"{name}_{device.type}.json"


def header(device: torch.device, quick: bool) -> dict[str, Any]:
    from medvit.provenance import now_iso

    return {"created": now_iso(), "quick": quick, "machine": machine(device)}


# ---------------------------------------------------------------------------- model zoo

# name -> (builder(size), input shape without batch, batch, uses attention, has convolutions)
def _vit(size: int) -> nn.Module:
    from medvit.models.vit import build_vit

    return build_vit("tiny", in_chans=1, num_classes=2, img_size=size, patch_size=8)


def _mae(size: int) -> nn.Module:
    from medvit.models.mae import build_mae

    return build_mae("vit_tiny", in_chans=1, img_size=size, patch_size=8, mask_ratio=0.9)


def _dvpt(size: int) -> nn.Module:
    from medvit.models.dvpt import build_prompted_vit

    return build_prompted_vit("tiny", "dvpt", in_chans=1, num_classes=2, img_size=size, patch_size=8)


def _registered(name: str, **kw: Any) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        from medvit.models import create_model

        return create_model(name, **kw)
    return build


ZOO: dict[str, dict[str, Any]] = {
    "vit_tiny": {"build": _vit, "chans": 1, "dims": 2, "attention": True, "conv": False},
    "mae_vit_tiny": {"build": _mae, "chans": 1, "dims": 2, "attention": True, "conv": False},
    "dvpt_vit_tiny": {"build": _dvpt, "chans": 1, "dims": 2, "attention": True, "conv": False},
    "dct_histo_tiny": {"build": _registered("dct_histo_tiny", in_chans=3, num_classes=2), "chans": 3, "dims": 2,
                       "attention": True, "conv": True},
    "resnet18": {"build": _registered("resnet18", in_chans=1, num_classes=2), "chans": 1, "dims": 2,
                 "attention": False, "conv": True},
    "densenet121": {"build": _registered("densenet121", in_chans=1, num_classes=2), "chans": 1, "dims": 2,
                    "attention": False, "conv": True},
    "unet3d": {"build": _registered("unet3d", in_chans=3, num_classes=1), "chans": 3, "dims": 3,
               "attention": False, "conv": True},
    "cswin_unet": {"build": _registered("cswin_unet", in_chans=3, num_classes=1), "chans": 3, "dims": 3,
                   "attention": True, "conv": True},
}


def zoo_input(name: str, size: int, batch: int, device: torch.device) -> torch.Tensor:
    spec = ZOO[name]
    return torch.randn(batch, spec["chans"], *([size] * spec["dims"]), device=device)


def build(name: str, size: int, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name]["build"](size).to(device)
