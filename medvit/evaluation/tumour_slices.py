"""Slice-level evaluation for data in which every patient has a tumour (e.g. TCGA-LGG).

Patient-to-patient metrics (:mod:`medvit.evaluation.ptp`) need tumour-free patients: their
specificity and false positives per normal patient are undefined when there are none, and a
patient-level AUROC has a single class. What such data can answer, on the test split:

* **per-patient detection rate at k**: of the patients with at least one tumour slice in the
  split, the share with at least ``k`` *tumour* slices flagged (score >= threshold); a flagged
  tumour-free slice does not count as a detection;
* **false-positive slices per tumour-free slice**: flagged tumour-free slices / tumour-free
  slices;
* **slice AUROC** (and AP) of the scores.

Every interval is a 95% percentile bootstrap over patients (cluster bootstrap: a drawn patient
brings all their slices), so slices of one patient are never treated as independent. A paired
version (:func:`paired_slice_auroc`) compares two models on the same slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medvit.evaluation import metrics as M
from medvit.evaluation.bootstrap import cluster_bootstrap, resample_counts


def _codes(patients: pd.Series) -> np.ndarray:
    return pd.factorize(patients.astype(str), sort=True)[0]


def _test_rows(pred: pd.DataFrame, split: str, truth: str, score: str) -> pd.DataFrame:
    rows = pred[pred["split"] == split] if "split" in pred.columns else pred
    missing = [c for c in ("patient_id", truth, score) if c not in rows.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    rows = rows.dropna(subset=[score])
    return rows.reset_index(drop=True)


def _value(v: float, iv: Any) -> dict[str, Any]:
    return {"value": float(v), "ci95": [float(iv.lo), float(iv.hi)], "n_boot": int(iv.n_used)}


def slice_detection_summary(pred: pd.DataFrame, threshold: float, ks: Sequence[int] = (1, 2, 3),
                            score: str = "score_tumor", truth: str = "true_tumor", split: str = "test",
                            n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Detection rate per tumour patient at each k, false-positive slices per tumour-free slice,
    slice AUROC and AP, with patient-cluster bootstrap CIs (module docstring).

    Args:
        pred: a predictions.csv table (``patient_id``, ``split``, truth and score columns).
        threshold: a slice is flagged when its score is ``>= threshold``.
        ks: the k values of the detection rate.
        score, truth: column names.
        split: the rows evaluated.
        n_boot, seed: bootstrap resamples and seed.

    Returns:
        ``n_slices``, ``n_tumour_slices``, ``n_patients``, ``n_tumour_patients`` (patients with a
        tumour slice in ``split``), ``n_tumour_free_patients``, ``threshold``, and ``metrics``:
        ``detection_rate_k<k>``, ``fp_per_tumour_free_slice``, ``slice_auroc``, ``slice_ap``, each
        ``{"value", "ci95", "n_boot"}``; ``tumour_slices_per_patient`` (a histogram), and a note.
    """
    rows = _test_rows(pred, split, truth, score)
    y = rows[truth].to_numpy(float)
    s = rows[score].to_numpy(float)
    flagged = (s >= threshold).astype(float)
    codes = _codes(rows["patient_id"])
    n_pat = int(codes.max()) + 1 if len(codes) else 0
    # per patient: tumour slices present, tumour slices flagged
    tumour = np.bincount(codes, weights=y, minlength=n_pat)
    hits = np.bincount(codes, weights=y * flagged, minlength=n_pat)
    is_tp = (tumour > 0).astype(float)

    stats = {"fp_per_tumour_free_slice": lambda W: (W @ (flagged * (1 - y))) / np.maximum(W @ (1 - y), 1e-12),
             "slice_auroc": lambda W: M.weighted_auroc(y, s, W),
             "slice_ap": lambda W: M.weighted_average_precision(y, s, W)}
    point = {"fp_per_tumour_free_slice": float((flagged * (1 - y)).sum() / max((1 - y).sum(), 1)),
             "slice_auroc": M.auroc(y, s), "slice_ap": M.average_precision(y, s)}
    intervals = cluster_bootstrap(stats, codes, n_boot=n_boot, seed=seed)
    out_metrics = {name: _value(point[name], intervals[name]) for name in stats}
    pat_stats, pat_point = {}, {}
    for k in ks:
        det = (hits >= k).astype(float)
        pat_stats[f"detection_rate_k{k}"] = (lambda d: lambda W: (W @ (d * is_tp)) / np.maximum(W @ is_tp, 1e-12))(det)
        pat_point[f"detection_rate_k{k}"] = float((det * is_tp).sum() / max(is_tp.sum(), 1))
    pat_iv = cluster_bootstrap(pat_stats, np.arange(n_pat), n_boot=n_boot, seed=seed)
    out_metrics.update({name: _value(pat_point[name], pat_iv[name]) for name in pat_stats})
    per_patient = pd.Series(tumour[tumour > 0]).astype(int).value_counts().sort_index()
    return {
        "split": split, "threshold": float(threshold), "n_slices": int(len(rows)), "n_tumour_slices": int(y.sum()),
        "n_patients": n_pat, "n_tumour_patients": int(is_tp.sum()),
        "n_tumour_free_patients": int(n_pat - is_tp.sum()),
        "tumour_slices_per_patient": {str(k): int(v) for k, v in per_patient.items()},
        "metrics": out_metrics,
        "bootstrap": {"n": n_boot, "seed": seed, "method": "percentile; patients resampled with replacement, all "
                      "slices of a drawn patient kept (cluster bootstrap)"},
        "note": "detection rate: patients with a tumour slice in the split that have at least k tumour slices "
                "flagged; a patient whose tumour slices were all resampled away is not a tumour patient here",
    }


def paired_slice_auroc(pred_a: pd.DataFrame, pred_b: pd.DataFrame, score: str = "score_tumor",
                       truth: str = "true_tumor", split: str = "test", n_boot: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
    """Paired patient-cluster bootstrap of slice AUROC(a) - AUROC(b) on the slices both scored.

    Returns:
        ``difference``, ``ci95``, ``p_value`` (two-sided percentile-bootstrap test, floor
        ``1 / n_used``), ``n_boot`` (resamples used), ``n_slices``, ``n_patients``.
    """
    a = _test_rows(pred_a, split, truth, score).set_index("sample_id")
    b = _test_rows(pred_b, split, truth, score).set_index("sample_id")
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    if not np.array_equal(a[truth].to_numpy(), b[truth].to_numpy()):
        raise ValueError("the two prediction tables disagree on the truth of the same slices")
    y, sa, sb = a[truth].to_numpy(float), a[score].to_numpy(float), b[score].to_numpy(float)
    codes = _codes(a["patient_id"])
    diff = M.auroc(y, sa) - M.auroc(y, sb)
    rng = np.random.default_rng(seed)
    n_pat = int(codes.max()) + 1
    W = resample_counts(n_pat, n_boot, rng)[:, codes].astype(float)
    d = M.weighted_auroc(y, sa, W) - M.weighted_auroc(y, sb, W)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return {"difference": float(diff), "ci95": [float("nan")] * 2, "p_value": float("nan"), "n_boot": 0,
                "n_slices": int(len(y)), "n_patients": n_pat}
    p = float(min(1.0, max(2 * min(np.mean(d <= 0), np.mean(d >= 0)), 1.0 / len(d))))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"difference": float(diff), "ci95": [float(lo), float(hi)], "p_value": p, "n_boot": int(len(d)),
            "n_slices": int(len(y)), "n_patients": n_pat}


__all__ = ["paired_slice_auroc", "slice_detection_summary"]
