"""Training one segmentation model on one fold: Dice + focal loss, validation by sliding-window
inference on whole volumes (:class:`SegmentationTrainer`) scored by pooled soft Dice, and for
``cswin_unet_ssl`` an encoder that starts from the fold's SSL pretraining."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss
from torch import nn

from medvit.config import SSL_MODELS
from medvit.engine import Trainer, load_weights
from medvit.errors import CheckpointError
from medvit.models.cswin import encoder_config
from medvit.tasks.common import StageContext, read_sidecar
from medvit.tasks.segmentation.data import _check_sizes, volume_dataset
from medvit.tasks.segmentation.folds import ssl_encoder_path
from medvit.tasks.segmentation.models import build_model, model_kwargs
from medvit.tasks.training import fit_and_save, seeded_train_config


def validation_metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Soft Dice of the predicted maps against the masks over all validation volumes pooled
    (stable with few validation patients, where a patient-level AUROC is not; pooling keeps
    lesion-free volumes, whose per-volume Dice is undefined, from dominating)."""
    probs = outputs.float().sigmoid()
    denom = float(probs.sum() + targets.sum())
    return 2 * float((probs * targets).sum()) / denom if denom > 0 else 1.0


validation_metric.metric_name = "val_soft_dice"  # type: ignore[attr-defined]  # names it in the log and history.csv


class SegmentationTrainer(Trainer):
    """Validation by sliding-window inference over whole volumes (training sees patches)."""

    def __init__(self, *args: Any, roi_size: Sequence[int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.roi_size = list(roi_size)

    def validation_step(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        logits = sliding_window_inference(batch["image"], roi_size=self.roi_size, sw_batch_size=2,
                                          predictor=self.model, overlap=0.25)
        self._add_val_loss(logits, batch)
        return logits.float().cpu(), batch["label"].float().cpu()


def _init_from_ssl(model: nn.Module, encoder_path: Path, tcfg: dict[str, Any]) -> dict[str, Any]:
    if not encoder_path.is_file():
        raise CheckpointError(f"cswin_unet_ssl starts from the SSL encoder {encoder_path}, which does not exist: "
                              "run `medvit ssl-pretrain` for this fold first")
    meta = read_sidecar(encoder_path)
    wanted = encoder_config(tcfg.get("cswin", {}))
    if meta.get("encoder") != wanted:
        raise CheckpointError(f"the SSL encoder {encoder_path} has architecture {meta.get('encoder')}, the study's "
                              f"tasks.prostate.cswin encoder is {wanted}: rerun the SSL stage")
    load_weights(encoder_path, model.encoder)  # type: ignore[arg-type]
    return {"init": "ssl", "init_weights": str(encoder_path),
            "init_sha256": meta.get("sha256"), "ssl_tasks": meta.get("ssl_tasks")}


def fit_fold(ctx: StageContext, model_name: str, split_path: str | Path, out_dir: str | Path,
             init: str | Path | None = None, fold: int = 0) -> Path:
    """Train ``model_name`` on the context's train rows, select on its val rows ->
    ``out_dir/model.safetensors`` (+ model.json). ``init``: the SSL encoder (cswin_unet_ssl)."""
    cfg = seeded_train_config(ctx)
    size, roi = _check_sizes(ctx.tcfg)
    train_ds = volume_dataset(ctx, ctx.rows("train"), augment=True)
    val_ds = volume_dataset(ctx, ctx.rows("val"))
    in_chans = int(train_ds[0]["image"].shape[0])
    model = build_model(ctx.tcfg, model_name, in_chans)
    card: dict[str, Any] = {"init": "scratch"}
    if model_name in SSL_MODELS:
        card = _init_from_ssl(model, Path(init) if init else ssl_encoder_path(split_path, fold), ctx.tcfg)
    # batch=True pools Dice over the batch: with per-volume Dice, lesion-free volumes (most
    # patients) pull every voxel to zero and the lesions are never learned.
    loss = DiceFocalLoss(sigmoid=True, batch=True)
    return fit_and_save(ctx, model_name, split_path, out_dir, cfg, model, train_ds, val_ds,
                        lambda out, batch: loss(out, batch["label"]), validation_metric,
                        trainer_cls=SegmentationTrainer, trainer_kwargs={"roi_size": roi}, in_chans=in_chans,
                        roi_size=roi, image_size=size[0], model_kwargs=model_kwargs(ctx.tcfg, model_name),
                        fold=fold, folds=ctx.tcfg["folds"],
                        train_patients=int(ctx.rows("train")["patient_id"].nunique()),
                        **card)
