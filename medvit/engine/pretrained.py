"""Initialising a ViT from a pretrained checkpoint file: a timm ViT, an MAE checkpoint from the
MAE authors' code or from :mod:`medvit.models.mae`, at any resolution or channel count. The
file is read safely (:func:`medvit.engine.checkpoint.load_state_dict_file`) and adapted by
:func:`medvit.models.vit.checkpoint_filter_fn`::

    model = create_model("vit_small", in_chans=1, num_classes=14, img_size=224, patch_size=16)
    load_pretrained(model, "mae_pretrain_vit_small.pth")   # safe loading, pos-embed resampled
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from medvit.engine.checkpoint import load_state_dict_file
from medvit.errors import CheckpointError
from medvit.models.vit import checkpoint_filter_fn


def load_pretrained(model: VisionTransformer, path: str | Path, fresh_final_norm: bool = False) -> dict[str, Any]:
    """Initialise ``model``'s encoder from a local checkpoint (``.safetensors`` or a
    weights-only ``.pt``/``.pth``; never unpickles code), through :func:`checkpoint_filter_fn`.

    Only the classifier head, ``fc_norm`` and the input standardisation (``input_norm``, absent
    from checkpoints trained elsewhere) may be left at their fresh initialisation; any other
    missing key, or a key whose shape still differs (e.g. another patch size or width), is an
    error.

    Args:
        model: the ViT to initialise.
        path: the checkpoint.
        fresh_final_norm: leave ``fc_norm`` at its fresh initialisation even when the
            checkpoint has one (MAE fine-tuning starts the pooled features' norm anew: the
            pretrained one normalised the visible patches of a masked image, not a whole one).

    Returns:
        ``{"missing": [...], "unexpected": [...], "input_norm": bool}``: the keys as loaded, and
        whether the checkpoint carried the input standardisation it was trained with.

    Raises:
        CheckpointError: unreadable/unsafe file, or weights that do not fit the model.
    """
    state = checkpoint_filter_fn(load_state_dict_file(path), model)
    if fresh_final_norm:
        state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(wrong[:3])}): a ViT of another "
                              "width or patch size")
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm.", "input_norm."))]
    if missing or unexpected:
        raise CheckpointError(f"{path}: not a ViT encoder of this architecture (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
            "input_norm": "input_norm.mean" in state}
