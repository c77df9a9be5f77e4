"""Vision Transformers (Dosovitskiy et al., ICLR 2021) from timm, randomly initialised.

Three sizes (``vit_tiny`` 192-d/12 blocks/3 heads, ``vit_small`` 384/12/6, ``vit_base``
768/12/12) at any image size and patch size, 1-channel input by default. The ``*_mae``
names build the same architectures; in a study they mean "initialise from the task's MAE
pretraining stage" (see :mod:`medvit.tasks.classification` and docs/xray_mae.md).

Weights trained elsewhere (a timm ViT, an MAE checkpoint, at any resolution or channel
count) are adapted by :func:`checkpoint_filter_fn` and loaded by
:func:`medvit.engine.pretrained.load_pretrained`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medvit.models.layers import add_input_standardization
from medvit.models.registry import register_model

# (embed_dim, depth, num_heads) of the timm configurations of the same names.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
# Keys of an MAE checkpoint that belong to the decoder (dropped when loading an encoder).
_DECODER_KEY = re.compile(r"^(decoder|mask_token)")


def build_vit(size: str, in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
              drop_path: float = 0.0) -> VisionTransformer:
    """A timm ViT of the given size (no download).

    Args:
        size: ``tiny``, ``small`` or ``base``.
        in_chans: image channels (1 for radiographs).
        num_classes: outputs of the linear head on the class token; 0 gives the encoder
            alone (features (B, embed_dim)).
        img_size: side length in pixels; must be a multiple of ``patch_size``.
        patch_size: side of the square patches in pixels.
        drop_path: stochastic depth rate (linearly increasing over the blocks, timm's rule).

    Returns:
        ``VisionTransformer``: (B, in_chans, img_size, img_size) -> (B, num_classes) logits. Its
        ``input_norm`` (:class:`medvit.models.layers.InputStandardize`, identity until the
        training stage stores the training split's per-channel mean and std) standardises the
        input first, so the statistics are saved with the weights.
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    dim, depth, heads = VIT_SIZES[size]
    # Average pooling over the patch tokens (with its own LayerNorm, `fc_norm`) as in MAE
    # fine-tuning: an MAE never trains the class token's output, so it is a poor summary.
    model = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, in_chans=in_chans,
                              num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                              drop_path_rate=drop_path, embed_dim=dim, depth=depth, num_heads=heads,
                              global_pool="avg")
    return add_input_standardization(model, in_chans)


@register_model
def vit_tiny(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
             drop_path: float = 0.0) -> nn.Module:
    """ViT-Tiny (5.5M parameters at patch 16)."""
    return build_vit("tiny", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def vit_small(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
              drop_path: float = 0.0) -> nn.Module:
    """ViT-Small (22M parameters at patch 16), Medical MAE's main encoder."""
    return build_vit("small", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def vit_base(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
             drop_path: float = 0.0) -> nn.Module:
    """ViT-Base (86M parameters at patch 16)."""
    return build_vit("base", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def vit_tiny_mae(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                 drop_path: float = 0.0) -> nn.Module:
    """ViT-Tiny to be initialised from the task's MAE encoder (same architecture as ``vit_tiny``)."""
    return build_vit("tiny", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def vit_small_mae(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                  drop_path: float = 0.0) -> nn.Module:
    """ViT-Small to be initialised from the task's MAE encoder."""
    return build_vit("small", in_chans, num_classes, img_size, patch_size, drop_path)


@register_model
def vit_base_mae(in_chans: int = 1, num_classes: int = 1, img_size: int = 224, patch_size: int = 16,
                 drop_path: float = 0.0) -> nn.Module:
    """ViT-Base to be initialised from the task's MAE encoder."""
    return build_vit("base", in_chans, num_classes, img_size, patch_size, drop_path)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a ViT/MAE state dict to ``model``.

    * MAE keys: ``encoder.`` prefixes (:class:`medvit.models.mae.MaskedAutoencoder`) are
      stripped; decoder weights and the mask token are dropped.
    * Position embeddings are resampled (bicubic, timm's ``resample_abs_pos_embed``) when the
      checkpoint's patch grid differs from the model's (other image size).
    * A patch embedding for another channel count is adapted (RGB -> grayscale sums the
      colour filters, timm's ``adapt_input_conv``).
    * A classifier head whose shape differs from the model's is dropped (new task), and so is
      a final norm the model does not have (``norm`` of a class-token ViT or MAE encoder
      loaded into an average-pooling ViT, whose ``fc_norm`` then starts fresh).

    Returns:
        a new state dict; keys the model has and the checkpoint lacks stay missing (the
        caller decides whether that is allowed).
    """
    out: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            key = key[len("encoder."):]
        if _DECODER_KEY.match(key):
            continue
        if key == "pos_embed" and key in own and value.shape != own[key].shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            value = resample_abs_pos_embed(value, new_size=list(model.patch_embed.grid_size),
                                           num_prefix_tokens=prefix)
        elif key == "patch_embed.proj.weight" and key in own and value.shape[1] != own[key].shape[1]:
            value = adapt_input_conv(own[key].shape[1], value)
        elif key.startswith("head.") and key in own and value.shape != own[key].shape:
            continue
        elif key.startswith(("norm.", "fc_norm.")) and key not in own:
            continue  # the other pooling's final norm (class token vs average pooling)
        out[key] = value
    return out


def layer_decay_param_groups(model: VisionTransformer, layer_decay: float,
                             weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups with layer-wise learning-rate decay (BEiT/MAE fine-tuning recipe).

    Layer 0 is the stem (patch embedding, class token, position embedding), layers
    1..depth the blocks, depth + 1 the final norm and head. A parameter of layer ``i`` gets
    ``lr_scale = layer_decay ** (depth + 1 - i)``: the head learns at the full rate, each
    block below it at ``layer_decay`` times the one above. Biases, norms and the model's
    ``no_weight_decay()`` names get no weight decay.

    Returns:
        groups with ``params``, ``lr_scale``, ``weight_decay`` and ``name`` for
        :class:`medvit.engine.Trainer` ``param_groups``; together they hold every trainable
        parameter once.
    """
    depth = len(model.blocks)
    no_decay_names = set(model.no_weight_decay())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = _layer_of(name, depth)
        decay = param.ndim >= 2 and name not in no_decay_names
        group = groups.setdefault((layer, decay), {
            "params": [], "lr_scale": float(layer_decay ** (depth + 1 - layer)),
            "weight_decay": float(weight_decay) if decay else 0.0,
            "name": f"layer{layer}" + ("" if decay else "_no_decay")})
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def _layer_of(name: str, depth: int) -> int:
    """Layer index of a parameter name as used by :func:`layer_decay_param_groups`."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1
