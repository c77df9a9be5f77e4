"""3D UNet (Ronneberger et al. 2015; Çiçek et al. 2016) with residual units, MONAI's
implementation: the prostate lesion segmentation baseline."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn

from medvit.models.registry import register_model


@register_model(spatial_dims=3)
def unet3d(in_chans: int = 3, num_classes: int = 1, channels: tuple[int, ...] = (16, 32, 64, 128),
           num_res_units: int = 1, dropout: float = 0.0) -> nn.Module:
    """Input (B, in_chans, D, H, W) -> lesion logits (B, num_classes, D, H, W).

    Each of the len(channels)-1 downsamplings halves every spatial size, so D, H and W must be
    divisible by 2 ** (len(channels) - 1).
    """
    strides = (2,) * (len(channels) - 1)
    return UNet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, channels=channels,
                strides=strides, num_res_units=num_res_units, dropout=dropout)
