"""Patient aggregation, kind inference, the cluster bootstrap and the evaluate stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from medvit.errors import LeakageError
from medvit.evaluation import bootstrap as B
from medvit.evaluation import metrics as M
from medvit.evaluation.aggregate import PredictionsError, aggregate_patients, check_predictions, infer_kind
from medvit.evaluation.evaluate import (
    ci_key,
    evaluate_predictions,
    read_predictions,
    to_jsonable,
    write_json,
)
from medvit.evaluation.report_sections import under_count_baseline
from medvit.tasks.evaluate import evaluate_stage


def make_predictions(kind: str = "binary", n_patients: int = 80, per_patient: int = 3, signal: float = 2.0,
                     seed: int = 0, classes: tuple[str, ...] | None = None, val_fraction: float = 0.4) -> pd.DataFrame:
    """Synthetic predictions: scores follow the truth with strength ``signal`` (0 = random)."""
    rng = np.random.default_rng(seed)
    classes = classes or {"binary": ("tumor",), "multiclass": ("a", "b", "c"),
                          "multilabel": ("effusion", "nodule", "mass")}[kind]
    k = len(classes)
    rows = []
    for p in range(n_patients):
        split = "val" if p < val_fraction * n_patients else "test"
        label = rng.integers(0, k)
        findings = rng.random(k) < 0.4
        for s in range(per_patient):
            row = {"patient_id": f"P{p:03d}", "sample_id": f"P{p:03d}-{s}", "split": split}
            if kind == "multiclass":
                truth = np.eye(k, dtype=int)[label]
                logits = rng.normal(size=k) + signal * truth
                score = np.exp(logits) / np.exp(logits).sum()
            else:
                truth = (findings if kind == "multilabel" else np.array([p % 3 == 0])).astype(int)
                score = 1 / (1 + np.exp(-(rng.normal(size=k) + signal * (2 * truth - 1))))
            for c, t, sc in zip(classes, truth, score):
                row[f"true_{c}"] = int(t)
                row[f"score_{c}"] = float(sc)
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ aggregation
def _toy() -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": ["A", "A", "A", "B", "B", "C"],
        "sample_id": ["a1", "a2", "a3", "b1", "b2", "c1"],
        "split": ["test"] * 6,
        "true_x": [0, 1, 0, 0, 0, 1],
        "score_x": [0.1, 0.9, 0.5, 0.2, 0.4, 0.7],
        "dice": [0.5, np.nan, 0.7, 1.0, 0.0, 0.3],
    })


@pytest.mark.parametrize("method,top_k,expected", [
    ("max", 3, [0.9, 0.4, 0.7]),
    ("mean", 3, [0.5, 0.3, 0.7]),
    ("topk", 2, [0.7, 0.3, 0.7]),
    ("topk", 1, [0.9, 0.4, 0.7]),
])
def test_aggregation_methods(method, top_k, expected):
    out = aggregate_patients(_toy(), method, top_k)
    assert out["patient_id"].tolist() == ["A", "B", "C"]
    assert out["score_x"].tolist() == pytest.approx(expected)
    assert out["true_x"].tolist() == [1, 0, 1]  # positive if any sample is
    assert out["n_samples"].tolist() == [3, 2, 1]
    assert out["dice"].tolist() == pytest.approx([0.6, 0.5, 0.3])  # NaN skipped
    assert "sample_id" not in out.columns
    assert list(out.columns) == ["patient_id", "split", "true_x", "score_x", "dice", "n_samples"]


def test_topk_keeps_patient_order_when_top_samples_come_late():
    df = pd.DataFrame({"patient_id": ["A", "B", "A"], "sample_id": ["1", "2", "3"], "split": "test",
                       "true_x": [0, 1, 0], "score_x": [0.1, 0.8, 0.6]})
    out = aggregate_patients(df, "topk", 1)
    assert out["patient_id"].tolist() == ["A", "B"]
    assert out["score_x"].tolist() == pytest.approx([0.6, 0.8])


def test_multiclass_aggregation_is_mean_softmax_and_mode_truth():
    df = pd.DataFrame({"patient_id": ["A", "A", "A"], "sample_id": ["1", "2", "3"], "split": "test",
                       "true_a": [1, 0, 0], "score_a": [0.7, 0.1, 0.2],
                       "true_b": [0, 1, 1], "score_b": [0.2, 0.8, 0.7],
                       "true_c": [0, 0, 0], "score_c": [0.1, 0.1, 0.1]})
    out = aggregate_patients(df, "max", kind="multiclass")  # max is ignored for multiclass
    assert out[["true_a", "true_b", "true_c"]].iloc[0].tolist() == [0, 1, 0]
    assert out[["score_a", "score_b", "score_c"]].iloc[0].tolist() == pytest.approx([1 / 3, 1.7 / 3, 0.1])


def test_aggregation_refuses_leakage_and_bad_method():
    df = _toy()
    df.loc[0, "split"] = "val"
    with pytest.raises(LeakageError, match="A"):
        aggregate_patients(df)
    with pytest.raises(PredictionsError, match="median"):
        aggregate_patients(_toy(), "median")
    with pytest.raises(PredictionsError, match="top_k"):
        aggregate_patients(_toy(), "topk", 0)


# ------------------------------------------------------------------------ kind inference
def test_kind_inference():
    assert infer_kind(make_predictions("binary")) == "binary"
    assert infer_kind(make_predictions("multiclass")) == "multiclass"
    assert infer_kind(make_predictions("multilabel")) == "multilabel"
    # One true class per row but sigmoid scores (not summing to 1) -> multilabel.
    df = make_predictions("multiclass")
    df["score_a"] = np.clip(df["score_a"] + 0.2, 0, 1)
    assert infer_kind(df) == "multilabel"


def test_check_predictions_names_bad_columns():
    df = _toy()
    df.loc[2, "score_x"] = 1.5
    with pytest.raises(PredictionsError, match=r"score_x.*data rows 3"):
        check_predictions(df)
    with pytest.raises(PredictionsError, match="unpaired: y"):
        check_predictions(_toy().assign(true_y=0))
    with pytest.raises(PredictionsError, match="no true_"):
        check_predictions(_toy()[["patient_id", "split"]])


# ------------------------------------------------------------------------ bootstrap
def test_resample_counts_draw_patients_with_replacement():
    counts = B.resample_counts(7, 500, np.random.default_rng(0))
    assert counts.shape == (500, 7)
    assert (counts.sum(1) == 7).all()
    assert (counts == 0).any() and (counts >= 2).any()  # some patients dropped, some repeated
    assert counts.mean(0) == pytest.approx(np.ones(7), abs=0.15)


def test_cluster_bootstrap_moves_all_samples_of_a_patient_together():
    clusters = np.array([0, 0, 0, 1, 2, 2])
    seen = []
    B.cluster_bootstrap({"w": lambda W: seen.append(W.copy()) or W.sum(1)}, clusters, n_boot=200, seed=1)
    W = np.concatenate(seen)
    assert (W[:, 0] == W[:, 1]).all() and (W[:, 1] == W[:, 2]).all() and (W[:, 4] == W[:, 5]).all()
    # Row weights are patient multiplicities: they sum to n_patients per patient draw.
    assert (W[:, [0, 3, 4]].sum(1) == 3).all()


def test_bootstrap_contains_point_narrows_with_patients_and_is_seeded():
    def interval(n_patients, seed=0):
        df = make_predictions("binary", n_patients=n_patients, signal=1.0, seed=3, val_fraction=0.0)
        p = aggregate_patients(df)
        y, s = p["true_tumor"].to_numpy(), p["score_tumor"].to_numpy()
        iv = B.cluster_bootstrap({"auroc": lambda W: M.weighted_auroc(y, s, W)}, np.arange(len(p)), 500,
                                 seed=seed)["auroc"]
        return M.auroc(y, s), iv

    point, small = interval(40)
    assert small.lo <= point <= small.hi
    assert small.n_total == 500 and 0 < small.n_used <= 500
    point_big, big = interval(400)
    assert big.lo <= point_big <= big.hi
    assert (big.hi - big.lo) < (small.hi - small.lo)
    assert interval(40, seed=0)[1] == small
    assert interval(40, seed=1)[1] != small


def test_bootstrap_skips_undefined_resamples():
    y = np.array([1, 0, 0, 0, 0, 0])  # one positive patient: many resamples lack it
    s = np.linspace(0.9, 0.1, 6)
    iv = B.cluster_bootstrap({"auroc": lambda W: M.weighted_auroc(y, s, W)}, np.arange(6), 400, seed=0)["auroc"]
    assert 100 < iv.n_used < 400  # P(no positive) = (5/6)^6 = 33%
    assert iv.lo == iv.hi == 1.0
    none = B.cluster_bootstrap({"auroc": lambda W: M.weighted_auroc(y * 0, s, W)}, np.arange(6), 50)["auroc"]
    assert none.n_used == 0 and math.isnan(none.lo) and math.isnan(none.hi)


# ------------------------------------------------------------------------ evaluate_predictions
def test_good_scores_high_auroc_random_scores_chance():
    good = evaluate_predictions(make_predictions("binary", n_patients=200, signal=2.0), n_bootstrap=200)
    rand = evaluate_predictions(make_predictions("binary", n_patients=200, signal=0.0), n_bootstrap=200)
    assert good["kind"] == "binary" and good["classes"] == ["tumor"]
    assert good["metrics"]["auroc"]["value"] > 0.95
    assert 0.35 < rand["metrics"]["auroc"]["value"] < 0.65
    lo, hi = rand["metrics"]["auroc"]["ci95"]
    assert lo < 0.5 < hi
    assert good["n_patients"] == 120 and good["n_samples"] == 360
    assert good["sample_level"]["n_samples"] == 360
    assert set(good["metrics"]) == {"auroc", "ap", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
                                    "f1", "kappa"}
    for entry in good["metrics"].values():
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]


def test_patient_metrics_recomputable_with_sklearn():
    df = make_predictions("binary", n_patients=100, signal=1.0, seed=4)
    r = evaluate_predictions(df, aggregate="mean", n_bootstrap=0)
    p = aggregate_patients(df, "mean")
    test, val = p[p["split"] == "test"], p[p["split"] == "val"]
    thr = M.select_threshold(val["true_tumor"], val["score_tumor"], "youden").value
    assert r["threshold"]["patient"]["tumor"] == pytest.approx(thr)
    pred = test["score_tumor"] >= thr
    assert r["metrics"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(test["true_tumor"], test["score_tumor"]))
    assert r["metrics"]["kappa"]["value"] == pytest.approx(skm.cohen_kappa_score(test["true_tumor"], pred))
    assert r["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
        skm.balanced_accuracy_score(test["true_tumor"], pred))
    samples = df[df["split"] == "test"]
    assert r["sample_level"]["metrics"]["auroc"]["value"] == pytest.approx(
        skm.roc_auc_score(samples["true_tumor"], samples["score_tumor"]))
    assert math.isnan(r["metrics"]["auroc"]["ci95"][0])  # no resamples -> no interval


def test_multiclass_and_multilabel_metrics():
    mc = evaluate_predictions(make_predictions("multiclass", n_patients=120, signal=2.5), n_bootstrap=100)
    assert mc["kind"] == "multiclass" and mc["threshold"] == {"method": "argmax"}
    assert mc["aggregate"]["method"] == "mean"
    assert set(mc["metrics"]) == {"accuracy", "balanced_accuracy", "kappa", "f1_macro", "auroc_macro", "ap_macro"}
    assert mc["metrics"]["accuracy"]["value"] > 0.8 and mc["metrics"]["auroc_macro"]["value"] > 0.9
    ml = evaluate_predictions(make_predictions("multilabel", n_patients=120), n_bootstrap=100, threshold="f1")
    assert ml["kind"] == "multilabel"
    assert {"auroc_effusion", "auroc_nodule", "auroc_mass", "auroc_macro", "f1_macro"} <= set(ml["metrics"])
    per = [ml["metrics"][f"auroc_{c}"]["value"] for c in ("effusion", "nodule", "mass")]
    assert ml["metrics"]["auroc_macro"]["value"] == pytest.approx(np.mean(per))
    assert set(ml["threshold"]["patient"]) == {"effusion", "nodule", "mass"}
    assert ml["threshold"]["method"] == "f1"


def test_single_class_in_test_does_not_crash():
    df = make_predictions("binary", n_patients=60)
    df.loc[df["split"] == "test", "true_tumor"] = 0
    r = evaluate_predictions(df, n_bootstrap=50)
    assert math.isnan(r["metrics"]["auroc"]["value"])
    assert r["metrics"]["auroc"]["n_boot"] == 0
    assert not math.isnan(r["metrics"]["specificity"]["value"])
    assert any("single class" in n for n in r["notes"])
    json.dumps(to_jsonable(r), allow_nan=False)  # NaN -> null


def test_thresholds_validation_cannot_choose_are_recorded_by_class():
    df = make_predictions("multilabel", n_patients=120)
    df.loc[df["split"] == "val", "true_mass"] = 0  # validation holds one class of 'mass'
    r = evaluate_predictions(df, n_bootstrap=0)
    assert r["threshold"]["fallback"] == 0.5
    assert r["threshold"]["fallback_classes"] == {"patient": ["mass"], "sample": ["mass"]}
    assert r["threshold"]["patient"]["mass"] == 0.5 and r["threshold"]["patient"]["nodule"] != 0.5
    assert "fallback" not in evaluate_predictions(make_predictions("multilabel", n_patients=120),
                                                  n_bootstrap=0)["threshold"]


def test_multilabel_absent_finding_excluded_from_macro_with_note():
    df = make_predictions("multilabel", n_patients=80)
    df.loc[df["split"] == "test", "true_mass"] = 0
    r = evaluate_predictions(df, n_bootstrap=50)
    assert math.isnan(r["metrics"]["auroc_mass"]["value"])
    both = [r["metrics"][f"auroc_{c}"]["value"] for c in ("effusion", "nodule")]
    assert r["metrics"]["auroc_macro"]["value"] == pytest.approx(np.mean(both))
    assert any("auroc_macro excludes 'mass'" in n for n in r["notes"])


def test_no_val_rows_falls_back_to_half():
    df = make_predictions("binary", n_patients=30, val_fraction=0.0)
    r = evaluate_predictions(df, n_bootstrap=20)
    assert r["threshold"]["patient"]["tumor"] == 0.5
    assert any("no validation rows" in n for n in r["notes"])
    with pytest.raises(PredictionsError, match="does not fit 1"):
        evaluate_predictions(df, kind="multiclass")
    with pytest.raises(PredictionsError, match="no `test` rows"):
        evaluate_predictions(df.assign(split="val"))


def test_segmentation_columns_reported_with_ci():
    df = make_predictions("binary", n_patients=40, per_patient=1)
    rng = np.random.default_rng(0)
    df["dice"] = rng.random(len(df))
    df["hd95"] = np.where(rng.random(len(df)) < 0.2, np.nan, rng.random(len(df)) * 10)
    r = evaluate_predictions(df, n_bootstrap=100)
    test = df[df["split"] == "test"]
    assert r["metrics"]["dice"]["value"] == pytest.approx(test["dice"].mean())
    assert r["metrics"]["hd95"]["value"] == pytest.approx(test["hd95"].mean())  # NaN skipped
    lo, hi = r["metrics"]["dice"]["ci95"]
    assert lo < r["metrics"]["dice"]["value"] < hi
    assert ci_key(0.9) == "ci90" and ci_key(0.975) == "ci97_5"


# ------------------------------------------------------------------------ the stage
def test_evaluate_stage_writes_metrics_json(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: unit\nseed: 7\nevaluation: {bootstrap: 200, aggregate: topk, top_k: 2}\n"
                     "tasks:\n  brain: {}\n")
    model_dir = tmp_path / "brain" / "resnet18"
    model_dir.mkdir(parents=True)
    split = tmp_path / "split.csv"
    split.write_text("patient_id,image,split\nP1,a.png,test\n")
    (model_dir / "model.json").write_text(json.dumps({"params": 1234, "trainable_params": 56, "train_seconds": 7.5,
                                                      "split_manifest": str(split)}))
    preds = model_dir / "predictions.csv"
    df = make_predictions("binary", n_patients=50)
    df["hd95"] = np.nan
    df.to_csv(preds, index=False)
    out = evaluate_stage(study, "brain", "resnet18", preds, model_dir / "metrics.json")
    text = out.read_text()
    assert "NaN" not in text
    m = json.loads(text)
    assert (m["study"], m["task"], m["model"], m["level"], m["kind"]) == ("unit", "brain", "resnet18", "patient",
                                                                          "binary")
    assert (m["params"], m["trainable_params"], m["train_seconds"]) == (1234, 56, 7.5)
    assert m["aggregate"] == {"method": "topk", "requested": "topk", "top_k": 2}
    assert m["bootstrap"]["n"] == 200 and m["bootstrap"]["seed"] == 7
    assert m["metrics"]["hd95"]["value"] is None
    assert m["provenance"]["manifest_path"] == str(split)
    assert len(m["provenance"]["predictions_sha256"]) == 64
    assert "config_sha256" in m["provenance"]
    # Recomputable: the same predictions and settings give the same numbers.
    again = evaluate_predictions(read_predictions(preds), aggregate="topk", top_k=2, n_bootstrap=200, seed=7)
    assert again["metrics"]["auroc"]["value"] == pytest.approx(m["metrics"]["auroc"]["value"])
    assert again["metrics"]["auroc"]["ci95"] == pytest.approx(m["metrics"]["auroc"]["ci95"])
    assert not list(model_dir.glob("*.tmp"))


def test_evaluate_stage_without_model_json(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: unit\nevaluation: {bootstrap: 10}\ntasks:\n  xray: {}\n")
    preds = tmp_path / "predictions.csv"
    make_predictions("multilabel", n_patients=30).to_csv(preds, index=False)
    m = json.loads(evaluate_stage(study, "xray", "densenet121", preds, tmp_path / "m.json").read_text())
    assert m["params"] is None and m["train_seconds"] is None
    assert any("no model.json" in n for n in m["notes"])
    with pytest.raises(PredictionsError, match="not found"):
        evaluate_stage(study, "xray", "densenet121", tmp_path / "missing.csv", tmp_path / "m.json")


def test_read_predictions_keeps_ids_as_text(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,sample_id,split,true_x,score_x,dice,hd95\n"
                    "007,NA,test,1,0.9,0.5,\n008,2,test,0,0.1,1.0,3.5\n")
    df = read_predictions(path)
    assert df["patient_id"].tolist() == ["007", "008"]
    assert df["sample_id"].tolist() == ["NA", "2"]
    assert math.isnan(df["hd95"].iloc[0]) and df["hd95"].iloc[1] == 3.5
    write_json(tmp_path / "x.json", {"a": np.float32(np.nan), "b": np.int64(3), "c": (1.5, np.inf)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": 3, "c": [1.5, None]}


def _longitudinal_predictions(seed: int = 0) -> pd.DataFrame:
    """Binary predictions where each image is positive with probability 0.15 and its score is
    noise: a patient's union label and max score both rise with their number of images."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(120):
        split = "val" if p < 40 else "test"
        for s in range(int(rng.integers(1, 12))):
            rows.append({"patient_id": f"P{p:03d}", "sample_id": f"P{p:03d}-{s}", "split": split,
                         "true_tumor": int(rng.random() < 0.15), "score_tumor": float(rng.random())})
    return pd.DataFrame(rows)


