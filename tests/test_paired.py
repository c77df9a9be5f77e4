"""Paired DeLong test: against an independent O(m*n) implementation written from DeLong et
al. (1988)'s definitions, a hand-computed case, and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medvit.evaluation.paired import delong_test, holm_adjust, paired_auroc_comparisons


def delong_reference(y, a, b):
    """DeLong 1988, eqs. (2)-(5), with the kernel psi computed pair by pair."""
    y = np.asarray(y)
    scores = np.stack([a, b])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (2, m, n)
    theta = psi.mean(axis=(1, 2))
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    s10 = np.array([[np.sum((v10[r] - theta[r]) * (v10[s] - theta[s])) / (m - 1) for s in range(2)] for r in range(2)])
    s01 = np.array([[np.sum((v01[r] - theta[r]) * (v01[s] - theta[s])) / (n - 1) for s in range(2)] for r in range(2)])
    var = s10[0, 0] / m + s01[0, 0] / n + s10[1, 1] / m + s01[1, 1] / n - 2 * (s10[0, 1] / m + s01[0, 1] / n)
    z = (theta[0] - theta[1]) / np.sqrt(var)
    return theta, z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_implementation_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    a = np.round(rng.normal(size=60) + 1.0 * y, 1)  # rounding makes ties
    b = np.round(rng.normal(size=60) + 0.4 * y + 0.5 * a, 1)
    res = delong_test(y, a, b)
    theta, z, p = delong_reference(y, a, b)
    assert res.auc_a == pytest.approx(roc_auc_score(y, a)) and res.auc_b == pytest.approx(roc_auc_score(y, b))
    assert (res.auc_a, res.auc_b) == pytest.approx(tuple(theta))
    assert res.z == pytest.approx(z) and res.p_value == pytest.approx(p)


def test_hand_computed_case():
    # positives a=(3, 2), b=(3, 1); negatives a=(1, 2), b=(2, 0)
    # model a: psi rows (1, 1) and (1, 0.5): AUC 0.875, V10=(1, .75), V01=(1, .75)
    # model b: psi rows (1, 1) and (0, 1):   AUC 0.75,  V10=(1, .5),  V01=(.5, 1)
    # S10 = [[1/32, 1/16], [1/16, 1/8]], S01 = [[1/32, -1/16], [-1/16, 1/8]]
    # var = (1/32 + 1/8 - 1/8)/2 + (1/32 + 1/8 + 1/8)/2 = 5/32 ; z = 0.125 / sqrt(5/32)
    res = delong_test([1, 1, 0, 0], [3, 2, 1, 2], [3, 1, 2, 0])
    assert (res.auc_a, res.auc_b) == (0.875, 0.75)
    assert res.se == pytest.approx(np.sqrt(5 / 32))
    assert res.z == pytest.approx(0.125 / np.sqrt(5 / 32))
    assert res.p_value == pytest.approx(2 * norm.sf(0.125 / np.sqrt(5 / 32)))


def test_agrees_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = rng.normal(size=300) + 1.2 * y
    b = rng.normal(size=300) + 0.8 * y + 0.3 * a
    res = delong_test(y, a, b)
    diffs = []
    for _ in range(2000):
        idx = rng.integers(0, 300, 300)
        if y[idx].min() == y[idx].max():
            continue
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert np.std(diffs) == pytest.approx(res.se, rel=0.1)


def test_identical_models_and_degenerate_input():
    y = [0, 1, 0, 1, 1]
    s = [0.1, 0.9, 0.3, 0.6, 0.2]
    res = delong_test(y, s, s)
    assert res.difference == 0 and res.z == 0 and res.p_value == 1.0
    with pytest.raises(ValueError, match="positive and negative"):
        delong_test([1, 1], [0.2, 0.3], [0.1, 0.5])
    with pytest.raises(ValueError, match="length"):
        delong_test([1, 0], [0.2], [0.1, 0.5])


def test_holm_and_pairwise_tables():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 40)
    base = pd.DataFrame({"patient_id": [f"P{i}" for i in range(40)], "true_x": truth})
    tables = {name: base.assign(score_x=rng.normal(size=40) + shift * truth)
              for name, shift in (("good", 2.0), ("weak", 0.2), ("mid", 1.0))}
    tables["weak"] = tables["weak"].iloc[::-1]  # row order must not matter: joined by patient
    rows = paired_auroc_comparisons(tables, ["x"])
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("good", "mid"), ("good", "weak"), ("mid", "weak")]
    good_weak = rows[1]
    assert good_weak["n_patients"] == 40 and good_weak["difference"] > 0 and good_weak["p_value"] < 0.01
    assert good_weak["p_holm"] >= good_weak["p_value"]


def test_paired_bootstrap_of_macro_auroc():
    from medvit.evaluation.paired import macro_auroc, paired_bootstrap_test

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, (80, 3))
    good = truth + rng.normal(scale=0.5, size=truth.shape)
    weak = truth + rng.normal(scale=3.0, size=truth.shape)
    res = paired_bootstrap_test(truth, good, weak, n_boot=300)
    assert res["difference"] == pytest.approx(macro_auroc(truth, good) - macro_auroc(truth, weak))
    assert res["difference"] > 0 and res["ci95"][0] > 0 and res["p_value"] < 0.01
    same = paired_bootstrap_test(truth, good, good, n_boot=100)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    # with one class it agrees with DeLong's test on a large sample
    y = truth[:, :1]
    delong = delong_test(y[:, 0], good[:, 0], weak[:, 0])
    boot = paired_bootstrap_test(y, good[:, :1], weak[:, :1], n_boot=1000)
    assert boot["difference"] == pytest.approx(delong.difference)
    assert abs(boot["ci95"][0] - delong.ci95[0]) < 0.06 and abs(boot["ci95"][1] - delong.ci95[1]) < 0.06


def test_macro_auroc_matches_sklearn():
    from medvit.evaluation.paired import macro_auroc

    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, (30, 3)).astype(float)
    truth[:, 2] = 1  # a column without negatives is left out
    scores = np.round(rng.random((30, 3)), 1)
    expected = np.mean([roc_auc_score(truth[:, j], scores[:, j]) for j in range(2)])
    assert macro_auroc(truth, scores) == pytest.approx(expected)
