"""The stages of the segmentation task: one fold (``medvit cv-fold``), the pooled folds and
their ensemble (``medvit cv-pool``), the external test (``medvit external-test``), and train and
predict on the split as given (``medvit train``/``predict``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from medvit.config import external_manifest_path
from medvit.data.manifest import load_manifest
from medvit.data.splits import check_no_leakage
from medvit.engine import resolve_device, save_weights
from medvit.errors import ConfigError, ManifestError
from medvit.evaluation.evaluate import evaluate_predictions, write_json
from medvit.fileio import atomic_write_text, sha256_file
from medvit.models import count_parameters
from medvit.provenance import provenance
from medvit.tasks.common import load_context, model_sidecar, read_sidecar, task_spec
from medvit.tasks.segmentation.folds import fold_context
from medvit.tasks.segmentation.inference import _fold_predictions
from medvit.tasks.segmentation.models import FoldEnsemble, _load_model
from medvit.tasks.segmentation.training import fit_fold


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
