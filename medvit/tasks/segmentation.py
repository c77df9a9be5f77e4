"""3D lesion segmentation stages (prostate bpMRI): a multi-channel volume in, a lesion
probability map out, a patient-level score from the map (its maximum by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss
from torch import nn

from medvit.data.datasets import SampleDataset
from medvit.data.transforms import augment_transforms, load_transforms
from medvit.engine import TrainConfig, Trainer, load_weights, resolve_device, save_weights, seed_everything
from medvit.evaluation.metrics import dice_score, hd95
from medvit.models import count_parameters, create_model
from medvit.tasks.common import StageContext, load_context, model_sidecar, read_sidecar, records, write_predictions


def _sample_loader(ctx: StageContext):
    """record -> ``image`` (C, D, H, W) in [0, 1], ``label`` (1, D, H, W) mask, ``target`` (1,) patient label."""
    load = load_transforms(ctx.manifest.root, ctx.tcfg["roi_size"], load_mask=True)

    def to_sample(rec: dict[str, Any]) -> dict[str, Any]:
        sample = load(rec)
        sample["target"] = torch.as_tensor(rec["target"])
        return sample

    return to_sample


def _dataset(ctx: StageContext, splits: str | list[str], train: bool) -> SampleDataset:
    augment = augment_transforms(3, flips=True, load_mask=True) if train else None
    return SampleDataset(records(ctx, ctx.rows(splits)), _sample_loader(ctx), augment=augment,
                         seed=ctx.study["seed"], cache=True)


def patient_score(prob_map: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) lesion probabilities -> (B,) patient csPCa score: the map's maximum."""
    return prob_map.flatten(1).amax(1)


def validation_metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean soft Dice between the predicted map and the mask over validation volumes
    (stable with few validation patients, where a patient-level AUROC is not)."""
    probs = outputs.float().sigmoid()
    inter = (probs * targets).flatten(1).sum(1)
    denom = probs.flatten(1).sum(1) + targets.flatten(1).sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-6), torch.ones_like(denom))
    return float(dice.mean())


def build_model(ctx: StageContext, model_name: str, in_chans: int) -> nn.Module:
    return create_model(model_name, in_chans=in_chans, num_classes=1)


def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    ctx = load_context(config_path, task, split_path)
    out_dir = Path(out_dir)
    cfg = TrainConfig.from_study(ctx.study, ctx.tcfg["train"])
    seed_everything(cfg.seed, cfg.deterministic)
    train_ds, val_ds = _dataset(ctx, "train", train=True), _dataset(ctx, "val", train=False)
    in_chans = int(train_ds[0]["image"].shape[0])
    model = build_model(ctx, model_name, in_chans)
    loss = DiceFocalLoss(sigmoid=True)
    trainer = Trainer(model, train_ds, val_ds, cfg, out_dir, loss_fn=lambda out, batch: loss(out, batch["label"]),
                      val_metric_fn=validation_metric)
    result = trainer.fit(resume=True)
    params, trainable = count_parameters(model)
    meta = model_sidecar(ctx, model_name, split_path, in_chans=in_chans, roi_size=ctx.tcfg["roi_size"],
                         params=params, trainable_params=trainable, train_seconds=result.train_seconds,
                         best_epoch=result.best_epoch, best_val_metric=result.best_metric, train=ctx.tcfg["train"])
    weights = out_dir / "model.safetensors"
    save_weights(weights, model, meta)
    return weights


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """Segment val and test volumes with MONAI's sliding-window inference; one row per volume
    with the patient-level score, plus lesion ``dice`` and ``hd95`` (voxels of the model grid)."""
    ctx = load_context(config_path, task, split_path)
    device = resolve_device(ctx.study["device"])
    meta = read_sidecar(weights)
    model = build_model(ctx, model_name, int(meta.get("in_chans", 3)))
    load_weights(weights, model)
    model.to(device).eval()
    rows = ctx.rows(["val", "test"])
    dataset = _dataset(ctx, ["val", "test"], train=False)
    scores, dices, hds = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"][None].to(device)
        logits = sliding_window_inference(image, roi_size=ctx.tcfg["roi_size"], sw_batch_size=1, predictor=model,
                                          overlap=0.25)
        probs = logits.float().sigmoid().cpu()
        scores.append(float(patient_score(probs)[0]))
        pred = (probs[0, 0] > 0.5).numpy()
        truth = sample["label"][0].numpy() > 0.5
        dices.append(dice_score(pred, truth))
        hds.append(hd95(pred, truth))
    write_predictions(out_path, rows, ctx.spec, np.array(scores)[:, None],
                      extra={"dice": np.array(dices), "hd95": np.array(hds)})
    return Path(out_path)
