"""ResNets (He et al., CVPR 2016) from timm, randomly initialised (no download)."""

from __future__ import annotations

import timm
from torch import nn

from medvit.models.registry import register_model


def _timm(name: str, in_chans: int, num_classes: int, drop_path: float) -> nn.Module:
    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                             drop_path_rate=drop_path)


@register_model
def resnet18(in_chans: int = 3, num_classes: int = 1, drop_path: float = 0.0) -> nn.Module:
    """timm ResNet-18. Input (B, in_chans, H, W) -> logits (B, num_classes)."""
    return _timm("resnet18", in_chans, num_classes, drop_path)


@register_model
def resnet10t(in_chans: int = 3, num_classes: int = 1, drop_path: float = 0.0) -> nn.Module:
    """timm ResNet-10-T (tiered stem, ~5M params): a fast baseline for small images."""
    return _timm("resnet10t", in_chans, num_classes, drop_path)


@register_model
def resnet50(in_chans: int = 3, num_classes: int = 1, drop_path: float = 0.0) -> nn.Module:
    """timm ResNet-50 (bottleneck blocks, ~23.5M params)."""
    return _timm("resnet50", in_chans, num_classes, drop_path)


@register_model
def resnet152(in_chans: int = 3, num_classes: int = 1, drop_path: float = 0.0) -> nn.Module:
    """timm ResNet-152 (~58M params): the CNN teacher of the brain study ("Realism in Action")."""
    return _timm("resnet152", in_chans, num_classes, drop_path)
