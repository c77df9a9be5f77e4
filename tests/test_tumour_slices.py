"""Slice-level evaluation for data where every patient has a tumour, checked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medvit.evaluation.report_sections import TaskResults, all_patients_positive, summary_section
from medvit.evaluation.tumour_slices import paired_slice_auroc, slice_detection_summary


def _pred() -> pd.DataFrame:
    # patient A: 2 tumour slices (one flagged) + 1 tumour-free (flagged); B: 1 tumour slice (missed)
    # + 2 tumour-free; C: tumour-free only (its tumour slices were resampled away); a val row ignored
    rows = [("A", "a1", 1, 0.9), ("A", "a2", 1, 0.2), ("A", "a3", 0, 0.6), ("B", "b1", 1, 0.4),
            ("B", "b2", 0, 0.1), ("B", "b3", 0, 0.3), ("C", "c1", 0, 0.05), ("C", "c2", 0, 0.7)]
    df = pd.DataFrame(rows, columns=["patient_id", "sample_id", "true_tumor", "score_tumor"]).assign(split="test")
    return pd.concat([df, pd.DataFrame([{"patient_id": "D", "sample_id": "d1", "true_tumor": 1, "score_tumor": 0.0,
                                         "split": "val"}])], ignore_index=True)


def test_slice_detection_summary_by_hand() -> None:
    out = slice_detection_summary(_pred(), threshold=0.5, ks=(1, 2), n_boot=200)
    m = out["metrics"]
    assert out["n_slices"] == 8 and out["n_tumour_slices"] == 3 and out["n_patients"] == 3
    assert out["n_tumour_patients"] == 2 and out["n_tumour_free_patients"] == 1
    assert m["detection_rate_k1"]["value"] == pytest.approx(0.5)  # A found, B missed
    assert m["detection_rate_k2"]["value"] == 0.0
    assert m["fp_per_tumour_free_slice"]["value"] == pytest.approx(2 / 5)  # a3 and c2 of 5 tumour-free
    # AUROC by pairs: positives 0.9, 0.2, 0.4 vs negatives 0.6, 0.1, 0.3, 0.05, 0.7
    pairs = [(p > n) + 0.5 * (p == n) for p in (0.9, 0.2, 0.4) for n in (0.6, 0.1, 0.3, 0.05, 0.7)]
    assert m["slice_auroc"]["value"] == pytest.approx(np.mean(pairs))
    for v in m.values():
        lo, hi = v["ci95"]
        assert lo <= v["value"] + 1e-9 and v["value"] - 1e-9 <= hi
    assert out["tumour_slices_per_patient"] == {"1": 1, "2": 1}


def test_paired_slice_auroc() -> None:
    a = _pred()
    b = a.assign(score_tumor=a["true_tumor"] * 0.5 + 0.25)  # perfect ranking
    res = paired_slice_auroc(b, a, n_boot=300)
    assert res["difference"] > 0 and res["n_slices"] == 8 and res["n_patients"] == 3
    same = paired_slice_auroc(a, a, n_boot=100)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_report_detects_data_without_tumour_free_patients() -> None:
    lgg_like = {"splits": {"train": {"strata": {"tumor": 61}}, "val": {"strata": {"tumor": 16}},
                           "test": {"strata": {"normal": 19, "tumor": 14}}}}  # test: resampling artefact
    assert all_patients_positive(lgg_like, "tumor")
    mixed = {"splits": {"train": {"strata": {"tumor": 5, "normal": 9}}, "val": {"strata": {"tumor": 2}}}}
    assert not all_patients_positive(mixed, "tumor") and not all_patients_positive({}, "tumor")
    assert not all_patients_positive({"splits": {"train": {"patients": 5}, "val": {"patients": 2}}}, "tumor")
    # the report's summary crowns no model at patient level on such data
    record = {"model": "resnet18", "kind": "binary", "classes": ["tumor"], "n_patients": 33,
              "metrics": {"auroc": {"value": 0.801, "ci95": [0.628, 0.941]}}}
    study = {"study": "lgg", "seed": 0, "tasks": {"brain": {"positive_class": "tumor", "source": "lgg"}}}
    body = summary_section(study, {"brain": TaskResults("brain", [record], split=lgg_like)}, {}).body
    assert "none at patient level: every patient has tumor" in body and "no model is crowned" in body
    mixed_body = summary_section(study, {"brain": TaskResults("brain", [record], split=mixed)}, {}).body
    assert "none at patient level" not in mixed_body and ">resnet18<" in mixed_body
