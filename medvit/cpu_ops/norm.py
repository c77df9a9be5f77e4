"""Instance norm + LeakyReLU of a channels_last_3d volume as one hand-written autograd
function (:func:`instance_norm_leaky_relu`), the same function as its reference
:func:`reference_instance_norm_leaky_relu` (``act(norm(x))``).

Why: PyTorch's GroupNorm backward in channels_last_3d is much slower on the CPU than in the
standard layout, and slower again when the incoming gradient is a channel slice of a
concatenation (a UNet skip); copying to the standard layout and back costs more than it
saves. Measured gains: docs/performance.md (CSwin-UNet rounds) and docs/prostate.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 128  # elementwise work runs on rows of this many floats (vectorises; C alone is too narrow)


def _channel_sums(lane_sums: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, L) sums per lane of rows holding channels in turn -> (B, C) per-channel sums."""
    return lane_sums.view(lane_sums.shape[0], -1, channels).sum(1)


def _tiled(per_channel: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, C) -> (B, 1, C * rep): the values laid out as a row of the (B, R, L) rows."""
    return per_channel.repeat(1, rep).unsqueeze(1)


class _InstanceNormLeakyReLU(torch.autograd.Function):
    """Instance norm (per sample and channel over D*H*W, biased variance), affine, LeakyReLU
    of a channels_last_3d volume, forward and backward in a few memory-bound passes.

    The tensor is read as (B, R, L) rows of L = 128 floats, L a multiple of C (a view of the
    channels-last storage), so channel c sits at every C-th float of a row: per-channel sums
    are row sums folded by C, and per-channel scales broadcast over rows of a vector width.
    The normalisation and affine map are one ``x * scale + shift`` pass, and the backward
    works from ``x`` and per-channel constants, so no normalised copy is stored or re-read.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                slope: float) -> torch.Tensor:
        B, C = x.shape[:2]
        n = x[0, 0].numel()
        lanes = _LANES if _LANES % C == 0 and n * C % _LANES == 0 else C
        rep = lanes // C
        xv = x.permute(0, 2, 3, 4, 1).reshape(B, -1, lanes).float()
        mean = _channel_sums(xv.sum(1), C) / n
        var = _channel_sums((xv - _tiled(mean, rep)).square_().sum(1), C) / n
        rstd = (var + eps).rsqrt()
        scale = weight.float() * rstd  # (B, C)
        out = F.leaky_relu_(torch.addcmul(_tiled(bias.float() - mean * scale, rep), xv, _tiled(scale, rep)), slope)
        ctx.save_for_backward(xv, out, mean, rstd, weight)
        ctx.slope, ctx.channels, ctx.n = slope, C, n
        return out.view(B, *x.shape[2:], C).permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xv, out, mean, rstd, weight = ctx.saved_tensors
        B, R, lanes = xv.shape
        C, n = ctx.channels, ctx.n
        rep = lanes // C
        g = torch.ops.aten.leaky_relu_backward(grad.permute(0, 2, 3, 4, 1).reshape(B, R, lanes).float(), out,
                                               ctx.slope, True)
        sum_g = _channel_sums(g.sum(1), C)
        sum_gxhat = (_channel_sums((g * xv).sum(1), C) - mean * sum_g) * rstd  # xhat = (x - mean) rstd
        # d/dx of instance norm: rstd w (g - mean(g) - xhat mean(g xhat)) = g a + x b + c per channel
        a = rstd * weight.float()
        b = -a * rstd * sum_gxhat / n
        c = -a * sum_g / n - b * mean
        dx = torch.addcmul(_tiled(c, rep), g, _tiled(a, rep)).addcmul_(xv, _tiled(b, rep))
        return (dx.view(B, *grad.shape[2:], C).permute(0, 4, 1, 2, 3), sum_gxhat.sum(0), sum_g.sum(0), None, None)


def reference_instance_norm_leaky_relu(x: torch.Tensor, norm: nn.GroupNorm, act: nn.LeakyReLU) -> torch.Tensor:
    """The plain reference of :func:`instance_norm_leaky_relu`: the modules themselves,
    ``act(norm(x))``. (B, C, D, H, W) -> same shape."""
    return act(norm(x))


def instance_norm_leaky_relu(x: torch.Tensor, norm: nn.GroupNorm, act: nn.LeakyReLU) -> torch.Tensor:
    """``act(norm(x))`` for a per-channel ``GroupNorm`` (instance norm) and a ``LeakyReLU``:
    on CPU tensors :class:`_InstanceNormLeakyReLU` (computed and returned in fp32 whatever the
    input's dtype; a channels_last_3d input gives a channels_last_3d output), elsewhere
    :func:`reference_instance_norm_leaky_relu`. (B, C, D, H, W) -> same shape."""
    if x.device.type != "cpu" or norm.num_groups != norm.num_channels or not norm.affine:
        return reference_instance_norm_leaky_relu(x, norm, act)
    return _InstanceNormLeakyReLU.apply(x, norm.weight, norm.bias, norm.eps, act.negative_slope)
