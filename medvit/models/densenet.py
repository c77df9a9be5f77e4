"""DenseNet-121 (Huang et al., CVPR 2017), the chest X-ray baseline of CheXNet and of
Medical MAE's comparison; MONAI's implementation, randomly initialised."""

from __future__ import annotations

from monai.networks.nets import DenseNet121
from torch import nn

from medvit.models.registry import register_model


@register_model
def densenet121(in_chans: int = 1, num_classes: int = 1, dropout: float = 0.0) -> nn.Module:
    """2D DenseNet-121. Input (B, in_chans, H, W) -> logits (B, num_classes)."""
    return DenseNet121(spatial_dims=2, in_channels=in_chans, out_channels=num_classes, dropout_prob=dropout)
