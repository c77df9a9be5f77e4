"""The cross-validation comparison (``medvit cv-summary``): per model the fold table with mean
and sd over folds, the pooled and external metrics, parameters, FLOPs and the SSL record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvit.config import SSL_MODELS
from medvit.engine.compute import count_flops
from medvit.evaluation.evaluate import write_json
from medvit.evaluation.metrics import auroc, average_precision
from medvit.evaluation.prostate_report import save_overlays
from medvit.fileio import read_json
from medvit.models import create_model
from medvit.tasks.common import load_context, read_sidecar
from medvit.tasks.segmentation.folds import ssl_encoder_path


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
    png = save_overlays(ctx.df, ctx.manifest.root, positive, task_dir, list(tcfg["models"]),
                        out_path.with_name("overlays.png"), n=tcfg["figures"])
    summary["overlays"] = png.name if png else None
    write_json(out_path, summary)
    return out_path
