"""Reading predictions tables and aggregating sample scores to patients.

A predictions table (Contract 3) has ``patient_id``, ``sample_id``, ``split`` and, per class
or finding ``<c>``, ``true_<c>`` (0/1) and ``score_<c>`` (in [0, 1]); segmentation adds
``dice`` and ``hd95``. The task kind is read from the table alone, so every metric can be
recomputed from predictions.csv:

* one class pair -> ``binary``;
* several pairs, every row with exactly one ``true_`` = 1 and scores summing to 1
  (+-1e-3) -> ``multiclass`` (softmax);
* otherwise -> ``multilabel`` (one sigmoid per finding).

Patient aggregation (see docs/metrics.md):

* scores: ``max`` (default; a patient is as suspicious as their most suspicious sample),
  ``mean``, or ``topk`` (mean of the ``top_k`` highest; all samples when fewer). Multiclass
  scores are always the mean softmax vector (soft voting): a per-class max would mix samples
  and no longer sum to 1.
* truth: max over samples for binary/multilabel (positive if any sample is); the most
  frequent class for multiclass (ties -> the first class in column order).
* ``dice``/``hd95`` and any other numeric column: mean over the patient's samples (NaN skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from medvit.errors import LeakageError, ManifestError

Kind = Literal["binary", "multiclass", "multilabel"]
AggregateMethod = Literal["max", "mean", "topk"]
ID_COLUMNS = ("patient_id", "sample_id", "split")
SUM_TOLERANCE = 1e-3


class PredictionsError(ManifestError):
    """A predictions table is unusable (missing columns, values out of range)."""


def class_names(df: pd.DataFrame) -> list[str]:
    """Class/finding names of a predictions table, in column order.

    Raises:
        PredictionsError: no ``true_<c>``/``score_<c>`` pair, or an unpaired column.
    """
    trues = [c[len("true_"):] for c in df.columns if c.startswith("true_")]
    scores = [c[len("score_"):] for c in df.columns if c.startswith("score_")]
    unpaired = sorted(set(trues) ^ set(scores))
    if unpaired:
        raise PredictionsError("predictions need a true_<c> and a score_<c> column for every class; unpaired: "
                               + ", ".join(unpaired))
    if not trues:
        raise PredictionsError("predictions have no true_<c>/score_<c> column pair; columns are "
                               + ", ".join(map(str, df.columns)))
    return trues


def check_predictions(df: pd.DataFrame) -> list[str]:
    """Check a predictions table against Contract 3 and return its class names.

    Raises:
        PredictionsError: naming the column and the first offending rows.
    """
    missing = [c for c in ("patient_id", "split") if c not in df.columns]
    if missing:
        raise PredictionsError(f"predictions lack required column(s): {', '.join(missing)}")
    classes = class_names(df)
    for c in classes:
        for col, ok in ((f"true_{c}", lambda v: v.isin([0, 1])), (f"score_{c}", lambda v: v.between(0.0, 1.0))):
            values = pd.to_numeric(df[col], errors="coerce")
            bad = np.flatnonzero(~ok(values).to_numpy())
            if bad.size:
                rows = ", ".join(str(i + 1) for i in bad[:5]) + (" ..." if bad.size > 5 else "")
                want = "0 or 1" if col.startswith("true_") else "a number in [0, 1]"
                raise PredictionsError(f"predictions column {col!r} must be {want}; {bad.size} row(s) are not "
                                       f"(data rows {rows})")
    return classes


def infer_kind(df: pd.DataFrame, classes: Sequence[str] | None = None) -> Kind:
    """``binary``, ``multiclass`` or ``multilabel`` from the predictions alone (module docstring)."""
    classes = list(classes) if classes is not None else class_names(df)
    if len(classes) == 1:
        return "binary"
    truth = df[[f"true_{c}" for c in classes]].to_numpy(float)
    scores = df[[f"score_{c}" for c in classes]].to_numpy(float)
    if len(df) and (truth.sum(1) == 1).all() and (np.abs(scores.sum(1) - 1.0) <= SUM_TOLERANCE).all():
        return "multiclass"
    return "multilabel"


def _check_split_leakage(df: pd.DataFrame) -> None:
    if "split" not in df.columns:
        return
    n_splits = df.groupby("patient_id", sort=False)["split"].nunique()
    leaked = n_splits.index[n_splits > 1].astype(str).tolist()
    if leaked:
        raise LeakageError(leaked, "in predictions.csv")


def aggregate_patients(df: pd.DataFrame, method: AggregateMethod = "max", top_k: int = 3,
                       kind: Kind | None = None) -> pd.DataFrame:
    """Aggregate a predictions table to one row per patient.

    Args:
        df: predictions (Contract 3), one row per sample.
        method: ``max``, ``mean`` or ``topk`` for binary/multilabel scores (multiclass: mean).
        top_k: k of ``topk`` (>= 1).
        kind: task kind; inferred from ``df`` when None.

    Returns:
        One row per patient (first-appearance order) with the same columns as ``df`` except
        ``sample_id``, plus ``n_samples``.

    Raises:
        PredictionsError: unknown method or bad ``top_k``.
        LeakageError: a patient appears in more than one split.
    """
    if method not in ("max", "mean", "topk"):
        raise PredictionsError(f"aggregate method {method!r} is not allowed; use max, mean or topk")
    if method == "topk" and (int(top_k) != top_k or top_k < 1):
        raise PredictionsError(f"top_k must be a positive integer, got {top_k!r}")
    classes = class_names(df)
    kind = kind or infer_kind(df, classes)
    _check_split_leakage(df)
    df = df.reset_index(drop=True)
    key = df["patient_id"].astype(str)
    groups = df.groupby(key, sort=False)
    out = pd.DataFrame({"patient_id": groups.size().index})
    if "split" in df.columns:
        out["split"] = groups["split"].first().to_numpy()

    true_cols = [f"true_{c}" for c in classes]
    score_cols = [f"score_{c}" for c in classes]
    if kind == "multiclass":
        # Most frequent true class per patient; idxmax keeps the first class on ties.
        counts = df[true_cols].astype(float).groupby(key, sort=False).sum()
        winner = counts.to_numpy().argmax(1)
        for j, col in enumerate(true_cols):
            out[col] = (winner == j).astype(np.int64)
        mean = df[score_cols].astype(float).groupby(key, sort=False).mean().to_numpy(copy=True)
        mean /= mean.sum(1, keepdims=True).clip(min=1e-12)  # clip() in predictions can move sums off 1
        for j, col in enumerate(score_cols):
            out[col] = mean[:, j]
    else:
        truth = df[true_cols].astype(np.int64).groupby(key, sort=False).max()
        for col in true_cols:
            out[col] = truth[col].to_numpy()
        for col in score_cols:
            per_patient = _aggregate_scores(df[col].astype(float), key, method, int(top_k))
            out[col] = per_patient.reindex(out["patient_id"]).to_numpy()

    skip = set(ID_COLUMNS) | set(true_cols) | set(score_cols)
    for col in df.columns:
        if col not in skip and pd.api.types.is_numeric_dtype(df[col]):
            out[col] = df[col].astype(float).groupby(key, sort=False).mean().to_numpy()  # mean skips NaN
    out["n_samples"] = groups.size().to_numpy()
    ordered = [c for c in df.columns if c in out.columns] + ["n_samples"]
    return out[ordered]


def _aggregate_scores(scores: pd.Series, key: pd.Series, method: str, top_k: int) -> pd.Series:
    """Per-patient score indexed by patient id."""
    if method == "max":
        return scores.groupby(key).max()
    if method == "mean":
        return scores.groupby(key).mean()
    keep = scores.groupby(key).rank(method="first", ascending=False) <= top_k
    return scores[keep].groupby(key[keep]).mean()
