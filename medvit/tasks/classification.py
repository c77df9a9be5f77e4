"""Image classification stages (chest X-ray findings, brain slices, histopathology patches):
binary, multi-class or multi-label, any registered 2D model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medvit.data.datasets import SampleDataset
from medvit.data.transforms import augment_transforms, load_transforms
from medvit.engine import TrainConfig, Trainer, load_weights, resolve_device, save_weights, seed_everything
from medvit.models import count_parameters, create_model
from medvit.tasks.common import StageContext, TaskSpec, load_context, model_sidecar, read_sidecar, records, write_predictions

# Left and right are anatomy on a chest radiograph; flipping elsewhere is label-preserving.
_FLIPS = {"xray": False, "brain": True, "histo": True}


def _sample_loader(ctx: StageContext):
    """record -> sample dict with ``image`` (C, S, S) in [0, 1] and ``label`` (the target)."""
    load = load_transforms(ctx.manifest.root, [ctx.tcfg["image_size"]] * 2)

    def to_sample(rec: dict[str, Any]) -> dict[str, Any]:
        sample = load(rec)
        sample["label"] = torch.as_tensor(rec["target"])
        return sample

    return to_sample


def _dataset(ctx: StageContext, splits: str | list[str], train: bool) -> SampleDataset:
    augment = augment_transforms(2, flips=_FLIPS.get(ctx.task, True)) if train else None
    return SampleDataset(records(ctx, ctx.rows(splits)), _sample_loader(ctx), augment=augment,
                         seed=ctx.study["seed"], cache=train or splits == "val")


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
        truth = np.eye(probs.shape[1])[targets.numpy()] if spec.kind == "multiclass" else targets.numpy()
        aucs = [roc_auc_score(truth[:, j], probs[:, j]) for j in range(probs.shape[1])
                if 0 < truth[:, j].sum() < len(truth)]
        if aucs:
            return float(np.mean(aucs))
        return float(balanced_accuracy_score(truth.argmax(1), probs.argmax(1)))

    return metric


def build_model(ctx: StageContext, model_name: str, in_chans: int) -> nn.Module:
    return create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs)


def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """Train ``model_name`` on the split's train rows, select on val; write model.safetensors + model.json."""
    ctx = load_context(config_path, task, split_path)
    out_dir = Path(out_dir)
    cfg = TrainConfig.from_study(ctx.study, ctx.tcfg["train"])
    seed_everything(cfg.seed, cfg.deterministic)
    train_ds, val_ds = _dataset(ctx, "train", train=True), _dataset(ctx, "val", train=False)
    in_chans = int(train_ds[0]["image"].shape[0])
    model = build_model(ctx, model_name, in_chans)
    trainer = Trainer(model, train_ds, val_ds, cfg, out_dir, loss_fn=_loss_on_batch(loss_function(ctx.spec)),
                      val_metric_fn=validation_metric(ctx.spec))
    result = trainer.fit(resume=True)
    params, trainable = count_parameters(model)
    meta = model_sidecar(ctx, model_name, split_path, in_chans=in_chans, image_size=ctx.tcfg["image_size"],
                         params=params, trainable_params=trainable, train_seconds=result.train_seconds,
                         best_epoch=result.best_epoch, best_val_metric=result.best_metric, train=ctx.tcfg["train"])
    weights = out_dir / "model.safetensors"
    save_weights(weights, model, meta)
    return weights


def _loss_on_batch(loss: nn.Module):
    def fn(outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return loss(outputs, batch["label"])

    return fn


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """Score the val and test rows -> predictions.csv (Contract 3)."""
    ctx = load_context(config_path, task, split_path)
    device = resolve_device(ctx.study["device"])
    meta = read_sidecar(weights)
    model = build_model(ctx, model_name, int(meta.get("in_chans", 1)))
    load_weights(weights, model)
    model.to(device).eval()
    rows = ctx.rows(["val", "test"])
    dataset = _dataset(ctx, ["val", "test"], train=False)
    loader = DataLoader(dataset, batch_size=ctx.tcfg["train"]["batch_size"], shuffle=False,
                        num_workers=ctx.tcfg["train"]["num_workers"])
    scores = []
    for batch in loader:
        scores.append(probabilities(ctx.spec, model(batch["image"].to(device))).cpu().numpy())
    write_predictions(out_path, rows, ctx.spec, np.concatenate(scores))
    return Path(out_path)
