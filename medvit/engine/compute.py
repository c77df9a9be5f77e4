"""Compute measurements shared by every model comparison and benchmark: parameters, FLOPs
counted by one counter for all models, and wall-clock latency/throughput.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a real forward
pass (a matmul of (M, K) x (K, N) counts 2*M*K*N; convolutions likewise), so every model,
ours, timm's or MONAI's, is measured the same way. Operations the counter does not know
(elementwise ops, norms, softmax) count zero, which is the usual convention (fvcore, the
papers' tables).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module | Callable[..., Any], *inputs: torch.Tensor, backward: bool = False) -> int:
    """FLOPs of one forward pass (plus the backward pass with ``backward``) on ``inputs``.

    Args:
        model: a module (put in eval mode here when ``backward`` is false) or any callable.
        inputs: example inputs, e.g. one (1, C, H, W) tensor for per-image FLOPs.
        backward: also count the gradient computation of ``output.float().sum()``.

    Returns:
        The total FLOP count (an integer; 1 multiply-add = 2 FLOPs), attention included.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module) and not backward:
        model.eval()
    try:
        # PyTorch's FLOP counter has no formula for the fused CPU kernel behind
        # F.scaled_dot_product_attention (attention would count zero on the CPU); the math
        # backend computes the same attention with two batched matmuls, which it counts.
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            if backward:
                out = model(*inputs)
                out = out if isinstance(out, torch.Tensor) else out[0]
                out.float().sum().backward()
            else:
                with torch.no_grad():
                    model(*inputs)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10,
                    min_seconds: float = 0.0) -> dict[str, float]:
    """Wall-clock inference time of ``model(example)`` in eval mode.

    Args:
        model: the network, on the device of ``example``.
        example: one input batch, e.g. (B, C, H, W).
        warmup: untimed calls first (allocator, kernel selection).
        repeats: timed calls (at least; more when ``min_seconds`` asks for it).
        min_seconds: keep timing until this much time has passed.

    Returns:
        ``{"batch": B, "median_s": per-call median in seconds, "per_sample_ms": median / B in
        ms, "throughput": samples per second at the median}``.
    """
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    try:
        for _ in range(warmup):
            model(example)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            model(example)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    times.sort()
    median = times[len(times) // 2]
    batch = int(example.shape[0])
    return {"batch": batch, "median_s": median, "per_sample_ms": 1e3 * median / batch, "throughput": batch / median}
