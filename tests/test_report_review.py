"""The reviewer-facing parts of the report, from real evaluations of tiny synthetic
predictions: the chance flag, degenerate operating points, learning curves, failure cases,
Brier/PPV/NPV/decision curves, subgroups, the reporting checklist, table exports, plain
model-card notes and counts taken from the metrics' own test set."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from medvit.engine.trainer import write_history
from medvit.evaluation import clinical as C
from medvit.evaluation.aggregate import aggregate_patients
from medvit.evaluation.evaluate import evaluate_predictions
from medvit.evaluation.report_sections import includes_chance, plain_note
from medvit.tasks.report import report_stage

PATIENTS = 60


def _brain(model: str, rng: np.random.Generator) -> pd.DataFrame:
    truth_rng = np.random.default_rng(1)  # every model sees the same patients and truth
    rows = []
    for p in range(PATIENTS):
        split = "val" if p < PATIENTS // 3 else "test"
        y = int(truth_rng.random() < 0.4)
        sex = "F" if p % 2 else "M"
        for k in range(2):
            if model == "strong":
                score = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal())))
            elif model == "allpos":  # separable on val (threshold 0.9), every test score above it
                score = (0.9 if y else 0.1) if split == "val" else 0.95 + 0.04 * rng.random()
            else:
                score = rng.random()
            rows.append({"patient_id": f"P{p:03d}", "sample_id": f"P{p:03d}-{k}", "split": split,
                         "true_tumor": y, "score_tumor": float(score), "sex": sex})
    return pd.DataFrame(rows)


def _xray(rng: np.random.Generator) -> pd.DataFrame:
    truth_rng = np.random.default_rng(2)
    rows = []
    for p in range(PATIENTS):
        split = "val" if p < PATIENTS // 3 else "test"
        truth = {c: int(truth_rng.random() < 0.4) for c in ("effusion", "nodule")}
        row = {"patient_id": f"X{p:03d}", "sample_id": f"X{p:03d}-0", "split": split}
        for c, y in truth.items():
            row[f"true_{c}"] = y
            row[f"score_{c}"] = float(rng.random())  # no signal: chance
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    os.chdir(root)
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({"study": "rev", "tasks": {"brain": {}, "xray": {}},
                                      "evaluation": {"subgroups": ["sex"], "prevalence": {"brain": 0.1},
                                                     "bootstrap": 200}}))
    out = root / "results" / "rev"
    rng = np.random.default_rng(0)
    paths = []
    for task, model, df in [("brain", m, _brain(m, rng)) for m in ("strong", "allpos")] + \
                           [("xray", m, _xray(rng)) for m in ("vit_a", "vit_b")]:
        folder = out / task / model
        folder.mkdir(parents=True)
        df.to_csv(folder / "predictions.csv", index=False)
        record = {"task": task, "model": model, **evaluate_predictions(df, n_bootstrap=200), "params": 1000,
                  "train_seconds": 10.0}
        (folder / "metrics.json").write_text(json.dumps(record))
        history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.1 * e, "val_metric": 0.5 + 0.1 * e,
                    "lr": 1e-3, "seconds": 2.0} for e in (1, 2, 3)]
        write_history(folder / "history.csv", history, "val_auroc_macro")
        (folder / "model.json").write_text(json.dumps({"model": model, "best_epoch": 3,
                                                      "train": {"epochs": 3, "lr": 1e-3, "batch_size": 8}}))
        paths.append(folder / "metrics.json")
    for task in ("brain", "xray"):
        df = pd.read_csv(out / task / ("strong" if task == "brain" else "vit_a") / "predictions.csv")
        df[["patient_id", "split"]].drop_duplicates().to_csv(out / task / "split.csv", index=False)
        (out / task / "split.json").write_text(json.dumps({
            "task": task, "kind": "binary", "classes": ["tumor"], "quarantined": [],
            "splits": {"val": {"patients": 20, "samples": 40}, "test": {"patients": 40, "samples": 80}}}))
    html = report_stage(config, paths, out / "report" / "index.html")
    return out, html.read_text()


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(f'id="{start}"'):text.index(f'id="{end}"')]


def test_chance_best_model_is_not_crowned(study):
    out, text = study
    summary = _section(text, "summary", "task-xray")
    xray_row = summary[summary.index("<td>xray</td>"):summary.index("<td>brain</td>")]
    assert "no better than chance" in xray_row and "no model is crowned" in xray_row
    brain_row = summary[summary.index("<td>brain</td>"):]
    assert "<td class=\"t\">strong</td>" in brain_row and "no better than chance" not in brain_row.split("</tr>")[0]
    record = json.loads((out / "xray" / "vit_a" / "metrics.json").read_text())
    assert includes_chance("auroc_macro", record["metrics"]["auroc_macro"], record) == 0.5
    assert includes_chance("auroc", {"value": 0.9, "ci95": [0.8, 0.97]}, record) is None
    assert "No better than chance." in _section(text, "task-xray", "task-brain")
    cards = _section(text, "model-cards", "provenance")
    assert "interval includes chance (0.5)" in cards


def test_degenerate_operating_point_is_flagged(study):
    _, text = study
    brain = _section(text, "task-brain", "data")
    assert "Degenerate operating point." in brain
    assert "allpos: the threshold chosen on validation (0.9) calls every one of the 40 test patients positive" in brain
    assert "strong: the threshold" not in brain
    assert "it calls every test patient positive" in _section(text, "model-cards", "provenance")


def test_learning_curves_per_task(study):
    out, text = study
    assert (out / "report" / "figures" / "brain_curves.png").is_file()
    assert "Learning curves (2 training runs)" in _section(text, "task-brain", "data")
    assert "val_auroc_macro" in text


def test_failure_cases_are_the_most_confident_errors(study):
    out, text = study
    df = pd.read_csv(out / "brain" / "strong" / "predictions.csv")
    record = json.loads((out / "brain" / "strong" / "metrics.json").read_text())
    thr = record["threshold"]["patient"]["tumor"]
    patients = aggregate_patients(df, "max")
    test = patients[patients["split"] == "test"]
    fp = test[(test["score_tumor"] >= thr) & (test["true_tumor"] == 0)].sort_values("score_tumor", ascending=False)
    fn = test[(test["score_tumor"] < thr) & (test["true_tumor"] == 1)].sort_values("score_tumor")
    brain = _section(text, "task-brain", "data")
    table = brain[brain.index("Failure cases (test)"):]
    if len(fp):
        assert f"<td>{fp['score_tumor'].iloc[0]:.3f}</td>" in table
    if len(fn):
        assert f"<td>{fn['score_tumor'].iloc[0]:.3f}</td>" in table
    assert "P0" not in table  # no patient id printed: lines of predictions.csv instead
    cases = C.failure_cases(test, ["tumor"], "binary", {"tumor": thr}, n=3)
    fps = [c["score"] for c in cases if c["error"] == "false positive"]
    assert fps == sorted(fps, reverse=True) and len(fps) == min(3, len(fp))


def test_brier_and_predictive_values_at_the_stated_prevalence(study):
    out, text = study
    df = pd.read_csv(out / "brain" / "strong" / "predictions.csv")
    record = json.loads((out / "brain" / "strong" / "metrics.json").read_text())
    patients = aggregate_patients(df, "max")
    test = patients[patients["split"] == "test"]
    y, s = test["true_tumor"].to_numpy(), test["score_tumor"].to_numpy()
    brier = C.brier_score(test, ["tumor"], "binary", n_boot=200)
    assert brier["value"] == pytest.approx(np.mean((s - y) ** 2))
    assert brier["ci"][0] <= brier["value"] <= brier["ci"][1]
    thr = record["threshold"]["patient"]["tumor"]
    se = np.mean(s[y == 1] >= thr)
    sp = np.mean(s[y == 0] < thr)
    pv = C.predictive_values(y, s, thr, 0.1, n_boot=200)
    assert pv["ppv"]["value"] == pytest.approx(se * 0.1 / (se * 0.1 + (1 - sp) * 0.9))
    assert pv["npv"]["value"] == pytest.approx(sp * 0.9 / (sp * 0.9 + (1 - se) * 0.1))
    # at the test prevalence PPV is the observed TP / (TP + FP)
    observed = C.predictive_values(y, s, thr, None, n_boot=0)
    assert observed["ppv"]["value"] == pytest.approx(np.sum((s >= thr) & (y == 1)) / np.sum(s >= thr))
    brain = _section(text, "task-brain", "data")
    assert f"{pv['ppv']['value']:.3f}" in brain and "prevalence of 0.1 (stated in the study config)" in brain
    assert (out / "report" / "figures" / "brain_decision_curve.png").is_file()
    dc = C.decision_curve(y, s, np.array([0.2]))
    tp, fp = np.sum((s >= 0.2) & (y == 1)), np.sum((s >= 0.2) & (y == 0))
    assert dc["model"][0] == pytest.approx(tp / len(y) - fp / len(y) * 0.25)
    assert dc["treat_all"][0] == pytest.approx(y.mean() - (1 - y.mean()) * 0.25)


def test_subgroup_metrics_match_a_direct_computation(study):
    out, text = study
    df = pd.read_csv(out / "brain" / "strong" / "predictions.csv")
    patients = aggregate_patients(df.drop(columns="sex"), "max")
    test = patients[patients["split"] == "test"].copy()
    test["sex"] = test["patient_id"].map(df.groupby("patient_id")["sex"].first())
    res = C.subgroup_metrics(test, "sex", ["tumor"], "binary", "auroc", n_boot=200, n_permutations=200)
    for g in res["groups"]:
        sub = test[test["sex"] == g["value"]]
        assert g["n"] == len(sub)
        assert g["metric"]["value"] == pytest.approx(roc_auc_score(sub["true_tumor"], sub["score_tumor"]))
        assert g["metric"]["ci"][0] <= g["metric"]["value"] <= g["metric"]["ci"][1]
    values = [g["metric"]["value"] for g in res["groups"]]
    assert res["difference"] == pytest.approx(max(values) - min(values))
    assert 0 < res["p_value"] <= 1
    brain = _section(text, "task-brain", "data")
    assert "Subgroups by sex" in brain
    assert f"{values[0]:.3f} [" in brain


def test_checklist_methods_tables_and_print_css(study):
    out, text = study
    reporting = _section(text, "reporting", "model-cards")
    assert "TRIPOD+AI" in reporting and "CLAIM" in reporting and "authors must write this" in reporting
    methods = reporting[reporting.index("Methods (generated from this run)"):]
    record = json.loads((out / "brain" / "strong" / "metrics.json").read_text())
    assert f"{record['metrics']['auroc']['value']:.3f}" in methods and "40 test patients" in methods
    tables = sorted(p.name for p in (out / "report" / "tables").iterdir())
    csvs = [t for t in tables if t.endswith(".csv")]
    assert len(csvs) == len([t for t in tables if t.endswith(".tex")]) == text.count("<table")
    first = pd.read_csv(out / "report" / "tables" / csvs[0])
    assert list(first.columns)[:3] == ["task", "patients", "samples"]  # the summary comes first
    tex = (out / "report" / "tables" / csvs[0].replace(".csv", ".tex")).read_text()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex
    assert "@media print" in text
    assert re.search(r"td:first-child,th:first-child\{position:sticky", text)


def test_model_cards_use_plain_sentences_and_the_metrics_test_set():
    assert plain_note("patient level: hd95: 3 of 8 rows undefined (one mask empty) and skipped") == (
        "HD95 (boundary distance) is undefined for 3 of 8 test patients where the predicted or the true lesion "
        "mask is empty (no boundary to measure); the mean HD95 leaves them out, and Dice counts those misses.")
    assert plain_note("patient-level threshold for 'tumor': youden threshold undefined (val holds one class); "
                      "used 0.5").startswith("Validation could not choose a patient-level threshold for tumor")
    assert plain_note("something new") == "Something new."


def test_subgroup_columns_travel_into_predictions(tmp_path):
    from types import SimpleNamespace

    from medvit.tasks.common import StageContext, TaskSpec, write_predictions

    df = pd.DataFrame({"patient_id": ["a", "b", "c"], "sample_id": ["a1", "b1", "c1"], "split": ["val", "test",
                                                                                                 "train"],
                       "label": ["tumor", "normal", "tumor"], "sex": ["F", "M", "F"], "site": ["1", "2", ""]})
    spec = TaskSpec("binary", ["tumor"], "label", ["normal", "tumor"])
    ctx = StageContext({"evaluation": {"subgroups": ["sex", "site"]}}, tmp_path, "brain", {},
                       SimpleNamespace(df=df), spec)
    rows = ctx.rows(["val", "test"])
    out = write_predictions(tmp_path / "predictions.csv", rows, spec, np.array([[0.9], [0.2]]))
    written = pd.read_csv(tmp_path / "predictions.csv", dtype=str)
    assert list(written.columns) == ["patient_id", "sample_id", "split", "true_tumor", "score_tumor", "sex", "site"]
    assert written["sex"].tolist() == ["F", "M"] and written["site"].tolist() == ["1", "2"]
    assert list(out["sex"]) == ["F", "M"]
    plain = StageContext({"evaluation": {}}, tmp_path, "brain", {}, SimpleNamespace(df=df), spec)
    write_predictions(tmp_path / "p2.csv", plain.rows(["test"]), spec, np.array([[0.2]]))
    assert "sex" not in pd.read_csv(tmp_path / "p2.csv").columns


@pytest.mark.slow
def test_review_report_renders_in_headless_chromium(study, tmp_path):
    from tests.test_report_full import render_in_chromium

    out, _ = study
    render_in_chromium(out / "report" / "index.html", tmp_path)


def test_counts_and_captions_come_from_the_metrics_records():
    """A cross-validated model's metrics pool out-of-fold patients: the Data section and the
    model card give those counts, not the split's test split; a threshold that fell back to
    0.5 is named so in the captions."""
    from medvit.evaluation.report_sections import TaskResults, data_section, evaluated_on, threshold_phrase

    record = {"model": "cswin_unet", "task": "prostate", "kind": "binary", "classes": ["cspca"], "n_patients": 40,
              "n_samples": 40, "threshold": {"fallback": 0.5, "fallback_classes": {"patient": ["cspca"], "sample": []}}}
    samples = pd.DataFrame({"patient_id": [f"p{i}" for i in range(40)], "fold": [i % 5 for i in range(40)]})
    tr = TaskResults("prostate", [record], split={"splits": {"train": {"patients": 24, "samples": 24},
                                                             "val": {"patients": 8, "samples": 8},
                                                             "test": {"patients": 8, "samples": 8}}},
                     samples={"cswin_unet": samples})
    text = evaluated_on(tr, record)
    assert text.startswith("40 patients (40 samples) pooled out of fold over 5 cross-validation folds")
    data = data_section({"prostate": tr}).body
    assert "the metrics are computed on 40 patients" in data and "not on the 8 patients of the test split" in data
    assert threshold_phrase(tr).startswith("a threshold of 0.5 (validation could not choose one")
    other = dict(record, model="unet3d", threshold={"patient": {"cspca": 0.4}})
    both = TaskResults("prostate", [record, other])
    assert threshold_phrase(both) == ("the threshold chosen on the validation patients (unet3d), or 0.5 where "
                                      "validation could not choose one (cswin_unet)")
    # multilabel: a fallback for one finding leaves the others' validation-chosen thresholds
    finding = dict(record, model="densenet121", classes=["Effusion", "Hernia"],
                   threshold={"fallback": 0.5, "fallback_classes": {"patient": ["Hernia"], "sample": ["Hernia"]}})
    assert threshold_phrase(TaskResults("xray", [finding])) == (
        "the threshold chosen on the validation patients, or 0.5 for Hernia where validation could not choose one "
        "(see the notes)")
    # a fallback at sample level only leaves the patient-level captions alone
    sample_only = dict(finding, threshold={"fallback": 0.5, "fallback_classes": {"patient": [], "sample": ["Hernia"]}})
    assert threshold_phrase(TaskResults("xray", [sample_only])) == "the threshold chosen on the validation patients"
    # a metrics.json from before the classes were recorded: a fallback, classes unknown
    assert threshold_phrase(TaskResults("xray", [dict(finding, threshold={"fallback": 0.5})])).startswith(
        "a threshold of 0.5 (validation could not choose one")


def test_multiclass_failures_and_subgroups():
    table = pd.DataFrame({"true_a": [1, 0, 0, 1, 0, 0], "true_b": [0, 1, 0, 0, 1, 0], "true_c": [0, 0, 1, 0, 0, 1],
                          "score_a": [.7, .8, .1, .2, .1, .3], "score_b": [.2, .1, .1, .7, .8, .3],
                          "score_c": [.1, .1, .8, .1, .1, .4], "site": ["x", "x", "x", "y", "y", "y"]})
    cases = C.failure_cases(table.drop(columns="site"), ["a", "b", "c"], "multiclass", None, n=5)
    assert [(c["class"], c["error"], c["score"]) for c in cases] == [("b", "predicted a", 0.8), ("a", "predicted b",
                                                                                                 0.7)]
    res = C.subgroup_metrics(table, "site", ["a", "b", "c"], "multiclass", "balanced_accuracy", n_boot=50,
                             n_permutations=50)
    got = {g["value"]: g["metric"]["value"] for g in res["groups"]}
    from sklearn.metrics import balanced_accuracy_score
    for site, idx in (("x", [0, 1, 2]), ("y", [3, 4, 5])):
        t = table.iloc[idx][["true_a", "true_b", "true_c"]].to_numpy().argmax(1)
        p = table.iloc[idx][["score_a", "score_b", "score_c"]].to_numpy().argmax(1)
        assert got[site] == pytest.approx(balanced_accuracy_score(t, p))
