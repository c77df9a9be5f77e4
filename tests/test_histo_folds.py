"""Patient-level k-fold cross-validation of a classification task (`tasks.histo.folds`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvit.errors import ManifestError
from medvit.tasks.common import fold_split_stage

REPO = Path(__file__).resolve().parents[1]


def _split_csv(tmp_path: Path) -> Path:
    rows = []
    for p in range(10):
        for j in range(2):
            rows.append({"patient_id": f"P{p}", "sample_id": f"P{p}-{j}", "image": f"img/P{p}-{j}.png",
                         "label": "a" if p % 2 else "b", "split": "train", "fold": p % 5})
    rows.append({"patient_id": "U", "sample_id": "U-0", "image": "img/U.png", "label": "", "split": "unlabeled",
                 "fold": ""})
    path = tmp_path / "task" / "split.csv"
    (tmp_path / "task" / "img").mkdir(parents=True)
    for r in rows:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path.parent / r["image"])
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_fold_split(tmp_path: Path) -> None:
    src = _split_csv(tmp_path)
    out = fold_split_stage(src, 3, tmp_path / "task" / "folds" / "fold3" / "split.csv")
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    by = df.groupby("split")["patient_id"].unique().map(set).to_dict()
    assert by["test"] == {"P3", "P8"} and by["val"] == {"P4", "P9"} and by["unlabeled"] == {"U"}
    assert len(by["train"]) == 6 and not by["train"] & (by["test"] | by["val"])
    assert df.loc[0, "image"] == "../../img/P0-0.png"  # relative to the fold's folder
    with pytest.raises(ManifestError, match="outside 0..4"):
        fold_split_stage(src, 5, tmp_path / "x.csv")
    pd.read_csv(src).drop(columns="fold").to_csv(src.with_name("nofold.csv"), index=False)
    with pytest.raises(ManifestError, match="no `fold` column"):
        fold_split_stage(src.with_name("nofold.csv"), 0, tmp_path / "y.csv")


def test_kather_study_plans_fold_runs(tmp_path: Path) -> None:
    snakemake = Path(sys.executable).with_name("snakemake")
    study = tmp_path / "kather.yaml"
    text = (REPO / "workflows" / "studies" / "kather_histo.yaml").read_text(encoding="utf-8")
    study.write_text(text.replace("study: kather_histo", "study: kather_plan_test"), encoding="utf-8")
    r = subprocess.run([str(snakemake), "-n", "--quiet", "rules", "--configfile", str(study)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    text = r.stdout + r.stderr
    for rule, n in (("fold_split", 5), ("train_fold", 20), ("predict_fold", 20), ("evaluate_fold", 20),
                    ("compare", 1)):
        assert any(line.split()[:2] == [rule, str(n)] for line in text.splitlines()), (rule, text)