def test_sample_count_baseline_scores_patients_by_their_number_of_images():
    df = _longitudinal_predictions()
    result = evaluate_predictions(df, aggregate="max", n_bootstrap=200)
    baseline = result["sample_count_baseline"]["metrics"]["auroc"]
    test = df[df["split"] == "test"].groupby("patient_id").agg(y=("true_tumor", "max"), n=("sample_id", "size"))
    assert baseline["value"] == pytest.approx(skm.roc_auc_score(test["y"], test["n"]))
    assert baseline["value"] > 0.7  # the confound this baseline exists to expose
    # noise scores max-aggregated ride on the same confound: patient AUROC far above chance,
    # sample AUROC at chance, and the patient figure does not clear the count baseline
    assert result["metrics"]["auroc"]["value"] > 0.6
    assert abs(result["sample_level"]["metrics"]["auroc"]["value"] - 0.5) < 0.1
    lo, hi = baseline[ci_key(0.95)]
    assert lo < baseline["value"] < hi
    record = {"model": "noise", "kind": "binary", **to_jsonable(result)}
    assert under_count_baseline(record) is not None
    # a model that truly reads the images clears it
    strong = df.assign(score_tumor=df["true_tumor"] * 0.9 + 0.05)
    record = {"model": "oracle", "kind": "binary", **to_jsonable(evaluate_predictions(strong, n_bootstrap=200))}
    assert under_count_baseline(record) is None
    # a count baseline that is itself at chance warns of nothing (the chance flag covers it)
    at_chance = dict(record, metrics={"auroc": {"value": 0.55, "ci95": [0.45, 0.65]}},
                     sample_count_baseline={"metrics": {"auroc": {"value": 0.56, "ci95": [0.46, 0.66]}}})
    assert under_count_baseline(at_chance) is None
    assert under_count_baseline(dict(at_chance, sample_count_baseline={
        "metrics": {"auroc": {"value": 0.7, "ci95": [0.6, 0.8]}}})) is not None


def test_sample_count_baseline_absent_when_every_patient_has_as_many_images():
    result = evaluate_predictions(make_predictions("multilabel", per_patient=3), n_bootstrap=20)
    assert result["sample_count_baseline"] is None
