"""The prostate comparison through Snakemake and the real stages: synthetic bpMRI -> split ->
per-fold SSL pretraining -> per-fold training and prediction -> pooled out-of-fold
predictions -> metrics -> external test -> cross-validation summary -> report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import run_snakemake as _run_snakemake

pytestmark = pytest.mark.slow

MODELS = ["cswin_unet_ssl", "unet3d"]
STUDY = {
    "study": "ptiny",
    "seed": 0,
    "device": "cpu",
    "evaluation": {"bootstrap": 50},
    "tasks": {
        "prostate": {"synthetic": {"patients": 10, "image_size": 16}, "image_size": 16, "roi_size": [16, 16, 16],
                     "folds": 2, "models": MODELS, "figures": 2,
                     "cswin": {"embed_dim": 8},
                     "train": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0},
                     "ssl": {"train": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0}},
                     "external_synthetic": {"patients": 4, "seed": 7}},
    },
}




def run_snakemake(workdir: Path, study: Path, *args: str) -> str:
    return _run_snakemake(workdir, study, *args, timeout=1200)  # six models x folds: more time


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prostate")
    study = workdir / "ptiny.yaml"
    study.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    run_snakemake(workdir, study)
    return workdir, study, workdir / "results" / "ptiny"


def test_folds_pool_every_patient_once_and_never_share_patients(run):
    _, _, out = run
    split = pd.read_csv(out / "prostate" / "split.csv", dtype=str)
    patients = set(split["patient_id"])
    for model in MODELS:
        tests = []
        for i in range(2):
            fold = pd.read_csv(out / "prostate" / model / f"fold{i}" / "split.csv", dtype=str)
            assert fold.groupby("patient_id")["split"].nunique().max() == 1
            tests.append(set(fold.loc[fold["split"] == "test", "patient_id"]))
        assert not tests[0] & tests[1] and tests[0] | tests[1] == patients
        pooled = pd.read_csv(out / "prostate" / model / "predictions.csv", dtype={"patient_id": str})
        assert set(pooled["split"]) == {"test"} and sorted(pooled["patient_id"]) == sorted(patients)
        assert {"fold", "dice", "hd95", "seconds", "score_cspca", "true_cspca"} <= set(pooled.columns)
        metrics = json.loads((out / "prostate" / model / "metrics.json").read_text())
        assert metrics["n_patients"] == len(patients) and metrics["params"] > 0 and metrics["train_seconds"] > 0
        card = json.loads((out / "prostate" / model / "model.json").read_text())
        assert card["members"] == 2 and card["folds"] == 2
        assert (out / "logs" / "train" / f"prostate_{model}_fold0.log").exists()


def test_ssl_saw_training_patients_only(run):
    _, _, out = run
    for i in range(2):
        enc = json.loads((out / "prostate" / "ssl" / f"fold{i}" / "encoder.json").read_text())
        assert enc["splits_seen"] == ["train"] and enc["ssl_tasks"] == ["inpaint", "rotation", "contrastive"]
        fold = pd.read_csv(out / "prostate" / "cswin_unet_ssl" / f"fold{i}" / "split.csv", dtype=str)
        assert enc["train_patients"] == fold.loc[fold["split"] == "train", "patient_id"].nunique()
        card = json.loads((out / "prostate" / "cswin_unet_ssl" / f"fold{i}" / "model.json").read_text())
        assert card["init"] == "ssl" and card["init_weights"].endswith(f"ssl/fold{i}/encoder.safetensors")


def test_maps_open_on_the_input_grid(run):
    _, _, out = run
    pooled = pd.read_csv(out / "prostate" / "unet3d" / "predictions.csv", dtype={"sample_id": str})
    manifest = pd.read_csv(out / "data" / "prostate" / "manifest.csv", dtype=str).set_index("sample_id")
    for _, row in pooled.head(3).iterrows():
        ref = nib.load(str(out / "data" / "prostate" / manifest.loc[row["sample_id"], "image_t2w"]))
        for col in ("prob_map", "mask_map"):
            img = nib.load(str(out / "prostate" / "unet3d" / row[col]))
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)


def test_summary_external_and_report(run):
    _, _, out = run
    summary = json.loads((out / "prostate" / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and list(summary["models"]) == MODELS
    for model, entry in summary["models"].items():
        assert len(entry["per_fold"]) == 2 and entry["flops"] > 0 and entry["params"] > 0
        assert entry["auroc"]["n"] + entry["ap"]["n"] >= 0 and entry["seconds"]["mean"] > 0
        assert entry["external"]["n_patients"] == 4
        ext = pd.read_csv(out / "prostate" / model / "external" / "predictions.csv")
        assert len(ext) == 4 and set(ext["split"]) == {"test"}
    assert summary["models"]["cswin_unet_ssl"]["flops"] > 0 and (out / "prostate" / "overlays.png").stat().st_size
    html = (out / "report" / "index.html").read_text()
    assert "2-fold patient-level cross-validation" in html and "External test" in html
    assert html.count("data:image/png;base64") >= 2  # SSL inpainting + overlays


def test_second_run_does_nothing(run):
    workdir, study, _ = run
    assert "Nothing to be done" in run_snakemake(workdir, study, "-n")
