"""Patient-to-patient evaluation on hand-made detections, checked against numbers computed
by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from medvit.evaluation.aggregate import PredictionsError
from medvit.evaluation.ptp import patient_table, ptp_metrics, ptp_stage


def _slices(spec: dict[str, tuple[list[int], list[float]]], split: str = "test") -> pd.DataFrame:
    rows = []
    for pid, (truth, scores) in spec.items():
        for i, (t, s) in enumerate(zip(truth, scores)):
            rows.append({"patient_id": pid, "sample_id": f"{pid}_{i}", "split": split, "true_tumor": t,
                         "score_tumor": s})
    return pd.DataFrame(rows)


# Six test patients (conf 0.5):
#   T1 tumour, 2 flagged slices (both tumour)          -> positive for k=1 and k=2
#   T2 tumour, 1 flagged slice (a normal slice of it)  -> positive for k=1 only
#   T3 tumour, nothing flagged                         -> negative
#   N1 normal, 1 flagged slice                         -> FP for k=1
#   N2 normal, 3 flagged slices                        -> FP for k=1 and k=2
#   N3 normal, nothing flagged (a 0.49 just below)     -> TN
DETECTIONS = _slices({
    "T1": ([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.0]),
    "T2": ([0, 1, 0], [0.7, 0.3, 0.0]),
    "T3": ([1, 1, 0], [0.2, 0.0, 0.1]),
    "N1": ([0, 0, 0], [0.5, 0.2, 0.0]),
    "N2": ([0, 0, 0, 0], [0.8, 0.55, 0.95, 0.1]),
    "N3": ([0, 0], [0.49, 0.0]),
})


def test_patient_table_counts_flagged_slices():
    t = patient_table(DETECTIONS, conf=0.5, k=1).set_index("patient_id")
    assert t["flagged"].to_dict() == {"T1": 2, "T2": 1, "T3": 0, "N1": 1, "N2": 3, "N3": 0}
    assert t["truth"].to_dict() == {"T1": 1, "T2": 1, "T3": 1, "N1": 0, "N2": 0, "N3": 0}
    assert t["flagged_tumour"].to_dict() == {"T1": 2, "T2": 0, "T3": 0, "N1": 0, "N2": 0, "N3": 0}


def test_ptp_k1_matches_hand_computation():
    r = ptp_metrics(DETECTIONS, conf=0.5, k=1, n_boot=200)
    # TP = T1, T2; FN = T3; FP = N1, N2; TN = N3
    assert r["confusion"] == {"tp": 2, "fp": 2, "fn": 1, "tn": 1}
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # 4/7
    assert m["accuracy"] == pytest.approx(3 / 6)
    # flagged slices of normal patients: 1 (N1) + 3 (N2) + 0 (N3) over 3 normal patients
    assert m["fp_slices_per_normal_patient"] == pytest.approx(4 / 3)
    assert r["n_patients"] == 6 and r["n_slices"] == 19
    for v in r["metrics"].values():
        lo, hi = v["ci95"]
        assert lo <= v["value"] <= hi and v["n_boot"] > 0


def test_ptp_k2_matches_hand_computation():
    r = ptp_metrics(DETECTIONS, conf=0.5, k=2, n_boot=0)
    # TP = T1; FN = T2, T3; FP = N2; TN = N1, N3
    assert r["confusion"] == {"tp": 1, "fp": 1, "fn": 2, "tn": 2}
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert m["sensitivity"] == pytest.approx(1 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(1 / 2) and m["f1"] == pytest.approx(2 / 5)
    assert m["fp_slices_per_normal_patient"] == pytest.approx(4 / 3)  # slices, whatever k
    assert np.isnan(r["metrics"]["f1"]["ci95"][0])  # no resamples, no interval


def test_threshold_is_inclusive_and_other_splits_ignored():
    val = _slices({"V1": ([1], [0.99])}, split="val")
    r = ptp_metrics(pd.concat([DETECTIONS, val]), conf=0.49, k=1, n_boot=0)
    assert r["confusion"]["fp"] == 3  # N3's 0.49 now counts; V1 (val) is not a test patient
    assert r["n_patients"] == 6
    with pytest.raises(PredictionsError):
        ptp_metrics(val, conf=0.5, k=1, split="test")
    with pytest.raises(ValueError):
        patient_table(DETECTIONS, 0.5, 0)


def test_bootstrap_resamples_patients():
    # with one flagged FP slice per normal patient every resample gives exactly 1
    df = _slices({"A": ([1], [0.9]), "B": ([0], [0.9]), "C": ([0], [0.9])})
    r = ptp_metrics(df, conf=0.5, k=1, n_boot=300, seed=1)
    assert r["metrics"]["fp_slices_per_normal_patient"]["ci95"] == [1.0, 1.0]
    lo, hi = r["metrics"]["specificity"]["ci95"]
    assert lo == hi == 0.0


def test_ptp_stage_reads_conf_and_k_from_the_study(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "evaluation": {"bootstrap": 20}, "tasks": {
        "brain": {"detection": {"conf": 0.5, "min_slices": 2}}}}))
    preds = tmp_path / "predictions.csv"
    DETECTIONS.to_csv(preds, index=False)
    out = json.loads(ptp_stage(study, "brain", preds, tmp_path / "ptp.json").read_text())
    assert out["k"] == 2 and out["conf"] == 0.5 and out["confusion"] == {"tp": 1, "fp": 1, "fn": 2, "tn": 2}
    assert [r["k"] for r in out["by_k"]] == [1, 2, 3]
    assert out["by_k"][0]["confusion"] == {"tp": 2, "fp": 2, "fn": 1, "tn": 1}
    assert len(out["patients"]) == 6
