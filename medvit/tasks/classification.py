"""Image classification stages (chest X-ray findings, brain slices, histopathology patches):
binary, multi-class or multi-label, any registered 2D model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medvit.data.transforms import augment_transforms
from medvit.models import create_model
from medvit.tasks.common import StageContext, TaskSpec, load_context, write_predictions
from medvit.tasks.training import fit_and_save, load_for_inference, seeded_train_config, split_dataset

# Left and right are anatomy on a chest radiograph; flipping elsewhere is label-preserving.
_FLIPS = {"xray": False, "brain": True, "histo": True}


def loss_function(spec: TaskSpec) -> nn.Module:
    return nn.CrossEntropyLoss() if spec.kind == "multiclass" else nn.BCEWithLogitsLoss()


def probabilities(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) -> probabilities (B, K): softmax for multiclass, sigmoid otherwise."""
    return logits.float().softmax(1) if spec.kind == "multiclass" else logits.float().sigmoid()


def validation_metric(spec: TaskSpec):
    """Model selection metric on the validation split (higher is better): sample-level macro
    AUROC over the classes present, or balanced accuracy when no class has both values."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    def metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        probs = probabilities(spec, outputs).numpy()
        truth = np.eye(probs.shape[1])[targets.numpy().astype(int)] if spec.kind == "multiclass" else targets.numpy()
        aucs = [roc_auc_score(truth[:, j], probs[:, j]) for j in range(probs.shape[1])
                if 0 < truth[:, j].sum() < len(truth)]
        if aucs:
            return float(np.mean(aucs))
        return float(balanced_accuracy_score(truth.argmax(1), probs.argmax(1)))

    return metric


def _size(ctx: StageContext) -> list[int]:
    return [ctx.tcfg["image_size"]] * 2


def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """Train ``model_name`` on the split's train rows, select on val; write model.safetensors + model.json."""
    ctx = load_context(config_path, task, split_path)
    cfg = seeded_train_config(ctx)
    train_ds = split_dataset(ctx, "train", _size(ctx), augment=augment_transforms(2, flips=_FLIPS.get(task, True)))
    val_ds = split_dataset(ctx, "val", _size(ctx))
    in_chans = int(train_ds[0]["image"].shape[0])
    model = create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs)
    loss = loss_function(ctx.spec)

    def loss_fn(outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return loss(outputs, batch["label"])

    return fit_and_save(ctx, model_name, split_path, out_dir, cfg, model, train_ds, val_ds, loss_fn,
                        validation_metric(ctx.spec), in_chans=in_chans, image_size=ctx.tcfg["image_size"])


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """Score the val and test rows -> predictions.csv (Contract 3)."""
    ctx = load_context(config_path, task, split_path)
    model, device = load_for_inference(
        ctx, weights, lambda in_chans: create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs))
    dataset = split_dataset(ctx, ["val", "test"], _size(ctx), cache=False)
    loader = DataLoader(dataset, batch_size=ctx.tcfg["train"]["batch_size"], shuffle=False,
                        num_workers=ctx.tcfg["train"]["num_workers"])
    scores = [probabilities(ctx.spec, model(batch["image"].to(device))).cpu().numpy() for batch in loader]
    write_predictions(out_path, ctx.rows(["val", "test"]), ctx.spec, np.concatenate(scores))
    return Path(out_path)
