"""Paired comparison of models evaluated on the same test patients.

A claim that model A beats model B needs a test on the *same* patients, which accounts for the
correlation between the two models' scores. For AUROC this is DeLong's test (DeLong, DeLong &
Clarke-Pearson, Biometrics 1988), computed with the fast midrank algorithm of Sun & Xu (IEEE
Signal Processing Letters 2014): for m positive and n negative patients,

* placement values ``V10[i] = mean_j psi(x_i, y_j)`` per positive and
  ``V01[j] = mean_i psi(x_i, y_j)`` per negative, with ``psi = 1`` if the positive scores
  higher, ``1/2`` on a tie, ``0`` otherwise (their means are the AUC);
* ``S10``/``S01``: the 2x2 covariance matrices of the placement values of both models;
* ``var(AUC_A - AUC_B) = (S10_AA + S10_BB - 2 S10_AB) / m + (S01_AA + S01_BB - 2 S01_AB) / n``;
* ``z = (AUC_A - AUC_B) / sqrt(var)``, two-sided ``p = 2 (1 - Phi(|z|))``.

The same numbers as R's ``pROC::roc.test(method = "delong", paired = TRUE)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata


@dataclass
class DeLongResult:
    """Outcome of a paired DeLong test.

    Attributes:
        auc_a, auc_b: the two AUROCs.
        difference: ``auc_a - auc_b``.
        se: standard error of the difference.
        z: the z statistic (0 when both models rank identically).
        p_value: two-sided p-value.
        ci95: 95% confidence interval of the difference (normal approximation).
        n_positive, n_negative: the cases behind it.
    """

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci95: tuple[float, float]
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _placements(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement values (V10 per positive, V01 per negative) of one model via midranks."""
    m, n = len(positives), len(negatives)
    combined = rankdata(np.concatenate([positives, negatives]))  # midranks handle ties as 1/2
    rank_pos_all = combined[:m]
    rank_pos_within = rankdata(positives)
    rank_neg_all = combined[m:]
    rank_neg_within = rankdata(negatives)
    v10 = (rank_pos_all - rank_pos_within) / n
    v01 = 1.0 - (rank_neg_all - rank_neg_within) / m
    return v10, v01


def delong_test(y_true: Sequence[int] | np.ndarray, score_a: Sequence[float] | np.ndarray,
                score_b: Sequence[float] | np.ndarray) -> DeLongResult:
    """Paired DeLong test of AUROC(score_a) = AUROC(score_b) on the same cases.

    Args:
        y_true: (N,) 0/1 truth, one entry per case (per patient for a patient-level claim).
        score_a, score_b: (N,) scores of the two models on the same cases, in the same order.

    Returns:
        A :class:`DeLongResult`.

    Raises:
        ValueError: lengths differ, or the truth lacks positives or negatives.
    """
    y = np.asarray(y_true).astype(int)
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"y_true, score_a and score_b differ in length ({len(y)}, {len(a)}, {len(b)})")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong's test needs positive and negative cases (got {m} positive, {n} negative)")
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    for k, s in enumerate((a, b)):
        v10[k], v01[k] = _placements(s[pos], s[neg])
    aucs = v10.mean(axis=1)
    # np.cov of one case gives NaN (ddof 1): a single positive/negative has no spread to estimate
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n)
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(var, 0.0)))
    if se > 0:
        z = diff / se
    else:  # identical rankings (or no spread): no evidence of a difference, as pROC does
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    p = float(2 * norm.sf(abs(z)))
    half = float(norm.ppf(0.975) * se)
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, float(z), p, (diff - half, diff + half), m, n)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control for several comparisons)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def paired_auroc_comparisons(tables: dict[str, pd.DataFrame], classes: Sequence[str]) -> list[dict[str, Any]]:
    """DeLong tests between every pair of models, per class, on the patients both scored.

    Args:
        tables: model name -> patient-level test table with ``patient_id``, ``true_<c>`` and
            ``score_<c>`` columns (one row per patient, e.g. from
            :func:`medvit.evaluation.aggregate.aggregate_patients`).
        classes: the class names (one test per class; a multi-label task gets one per finding).

    Returns:
        One dict per (model_a, model_b, class): the :class:`DeLongResult` fields plus
        ``model_a``, ``model_b``, ``class``, ``n_patients`` and ``p_holm`` (Holm-adjusted over
        all comparisons returned). Pairs whose common patients lack a positive or a negative
        are left out.
    """
    names = sorted(tables)
    results: list[dict[str, Any]] = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            ta = tables[first].set_index("patient_id")
            tb = tables[second].set_index("patient_id")
            common = ta.index.intersection(tb.index)
            for c in classes:
                if f"score_{c}" not in ta or f"score_{c}" not in tb:
                    continue
                truth = ta.loc[common, f"true_{c}"].to_numpy()
                if not np.array_equal(truth, tb.loc[common, f"true_{c}"].to_numpy()):
                    raise ValueError(f"{first} and {second} disagree on the truth of {c!r} for the same patients")
                if truth.min() == truth.max():
                    continue
                res = delong_test(truth, ta.loc[common, f"score_{c}"], tb.loc[common, f"score_{c}"])
                results.append({"model_a": first, "model_b": second, "class": c, "n_patients": int(len(common)),
                                **res.to_dict()})
    for r, adj in zip(results, holm_adjust([r["p_value"] for r in results])):
        r["p_holm"] = adj
    return results


