"""The whole pipeline for real: a tiny study of all four tasks through Snakemake and the
real `medvit` stages (synthetic data -> split -> train -> predict -> evaluate -> report),
then the rerun rules: nothing to do on a second run, and deleting one model's outputs
reruns only that model and what depends on it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from helpers import BIN, failed_job_logs, job_counts, render_in_chromium, run_snakemake

pytestmark = pytest.mark.slow

TINY = {
    "study": "tiny",
    "seed": 0,
    "device": "cpu",
    "evaluation": {"bootstrap": 50},
    "tasks": {
        "xray": {"synthetic": {"patients": 12, "image_size": 32}, "image_size": 32, "models": ["resnet18"],
                 "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
        "brain": {"synthetic": {"patients": 16, "image_size": 32}, "image_size": 32, "anomaly_ratio": 0.3,
                  "resample_by": "image", "models": ["resnet10t"],
                  "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
        "prostate": {"synthetic": {"patients": 12, "image_size": 16}, "roi_size": [16, 16, 16], "folds": 2,
                     "models": ["unet3d"], "train": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0}},
        "histo": {"synthetic": {"patients": 12, "image_size": 32}, "image_size": 32, "models": ["resnet10t"],
                  "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
    },
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    study = workdir / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY, sort_keys=False))
    run_snakemake(workdir, study)
    return workdir, study


def test_every_task_ends_in_metrics_and_report(tiny_run):
    workdir, _ = tiny_run
    out = workdir / "results" / "tiny"
    for task, tcfg in TINY["tasks"].items():
        model = tcfg["models"][0]
        folder = out / task / model
        preds = pd.read_csv(folder / "predictions.csv")
        assert {"patient_id", "sample_id", "split"} <= set(preds.columns)
        assert set(preds["split"]) <= {"val", "test"} and "test" in set(preds["split"])
        scores = preds.filter(like="score_")
        assert len(scores.columns) >= 1 and scores.notna().all().all()
        assert ((scores >= 0) & (scores <= 1)).all().all()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["level"] == "patient" and metrics["task"] == task and metrics["model"] == model
        assert metrics["n_patients"] == preds.loc[preds["split"] == "test", "patient_id"].nunique()
        assert metrics["params"] > 0 and metrics["train_seconds"] > 0
        if task != "prostate":  # prostate models are cross-validated: one cost per fold model
            assert metrics["flops"] > 0 and metrics["latency_ms"] > 0
        assert metrics["provenance"]["manifest_sha256"]
        assert (folder / "model.safetensors").stat().st_size > 0
        sidecar = json.loads((folder / "model.json").read_text())
        assert sidecar["provenance"]["code"]["commit"] is None or len(sidecar["provenance"]["code"]["commit"]) == 40
        # the split the model saw is patient-disjoint
        split = pd.read_csv(out / task / "split.csv")
        assert split.groupby("patient_id")["split"].nunique().max() == 1
        assert (out / "logs" / "train" / f"{task}_{model}.log").exists()
        assert (out / "benchmarks" / "train" / f"{task}_{model}.tsv").exists()
    prostate = pd.read_csv(out / "prostate" / "unet3d" / "predictions.csv")
    assert {"dice", "hd95"} <= set(prostate.columns)
    html = (out / "report" / "index.html").read_text()
    for task in TINY["tasks"]:  # each task's own section, not just its name somewhere on the page
        assert f'<h2 id="task-{task}">Task: {task}</h2>' in html
    assert "http://" not in html and "https://" not in html


def test_second_run_does_nothing(tiny_run):
    workdir, study = tiny_run
    out = run_snakemake(workdir, study, "-n")
    assert "Nothing to be done" in out


def test_deleting_one_model_reruns_only_it(tiny_run):
    workdir, study = tiny_run
    shutil.rmtree(workdir / "results" / "tiny" / "histo" / "resnet10t")
    out = run_snakemake(workdir, study, "-n")
    jobs = job_counts(out)
    assert jobs == {"train": 1, "predict": 1, "evaluate": 1, "report": 1, "all": 1}, out
    wildcards = [line.strip() for line in out.splitlines() if line.strip().startswith("wildcards:")]
    assert len(wildcards) == 3 and all("task=histo" in w and "model=resnet10t" in w for w in wildcards), out


def test_snakemake_report_zip_has_the_figures(tiny_run):
    import zipfile

    workdir, study = tiny_run
    archive = workdir / "report.zip"
    run_snakemake(workdir, study, "--report", str(archive))
    names = zipfile.ZipFile(archive).namelist()
    # the study's own report (index.html) travels in the archive as a raw result file
    assert any(n.endswith("/index.html") and "/data/raw/" in n for n in names), names
    for task in TINY["tasks"]:
        assert any(n.endswith(f"{task}_roc_pr.png") for n in names), names


def test_study_report_renders_in_headless_chromium(tiny_run, tmp_path):
    workdir, _ = tiny_run
    render_in_chromium(workdir / "results" / "tiny" / "report" / "index.html", tmp_path)


def test_a_failed_jobs_own_log_is_shown(tmp_path):
    """When a workflow test's Snakemake run fails, the assertion message carries the failed
    job's log (its traceback), read from Snakemake's real `Error in rule` output."""
    (tmp_path / "Snakefile").write_text(
        'rule boom:\n    output: "out.txt"\n    log: "logs/boom.log"\n'
        '    shell: "echo \'ValueError: the real cause\' > {log}; exit 1"\n')
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "-s", str(tmp_path / "Snakefile"),
                           "--directory", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    shown = failed_job_logs(tmp_path, proc.stdout + proc.stderr)
    assert "logs/boom.log" in shown and "ValueError: the real cause" in shown
    assert failed_job_logs(tmp_path, "Finished job 0.") == ""
