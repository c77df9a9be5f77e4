"""The brain study through Snakemake: resampled split -> YOLOv8 detector -> PTP, CNN teacher
-> distilled and plain DeiT students -> comparison, cascade -> report with every part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import job_counts
from helpers import run_snakemake as run_workflow

pytestmark = pytest.mark.slow

TINY_BRAIN = {
    "study": "tinybrain",
    "seed": 0,
    "device": "cpu",
    "evaluation": {"bootstrap": 50},
    "tasks": {
        "brain": {"synthetic": {"patients": 16, "image_size": 32}, "image_size": 32, "anomaly_ratio": 0.3,
                  "resample_by": "patient", "models": ["resnet10t"],
                  "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
                  "detection": {"enabled": True, "image_size": 32, "epochs": 1, "batch_size": 16, "examples": 4},
                  "distill": {"enabled": True, "teacher": "resnet10t", "patch_size": 16, "latency_repeats": 3,
                              "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}},
                  "cascade": {"enabled": True}},
    },
}




def run_snakemake(workdir: Path, study: Path, *args: str) -> str:
    # ultralytics writes its settings file under YOLO_CONFIG_DIR: keep it inside the test's folder
    return run_workflow(workdir, study, *args, env={"YOLO_CONFIG_DIR": str(workdir / "yolo_config")})


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("brainflow")
    study = workdir / "tinybrain.yaml"
    study.write_text(yaml.safe_dump(TINY_BRAIN, sort_keys=False))
    run_snakemake(workdir, study)
    return workdir, study


def test_brain_study_outputs_and_report(brain_run):
    workdir, _ = brain_run
    out = workdir / "results" / "tinybrain" / "brain"
    ptp = json.loads((out / "detector" / "ptp.json").read_text())
    assert ptp["k"] == 1 and set(ptp["metrics"]) >= {"sensitivity", "specificity", "precision", "f1",
                                                     "fp_slices_per_normal_patient"}
    det = json.loads((out / "detector" / "detection_metrics.json").read_text())
    assert {"map50", "map50_95", "precision", "recall"} <= set(det["splits"]["test"])
    assert json.loads((out / "detector" / "metrics.json").read_text())["model"] == "detector"
    comp = json.loads((out / "distill" / "comparison.json").read_text())
    assert set(comp["roles"]) == {"teacher", "student", "student_distilled"}
    for role, r in comp["roles"].items():
        assert r["params"] > 0 and r["cpu_latency_ms_per_slice"] > 0 and "auroc" in r["patient_metrics"]
        assert (out / "distill" / role / "predictions.csv").is_file()
    assert comp["roles"]["student"]["params"] == comp["roles"]["student_distilled"]["params"]
    card = json.loads((out / "distill" / "student_distilled" / "model.json").read_text())
    assert card["distillation"] == "hard" and card["teacher"] == "resnet10t"
    assert json.loads((out / "cascade" / "ptp.json").read_text())["source"] == "cascade"
    split = json.loads((out / "split.json").read_text())
    assert set(split["anomaly"]) == {"train", "test"}
    html = (workdir / "results" / "tinybrain" / "report" / "index.html").read_text()
    for text in ("Patient-to-patient (PTP)", "mAP50-95", "Distillation: CNN teacher", "predicted (red)",
                 "Anomaly distribution after resampling"):
        assert text in html, text
    assert "http://" not in html and "https://" not in html


def test_changing_k_reruns_only_ptp(brain_run):
    workdir, study = brain_run
    cfg = yaml.safe_load(study.read_text())
    cfg["tasks"]["brain"]["detection"]["min_slices"] = 2
    study2 = workdir / "tinybrain.yaml"
    study2.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = run_snakemake(workdir, study2, "-n")
    jobs = job_counts(out)
    assert "brain_detect" not in jobs and "brain_distill" not in jobs and "brain_ptp" in jobs, out
