"""3D lesion segmentation stages (prostate bpMRI): a multi-channel volume in, a lesion
probability map out, a patient-level score from the map (its maximum by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss

from medvit.data.transforms import augment_transforms
from medvit.evaluation.metrics import dice_score, hd95
from medvit.models import create_model
from medvit.tasks.common import load_context, write_predictions
from medvit.tasks.training import fit_and_save, load_for_inference, seeded_train_config, split_dataset


def patient_score(prob_map: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) lesion probabilities -> (B,) patient csPCa score: the map's maximum."""
    return prob_map.flatten(1).amax(1)


def validation_metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Soft Dice of the predicted maps against the masks over all validation volumes pooled
    (stable with few validation patients, where a patient-level AUROC is not; pooling keeps
    lesion-free volumes, whose per-volume Dice is undefined, from dominating)."""
    probs = outputs.float().sigmoid()
    denom = float(probs.sum() + targets.sum())
    return 2 * float((probs * targets).sum()) / denom if denom > 0 else 1.0


def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    ctx = load_context(config_path, task, split_path)
    cfg = seeded_train_config(ctx)
    roi = ctx.tcfg["roi_size"]
    train_ds = split_dataset(ctx, "train", roi, augment=augment_transforms(3, flips=True, load_mask=True),
                             segmentation=True)
    val_ds = split_dataset(ctx, "val", roi, segmentation=True)
    in_chans = int(train_ds[0]["image"].shape[0])
    model = create_model(model_name, in_chans=in_chans, num_classes=1)
    # batch=True pools Dice over the batch: with per-volume Dice, lesion-free volumes (most
    # patients) pull every voxel to zero and the lesions are never learned.
    loss = DiceFocalLoss(sigmoid=True, batch=True)
    return fit_and_save(ctx, model_name, split_path, out_dir, cfg, model, train_ds, val_ds,
                        lambda out, batch: loss(out, batch["label"]), validation_metric, in_chans=in_chans,
                        roi_size=roi)


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """Segment val and test volumes with MONAI's sliding-window inference; one row per volume
    with the patient-level score, plus lesion ``dice`` and ``hd95`` (voxels of the model grid)."""
    ctx = load_context(config_path, task, split_path)
    model, device = load_for_inference(ctx, weights,
                                       lambda in_chans: create_model(model_name, in_chans=in_chans, num_classes=1))
    roi = ctx.tcfg["roi_size"]
    dataset = split_dataset(ctx, ["val", "test"], roi, segmentation=True, cache=False)
    scores, dices, hds = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        logits = sliding_window_inference(sample["image"][None].to(device), roi_size=roi, sw_batch_size=1,
                                          predictor=model, overlap=0.25)
        probs = logits.float().sigmoid().cpu()
        scores.append(float(patient_score(probs)[0]))
        pred, truth = (probs[0, 0] > 0.5).numpy(), sample["label"][0].numpy() > 0.5
        dices.append(dice_score(pred, truth))
        hds.append(hd95(pred, truth))
    write_predictions(out_path, ctx.rows(["val", "test"]), ctx.spec, np.array(scores)[:, None],
                      extra={"dice": np.array(dices), "hd95": np.array(hds)})
    return Path(out_path)
