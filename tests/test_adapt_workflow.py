"""The adaptation stage through Snakemake: a tiny X-ray study whose MAE encoder is the shared
backbone of two methods at two patient fractions, then the comparison and the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from helpers import job_counts, run_snakemake

pytestmark = pytest.mark.slow

TINY = {
    "study": "tiny_adapt",
    "seed": 0,
    "device": "cpu",
    "evaluation": {"bootstrap": 50},
    "tasks": {
        "xray": {
            "synthetic": {"patients": 16, "image_size": 32}, "image_size": 32, "models": ["resnet18"],
            "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0},
            "pretrain": {"model": "vit_tiny", "patch_size": 8,
                         "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}},
            "adapt": {"enabled": True, "methods": ["linear", "dvpt"], "fractions": [0.5, 1.0],
                      "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
        },
    },
}




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adapt")
    study = workdir / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY, sort_keys=False))
    run_snakemake(workdir, study)
    return workdir, study


def test_runs_comparison_and_report(tiny_run):
    workdir, _ = tiny_run
    out = workdir / "results" / "tiny_adapt" / "xray"
    encoder = out / "mae" / "encoder.safetensors"
    comparison = json.loads((out / "adapt" / "comparison.json").read_text())
    assert [(r["method"], r["fraction"]) for r in comparison["rows"]] == [
        ("linear", 0.5), ("linear", 1.0), ("dvpt", 0.5), ("dvpt", 1.0)]
    split = pd.read_csv(out / "split.csv")
    all_train = split.loc[split["split"] == "train", "patient_id"].nunique()
    for row in comparison["rows"]:
        run = out / "adapt" / f"{row['method']}_p{row['percent']}"
        card = json.loads((run / "adapter.json").read_text())
        assert card["backbone"]["path"] == str(encoder.relative_to(workdir))
        assert card["backbone"]["sha256"] == json.loads((out / "mae" / "encoder.json").read_text())["sha256"]
        assert (run / "adapter.safetensors").stat().st_size == row["adapter_bytes"] < encoder.stat().st_size / 10
        assert not (run / "checkpoints").exists()
        preds = pd.read_csv(run / "predictions.csv")
        assert set(preds["split"]) == {"val", "test"}
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["level"] == "patient" and "kappa_macro" in metrics["metrics"]
        assert row["trainable_params"] < row["backbone_params"] / 10
        assert row["train_patients"] == (all_train if row["fraction"] == 1.0 else pytest.approx(all_train / 2, abs=2))
    assert (out / "adapt" / "label_efficiency.png").stat().st_size > 0
    html = (workdir / "results" / "tiny_adapt" / "report" / "index.html").read_text()
    assert "Adaptation methods" in html and "DVPT" in html and "Label efficiency" in html
    assert (workdir / "results" / "tiny_adapt" / "benchmarks" / "adapt" / "xray_dvpt.tsv").exists()


def test_second_run_does_nothing_and_adding_a_method_runs_only_it(tiny_run):
    workdir, study = tiny_run
    assert "Nothing to be done" in run_snakemake(workdir, study, "-n")
    more = json.loads(json.dumps(TINY))
    more["tasks"]["xray"]["adapt"]["methods"].append("vpt")
    study2 = workdir / "tiny.yaml"
    study2.write_text(yaml.safe_dump(more, sort_keys=False))
    out = run_snakemake(workdir, study2, "-n")
    jobs = job_counts(out)
    assert jobs == {"adapt_xray": 1, "adapt_compare_xray": 1, "report": 1, "all": 1}, out


def test_study_without_adapt_runs_nothing_extra(tmp_path):
    plain = json.loads(json.dumps(TINY))
    del plain["tasks"]["xray"]["adapt"]
    study = tmp_path / "plain.yaml"
    study.write_text(yaml.safe_dump(plain, sort_keys=False))
    out = run_snakemake(tmp_path, study, "-n")
    # rule names only: the study itself is called tiny_adapt, so its paths contain "adapt"
    assert "rule train:" in out and not any(line.startswith("rule adapt") for line in out.splitlines()), out
