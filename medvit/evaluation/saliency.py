"""Where a classifier looks: Grad-CAM maps (MONAI's ``monai.visualize.GradCAM``, Selvaraju
et al. 2017) for a fixed set of test patients, the same patients for every model of a task,
overlaid on the input.

* CNNs (ResNet, DenseNet, MobileViT, ...): Grad-CAM on the last layer whose output is still a
  spatial feature map of at least 4x4 (found by one forward pass: e.g. ResNet ``layer4`` at
  224 px, ``layer2`` at 28-32 px, where the later maps are 2x2 or 1x1 and a Grad-CAM on them
  is one blob or blank).
* ViTs and DeiTs (timm ``VisionTransformer``): Grad-CAM on the output of the last
  transformer block, its patch tokens laid back on the patch grid (the class and
  distillation tokens are left out), as pytorch-grad-cam's ``reshape_transform`` does for
  ViTs. The model is called as a whole, so its own input standardisation (``input_norm``)
  applies to the raw [0, 1] image.

Each map is min-max scaled to [0, 1] per image (MONAI's default), so maps show where, not
how much. :mod:`medvit.tasks.saliency` rebuilds each packaged classifier of a task and draws
its maps for the report.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medvit.evaluation.figures import plt, save_figure

N_PATIENTS = 4  # test patients shown per task


def choose_patients(split: pd.DataFrame, truth: dict[str, int] | None, n: int = N_PATIENTS,
                    seed: int = 0) -> pd.DataFrame:
    """The fixed test samples of a task: up to ``n`` test patients (positives and negatives
    alternately when ``truth`` (patient -> 0/1) is given), each by its first sample in the
    split; the order is a keyed hash of the patient id and the study seed, so every model and
    every rerun gets the same patients."""
    test = split[split["split"].astype(str).str.lower() == "test"]
    first = test.drop_duplicates("patient_id", keep="first")

    def rank(pid: str) -> str:
        return hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()

    first = first.assign(_rank=first["patient_id"].astype(str).map(rank)).sort_values("_rank")
    if truth:
        pos = first[first["patient_id"].astype(str).map(lambda p: truth.get(p, 0) == 1)]
        neg = first[~first.index.isin(pos.index)]
        picked = []
        for i in range(n):
            for pool in (pos, neg) if i % 2 == 0 else (neg, pos):
                rest = pool[~pool.index.isin([r.name for r in picked])]
                if len(rest):
                    picked.append(rest.iloc[0])
                    break
        first = pd.DataFrame(picked) if picked else first.iloc[:0]
    return first.head(n).drop(columns="_rank", errors="ignore").reset_index(drop=True)


def _token_grid_wrapper(model: Any):
    """Wrap a timm ViT/DeiT so its last block's patch tokens pass through an identity module
    ``grid`` as a (B, C, h, w) map (Grad-CAM's target); the model's outputs are unchanged."""
    import torch
    from torch import nn

    class Grid(nn.Module):  # identity on the (B, C, h, w) token grid: Grad-CAM's target
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Wrapped(nn.Module):
        def __init__(self, vit: nn.Module):
            super().__init__()
            self.vit = vit
            self.grid = Grid()
            h, w = (int(v) for v in vit.patch_embed.grid_size)
            self.hw = (h, w)
            self.handle = vit.blocks[-1].register_forward_hook(self._hook)

        def _hook(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            h, w = self.hw
            b, n, c = out.shape
            prefix = n - h * w  # class / distillation / register tokens come first
            patches = out[:, prefix:, :].transpose(1, 2).reshape(b, c, h, w)
            patches = self.grid(patches)
            return torch.cat([out[:, :prefix, :], patches.flatten(2).transpose(1, 2)], dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.vit(x)
            return out[0] if isinstance(out, (tuple, list)) else out

    return Wrapped(model)


MIN_CAM_SIDE = 4  # a 2x2 Grad-CAM is one blob or, after its ReLU, nothing: no "where" left to show


def _last_spatial_layer(model: Any, example: Any) -> str:
    """Name of the last module (in execution order) whose output is a 4-D map at least
    MIN_CAM_SIDE on each side; on an input too small for any, the last of the largest maps."""
    import torch

    seen: list[tuple[str, int]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod: Any, inp: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) > 1:
                seen.append((name, min(out.shape[-2:])))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("no spatial feature map found for Grad-CAM")
    large = [name for name, side in seen if side >= MIN_CAM_SIDE]
    if large:
        return large[-1]
    biggest = max(side for _, side in seen)
    return [name for name, side in seen if side == biggest][-1]


def gradcam_maps(model: Any, images: Any, class_index: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                             str]:
    """Grad-CAM of each image (C, H, W) for the class ``class_index[i]`` (None: the class the
    model scores highest).

    Returns:
        (maps (N, H, W) in [0, 1], logits (N, K), target layer name).
    """
    import torch
    from monai.visualize import GradCAM

    model = model.eval()
    is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size")
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if is_vit:
        net = _token_grid_wrapper(model)
        layer = "grid"
    else:
        net = model
        layer = _last_spatial_layer(model, images[:1])
    cam = GradCAM(nn_module=net, target_layers=layer)
    maps, logits = [], []
    try:
        for i in range(len(images)):
            x = images[i:i + 1].clone().requires_grad_(False)
            with torch.no_grad():
                out = net(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
            idx = int(out.argmax(1)) if class_index is None else int(class_index[i])
            m = cam(x=x, class_idx=idx)
            maps.append(m.detach().cpu().numpy()[0, 0])
            logits.append(out.detach().cpu().numpy()[0])
    finally:
        if is_vit:
            net.handle.remove()
    return np.nan_to_num(np.stack(maps)).astype(np.float32), np.stack(logits), ("last block" if is_vit else layer)


def saliency_figure(result: dict[str, Any], path: Path) -> Path:
    """Rows = the chosen test samples; columns = the input, then each model's Grad-CAM
    overlaid on it (jet, alpha 0.45), titled with the model's score for the mapped class."""
    models = result["models"]
    rows = len(result["samples"])
    cols = 1 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows), squeeze=False)
    for i in range(rows):
        base = result["images"][i][0]
        axes[i][0].imshow(base, cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_title(f"test case {i + 1}", fontsize=8)
        for j, (name, m) in enumerate(models.items(), 1):
            img = m["images"][i][0]
            ax = axes[i][j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.imshow(m["maps"][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            k = int(np.argmax(m["scores"][i]))
            ax.set_title(f"{name}\n{m['classes'][k]} {m['scores'][i][k]:.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
