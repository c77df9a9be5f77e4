"""3D lesion segmentation stages (prostate bpMRI, the CSwin-UNet paper): a multi-channel
volume in, a lesion probability map out, a patient-level csPCa score from the map (its
maximum), compared across models in patient-level k-fold cross-validation.

Stages (each one ``medvit`` subcommand; workflows/rules/prostate.smk runs them):

* :func:`cv_fold_stage` (``medvit cv-fold``): train one model on one fold and predict the
  fold's validation and test volumes (``fold<i>/{model.safetensors, predictions.csv,
  split.csv, maps/}``); ``cswin_unet_ssl`` starts from that fold's SSL encoder
  (:mod:`medvit.tasks.ssl`).
* :func:`cv_pool_stage` (``medvit cv-pool``): the model-level ``predictions.csv`` pooling the
  out-of-fold test predictions (with a ``fold`` column; evaluated by the generic
  ``evaluate`` rule) and ``model.safetensors``: the k fold models as one ensemble (mean
  probability), used for the external test.
* :func:`external_test_stage` (``medvit external-test``): the ensemble on a second manifest.
* :func:`cv_summary_stage` (``medvit cv-summary``): the fold table (mean +- sd over folds),
  parameters, FLOPs, inference time, external results, slice overlays.

Folds (:func:`fold_split`): ``folds: 1`` keeps the split of ``split.csv``; ``folds: k >= 2``
assigns every labelled patient to one of k test folds (:func:`medvit.data.splits.patient_kfold`,
stratified by csPCa), and for fold i holds out ``split.val_fraction`` of the other
patients for model selection. ``unlabeled`` rows are only ever read by SSL pretraining.

Predicted maps are written as NIfTI on the input's grid with the input's affine, and as
DICOM SEG when the input was a DICOM series (:mod:`medvit.data.export`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss
from torch import nn

from medvit.config import CSWIN_MODELS, SSL_MODELS, external_manifest_path
from medvit.data.datasets import SampleDataset
from medvit.data.export import ExportError, save_dicom_seg, save_nifti_dicom_grid, save_nifti_like, to_input_grid
from medvit.data.io import read_image, read_sample
from medvit.data.manifest import load_manifest
from medvit.data.splits import assign_splits, check_no_leakage, patient_kfold
from medvit.data.transforms import augment_transforms
from medvit.engine import Trainer, load_weights, resolve_device, save_weights
from medvit.engine.compute import count_flops
from medvit.engine.seed import derive_seed
from medvit.errors import CheckpointError, ConfigError, ManifestError
from medvit.evaluation.evaluate import evaluate_predictions, write_json
from medvit.evaluation.metrics import auroc, average_precision, dice_score, hd95
from medvit.fileio import atomic_path, atomic_write_text, read_json, sha256_file
from medvit.models import count_parameters, create_model
from medvit.models.cswin import encoder_config
from medvit.provenance import provenance
from medvit.tasks.common import (
    StageContext,
    load_context,
    model_sidecar,
    read_sidecar,
    records,
    task_spec,
    write_predictions,
)
from medvit.tasks.preprocess import sample_loading
from medvit.tasks.training import fit_and_save, seeded_train_config

"""Models whose encoder starts from the fold's self-supervised pretraining."""


