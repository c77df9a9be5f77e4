"""Determinism: two runs of the same study with the same seed on the same
machine give identical metrics.json (apart from timings), predictions and weights.

A TINY one-task study (histo, 8 synthetic patients, 2 epochs) stands in for the full demo
(which takes minutes): same stages and code paths (synthetic data -> split -> train ->
predict -> evaluate -> report), so the same sources of nondeterminism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_snakemake, strip_volatile

pytestmark = pytest.mark.slow

STUDY = {
    "study": "det", "seed": 3, "device": "cpu", "deterministic": True, "evaluation": {"bootstrap": 100},
    "tasks": {
        "histo": {"synthetic": {"patients": 8, "image_size": 32}, "image_size": 32, "models": ["resnet10t"],
                  "split": {"val_fraction": 0.25, "test_fraction": 0.25},
                  "train": {"epochs": 2, "batch_size": 8, "warmup_epochs": 1}},
    },
}


def _run(tmp_path: Path, name: str, cache: str = "auto") -> Path:
    work = tmp_path / name
    work.mkdir()
    study = work / "study.yaml"
    study.write_text(yaml.safe_dump({**STUDY, "cache": cache}, sort_keys=False))
    run_snakemake(work, study)
    return work / "results" / "det"


# `disk`: samples read from the task's preprocessed cache (a job of its own) instead of decoded in memory
@pytest.mark.parametrize("cache", ["auto", "disk"])
def test_same_seed_same_results(tmp_path, cache):
    a, b = _run(tmp_path, "a", cache), _run(tmp_path, "b", cache)
    if cache == "disk":
        assert (a / "histo" / "cache" / "32x32" / "image.npy").is_file()
    for task, tcfg in STUDY["tasks"].items():
        assert (a / task / "split.csv").read_text() == (b / task / "split.csv").read_text()
        for model in tcfg["models"]:
            ma = json.loads((a / task / model / "metrics.json").read_text())
            mb = json.loads((b / task / model / "metrics.json").read_text())
            assert ma["metrics"] and strip_volatile(ma) == strip_volatile(mb), task
            assert ma["provenance"].get("manifest_sha256") == mb["provenance"].get("manifest_sha256")
            for name in ("predictions.csv", "model.safetensors"):
                assert (a / task / model / name).read_bytes() == (b / task / model / name).read_bytes(), name
