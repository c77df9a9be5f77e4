"""Attention fast paths, each the same function as ``F.scaled_dot_product_attention``
(:func:`reference_attention`).

* :func:`flash_friendly_attention` (CSwin-UNet's stripes): PyTorch's CPU flash kernel runs
  head dims under 16 slower than head dim 16 itself, so narrow heads are zero-padded to 16
  (:func:`padded_attention`).
* :class:`UnfusedAttention` (the engine's CPU bf16 autocast): PyTorch's fused CPU kernel is
  slow in bf16, above all in its backward pass, so every SDPA call is computed as three plain
  operations (:func:`unfused_attention`).

The measured gains: docs/performance.md and benchmarks/RESULTS.md (``bench_switches.py``,
``bf16_unfused_attention`` rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Head dims under this run slower than this one in the CPU flash kernel (docs/prostate.md).
CPU_FLASH_MIN_HEAD_DIM = 16


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """The plain reference of every op here: ``F.scaled_dot_product_attention`` on SDPA's math
    backend (no fused kernel, no padding). Shapes: query (..., L, E), key (..., S, E), value
    (..., S, Ev) -> (..., L, Ev)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p)`` computed with q, k and v
    zero-padded to ``head_dim`` channels and the scale of their true head dim d: zero columns
    add nothing to q.k and give zero output columns, so it is the same function (and plain SDPA
    when ``head_dim <= d``). Shapes: q, k, v (N, heads, T, d) -> (N, heads, T, d)."""
    d = q.shape[-1]
    if head_dim <= d:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    q, k, v = (F.pad(t, (0, head_dim - d)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=d ** -0.5)[..., :d]


def flash_friendly_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p)``, with head dims under
    :data:`CPU_FLASH_MIN_HEAD_DIM` zero-padded to it on the CPU while the flash kernel is
    enabled (outside autocast): :func:`padded_attention`, the same function.

    Where the flash kernel is disabled (e.g. in ``sdpa_kernel([SDPBackend.MATH])``, as
    ``medvit.engine.compute.count_flops`` runs) nothing is padded, so FLOP counts stay those of
    the useful work. GPUs get plain SDPA (padding gave no consistent gain there).

    Shapes: q, k, v (N, heads, T, d) -> (N, heads, T, d).
    """
    # under CPU autocast medvit's attention runs unfused (UnfusedAttention): padding there is
    # only more work. torch.backends.cuda's flash flag gates the CPU flash kernel too.
    if (q.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or not torch.backends.cuda.flash_sdp_enabled()):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return padded_attention(q, k, v, CPU_FLASH_MIN_HEAD_DIM, dropout_p)


def unfused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask) V`` as three plain operations, the same function as
    ``F.scaled_dot_product_attention`` with these arguments (timm's non-fused path).

    Shapes: query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); a boolean
    ``attn_mask`` keeps the True positions, a float one is added to the scores.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


class UnfusedAttention(torch.overrides.TorchFunctionMode):
    """A function mode that computes ``F.scaled_dot_product_attention`` calls (timm's blocks,
    medvit's MAE, DVPT, CSwin and DCT attention) with :func:`unfused_attention`.

    Entered by ``medvit.engine.device.autocast_context`` for bf16 on the CPU, where PyTorch's
    fused kernel loses to the plain composition (bf16 matmuls, fp32 softmax), above all in its
    backward pass (per-model gains: benchmarks/RESULTS.md, ``bench_switches.py``).
    Calls with ``enable_gqa`` (keyword-only, like ``scale``) go to the fused kernel unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa"):
            return unfused_attention(*args, **kwargs)
        return func(*args, **kwargs)
