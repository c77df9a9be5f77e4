"""Patient-to-patient (PTP) evaluation of a slice-level detector.

A brain MRI study is read patient by patient, not slice by slice. PTP turns slice
detections into one decision per patient and scores those decisions:

* a slice is **flagged** when its highest box confidence is ``>= conf``;
* a patient is **predicted positive** when at least ``k`` of their slices are flagged;
* a patient is **truly positive** when at least one of their slices holds a tumour.

Reported (on the ``test`` split): patient-level ``sensitivity`` TP/(TP+FN),
``specificity`` TN/(TN+FP), ``precision`` TP/(TP+FP), ``f1`` 2TP/(2TP+FP+FN),
``accuracy``, and ``fp_slices_per_normal_patient``: flagged slices of truly negative patients
divided by the number of such patients (the false alarms a reader would look at per
healthy patient). Each comes with a percentile cluster-bootstrap interval over test patients
(:func:`medvit.evaluation.bootstrap.cluster_bootstrap`). docs/brain.md restates this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit.config import load_study, task_config
from medvit.errors import ConfigError
from medvit.evaluation.aggregate import PredictionsError, check_predictions
from medvit.evaluation.bootstrap import cluster_bootstrap
from medvit.evaluation.evaluate import ci_key, read_predictions, write_json

PTP_METRICS = ("sensitivity", "specificity", "precision", "f1", "accuracy", "fp_slices_per_normal_patient")


def patient_table(df: pd.DataFrame, conf: float, k: int, positive: str | None = None) -> pd.DataFrame:
    """Per-patient PTP decisions from one row per slice.

    Args:
        df: predictions (Contract 3): ``patient_id``, ``true_<c>`` (1 = tumour slice),
            ``score_<c>`` (the slice's highest box confidence, 0 without a box).
        conf: confidence threshold of a flagged slice (``score >= conf``).
        k: flagged slices that make a patient positive (>= 1).
        positive: the class ``c``; None takes the table's only one.

    Returns:
        One row per patient (first-appearance order): ``patient_id``, ``n_slices``,
        ``tumour_slices``, ``flagged``, ``flagged_tumour``, ``truth`` (0/1), ``pred`` (0/1).
    """
    if k < 1:
        raise ValueError(f"k (min_slices) must be >= 1, got {k}")
    c = positive or check_predictions(df)[0]
    truth = df[f"true_{c}"].to_numpy(float) > 0.5
    flagged = df[f"score_{c}"].to_numpy(float) >= conf
    t = pd.DataFrame({"patient_id": df["patient_id"].astype(str).to_numpy(), "tumour": truth, "flagged": flagged,
                      "flagged_tumour": flagged & truth})
    g = t.groupby("patient_id", sort=False)
    out = pd.DataFrame({"n_slices": g.size(), "tumour_slices": g["tumour"].sum(), "flagged": g["flagged"].sum(),
                        "flagged_tumour": g["flagged_tumour"].sum()}).reset_index()
    out["truth"] = (out["tumour_slices"] > 0).astype(int)
    out["pred"] = (out["flagged"] >= k).astype(int)
    return out


def _weighted(table: pd.DataFrame, W: np.ndarray) -> dict[str, np.ndarray]:
    """PTP metrics for each row of patient weights ``W`` (B, P) -> (B,) arrays (NaN where undefined)."""
    y, p = table["truth"].to_numpy(bool), table["pred"].to_numpy(bool)
    W = np.asarray(W, dtype=float)
    tp, fp = W @ (y & p), W @ (~y & p)
    fn, tn = W @ (y & ~p), W @ (~y & ~p)
    normal_fp_slices = W @ np.where(y, 0.0, table["flagged"].to_numpy(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "accuracy": np.where(tp + fp + fn + tn > 0, (tp + tn) / (tp + fp + fn + tn), np.nan),
            "fp_slices_per_normal_patient": np.where(tn + fp > 0, normal_fp_slices / (tn + fp), np.nan),
        }


def ptp_metrics(df: pd.DataFrame, conf: float, k: int, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                split: str | None = "test", positive: str | None = None) -> dict[str, Any]:
    """PTP metrics with bootstrap intervals (see the module docstring).

    Args:
        df: predictions, one row per slice (``split`` selects the rows when given).
        conf, k: the PTP rule.
        n_boot: bootstrap resamples of patients (0: no intervals).
        ci: interval coverage.
        seed: bootstrap seed.
        split: evaluate the rows of this split (None: every row).
        positive: the class; None takes the table's only one.

    Returns:
        ``{"conf", "k", "split", "n_patients", "n_positive_patients", "n_negative_patients",
        "n_slices", "confusion": {"tp", "fp", "fn", "tn"}, "metrics": {name: {"value",
        "ci<..>": [lo, hi], "n_boot"}}, "bootstrap": {...}}``.

    Raises:
        PredictionsError: no rows in ``split``.
    """
    rows = df if split is None else df[df["split"].astype(str) == split]
    if rows.empty:
        raise PredictionsError(f"no {split!r} rows to evaluate patient to patient")
    table = patient_table(rows, conf, k, positive)
    point = {n: float(v[0]) for n, v in _weighted(table, np.ones((1, len(table)))).items()}
    stats = {n: (lambda W, n=n: _weighted(table, W)[n]) for n in PTP_METRICS}
    boot = cluster_bootstrap(stats, np.arange(len(table)), n_boot, ci, seed)
    y, p = table["truth"].to_numpy(bool), table["pred"].to_numpy(bool)
    key = ci_key(ci)
    return {
        "conf": float(conf), "k": int(k), "split": split,
        "n_patients": len(table), "n_positive_patients": int(y.sum()), "n_negative_patients": int((~y).sum()),
        "n_slices": len(rows),
        "confusion": {"tp": int((y & p).sum()), "fp": int((~y & p).sum()), "fn": int((y & ~p).sum()),
                      "tn": int((~y & ~p).sum())},
        "metrics": {n: {"value": point[n], key: [boot[n].lo, boot[n].hi], "n_boot": boot[n].n_used}
                    for n in PTP_METRICS},
        "bootstrap": {"n": int(n_boot), "ci": float(ci), "seed": int(seed),
                      "method": "percentile; test patients resampled with replacement"},
    }


def ptp_stage(config_path: str | Path, task: str, predictions_path: str | Path, out_path: str | Path,
              section: str = "detection", conf: float | None = None) -> Path:
    """PTP evaluation of a detector's (or cascade's) slice predictions -> ptp.json.

    ``conf`` (when None) and ``k`` come from ``tasks.<task>.<section>`` (``conf``/``threshold``
    and ``min_slices``, the detection block's ``min_slices`` when the section has none). A null
    cascade ``threshold`` means the one the cascade resolved from its classifier's validation
    split, read from the model.json beside the predictions. The bootstrap settings come from
    ``evaluation``. Besides the configured ``k``, the file holds the same metrics for k = 1..3
    (``by_k``) and the patient table (``patients``).

    Raises:
        ConfigError: the threshold is null and no model.json beside the predictions records one.
    """
    study = load_study(config_path)
    tcfg = task_config(study, task)
    block = tcfg.get(section) or {}
    if conf is None:
        conf = block.get("conf", block.get("threshold"))
    if conf is None:
        card_path = Path(predictions_path).parent / "model.json"
        conf = (json.loads(card_path.read_text()) if card_path.is_file() else {}).get("threshold")
        if conf is None:
            raise ConfigError(f"tasks.{task}.{section}.threshold is null and {card_path} records no resolved "
                              "threshold: run the stage that wrote the predictions again, or set the threshold")
    conf = float(conf)
    k = int(block.get("min_slices", tcfg["detection"]["min_slices"]))
    ev = study["evaluation"]
    df = read_predictions(predictions_path)
    kw = {"n_boot": ev["bootstrap"], "ci": ev["ci"], "seed": study["seed"]}
    result = {"study": study["study"], "task": task, "source": section, "predictions": str(predictions_path),
              "definition": "slice flagged when score >= conf; patient positive when >= k flagged slices; "
                            "patient truly positive when >= 1 tumour slice",
              **ptp_metrics(df, conf, k, **kw),
              "by_k": [ptp_metrics(df, conf, kk, **kw) for kk in sorted({1, 2, 3, k})],
              "patients": patient_table(df[df["split"].astype(str) == "test"], conf, k).to_dict("records")}
    return write_json(out_path, result)


__all__ = ["PTP_METRICS", "patient_table", "ptp_metrics", "ptp_stage"]
