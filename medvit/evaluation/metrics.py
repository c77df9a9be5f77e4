"""Classification and segmentation metrics.

Two forms of every classification metric live here:

* **Scalar** functions (``auroc``, ``f1``, ...) take one set of predictions and return a
  float. They wrap scikit-learn, the reference implementation.
* **Weighted** kernels (``weighted_auroc``, ``confusion_metrics``, ...) take the same
  predictions plus a weight matrix ``W`` of shape ``(B, N)``: row ``b`` holds how many
  times each of the ``N`` rows is drawn in bootstrap resample ``b``. They return ``(B,)``
  values in one vectorised pass, which is what makes 1000 resamples cheap. With
  ``W = ones((1, N))`` they equal the scalar form (tests check both forms agree).

Conventions (see docs/metrics.md):

* An undefined value is ``NaN``, never an exception: AUROC without both classes, AP
  without a positive, sensitivity without a positive, specificity without a negative,
  F1 when there is no positive in truth nor prediction, kappa when both raters agree on
  one class only.
* A prediction is positive when ``score >= threshold``.
* Macro averages are over the classes whose value is defined; callers report which were
  excluded.

Segmentation metrics use MONAI: Dice is 1 when prediction and truth are both empty and
0 when exactly one is; HD95 is 0 when both are empty and ``NaN`` (skipped in means) when
exactly one is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn import metrics as skm

from medvit.errors import ConfigError

ThresholdMethod = Literal["youden", "f1"]
_NAN = float("nan")
_TIE = 1e-12  # criteria equal up to rounding are ties (e.g. 2/3 - 0 vs 1 - 1/3)


def _as_binary(y: np.ndarray | Sequence) -> np.ndarray:
    return np.asarray(y).astype(bool).ravel()


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


# ---------------------------------------------------------------------------
# Scalar metrics (scikit-learn)
# ---------------------------------------------------------------------------

def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of one binary problem.

    Args:
        y_true: (N,) 0/1 truth.
        y_score: (N,) scores, higher means more likely positive.

    Returns:
        AUROC in [0, 1], or NaN when ``y_true`` holds a single class.
    """
    y = _as_binary(y_true)
    if not _both_classes(y):
        return _NAN
    return float(skm.roc_auc_score(y, np.asarray(y_score, dtype=float).ravel()))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision (area under the step-wise precision-recall curve).

    Returns:
        AP in [0, 1], or NaN when ``y_true`` has no positive (scikit-learn returns 0 there,
        which would read as a real, terrible score).
    """
    y = _as_binary(y_true)
    if not y.any():
        return _NAN
    return float(skm.average_precision_score(y, np.asarray(y_score, dtype=float).ravel()))


def per_class(fn, truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Apply a binary metric ``fn(y, s)`` to each column of (N, K) arrays -> (K,)."""
    truth, scores = np.asarray(truth), np.asarray(scores)
    return np.array([fn(truth[:, k], scores[:, k]) for k in range(truth.shape[1])], dtype=float)


def macro(values: np.ndarray, names: Sequence[str] | None = None) -> tuple[float, list[str]]:
    """Mean of the defined per-class values.

    Returns:
        ``(mean, excluded)``: the mean over non-NaN values (NaN if none) and the names (or
        indices as strings) of the classes left out because their value is undefined.
    """
    values = np.asarray(values, dtype=float)
    names = list(names) if names is not None else [str(i) for i in range(len(values))]
    excluded = [n for n, v in zip(names, values) if math.isnan(v)]
    defined = values[~np.isnan(values)]
    return (float(defined.mean()) if defined.size else _NAN), excluded


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions (binary or multiclass labels)."""
    return float(skm.accuracy_score(np.ravel(y_true), np.ravel(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": handled by definition
        return float(skm.balanced_accuracy_score(np.ravel(y_true), np.ravel(y_pred)))


def sensitivity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """True-positive rate TP / (TP + FN); NaN without a positive. Binary 0/1 inputs."""
    return float(skm.recall_score(_as_binary(y_true), _as_binary(y_pred), zero_division=np.nan))


def specificity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """True-negative rate TN / (TN + FP); NaN without a negative. Binary 0/1 inputs."""
    return float(skm.recall_score(~_as_binary(y_true), ~_as_binary(y_pred), zero_division=np.nan))


def cohen_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Cohen's (unweighted) kappa between truth and prediction; NaN when chance agreement is 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skm.cohen_kappa_score(np.ravel(y_true), np.ravel(y_pred), replace_undefined_by=np.nan))


def macro_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro Cohen's kappa of multi-label predictions: the mean over the findings (columns of
    the (N, K) 0/1 arrays) whose kappa is defined; NaN when none is."""
    return float(np.nanmean([cohen_kappa(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])]))


