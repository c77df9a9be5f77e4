"""DeiT students with a distillation token (Touvron et al., ICML 2021), from timm.

timm's ``VisionTransformerDistilled`` has a class token and a distillation token, each with
its own linear head. In training mode with ``set_distilled_training(True)`` the forward pass
returns ``(cls_logits, dist_logits)``, each (B, num_classes); otherwise it returns their
mean, which is DeiT's inference rule. Randomly initialised (no download).
"""

from __future__ import annotations

import timm
from torch import nn

from medvit.models.layers import add_input_standardization
from medvit.models.registry import register_model

DEIT_STUDENTS = ("deit_tiny_distilled", "deit_small_distilled", "deit_base_distilled")


def is_deit(name: str) -> bool:
    """Whether a registered model name is one of the distilled DeiTs of this module."""
    return name in DEIT_STUDENTS


def _deit(variant: str, in_chans: int, num_classes: int, img_size: int, patch_size: int,
          drop_path: float) -> nn.Module:
    # input standardised inside the model (training-split statistics, set by the training stage)
    model = timm.create_model(f"{variant}_patch16_224", pretrained=False, in_chans=in_chans, num_classes=num_classes,
                              img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path)
    return add_input_standardization(model, in_chans)


@register_model
def deit_tiny_distilled(in_chans: int = 3, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                        drop_path: float = 0.0) -> nn.Module:
    """DeiT-Tiny with distillation token (192 wide, 12 blocks, 3 heads, ~5.5M params).
    Input (B, in_chans, img_size, img_size); ``img_size`` must be a multiple of ``patch_size``."""
    return _deit("deit_tiny_distilled", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def deit_small_distilled(in_chans: int = 3, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                         drop_path: float = 0.0) -> nn.Module:
    """DeiT-Small with distillation token (384 wide, 12 blocks, 6 heads, ~22M params)."""
    return _deit("deit_small_distilled", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def deit_base_distilled(in_chans: int = 3, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                        drop_path: float = 0.0) -> nn.Module:
    """DeiT-Base with distillation token (768 wide, 12 blocks, 12 heads, ~87M params)."""
    return _deit("deit_base_distilled", in_chans, num_classes, img_size, patch_size, drop_path)
