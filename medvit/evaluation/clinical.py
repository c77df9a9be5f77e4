"""What a clinical reader asks of a model beyond discrimination, computed from the
patient-level test table (one row per patient, ``true_<c>`` and ``score_<c>`` columns, as
:func:`medvit.evaluation.aggregate.aggregate_patients` makes them):

* :func:`brier_score`: mean squared error of the probabilities (multiclass: summed over
  classes; Brier 1950), with a bootstrap CI over patients;
* :func:`predictive_values`: PPV and NPV at the operating threshold, at a stated prevalence
  (Bayes' rule from sensitivity and specificity; default the test prevalence);
* :func:`decision_curve`: net benefit against the threshold probability (Vickers & Elkin
  2006), for the model, "treat all" and "treat none";
* :func:`failure_cases`: the most confident false positives and false negatives;
* :func:`subgroup_metrics`: the headline metric per subgroup with CIs and a permutation test
  of the difference between subgroups.

Intervals come from :func:`medvit.evaluation.bootstrap.cluster_bootstrap` (percentile
bootstrap over patients), the same resampler as ``metrics.json``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medvit.evaluation import metrics as M
from medvit.evaluation.bootstrap import cluster_bootstrap


def _arrays(table: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    truth = table[[f"true_{c}" for c in classes]].to_numpy(float)
    scores = table[[f"score_{c}" for c in classes]].to_numpy(float)
    return truth, scores


# ------------------------------------------------------------------------ Brier
def brier_score(table: pd.DataFrame, classes: Sequence[str], kind: str, n_boot: int = 1000, ci: float = 0.95,
                seed: int = 0) -> dict[str, Any]:
    """Brier score of the patient-level probabilities: binary, the mean of (p - y)^2;
    multi-label, that mean over every patient and finding; multiclass, the sum over classes
    of (p_k - y_k)^2 averaged over patients (0 is perfect; a constant 0.5 scores 0.25 in
    the binary case).

    Returns:
        ``value``, ``ci`` ([lo, hi]) and ``n`` (patients).
    """
    truth, scores = _arrays(table, classes)
    sq = (scores - truth) ** 2
    per_patient = sq.sum(1) if kind == "multiclass" else sq.mean(1)
    value = float(per_patient.mean()) if len(per_patient) else math.nan
    boot = cluster_bootstrap({"brier": lambda W: (W @ per_patient) / W.sum(1)}, np.arange(len(per_patient)),
                             n_boot, ci, seed)["brier"]
    return {"value": value, "ci": [boot.lo, boot.hi], "n": int(len(per_patient))}


# ------------------------------------------------------------------------ PPV / NPV
def ppv_npv(sensitivity: np.ndarray | float, specificity: np.ndarray | float,
            prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV by Bayes' rule from sensitivity, specificity and a prevalence."""
    se, sp, p = np.asarray(sensitivity, float), np.asarray(specificity, float), float(prevalence)
    with np.errstate(invalid="ignore", divide="ignore"):
        ppv = se * p / (se * p + (1 - sp) * (1 - p))
        npv = sp * (1 - p) / (sp * (1 - p) + (1 - se) * p)
    return ppv, npv


