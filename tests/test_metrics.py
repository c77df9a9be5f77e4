"""Metrics agree with scikit-learn and MONAI; weighted (bootstrap) kernels agree with the
scalar forms on expanded resamples; degenerate inputs give NaN, not exceptions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from sklearn import metrics as skm

from medvit.errors import ConfigError
from medvit.evaluation import metrics as M


@pytest.fixture
def binary_data():
    rng = np.random.default_rng(1)
    y = (rng.random(120) < 0.35).astype(int)
    # Rounded scores create ties, which both implementations must treat alike.
    s = np.round(np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1), 2)
    return y, s


def test_scalar_metrics_match_sklearn(binary_data):
    y, s = binary_data
    pred = M.binarize(s, 0.5)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert M.cohen_kappa(y, pred) == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert M.f1(y, pred) == pytest.approx(skm.f1_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert M.sensitivity(y, pred) == pytest.approx(tp / (tp + fn))
    assert M.specificity(y, pred) == pytest.approx(tn / (tn + fp))
    # The scores are informative: well above chance.
    assert M.auroc(y, s) > 0.75


def test_multiclass_and_multilabel_f1_match_sklearn():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    assert M.f1(y, p, average="macro") == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert M.balanced_accuracy(y, p) == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert M.cohen_kappa(y, p) == pytest.approx(skm.cohen_kappa_score(y, p))
    Y, P = rng.integers(0, 2, (100, 5)), rng.integers(0, 2, (100, 5))
    assert M.f1(Y, P, average="macro") == pytest.approx(skm.f1_score(Y, P, average="macro"))


def test_macro_auroc_is_sklearn_one_vs_rest():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    value, excluded = M.macro(M.per_class(M.auroc, np.eye(3)[y], probs), ["a", "b", "c"])
    assert excluded == []
    assert value == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_macro_excludes_undefined_class():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, (50, 3))
    truth[:, 1] = 0  # finding "b" absent from truth
    scores = rng.random((50, 3))
    per = M.per_class(M.auroc, truth, scores)
    assert math.isnan(per[1])
    value, excluded = M.macro(per, ["a", "b", "c"])
    assert excluded == ["b"]
    assert value == pytest.approx((per[0] + per[2]) / 2)


def test_degenerate_inputs_give_nan():
    y = np.zeros(10, int)
    s = np.linspace(0, 1, 10)
    assert math.isnan(M.auroc(y, s))
    assert math.isnan(M.average_precision(y, s))  # sklearn would say 0.0
    assert math.isnan(M.sensitivity(y, s > 0.5))
    assert M.specificity(y, s > 0.5) == pytest.approx(0.5)
    assert math.isnan(M.cohen_kappa(np.ones(5), np.ones(5)))
    assert math.isnan(M.f1(y, np.zeros(10)))
    assert math.isnan(M.macro(np.array([np.nan, np.nan]))[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_kernels_match_sklearn_on_expanded_resamples(binary_data, seed):
    y, s = binary_data
    rng = np.random.default_rng(seed)
    W = rng.integers(0, 3, (4, y.size)).astype(float)
    W[0] = 1.0  # the plain point estimate
    auc = M.weighted_auroc(y, s, W)
    ap = M.weighted_average_precision(y, s, W)
    pred = M.binarize(s, 0.45)
    bm = M.binary_metrics(y, pred, W)
    for b in range(W.shape[0]):
        idx = np.repeat(np.arange(y.size), W[b].astype(int))
        ye, se, pe = y[idx], s[idx], pred[idx]
        assert auc[b] == pytest.approx(skm.roc_auc_score(ye, se))
        assert ap[b] == pytest.approx(skm.average_precision_score(ye, se))
        assert bm["accuracy"][b] == pytest.approx(skm.accuracy_score(ye, pe))
        assert bm["balanced_accuracy"][b] == pytest.approx(skm.balanced_accuracy_score(ye, pe))
        assert bm["kappa"][b] == pytest.approx(skm.cohen_kappa_score(ye, pe))
        assert bm["f1"][b] == pytest.approx(skm.f1_score(ye, pe))
        assert bm["sensitivity"][b] == pytest.approx(skm.recall_score(ye, pe))
        assert bm["specificity"][b] == pytest.approx(skm.recall_score(1 - ye, 1 - pe))


def test_weighted_confusion_metrics_match_sklearn_multiclass():
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 4, 90), rng.integers(0, 4, 90)
    y[y == 3] = 2  # class 3 never true: balanced accuracy and F1 must handle it like sklearn
    W = rng.integers(0, 3, (3, 90)).astype(float)
    m = M.confusion_metrics(M.weighted_confusion(y, p, 4, W))
    for b in range(3):
        idx = np.repeat(np.arange(90), W[b].astype(int))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m["balanced_accuracy"][b] == pytest.approx(skm.balanced_accuracy_score(y[idx], p[idx]))
            assert m["f1_macro"][b] == pytest.approx(skm.f1_score(y[idx], p[idx], average="macro"))
        assert m["accuracy"][b] == pytest.approx(skm.accuracy_score(y[idx], p[idx]))
        assert m["kappa"][b] == pytest.approx(skm.cohen_kappa_score(y[idx], p[idx]))


def test_weighted_kernels_nan_when_resample_lacks_a_class():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    W = np.array([[1, 1, 1, 1], [2, 2, 0, 0], [0, 0, 1, 3]], dtype=float)
    auc = M.weighted_auroc(y, s, W)
    assert auc[0] == pytest.approx(0.75)
    assert math.isnan(auc[1]) and math.isnan(auc[2])
    assert math.isnan(M.weighted_average_precision(y, s, W)[1])
    assert M.weighted_nanmean(np.array([1.0, np.nan, 3.0, 5.0]), W)[2] == pytest.approx((3 + 15) / 4)


def test_macro_kappa_skips_undefined_findings_and_its_weighted_form_agrees_on_expanded_resamples():
    rng = np.random.default_rng(3)
    truth = (rng.random((40, 3)) < 0.4).astype(int)
    pred = np.where(rng.random((40, 3)) < 0.8, truth, 1 - truth)
    truth[:, 2] = pred[:, 2] = 1  # one class only: this finding's kappa is undefined
    assert M.macro_kappa(truth, pred) == pytest.approx(
        np.mean([skm.cohen_kappa_score(truth[:, j], pred[:, j]) for j in range(2)]))
    W = np.stack([np.ones(40), rng.multinomial(40, np.full(40, 1 / 40))]).astype(float)
    weighted = M.weighted_macro_kappa(truth, pred, W)
    assert weighted[0] == pytest.approx(M.macro_kappa(truth, pred))
    idx = np.repeat(np.arange(40), W[1].astype(int))
    assert weighted[1] == pytest.approx(M.macro_kappa(truth[idx], pred[idx]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no defined finding
        assert math.isnan(M.macro_kappa(truth[:, 2:], pred[:, 2:]))
    assert math.isnan(M.weighted_macro_kappa(truth[:, 2:], pred[:, 2:], W)[0])


def test_threshold_selection():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.45, 0.4, 0.7, 0.9])
    youden = M.select_threshold(y, s, "youden")
    # Candidates 0.4 (sens 1, spec 2/3) and 0.7 (sens 2/3, spec 1) tie at J = 2/3: the higher wins.
    assert youden.method == "youden" and youden.value == pytest.approx(0.7)
    j = [M.sensitivity(y, s >= t) + M.specificity(y, s >= t) - 1 for t in s]
    assert M.sensitivity(y, s >= youden.value) + M.specificity(y, s >= youden.value) - 1 == pytest.approx(max(j))
    best_f1 = M.select_threshold(y, s, "f1")
    assert best_f1.method == "f1"
    assert M.f1(y, s >= best_f1.value) == pytest.approx(max(M.f1(y, s >= t) for t in s))
    assert M.select_threshold(y, s, 0.3).value == 0.3
    fb = M.select_threshold(np.ones(4), np.linspace(0, 1, 4), "youden")
    assert fb.method == "fallback" and fb.value == 0.5 and "single class" in fb.note


@pytest.mark.parametrize("spec,expected", [("youden", "youden"), ("F1", "f1"), ("0.25", 0.25), (1, 1.0)])
def test_parse_threshold_accepts(spec, expected):
    assert M.parse_threshold(spec) == expected


@pytest.mark.parametrize("spec", ["median", 1.5, -0.1, True, None])
def test_parse_threshold_rejects(spec):
    with pytest.raises(ConfigError, match="evaluation.threshold"):
        M.parse_threshold(spec)


def _random_masks(rng, shape=(12, 14, 10)):
    pred = np.zeros(shape, bool)
    truth = np.zeros(shape, bool)
    pred[rng.integers(0, 4):rng.integers(6, 10), 2:9, rng.integers(0, 3):7] = True
    truth[3:8, rng.integers(1, 5):rng.integers(7, 12), 1:8] = True
    return pred, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_hd95_match_monai_metric_classes(seed):
    pred, truth = _random_masks(np.random.default_rng(seed))
    dice_ref = DiceMetric(include_background=True)
    hd_ref = HausdorffDistanceMetric(include_background=True, percentile=95)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    dice_ref(t(pred), t(truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd_ref(t(pred), t(truth))
    assert M.dice_score(pred, truth) == pytest.approx(float(dice_ref.aggregate()))
    assert M.hd95(pred, truth) == pytest.approx(float(hd_ref.aggregate()))
    # Plain numpy reference for Dice.
    assert M.dice_score(pred, truth) == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_hd95_spacing_and_empty_masks():
    a = np.zeros((8, 8, 8), bool)
    a[2:5, 2:5, 2:5] = True
    b = a.copy()
    b[5, 2:5, 2:5] = True  # one extra slice along axis 0
    assert M.hd95(b, a) == pytest.approx(1.0)
    assert M.hd95(b, a, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    empty = np.zeros_like(a)
    assert M.dice_score(empty, empty) == 1.0
    assert M.dice_score(a, empty) == 0.0 and M.dice_score(empty, a) == 0.0
    assert M.hd95(empty, empty) == 0.0
    assert math.isnan(M.hd95(a, empty)) and math.isnan(M.hd95(empty, a))
    with pytest.raises(ValueError, match="shape"):
        M.dice_score(a, a[:4])
    # 2D works too.
    assert M.dice_score(a[3], b[3]) == 1.0


def test_expected_calibration_error_by_hand():
    from medvit.evaluation.metrics import calibration_bins, expected_calibration_error

    # bin [0.1, 0.2): probs .15 .15, truth 0 1 -> |0.5 - 0.15| ; bin [0.9, 1]: probs .95 1.0, truth 1 1 -> |1 - .975|
    y, p = [0, 1, 1, 1], [0.15, 0.15, 0.95, 1.0]
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.35 + 0.5 * 0.025)
    b = calibration_bins(y, p)
    assert b["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
