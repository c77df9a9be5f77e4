"""MobileViT (Mehta & Rastegari, ICLR 2022) from timm, randomly initialised (no download):
MobileNetV2 blocks interleaved with transformer blocks over unfolded 2x2 patches."""

from __future__ import annotations

import timm
from torch import nn

from medvit.models.registry import register_model


@register_model
def mobilevit_xxs(in_chans: int = 3, num_classes: int = 1, drop_path: float = 0.0) -> nn.Module:
    """timm MobileViT-XXS (about 1M parameters; 1.3M with an ImageNet head), the smallest MobileViT.
    Input (B, in_chans, H, W) -> logits (B, num_classes); any H, W (feature maps whose side is
    not a multiple of the 2x2 patch are interpolated by timm)."""
    return timm.create_model("mobilevit_xxs", pretrained=False, in_chans=in_chans, num_classes=num_classes,
                             drop_path_rate=drop_path)