def predictive_values(y: np.ndarray, score: np.ndarray, threshold: float, prevalence: float | None = None,
                      n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """PPV and NPV at ``threshold`` (positive when score >= threshold) for a population with
    ``prevalence`` (None: the test prevalence, where they equal the observed TP / (TP + FP)
    and TN / (TN + FN)). Intervals: bootstrap over patients of sensitivity and specificity,
    the prevalence held fixed.

    Returns:
        ``prevalence``, ``prevalence_source`` (``stated`` or ``test``), ``ppv`` and ``npv``
        (each ``{"value", "ci"}``), ``sensitivity``, ``specificity``.
    """
    y = np.asarray(y, int)
    pred = np.asarray(score, float) >= threshold
    source = "stated" if prevalence is not None else "test"
    prev = float(prevalence) if prevalence is not None else float(y.mean()) if len(y) else math.nan
    ones = np.ones((1, len(y)))
    point = M.binary_metrics(y, pred, ones)
    ppv, npv = ppv_npv(point["sensitivity"][0], point["specificity"][0], prev)

    def stat(which: int):
        def f(W: np.ndarray) -> np.ndarray:
            m = M.binary_metrics(y, pred, W)
            return ppv_npv(m["sensitivity"], m["specificity"], prev)[which]
        return f

    boot = cluster_bootstrap({"ppv": stat(0), "npv": stat(1)}, np.arange(len(y)), n_boot, ci, seed)
    return {"prevalence": prev, "prevalence_source": source, "threshold": float(threshold),
            "ppv": {"value": float(ppv), "ci": [boot["ppv"].lo, boot["ppv"].hi]},
            "npv": {"value": float(npv), "ci": [boot["npv"].lo, boot["npv"].hi]},
            "sensitivity": float(point["sensitivity"][0]), "specificity": float(point["specificity"][0])}


# ------------------------------------------------------------------------ decision curve
def decision_curve(y: np.ndarray, score: np.ndarray, thresholds: np.ndarray | None = None,
                   prevalence: float | None = None) -> dict[str, np.ndarray]:
    """Net benefit per threshold probability ``pt``: ``sens * pi - (1 - spec) * (1 - pi) *
    pt / (1 - pt)`` with ``pi`` the prevalence (None: the test prevalence, which gives the
    usual ``TP/n - FP/n * pt / (1 - pt)``), for the model (positive when score >= pt), for
    treating everyone and for treating no one (0).

    Returns:
        ``threshold``, ``model``, ``treat_all``, ``treat_none`` arrays.
    """
    y = np.asarray(y, int)
    s = np.asarray(score, float)
    pts = np.linspace(0.01, 0.99, 99) if thresholds is None else np.asarray(thresholds, float)
    pi = float(y.mean()) if prevalence is None else float(prevalence)
    pos, neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    odds = pts / (1 - pts)
    sens = np.array([np.sum((s >= t) & (y == 1)) / pos for t in pts])
    fpr = np.array([np.sum((s >= t) & (y == 0)) / neg for t in pts])
    return {"threshold": pts, "model": sens * pi - fpr * (1 - pi) * odds, "treat_all": pi - (1 - pi) * odds,
            "treat_none": np.zeros_like(pts)}


# ------------------------------------------------------------------------ failure cases
def failure_cases(table: pd.DataFrame, classes: Sequence[str], kind: str, thresholds: dict[str, float] | None,
                  n: int = 5) -> list[dict[str, Any]]:
    """The most confident errors of one model: per class (binary: the positive class;
    multi-label: each finding) the ``n`` false positives with the highest scores and the
    ``n`` false negatives with the lowest, at the threshold; multiclass: the ``n`` wrong
    predictions with the highest predicted probability.

    Args:
        table: test rows (patients or samples) with ``true_``/``score_`` columns; any other
            columns (e.g. ``row``) are carried into the result.
        thresholds: class -> threshold (unused for multiclass).

    Returns:
        dicts with ``class``, ``error`` (``false positive``/``false negative``/``predicted
        <c>``), ``score``, ``threshold`` and the row's other columns, most confident first.
    """
    out: list[dict[str, Any]] = []
    extra = [c for c in table.columns if not c.startswith(("true_", "score_"))]
    if kind == "multiclass":
        truth, scores = _arrays(table, classes)
        t, p = truth.argmax(1), scores.argmax(1)
        wrong = np.flatnonzero(t != p)
        order = wrong[np.argsort(-scores[wrong, p[wrong]], kind="stable")][:n]
        for i in order:
            out.append({"class": classes[t[i]], "error": f"predicted {classes[p[i]]}", "score": float(scores[i, p[i]]),
                        "threshold": None, **{c: table[c].iloc[i] for c in extra}})
        return out
    for c in classes:
        thr = (thresholds or {}).get(c)
        if thr is None or not math.isfinite(thr):
            continue
        y = table[f"true_{c}"].to_numpy(int)
        s = table[f"score_{c}"].to_numpy(float)
        fp = np.flatnonzero((s >= thr) & (y == 0))
        fn = np.flatnonzero((s < thr) & (y == 1))
        for label, idx in (("false positive", fp[np.argsort(-s[fp], kind="stable")][:n]),
                           ("false negative", fn[np.argsort(s[fn], kind="stable")][:n])):
            for i in idx:
                out.append({"class": c, "error": label, "score": float(s[i]), "threshold": float(thr),
                            **{k: table[k].iloc[i] for k in extra}})
    return out


# ------------------------------------------------------------------------ subgroups
def headline_statistic(name: str, kind: str, truth: np.ndarray, scores: np.ndarray):
    """(point value, bootstrap statistic of (B, N) weights) of a headline metric: ``auroc``,
    ``auroc_macro`` (mean one-vs-rest AUROC over the classes defined in the resample),
    ``balanced_accuracy`` (argmax; binary at 0.5 is not used: pass scores already 0/1) or
    ``accuracy``."""
    if name in ("auroc", "auroc_macro"):
        cols = range(truth.shape[1])

        def stat(W: np.ndarray) -> np.ndarray:
            per = np.stack([M.weighted_auroc(truth[:, j], scores[:, j], W) for j in cols], 1)
            n = (~np.isnan(per)).sum(1)
            with np.errstate(invalid="ignore"):
                return np.where(n > 0, np.nansum(per, 1) / np.maximum(n, 1), np.nan)

        return float(stat(np.ones((1, len(truth))))[0]), stat
    if name in ("balanced_accuracy", "accuracy"):
        k = truth.shape[1] if truth.shape[1] > 1 else 2
        t = truth.argmax(1) if truth.shape[1] > 1 else truth[:, 0].astype(int)
        p = scores.argmax(1) if scores.shape[1] > 1 else scores[:, 0].astype(int)

        def stat(W: np.ndarray) -> np.ndarray:
            return M.confusion_metrics(M.weighted_confusion(t, p, k, W))[name]

        return float(stat(np.ones((1, len(truth))))[0]), stat
    raise ValueError(f"no subgroup statistic for {name!r}")


def subgroup_metrics(table: pd.DataFrame, column: str, classes: Sequence[str], kind: str, metric: str,
                     thresholds: dict[str, float] | None = None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                     n_permutations: int = 2000, min_patients: int = 2) -> dict[str, Any]:
    """The headline metric per value of ``column`` (one row per patient), each with a
    percentile bootstrap CI over that subgroup's patients, and a permutation test of the
    difference between subgroups: the statistic is the range (max - min) of the metric over
    the subgroups, its null distribution from shuffling the subgroup labels among the
    patients (p = (1 + #{perm >= observed}) / (1 + permutations)); with two subgroups this is
    the two-sided test of their difference. Binary tasks add sensitivity and specificity at
    the validation threshold.

    Patients with an empty value form no subgroup. Subgroups with fewer than
    ``min_patients`` patients, or where the metric is undefined, are listed without a value
    and left out of the test.

    Returns:
        ``column``, ``metric``, ``groups`` (value, n, n_positive, metric {value, ci},
        sensitivity, specificity), ``difference`` (range over the tested subgroups), ``p_value``
        (None when fewer than two subgroups have a value), ``n_permutations``.
    """
    values = table[column].astype(str).str.strip()
    keep = values.ne("") & values.ne("nan")
    table, values = table[keep].reset_index(drop=True), values[keep].reset_index(drop=True)
    truth, scores = _arrays(table, classes)
    if metric in ("balanced_accuracy", "accuracy") and kind == "binary":
        scores = (scores >= (thresholds or {}).get(classes[0], 0.5)).astype(float)
    groups, tested = [], {}
    for g, idx in sorted(values.groupby(values).groups.items(), key=lambda kv: str(kv[0])):
        idx = np.asarray(idx)
        entry: dict[str, Any] = {"value": str(g), "n": int(len(idx)),
                                 "n_positive": int(truth[idx].max(1).sum()) if kind != "multiclass" else None}
        point, stat = headline_statistic(metric, kind, truth[idx], scores[idx])
        if len(idx) >= min_patients and math.isfinite(point):
            boot = cluster_bootstrap({"m": stat}, np.arange(len(idx)), n_boot, ci, seed)["m"]
            entry["metric"] = {"value": point, "ci": [boot.lo, boot.hi]}
            tested[str(g)] = idx
        else:
            entry["metric"] = {"value": None, "ci": [None, None]}
        if kind == "binary" and thresholds and classes[0] in thresholds:
            y = table[f"true_{classes[0]}"].to_numpy(int)[idx]
            pred = table[f"score_{classes[0]}"].to_numpy(float)[idx] >= thresholds[classes[0]]
            m = M.binary_metrics(y, pred, np.ones((1, len(idx))))
            entry["sensitivity"], entry["specificity"] = float(m["sensitivity"][0]), float(m["specificity"][0])
        groups.append(entry)
    result: dict[str, Any] = {"column": column, "metric": metric, "groups": groups, "difference": None,
                              "p_value": None, "n_permutations": 0}
    if len(tested) < 2:
        return result
    rows = np.concatenate(list(tested.values()))
    labels = np.concatenate([np.full(len(v), k) for k, (_, v) in enumerate(tested.items())])
    t_all, s_all = truth[rows], scores[rows]

    def spread(lab: np.ndarray) -> float:
        vals = [headline_statistic(metric, kind, t_all[lab == k], s_all[lab == k])[0] for k in range(len(tested))]
        vals = [v for v in vals if math.isfinite(v)]
        return max(vals) - min(vals) if len(vals) >= 2 else math.nan

    observed = spread(labels)
    rng = np.random.default_rng(seed)
    perms = np.array([spread(rng.permutation(labels)) for _ in range(n_permutations)])
    perms = perms[np.isfinite(perms)]
    if math.isfinite(observed) and len(perms):
        result.update(difference=float(observed),
                      p_value=float((1 + np.sum(perms >= observed - 1e-12)) / (1 + len(perms))),
                      n_permutations=int(len(perms)))
    return result
