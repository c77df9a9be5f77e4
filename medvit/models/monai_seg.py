"""MONAI's 3D segmentation networks, the baselines of the CSwin-UNet paper: Swin UNETR
(Hatamizadeh et al. 2022), DynUNet (nnU-Net's architecture, Isensee et al. 2021) and
Attention U-Net (Oktay et al. 2018); the plain UNet is :func:`medvit.models.unet.unet3d`.

Defaults are small widths for 32^3 patches on a CPU; every builder takes the width as a
keyword. Shapes: (B, in_chans, D, H, W) -> (B, num_classes, D, H, W) logits.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from monai.networks.nets import AttentionUnet, DynUNet, SwinUNETR
from torch import nn

from medvit.models.registry import register_model


def _permute_rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """``einops.rearrange`` for pure axis permutations (``"b c d h w -> b d h w c"``): the
    only patterns MONAI's Swin UNETR uses."""
    src, dst = (side.split() for side in pattern.split("->"))
    if sorted(src) != sorted(dst) or len(src) != x.ndim or any("(" in a for a in src + dst):
        raise ValueError(f"only axis permutations are supported without einops, got {pattern!r}")
    return x.permute(*(src.index(a) for a in dst))


if importlib.util.find_spec("einops") is None:  # pragma: no branch
    # MONAI imports einops optionally and Swin UNETR fails at its first forward without it;
    # its rearranges are plain permutations, so a permute does the same (no extra dependency).
    import monai.networks.nets.swin_unetr as _swin_unetr

    _swin_unetr.rearrange = _permute_rearrange


@register_model(spatial_dims=3)
def swin_unetr(in_chans: int = 3, num_classes: int = 1, feature_size: int = 12,
               depths: Sequence[int] = (1, 1, 1, 1), num_heads: Sequence[int] = (3, 6, 12, 24),
               window_size: int = 4, drop_path: float = 0.0,
               norm_name: str | tuple = ("group", {"num_groups": 1})) -> nn.Module:
    """Swin UNETR (shifted-window transformer encoder, convolutional decoder). D, H, W must be
    divisible by 32 (patch 2, then 4 merges). ``feature_size`` must be a multiple of 12.

    The decoder's norm is one-group GroupNorm rather than MONAI's default instance norm: a
    32^3 patch leaves a single voxel at the deepest level, where instance norm is undefined."""
    return SwinUNETR(in_channels=in_chans, out_channels=num_classes, feature_size=feature_size, depths=depths,
                     num_heads=num_heads, window_size=window_size, dropout_path_rate=drop_path, norm_name=norm_name,
                     spatial_dims=3)


@register_model(spatial_dims=3)
def dynunet(in_chans: int = 3, num_classes: int = 1, filters: Sequence[int] = (16, 32, 64, 128),
            res_block: bool = True) -> nn.Module:
    """DynUNet (nnU-Net-style UNet: 3x3x3 kernels, stride 1 then 2 per level, residual blocks).
    D, H, W must be divisible by 2 ** (len(filters) - 1)."""
    n = len(filters)
    strides = [1] + [2] * (n - 1)
    return DynUNet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, kernel_size=[3] * n,
                   strides=strides, upsample_kernel_size=strides[1:], filters=list(filters), res_block=res_block)


@register_model(spatial_dims=3)
def attention_unet(in_chans: int = 3, num_classes: int = 1, channels: Sequence[int] = (16, 32, 64, 128),
                   dropout: float = 0.0) -> nn.Module:
    """Attention U-Net (additive attention gates on the skips). D, H, W must be divisible by
    2 ** (len(channels) - 1)."""
    return AttentionUnet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, channels=channels,
                         strides=(2,) * (len(channels) - 1), dropout=dropout)
