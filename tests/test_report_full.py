"""The full evaluation report from real evaluations of predictions: summary first, figures,
paired tests, data, provenance and model cards; then rendered in headless Chromium (every
image loads, no console error, a screenshot is taken)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import render_in_chromium

from medvit.evaluation.aggregate import aggregate_patients
from medvit.evaluation.evaluate import evaluate_predictions
from medvit.evaluation.paired import delong_test
from medvit.tasks.report import report_stage

PATIENTS = 40


def _predictions(rng, classes, strength):
    rows = []
    truth_rng = np.random.default_rng(len(classes))  # both models of a task see the same truth
    for p in range(PATIENTS):
        split = "val" if p < PATIENTS // 2 else "test"
        truth = {c: int(truth_rng.random() < 0.4) for c in classes}
        for k in range(2):
            row = {"patient_id": f"P{p:03d}", "sample_id": f"P{p:03d}-{k}", "split": split}
            for c in classes:
                row[f"true_{c}"] = truth[c]
                row[f"score_{c}"] = float(1 / (1 + np.exp(-(strength * (2 * truth[c] - 1) + rng.normal()))))
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    os.chdir(root)  # results_dir is relative to the working directory
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({"study": "full", "tasks": {"brain": {}, "xray": {}}}))
    out = root / "results" / "full"
    rng = np.random.default_rng(0)
    metrics = []
    for task, classes in (("brain", ["tumor"]), ("xray", ["effusion", "nodule"])):
        for model, strength in (("strong", 2.0), ("weak", 0.3)):
            folder = out / task / model
            folder.mkdir(parents=True)
            df = _predictions(rng, classes, strength)
            df.to_csv(folder / "predictions.csv", index=False)
            record = {"task": task, "model": model, **evaluate_predictions(df, n_bootstrap=200),
                      "params": 1000 if model == "weak" else 50_000, "train_seconds": 12.0 if model == "weak" else 90.0}
            (folder / "metrics.json").write_text(json.dumps(record))
            metrics.append(folder / "metrics.json")
        split = df[["patient_id", "split"]].drop_duplicates()
        split.to_csv(out / task / "split.csv", index=False)
        summary = {"task": task, "kind": "binary" if task == "brain" else "multilabel", "classes": classes,
                   "n_quarantined": 1,
                   "quarantined": [{"row": 7, "column": "image",
                                    "reason": "cannot read images/DOE^JOHN/slice7.dcm: truncated file"}],
                   "splits": {"val": {"patients": 20, "samples": 40, "classes": {"normal": {"patients": 12,
                                                                                            "samples": 24},
                                                                                  "tumor": {"patients": 8,
                                                                                            "samples": 16}}},
                              "test": {"patients": 20, "samples": 40}}}
        if task == "brain":
            summary["anomaly"] = {"test": {"by": "patient", "target_abnormal_fraction": 0.1,
                                           "achieved_patient_fraction": 0.1, "achieved_image_fraction": 0.05,
                                           "patients_normal": 18, "patients_abnormal": 2,
                                           "images_normal": 38, "images_abnormal": 2}}
        (out / task / "split.json").write_text(json.dumps(summary))
    bench = out / "benchmarks" / "train"
    bench.mkdir(parents=True)
    (bench / "brain_strong.tsv").write_text("s\th:m:s\tmax_rss\n90.5\t0:01:30\t812.0\n")
    html = report_stage(config, metrics, out / "report" / "index.html")
    return root, out, html


def test_summary_comes_first_and_names_the_best_model(study):
    _, _, html = study
    text = html.read_text()
    headings = re.findall(r"<h2[^>]*>([^<]+)</h2>", text)
    assert headings[0] == "Summary"
    assert headings[1:3] == ["Task: xray", "Task: brain"]
    assert {"Data", "Model cards", "Provenance"} <= set(headings)
    summary = text[:text.index('id="task-xray"')]
    assert "strong" in summary and "significantly better than weak" in summary


def test_figures_are_written_and_inlined(study):
    _, out, html = study
    text = html.read_text()
    pngs = sorted(p.name for p in (out / "report" / "figures").glob("*.png"))
    for task in ("brain", "xray"):
        for kind in ("roc_pr", "calibration", "confusion", "comparison"):
            assert f"{task}_{kind}.png" in pngs
    assert text.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from the network


def test_paired_p_values_are_deLong_on_the_test_patients(study):
    _, out, html = study
    text = html.read_text()
    tables = {}
    for model in ("strong", "weak"):
        df = pd.read_csv(out / "brain" / model / "predictions.csv")
        agg = aggregate_patients(df, "max")
        tables[model] = agg[agg["split"] == "test"].set_index("patient_id")
    res = delong_test(tables["strong"]["true_tumor"], tables["strong"]["score_tumor"],
                      tables["weak"]["score_tumor"].reindex(tables["strong"].index))
    brain = text[text.index('id="task-brain"'):text.index('id="data"')]
    assert f"<td>{res.p_value:.3g}</td>" in brain
    assert "DeLong" in brain


def test_data_provenance_and_cards(study):
    _, _, html = study
    text = html.read_text()
    data = text[text.index('id="data"'):text.index('id="model-cards"')]
    assert "Leakage check passed: each of the 40 patients is in exactly one split." in data
    assert "truncated file" in data and "DOE^JOHN" not in text and "slice7.dcm" not in text
    assert "achieved (patients)" in data
    assert text.count("Model card: ") == 4
    prov = text[text.index('id="provenance"'):]
    assert "1 min 30 s" in prov and "Study config as run" in prov


@pytest.mark.slow
def test_report_renders_in_headless_chromium(study, tmp_path):
    _, _, html = study
    render_in_chromium(html, tmp_path)
    assert html.read_text().count('src="data:image/png;base64,') >= 8