def macro_auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the columns whose truth has both outcomes (NaN when none has); AUROC by
    the Mann-Whitney rank formula (ties count 1/2), fast enough to bootstrap."""
    m = truth.sum(0)
    n = len(truth) - m
    keep = (m > 0) & (n > 0)
    if not keep.any():
        return float("nan")
    ranks = rankdata(scores[:, keep], axis=0)
    aucs = ((ranks * truth[:, keep]).sum(0) - m[keep] * (m[keep] + 1) / 2) / (m[keep] * n[keep])
    return float(aucs.mean())


def paired_bootstrap_test(truth: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_boot: int = 2000,
                          seed: int = 0, statistic=macro_auroc) -> dict[str, Any]:
    """Paired bootstrap of ``statistic(a) - statistic(b)`` over cases (patients), for metrics
    without a closed-form paired test such as the macro AUROC of a multi-label task.

    Both models are evaluated on the same resampled patients each time, so their correlation
    is kept. The two-sided p-value is ``2 * min(P(diff <= 0), P(diff >= 0))`` over the
    resamples (the percentile-bootstrap test; floor ``1 / n_used``).

    Args:
        truth: (N, K) 0/1 truth per patient and class.
        score_a, score_b: (N, K) scores of the two models on the same patients.
        n_boot: resamples.
        seed: resampling seed.
        statistic: ``(truth, scores) -> float``.

    Returns:
        ``difference`` (on all patients), ``ci95``, ``p_value``, ``n_boot`` (resamples where
        the statistic was defined for both models) and ``n_patients``.
    """
    truth, a, b = (np.asarray(x, dtype=float).reshape(len(truth), -1) for x in (truth, score_a, score_b))
    diff = statistic(truth, a) - statistic(truth, b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(truth), len(truth))
        d = statistic(truth[idx], a[idx]) - statistic(truth[idx], b[idx])
        if math.isfinite(d):
            diffs.append(d)
    diffs_arr = np.asarray(diffs)
    if len(diffs_arr) == 0:
        return {"difference": diff, "ci95": [float("nan")] * 2, "p_value": float("nan"), "n_boot": 0,
                "n_patients": int(len(truth))}
    p = 2 * min(np.mean(diffs_arr <= 0), np.mean(diffs_arr >= 0))
    p = float(min(1.0, max(p, 1.0 / len(diffs_arr))))
    lo, hi = np.percentile(diffs_arr, [2.5, 97.5])
    return {"difference": float(diff), "ci95": [float(lo), float(hi)], "p_value": p, "n_boot": int(len(diffs_arr)),
            "n_patients": int(len(truth))}