def f1(y_true: np.ndarray, y_pred: np.ndarray, average: Literal["binary", "macro"] = "binary") -> float:
    """F1 score.

    Args:
        y_true, y_pred: (N,) 0/1 labels (``average="binary"``, F1 of the positive class),
            (N,) class indices (``average="macro"``, multiclass) or (N, K) 0/1 indicators
            (``average="macro"``, multilabel).
        average: ``binary`` or ``macro``. Macro averages the classes whose F1 is defined
            (a class absent from truth and prediction has none).

    Returns:
        F1 in [0, 1], or NaN when undefined.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if average == "binary":
        y_true, y_pred = _as_binary(y_true), _as_binary(y_pred)
    return float(skm.f1_score(y_true, y_pred, average=average, zero_division=np.nan))


def binarize(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """``scores >= threshold`` (thresholds broadcast over the last axis for (N, K) scores)."""
    return np.asarray(scores, dtype=float) >= np.asarray(threshold, dtype=float)


# ---------------------------------------------------------------------------
# Threshold selection
# ---------------------------------------------------------------------------

@dataclass
class Threshold:
    """A decision threshold and how it was obtained.

    Attributes:
        value: positive when ``score >= value``.
        method: ``youden``, ``f1``, ``fixed`` or ``fallback``.
        note: why a fallback was used (empty otherwise).
    """

    value: float
    method: str
    note: str = ""


def parse_threshold(spec: str | float | int) -> str | float:
    """Validate the ``evaluation.threshold`` setting.

    Args:
        spec: ``"youden"`` (maximise sensitivity + specificity - 1), ``"f1"`` (maximise F1),
            or a fixed number in [0, 1] (also as a string, e.g. ``"0.5"``).

    Raises:
        ConfigError: anything else.
    """
    if isinstance(spec, str):
        low = spec.strip().lower()
        if low in ("youden", "f1"):
            return low
        try:
            spec = float(low)
        except ValueError:
            raise ConfigError(f"evaluation.threshold: {spec!r} is not allowed; use 'youden', 'f1' "
                              "or a number in [0, 1]") from None
    if isinstance(spec, bool) or not isinstance(spec, (int, float)) or not 0.0 <= float(spec) <= 1.0:
        raise ConfigError(f"evaluation.threshold: {spec!r} is not allowed; use 'youden', 'f1' or a number in [0, 1]")
    return float(spec)


def select_threshold(y_true: np.ndarray, y_score: np.ndarray, method: str | float = "youden",
                     fallback: float = 0.5) -> Threshold:
    """Choose a decision threshold on validation scores.

    Candidates are the observed scores (a threshold between two of them classifies the
    same way as the upper one). Ties keep the highest threshold.

    Args:
        y_true: (N,) 0/1 validation truth.
        y_score: (N,) validation scores.
        method: ``youden`` (max of sensitivity + specificity - 1), ``f1`` (max F1 of the
            positive class) or a fixed number, returned as is.
        fallback: used when validation cannot choose (no rows, or one class only).

    Returns:
        The :class:`Threshold`.
    """
    method = parse_threshold(method)
    if isinstance(method, float):
        return Threshold(method, "fixed")
    y = _as_binary(y_true)
    s = np.asarray(y_score, dtype=float).ravel()
    if not _both_classes(y):
        why = "no validation rows" if y.size == 0 else "validation holds a single class"
        return Threshold(fallback, "fallback", f"{method} threshold undefined ({why}); used {fallback}")
    if method == "youden":
        fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
        finite = np.isfinite(thr)  # thr[0] is +inf: "predict nothing positive"
        j = (tpr - fpr)[finite]
        best = np.flatnonzero(j >= j.max() - _TIE)  # thr descending: the first maximum is the highest
        return Threshold(float(thr[finite][best[0]]), "youden")
    precision, recall, thr = skm.precision_recall_curve(y, s, drop_intermediate=False)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f >= f.max() - _TIE)
    return Threshold(float(thr[best[-1]]), "f1")  # thr ascending: the last maximum is the highest threshold


# ---------------------------------------------------------------------------
# Weighted kernels, vectorised over bootstrap resamples: W is (B, N) multiplicities
# ---------------------------------------------------------------------------

def weighted_ranking(y_true: np.ndarray, y_score: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each weight row, from one sort and two running sums.

    Args:
        y_true: (N,) 0/1. y_score: (N,). W: (B, N) non-negative integer-valued weights.

    Returns:
        ``(auroc, ap)``, each (B,). AUROC is the Mann-Whitney statistic (ties count one half),
        NaN where a row weights one class only; AP is scikit-learn's step-wise definition
        (precision at each distinct score, weighted by the recall gained there), NaN where a
        row has no positive weight.
    """
    s = np.asarray(y_score, dtype=float).ravel()
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], _as_binary(y_true)[order]
    n = s.size
    new_group = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    lo = starts[group]                   # per row: running-sum index just before its tie group
    hi = np.r_[starts[1:], n][group]     # per row: running-sum index at the end of its tie group
    Wo = np.asarray(W, dtype=float)[:, order]
    wp = Wo * y_sorted
    cum_all = np.zeros((Wo.shape[0], n + 1))
    cum_pos = np.zeros_like(cum_all)
    np.cumsum(Wo, axis=1, out=cum_all[:, 1:])
    np.cumsum(wp, axis=1, out=cum_pos[:, 1:])
    total_pos, total = cum_pos[:, n], cum_all[:, n]
    total_neg = total - total_pos
    # AUROC: each positive beats the negatives below its score and ties half of those at it.
    neg_lo = cum_all[:, lo] - cum_pos[:, lo]
    neg_hi = cum_all[:, hi] - cum_pos[:, hi]
    num = (wp * 0.5 * (neg_lo + neg_hi)).sum(1)
    # AP: at a positive's score, "predicted positive" is everything at or above it.
    tp_at = total_pos[:, None] - cum_pos[:, lo]
    all_at = total[:, None] - cum_all[:, lo]
    precision = np.divide(tp_at, all_at, out=np.zeros_like(tp_at), where=all_at > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc_ = np.where((total_pos > 0) & (total_neg > 0), num / (total_pos * total_neg), np.nan)
        ap = np.where(total_pos > 0, (wp * precision).sum(1) / total_pos, np.nan)
    return auroc_, ap


def weighted_auroc(y_true: np.ndarray, y_score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(B,) AUROC for each weight row of (B, N) ``W`` (see :func:`weighted_ranking`)."""
    return weighted_ranking(y_true, y_score, W)[0]


def weighted_average_precision(y_true: np.ndarray, y_score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(B,) average precision for each weight row of (B, N) ``W`` (see :func:`weighted_ranking`)."""
    return weighted_ranking(y_true, y_score, W)[1]


def weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, W: np.ndarray) -> np.ndarray:
    """Confusion matrices for each weight row.

    Args:
        y_true, y_pred: (N,) class indices in ``[0, n_classes)`` (0/1 for binary).
        W: (B, N) weights.

    Returns:
        (B, K, K) array, ``C[b, i, j]`` = weight of rows with truth ``i`` predicted ``j``.
    """
    cell = np.asarray(y_true, dtype=np.int64).ravel() * n_classes + np.asarray(y_pred, dtype=np.int64).ravel()
    onehot = np.zeros((cell.size, n_classes * n_classes))
    onehot[np.arange(cell.size), cell] = 1.0
    return (np.asarray(W, dtype=float) @ onehot).reshape(-1, n_classes, n_classes)


def confusion_metrics(C: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of (B, K, K) confusion matrices (rows = truth, columns = prediction).

    Returns:
        ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in truth),
        ``kappa`` (Cohen's), ``f1_macro`` (over classes present in truth or prediction), each
        (B,); and ``recall``, ``f1`` per class, each (B, K). Undefined entries are NaN.
    """
    C = np.asarray(C, dtype=float)
    total = C.sum((1, 2))
    diag = np.diagonal(C, axis1=1, axis2=2)
    rows, cols = C.sum(2), C.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows > 0, diag / rows, np.nan)
        f1k = np.where(rows + cols > 0, 2 * diag / (rows + cols), np.nan)
        accuracy_ = np.where(total > 0, diag.sum(1) / total, np.nan)
        expected = (rows * cols).sum(1) / total ** 2
        kappa = np.where(np.isclose(expected, 1.0) | (total == 0), np.nan, (accuracy_ - expected) / (1 - expected))
    return {"accuracy": accuracy_, "balanced_accuracy": _nanmean_rows(recall), "kappa": kappa,
            "f1_macro": _nanmean_rows(f1k), "recall": recall, "f1": f1k}


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    """Thresholded binary metrics for each weight row.

    Returns:
        (B,) arrays ``accuracy``, ``balanced_accuracy``, ``sensitivity``, ``specificity``,
        ``f1`` (positive class) and ``kappa``.
    """
    m = confusion_metrics(weighted_confusion(_as_binary(y_true), _as_binary(y_pred), 2, W))
    return {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "sensitivity": m["recall"][:, 1], "specificity": m["recall"][:, 0], "f1": m["f1"][:, 1],
            "kappa": m["kappa"]}


def weighted_macro_kappa(y_true: np.ndarray, y_pred: np.ndarray, W: np.ndarray) -> np.ndarray:
    """:func:`macro_kappa` for each weight row -> (B,), NaN where no finding's kappa is defined."""
    cols = np.stack([binary_metrics(y_true[:, j], y_pred[:, j], W)["kappa"] for j in range(y_true.shape[1])], 1)
    return _nanmean_rows(cols)


def weighted_nanmean(values: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted mean of (N,) values per weight row, skipping NaN values -> (B,)."""
    v = np.asarray(values, dtype=float).ravel()
    ok = ~np.isnan(v)
    Wk = np.asarray(W, dtype=float)[:, ok]
    w = Wk.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w > 0, Wk @ v[ok] / w, np.nan)


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    n = (~np.isnan(a)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(a, axis=1) / n, np.nan)


# ---------------------------------------------------------------------------
# Segmentation (MONAI)
# ---------------------------------------------------------------------------

def _mask_tensor(mask: np.ndarray):
    import torch

    arr = np.asarray(mask)
    return torch.as_tensor(arr.astype(bool), dtype=torch.float32)[None, None]  # (1, 1, *spatial)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary masks of one volume or image.

    Args:
        pred, truth: binary arrays of the same spatial shape ((H, W) or (D, H, W)).

    Returns:
        Dice in [0, 1]: 1 when both masks are empty, 0 when exactly one is.
    """
    from monai.metrics import compute_dice

    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"dice_score: prediction shape {np.shape(pred)} differs from truth shape {np.shape(truth)}")
    return float(compute_dice(_mask_tensor(pred), _mask_tensor(truth), include_background=True,
                              ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks' surfaces.

    Args:
        pred, truth: binary arrays of the same spatial shape.
        spacing: voxel size per spatial axis (e.g. mm); voxels when None.

    Returns:
        HD95 in the units of ``spacing``: 0 when both masks are empty, NaN when exactly one
        is (no surface to measure against; such volumes are skipped in means and caught by Dice).
    """
    from monai.metrics import compute_hausdorff_distance

    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"hd95: prediction shape {np.shape(pred)} differs from truth shape {np.shape(truth)}")
    p_any, t_any = bool(np.any(pred)), bool(np.any(truth))
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return _NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI-internal deprecation in get_mask_edges
        value = compute_hausdorff_distance(_mask_tensor(pred), _mask_tensor(truth), include_background=True,
                                           percentile=95, spacing=None if spacing is None else list(spacing))
    return float(value[0, 0])


def calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability-diagram statistics over ``n_bins`` equal-width probability bins.

    Args:
        y_true: (N,) 0/1 truth.
        y_prob: (N,) predicted probabilities in [0, 1].
        n_bins: number of bins over [0, 1] (the last bin includes 1).

    Returns:
        ``count`` (N per bin), ``confidence`` (mean probability) and ``frequency`` (fraction
        positive), NaN for empty bins; ``edges`` (n_bins + 1).
    """
    y = _as_binary(y_true).astype(float)
    p = np.clip(np.asarray(y_prob, dtype=float), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=p, minlength=n_bins) / count
        frequency = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"count": count, "confidence": confidence, "frequency": frequency, "edges": edges}


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE (Naeini et al., AAAI 2015): sum over bins of (N_bin / N) * |frequency - confidence|,
    with ``n_bins`` equal-width bins; NaN without samples."""
    b = calibration_bins(y_true, y_prob, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    filled = b["count"] > 0
    return float(np.sum(b["count"][filled] / n * np.abs(b["frequency"][filled] - b["confidence"][filled])))
