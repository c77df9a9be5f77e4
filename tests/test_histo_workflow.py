"""Histopathology end to end: the patient-level split of patch data (fast), then a tiny study
through Snakemake (slow): every model trained per seed, the comparison, the report part and
the rerun rules of the seed runs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from helpers import job_counts, run_snakemake
from safetensors.torch import load_file

from medvit.data.synth import synthesize
from medvit.tasks.common import split_stage

TINY = {
    "study": "tinyhisto",
    "seed": 0,
    "device": "cpu",
    "evaluation": {"bootstrap": 20},
    "tasks": {
        "histo": {"synthetic": {"patients": 12, "image_size": 32}, "image_size": 32,
                  "models": ["dct_histo_tiny", "vit_tiny"], "patch_size": 8,
                  "compare": {"seeds": 2, "latency_batches": [1, 4], "latency_repeats": 1},
                  "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}},
    },
}


def test_histo_split_keeps_every_patient_in_one_split(tmp_path):
    synthesize("histo", n_patients=16, out_dir=tmp_path / "data", seed=0, image_size=32)
    study = {"study": "s", "seed": 0, "results_dir": str(tmp_path / "results"),
             "tasks": {"histo": {"manifest": str(tmp_path / "data" / "manifest.csv"), "label_column": "subtype"}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    split_stage(config, "histo", tmp_path / "split.csv")
    df = pd.read_csv(tmp_path / "split.csv")
    # BreakHis-like data: many patches per patient, so a patch-level split would leak patients
    assert df.groupby("patient_id").size().min() > 1
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "val", "test"}
    assert "magnification" in df.columns and df["magnification"].notna().all()  # kept as metadata




@pytest.fixture(scope="module")
def histo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("histo")
    study = workdir / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY, sort_keys=False))
    run_snakemake(workdir, study)
    return workdir, study


@pytest.mark.slow
def test_every_model_and_seed_is_compared(histo_run):
    workdir, _ = histo_run
    out = workdir / "results" / "tinyhisto" / "histo"
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["seeds"] == [0, 1]
    by_model = {e["model"]: e for e in comp["models"]}
    assert set(by_model) == {"dct_histo_tiny", "vit_tiny"}
    for model, entry in by_model.items():
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert entry["patient"]["accuracy"]["n"] == 2
        assert entry["compute"]["flops"] > 0 and set(entry["compute"]["latency"]) == {"1", "4"}
        seed_card = json.loads((out / model / "seed1" / "model.json").read_text())
        assert seed_card["provenance"]["config"]["seed"] == 1
        # the second seed is a different training run of the same split
        a = load_file(out / model / "model.safetensors")
        b = load_file(out / model / "seed1" / "model.safetensors")
        assert any(not a[k].equal(b[k]) for k in a)
    assert by_model["dct_histo_tiny"]["compute"]["flops"] < by_model["vit_tiny"]["compute"]["flops"]
    assert json.loads((out / "vit_tiny" / "model.json").read_text())["patch_size"] == 8
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    html = (workdir / "results" / "tinyhisto" / "report" / "index.html").read_text()
    assert "Model comparison: accuracy and compute" in html and "MFLOPs (32x32)" in html


@pytest.mark.slow
def test_deleting_a_seed_run_reruns_only_it_and_the_comparison(histo_run):
    workdir, study = histo_run
    assert "Nothing to be done" in run_snakemake(workdir, study, "-n")
    shutil.rmtree(workdir / "results" / "tinyhisto" / "histo" / "dct_histo_tiny" / "seed1")
    out = run_snakemake(workdir, study, "-n")
    jobs = job_counts(out)
    assert jobs == {"train_seed": 1, "predict_seed": 1, "evaluate_seed": 1, "compare": 1, "report": 1, "all": 1}, out