# ------------------------------------------------------------------------------ models
def model_kwargs(tcfg: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Architecture settings of a model from the task config (``cswin`` for CSwin-UNets)."""
    return dict(tcfg.get("cswin", {})) if model_name in CSWIN_MODELS else {}


def build_model(tcfg: dict[str, Any], model_name: str, in_chans: int) -> nn.Module:
    return create_model(model_name, in_chans=in_chans, num_classes=1, **model_kwargs(tcfg, model_name))


class FoldEnsemble(nn.Module):
    """The k fold models of one architecture as one network: the mean of their lesion
    probabilities, returned as logits. Shapes: (B, C, D, H, W) -> (B, 1, D, H, W)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([m(x).float().sigmoid() for m in self.members]).mean(0)
        return torch.logit(prob.clamp(1e-6, 1 - 1e-6))


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


validation_metric.metric_name = "val_soft_dice"  # type: ignore[attr-defined]  # names it in the log and history.csv


# ------------------------------------------------------------------------------ folds
def fold_split(df: pd.DataFrame, folds: int, fold: int, seed: int, val_fraction: float) -> pd.DataFrame:
    """The split of cross-validation fold ``fold`` (module docstring).

    Args:
        df: the split manifest (``split`` column; ``unlabeled`` rows are kept as they are).
        folds: k; 1 keeps the given train/val/test split.
        fold: 0-based fold index (< k).
        seed: the study seed (folds and the validation draw depend on it only).
        val_fraction: fraction of the non-test patients held out for validation.

    Returns:
        A copy with ``split`` (``train``/``val``/``test``/``unlabeled``) and ``fold`` (the
        test fold of each labelled patient, -1 for unlabeled rows).

    Raises:
        ConfigError: ``fold`` out of range.
        ManifestError: too few patients for k folds plus train and validation patients.
    """
    if not 0 <= fold < max(folds, 1):
        raise ConfigError(f"fold {fold} is out of range for tasks.prostate.folds {folds}; allowed: 0 to {folds - 1}")
    df = df.copy()
    unlabeled = df["split"].astype(str) == "unlabeled"
    if folds == 1:
        df["fold"] = np.where(unlabeled, -1, 0)
        return df
    labeled = patient_kfold(df.loc[~unlabeled].drop(columns=["split"]), k=folds, seed=seed)
    test = labeled["fold"] == fold
    rest = assign_splits(labeled.loc[~test].drop(columns=["fold"]), seed=derive_seed(seed, "cv-val", fold) % 2**31,
                         val_fraction=val_fraction, test_fraction=0.0)
    df["fold"] = -1
    df.loc[labeled.index, "fold"] = labeled["fold"].to_numpy()
    df.loc[labeled.index[test.to_numpy()], "split"] = "test"
    df.loc[rest.index, "split"] = rest["split"].to_numpy()
    check_no_leakage(df)
    return df


def fold_context(config_path: str | Path, task: str, split_path: str | Path, fold: int) -> StageContext:
    """A stage context whose ``split`` column is the split of ``fold`` (:func:`fold_split`)."""
    ctx = load_context(config_path, task, split_path)
    df = fold_split(ctx.df, ctx.tcfg["folds"], fold, ctx.study["seed"], ctx.tcfg["split"]["val_fraction"])
    return dataclasses.replace(ctx, manifest=dataclasses.replace(ctx.manifest, df=df))


# ------------------------------------------------------------------------------ data
def _check_sizes(tcfg: dict[str, Any]) -> tuple[list[int], list[int]]:
    size, roi = [int(tcfg["image_size"])] * 3, [int(s) for s in tcfg["roi_size"]]
    if any(r > s for r, s in zip(roi, size)):
        raise ConfigError(f"tasks.prostate.roi_size: got {roi} with image_size {size[0]}; allowed: each at most "
                          "image_size (the patch is cut out of the resized volume)")
    return size, roi


def volume_dataset(ctx: StageContext, rows: pd.DataFrame, augment: bool = False, cache: bool = True,
                   with_mask: bool = True) -> SampleDataset:
    """Volumes of ``rows`` resized to ``image_size`` (and their masks); with ``augment``, a
    random ``roi_size`` patch (when smaller than the volume), flips and intensity jitter."""
    size, roi = _check_sizes(ctx.tcfg)
    load, in_memory = sample_loading(ctx, size, with_mask, cache)
    keys = ["image", "label"] if with_mask else ["image"]
    ops: list[Any] = []
    if augment:
        if roi != size:
            ops.append(mt.RandSpatialCropd(keys, roi_size=roi, random_size=False))
        ops.append(augment_transforms(3, flips=ctx.tcfg["augment"]["flips"], load_mask=with_mask))
    recs = records(ctx, rows) if with_mask else [
        {"row": r, "patient_id": str(r["patient_id"]),
         "sample_id": str(r["sample_id"])} for r in rows.to_dict("records")]

    def to_sample(rec: dict[str, Any]) -> dict[str, Any]:
        sample = load(rec)
        if "target" in rec:
            sample["target"] = torch.as_tensor(rec["target"])
        return sample

    return SampleDataset(recs, to_sample, augment=mt.Compose(ops) if ops else None, seed=ctx.study["seed"],
                         cache=in_memory)


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


def ssl_encoder_path(split_path: str | Path, fold: int) -> Path:
    """``<task folder>/ssl/fold<i>/encoder.safetensors``: the SSL encoder of a fold."""
    return Path(split_path).parent / "ssl" / f"fold{fold}" / "encoder.safetensors"


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


# ------------------------------------------------------------------------------ inference
def _reference_image(row: dict[str, Any]) -> str:
    """The first image column of a row (the map is written on its grid), e.g. ``image_t2w``."""
    cols = [c for c in row if c == "image" or str(c).startswith("image_")]
    return str(row[cols[0]])


@torch.no_grad()
def predict_rows(ctx: StageContext, model: nn.Module, device: torch.device, rows: pd.DataFrame,
                 maps_dir: Path | None = None, map_splits: Sequence[str] = ("test",)) -> dict[str, np.ndarray]:
    """Segment ``rows`` with sliding-window inference; write maps of ``map_splits`` rows.

    Returns:
        per row: ``score`` (patient-level: map maximum), ``dice`` and ``hd95`` (mm, model grid)
        against the mask, ``seconds`` (inference wall time per volume) and ``prob_map``/``mask_map``
        (paths relative to ``maps_dir.parent``, empty when not written).
    """
    _, roi = _check_sizes(ctx.tcfg)
    dataset = volume_dataset(ctx, rows, cache=False)
    out: dict[str, list[Any]] = {k: [] for k in ("score", "dice", "hd95", "seconds", "prob_map", "mask_map",
                                                 "dicom_seg")}
    for i, row in enumerate(rows.to_dict("records")):
        sample = dataset[i]
        t0 = time.perf_counter()
        logits = sliding_window_inference(sample["image"][None].to(device), roi_size=roi, sw_batch_size=2,
                                          predictor=model, overlap=0.25)
        probs = logits.float().sigmoid().cpu()
        out["seconds"].append(time.perf_counter() - t0)
        out["score"].append(float(patient_score(probs)[0]))
        pred, truth = (probs[0, 0] > 0.5).numpy(), sample["label"][0].numpy() > 0.5
        source = read_image(ctx.manifest.root / _reference_image(row))
        grid_mm = [sp * n / m for sp, n, m in zip(source.spacing, source.shape[1:], pred.shape)]
        out["dice"].append(dice_score(pred, truth))
        out["hd95"].append(hd95(pred, truth, spacing=grid_mm))
        paths = ("", "", "")
        if maps_dir is not None and row["split"] in map_splits:
            paths = write_maps(probs[0, 0].numpy(), row, ctx.manifest.root, maps_dir)
        for key, p in zip(("prob_map", "mask_map", "dicom_seg"), paths):
            out[key].append(p)
    return {k: np.asarray(v) for k, v in out.items()}


def write_maps(prob: np.ndarray, row: dict[str, Any], root: Path, maps_dir: Path,
               threshold: float = 0.5) -> tuple[str, str, str]:
    """Write a model-grid probability map as ``<sample_id>_prob.nii.gz`` and its mask
    (``prob > threshold``) as ``<sample_id>_mask.nii.gz`` on the input's grid and affine,
    plus ``<sample_id>_seg.dcm`` (DICOM SEG) when the input is DICOM (whose NIfTI maps carry
    the series' affine from its position/orientation headers).

    Returns:
        (prob, mask, seg) paths relative to ``maps_dir.parent`` ("" for a file not written).
    """
    ref = root / _reference_image(row)
    source = read_image(ref)
    prob_in = to_input_grid(prob, source.shape[1:], mode="trilinear")
    mask_in = (prob_in > threshold).astype(np.uint8)
    sid = str(row["sample_id"])
    base = maps_dir.parent
    if source.source_format == "nifti":
        p = save_nifti_like(prob_in, ref, maps_dir / f"{sid}_prob.nii.gz", dtype=np.float32)
        m = save_nifti_like(mask_in, ref, maps_dir / f"{sid}_mask.nii.gz", dtype=np.uint8)
        return str(p.relative_to(base)), str(m.relative_to(base)), ""
    if source.source_format in ("dicom", "dicom-series"):
        s = save_dicom_seg(mask_in, ref, maps_dir / f"{sid}_seg.dcm", patient_id=str(row["patient_id"]))
        try:  # NIfTI on the series' grid too, where its headers give the geometry
            p = save_nifti_dicom_grid(prob_in, ref, maps_dir / f"{sid}_prob.nii.gz", dtype=np.float32)
            m = save_nifti_dicom_grid(mask_in, ref, maps_dir / f"{sid}_mask.nii.gz", dtype=np.uint8)
        except ExportError:
            return "", "", str(s.relative_to(base))
        return str(p.relative_to(base)), str(m.relative_to(base)), str(s.relative_to(base))
    return "", "", ""


def _fold_predictions(ctx: StageContext, model: nn.Module, device: torch.device, out_path: Path,
                      splits: Sequence[str], maps_dir: Path | None) -> pd.DataFrame:
    rows = ctx.rows(list(splits))
    res = predict_rows(ctx, model, device, rows, maps_dir=maps_dir)
    extra = {"fold": rows["fold"].to_numpy() if "fold" in rows else np.zeros(len(rows), int),
             "dice": res["dice"], "hd95": res["hd95"], "seconds": res["seconds"],
             "prob_map": res["prob_map"], "mask_map": res["mask_map"], "dicom_seg": res["dicom_seg"]}
    return write_predictions(out_path, rows, ctx.spec, res["score"][:, None], extra=extra)


def _load_model(weights: str | Path, model_name: str, tcfg: dict[str, Any], device: torch.device) -> nn.Module:
    meta = read_sidecar(weights)
    if "in_chans" not in meta:
        raise CheckpointError(f"{weights}: its model.json lacks in_chans; retrain the model")
    members = int(meta.get("members", 0))

    def build() -> nn.Module:
        return create_model(model_name, in_chans=int(meta["in_chans"]), num_classes=1,
                            **meta.get("model_kwargs", model_kwargs(tcfg, model_name)))

    model: nn.Module = FoldEnsemble([build() for _ in range(members)]) if members else build()
    load_weights(weights, model)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ stages
def cv_fold_stage(config_path: str | Path, task: str, model_name: str, split_path: str | Path, fold: int,
                  out_dir: str | Path, init: str | Path | None = None) -> Path:
    """Train ``model_name`` on fold ``fold`` and predict the fold's val and test volumes.

    Writes into ``out_dir``: ``split.csv`` (the fold's patient split), ``model.safetensors``
    + ``model.json``, ``predictions.csv`` (val and test rows; ``fold``, ``dice``, ``hd95``,
    ``seconds`` and map paths beside the scores), ``maps/`` (test volumes' probability maps
    and masks on the input grid), ``train.log``, ``checkpoints/``.

    Returns:
        the path of ``predictions.csv``.
    """
    ctx = fold_context(config_path, task, split_path, fold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "split.csv", ctx.df[["patient_id", "sample_id", "split", "fold"]].to_csv(index=False))
    weights = fit_fold(ctx, model_name, split_path, out_dir, init=init, fold=fold)
    device = resolve_device(ctx.study["device"])
    model = _load_model(weights, model_name, ctx.tcfg, device)
    _fold_predictions(ctx, model, device, out_dir / "predictions.csv", ["val", "test"], out_dir / "maps")
    return out_dir / "predictions.csv"


def cv_pool_stage(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
                  fold_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Pool the folds of one model -> ``out_dir/predictions.csv`` (the out-of-fold test rows,
    with their ``fold``; with ``folds: 1`` the val rows too) and ``out_dir/model.safetensors``
    (the fold models as a :class:`FoldEnsemble`; its model.json sums the folds' training time
    and records the parameters of one member)."""
    ctx = load_context(config_path, task, split_path)
    out_dir = Path(out_dir)
    folds = int(ctx.tcfg["folds"])
    if len(fold_dirs) != folds:
        raise ConfigError(f"cv-pool got {len(fold_dirs)} fold folder(s) for tasks.{task}.folds {folds}")
    parts, members, metas = [], [], []
    device = torch.device("cpu")
    for d in map(Path, fold_dirs):
        preds = pd.read_csv(d / "predictions.csv", dtype={"patient_id": str, "sample_id": str}, keep_default_na=False)
        if folds > 1:
            preds = preds[preds["split"] == "test"]
        for col in ("prob_map", "mask_map", "dicom_seg"):
            preds[col] = [str(Path(d.name) / p) if isinstance(p, str) and p else "" for p in preds[col]]
        parts.append(preds)
        members.append(_load_model(d / "model.safetensors", model_name, ctx.tcfg, device))
        metas.append(read_sidecar(d / "model.safetensors"))
    pooled = pd.concat(parts, ignore_index=True)
    if pooled["sample_id"].duplicated().any():
        raise ManifestError("cross-validation folds share test volumes: "
                            + ", ".join(pooled.loc[pooled["sample_id"].duplicated(), "sample_id"].head(5)))
    check_no_leakage(pooled)
    pooled = pooled.sort_values(["fold", "patient_id", "sample_id"]).reset_index(drop=True)
    atomic_write_text(out_dir / "predictions.csv", pooled.to_csv(index=False, float_format="%.6g"))
    ensemble = FoldEnsemble(members)
    params, trainable = count_parameters(members[0])
    meta = model_sidecar(ctx, model_name, split_path, params=params, trainable_params=trainable,
                         train_seconds=float(sum(m.get("train_seconds") or 0.0 for m in metas)),
                         members=len(members), folds=folds, in_chans=metas[0]["in_chans"],
                         roi_size=metas[0]["roi_size"], image_size=metas[0].get("image_size"),
                         model_kwargs=metas[0].get("model_kwargs", {}), init=metas[0].get("init", "scratch"),
                         fold_train_seconds=[m.get("train_seconds") for m in metas],
                         fold_best_epochs=[m.get("best_epoch") for m in metas],
                         note="k-fold ensemble (mean probability of the fold models); params are one member's")
    save_weights(out_dir / "model.safetensors", ensemble, meta)
    return out_dir / "predictions.csv"


def external_test_stage(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
                   weights: str | Path, out_dir: str | Path) -> Path:
    """Evaluate a trained model (the fold ensemble) on the external manifest ->
    ``out_dir/predictions.csv`` (every row ``test``), ``out_dir/metrics.json`` (the study's
    evaluation settings; no validation rows, so thresholds fall back to 0.5) and maps."""
    ctx = load_context(config_path, task, split_path)
    path = external_manifest_path(ctx.study, task)
    if path is None:
        raise ConfigError(f"tasks.{task}: no external cohort configured; set external_manifest (a manifest path) "
                          "or external_synthetic.patients > 0")
    if not path.is_file():
        raise ConfigError(f"tasks.{task}.external_manifest: file not found: {path}")
    manifest = load_manifest(path, check_files=True)
    df = manifest.df.copy()
    if "split" in df.columns and (df["split"].astype(str) == "unlabeled").any():
        df = df[df["split"].astype(str) != "unlabeled"]
    df["split"] = "test"
    spec = task_spec(task, ctx.tcfg, df)
    if spec.classes != ctx.spec.classes:
        raise ManifestError(f"external manifest {path} has positive class {spec.classes}, the study "
                            f"{ctx.spec.classes}")
    ext = dataclasses.replace(ctx, manifest=dataclasses.replace(manifest, df=df.reset_index(drop=True)), spec=spec)
    device = resolve_device(ctx.study["device"])
    model = _load_model(weights, model_name, ctx.tcfg, device)
    out_dir = Path(out_dir)
    preds = _fold_predictions(ext, model, device, out_dir / "predictions.csv", ["test"], out_dir / "maps")
    ev = ctx.study["evaluation"]
    result = evaluate_predictions(preds, aggregate=ev["aggregate"], top_k=ev["top_k"], threshold=ev["threshold"],
                                  n_bootstrap=ev["bootstrap"], ci=ev["ci"], seed=ctx.study["seed"])
    prov = provenance(config=ctx.study, config_path=config_path, manifest_path=path)
    prov["predictions_sha256"] = sha256_file(out_dir / "predictions.csv")
    write_json(out_dir / "metrics.json", {"study": ctx.study["study"], "task": task, "model": model_name,
                                          "cohort": "external", "manifest": str(path), **result,
                                          "params": read_sidecar(weights).get("params"),
                                          "n_quarantined": len(manifest.problems), "provenance": prov})
    return out_dir / "metrics.json"


# ------------------------------------------------------------------------------ single split
def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """``medvit train`` on the split as given (fold 0 of ``folds: 1``); the workflow runs
    :func:`cv_fold_stage` instead."""
    return fit_fold(load_context(config_path, task, split_path), model_name, split_path, out_dir)


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """``medvit predict``: val and test volumes of the split -> predictions.csv (one row per
    volume with the patient-level score, ``dice``, ``hd95`` in mm) and their maps in
    ``maps/`` beside it."""
    ctx = load_context(config_path, task, split_path)
    device = resolve_device(ctx.study["device"])
    model = _load_model(weights, model_name, ctx.tcfg, device)
    out_path = Path(out_path)
    _fold_predictions(ctx, model, device, out_path, ["val", "test"], out_path.parent / "maps")
    return out_path


# ------------------------------------------------------------------------------ summary
def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def fold_metrics(preds: pd.DataFrame, positive: str) -> dict[str, float]:
    """Metrics of one fold's test rows: patient-level ``auroc`` and ``ap`` (patient score =
    maximum over the patient's volumes), lesion ``dice`` and ``hd95`` (mm; means over the
    volumes with a lesion), ``seconds`` per volume, ``n_patients``, ``n_positive``."""
    test = preds[preds["split"] == "test"]
    per_patient = test.groupby("patient_id").agg(y=(f"true_{positive}", "max"), s=(f"score_{positive}", "max"))
    lesion = test[test[f"true_{positive}"] == 1]
    return {"auroc": auroc(per_patient["y"].to_numpy(), per_patient["s"].to_numpy()),
            "ap": average_precision(per_patient["y"].to_numpy(), per_patient["s"].to_numpy()),
            "dice": float(lesion["dice"].mean()) if len(lesion) else float("nan"),
            "hd95": float(pd.to_numeric(lesion["hd95"], errors="coerce").replace(np.inf, np.nan).mean())
            if len(lesion) else float("nan"),
            "seconds": float(test["seconds"].mean()) if "seconds" in test and len(test) else float("nan"),
            "n_patients": len(per_patient), "n_positive": int(per_patient["y"].sum())}


def cv_summary_stage(config_path: str | Path, task: str, split_path: str | Path, out_path: str | Path) -> Path:
    """The cross-validation comparison of every model of the task -> ``cv_summary.json`` and
    ``overlays.png`` beside it.

    Per model: the fold table (AUROC, AP, lesion Dice, HD95 and inference seconds per
    volume of each fold, and their mean and sd over folds), the pooled out-of-fold metrics
    with bootstrap CIs (from ``<model>/metrics.json``), parameters, FLOPs of one forward
    pass on one ``roi_size`` patch (:func:`medvit.engine.compute.count_flops`, the same
    counter for every model), the external-test metrics when present, and for
    ``cswin_unet_ssl`` the SSL tasks and final losses.
    """
    ctx = load_context(config_path, task, split_path)
    tcfg, positive = ctx.tcfg, ctx.spec.classes[0]
    task_dir = Path(split_path).parent
    folds = int(tcfg["folds"])
    summary: dict[str, Any] = {"study": ctx.study["study"], "task": task, "folds": folds, "positive_class": positive,
                               "roi_size": tcfg["roi_size"], "image_size": tcfg["image_size"], "train": tcfg["train"],
                               "flops_counter": "torch FlopCounterMode, one forward pass on a (1, C, *roi_size) "
                                                "patch; 1 multiply-add = 2 FLOPs", "models": {}}
    for name in tcfg["models"]:
        mdir = task_dir / name
        per_fold = []
        for i in range(folds):
            preds = pd.read_csv(mdir / f"fold{i}" / "predictions.csv", dtype={"patient_id": str, "sample_id": str},
                                keep_default_na=False)
            for col in ("dice", "hd95", "seconds", f"score_{positive}", f"true_{positive}"):
                preds[col] = pd.to_numeric(preds[col], errors="coerce")
            per_fold.append({"fold": i, **fold_metrics(preds, positive)})
        card = read_sidecar(mdir / "model.safetensors")
        model = create_model(name, in_chans=int(card["in_chans"]), num_classes=1, **card.get("model_kwargs", {}))
        flops = count_flops(model, torch.zeros(1, int(card["in_chans"]), *tcfg["roi_size"]))
        pooled = read_json(mdir / "metrics.json", {}).get("metrics", {})
        entry: dict[str, Any] = {
            "per_fold": per_fold,
            **{k: _mean_sd([f[k] for f in per_fold]) for k in ("auroc", "ap", "dice", "hd95", "seconds")},
            "pooled": {k: pooled[k] for k in ("auroc", "ap", "dice", "hd95") if k in pooled},
            "params": card.get("params"), "flops": int(flops), "train_seconds": card.get("train_seconds"),
            "init": card.get("init", "scratch")}
        external = read_json(mdir / "external" / "metrics.json", {})
        if external:
            entry["external"] = {"n_patients": external.get("n_patients"), "manifest": external.get("manifest"),
                                 "metrics": {k: external["metrics"][k] for k in ("auroc", "ap", "dice", "hd95")
                                             if k in external.get("metrics", {})}}
        if name in SSL_MODELS:
            encs = [read_json(ssl_encoder_path(split_path, i).with_suffix(".json"), {}) for i in range(folds)]
            entry["ssl"] = {"tasks": encs[0].get("ssl_tasks"), "final_loss": [e.get("final_loss") for e in encs],
                            "train_patients": [e.get("train_patients") for e in encs],
                            "splits_seen": sorted({s for e in encs for s in e.get("splits_seen", [])})}
        summary["models"][name] = entry
    out_path = Path(out_path)
    png = save_overlays(ctx, task_dir, list(tcfg["models"]), out_path.with_name("overlays.png"), n=tcfg["figures"])
    summary["overlays"] = png.name if png else None
    write_json(out_path, summary)
    return out_path


def save_overlays(ctx: StageContext, task_dir: Path, models: Sequence[str], path: Path, n: int = 3) -> Path | None:
    """PNG: for ``n`` out-of-fold test patients (lesion patients first), the axial slice
    through the largest lesion area (or the highest predicted probability): T2w with the
    true lesion outline, then each model's probability map over T2w with its patient score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = ctx.spec.classes[0]
    pooled = {m: pd.read_csv(task_dir / m / "predictions.csv", dtype={"sample_id": str, "patient_id": str},
                             keep_default_na=False).set_index("sample_id") for m in models}
    first = pooled[models[0]]
    if n <= 0 or first.empty:
        return None
    order = first.assign(pos=pd.to_numeric(first[f"true_{positive}"])).sort_values(["pos"], ascending=False,
                                                                                   kind="stable")
    chosen = [s for s in order.index if all(pooled[m].loc[s, "prob_map"] for m in models)][:n]
    if not chosen:
        return None
    rows_by_sid = ctx.df.set_index(ctx.df["sample_id"].astype(str))
    fig, axes = plt.subplots(len(chosen), len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.3 * len(chosen)),
                             squeeze=False)
    for r, sid in enumerate(chosen):
        row = rows_by_sid.loc[sid].to_dict()
        image = read_sample(row, ctx.manifest.root).array[0]
        truth = (read_image(ctx.manifest.root / row["mask"]).array[0] > 0.5) if row.get("mask") else None
        maps = {m: read_image(task_dir / m / pooled[m].loc[sid, "prob_map"]).array[0] for m in models}
        if truth is not None and truth.any():
            z = int(truth.sum(axis=(1, 2)).argmax())
        else:
            z = int(np.unravel_index(int(np.argmax(maps[models[0]])), maps[models[0]].shape)[0])
        lo, hi = np.percentile(image[z], [1, 99])
        for c in range(len(models) + 1):
            ax = axes[r, c]
            ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if c:
                m = models[c - 1]
                ax.imshow(np.ma.masked_less(maps[m][z], 0.05), cmap="hot", vmin=0, vmax=1, alpha=0.6)
                ax.set_title(f"{m}\nscore {float(pooled[m].loc[sid, f'score_{positive}']):.2f}", fontsize=7)
            else:
                ax.set_title(f"{sid} ({'csPCa' if int(first.loc[sid, f'true_{positive}']) else 'no csPCa'})\n"
                             f"T2w slice {z}", fontsize=7)
            if truth is not None and truth[z].any():
                ax.contour(truth[z].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path

