"""Importing the shipped real PneumoniaMNIST file into PNGs plus a manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvit.data.manifest import load_manifest, validate_manifest
from medvit.data.realdata import PNEUMONIAMNIST_ATTRIBUTION, PNEUMONIAMNIST_SHA256, import_dataset
from medvit.errors import MedvitError

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO / "data_manifests" / "pneumoniamnist" / "pneumoniamnist.npz"
MEDVIT = Path(sys.executable).with_name("medvit")


def test_shipped_file_and_attribution() -> None:
    from medvit.fileio import sha256_file

    assert sha256_file(NPZ) == PNEUMONIAMNIST_SHA256
    text = (NPZ.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert PNEUMONIAMNIST_ATTRIBUTION in text
    assert "CC BY 4.0" in text and "No patient ids are included" in text


def test_import_subset_matches_source(tmp_path: Path) -> None:
    manifest = import_dataset("pneumoniamnist", NPZ, tmp_path / "pmn", limit=12)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(df.columns) == ["patient_id", "sample_id", "image", "label", "split", "source_index"]
    assert df["split"].value_counts().to_dict() == {"train": 12, "val": 12, "test": 12}
    assert (df["patient_id"] == df["sample_id"]).all() and df["patient_id"].is_unique
    assert df.loc[0, "patient_id"] == "pmn-train-00001" and df.loc[0, "image"] == "images/train/pmn-train-00001.png"
    assert set(df["label"]) <= {"normal", "pneumonia"}
    with np.load(NPZ) as data:
        for _, row in df.iloc[[0, 13, 35]].iterrows():
            i = int(row["source_index"])
            pixels = np.asarray(Image.open(manifest.parent / row["image"]))
            assert np.array_equal(pixels, data[f"{row['split']}_images"][i])
            assert row["label"] == ("normal", "pneumonia")[int(data[f"{row['split']}_labels"][i, 0])]
    assert PNEUMONIAMNIST_ATTRIBUTION in (manifest.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    rep = validate_manifest(manifest, check_files=True)
    assert rep.ok, rep.problems
    assert rep.summary["patients"] == 36 and set(rep.summary["splits"]) == {"train", "val", "test"}


def test_full_import_via_cli(tmp_path: Path) -> None:
    out = tmp_path / "pmn"
    r = subprocess.run([str(MEDVIT), "import", "pneumoniamnist", str(NPZ), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "SHA-256 verified" in r.stdout and f"wrote {out / 'manifest.csv'}" in r.stdout
    assert "train: 2428 images (normal 1214, pneumonia 1214)" in r.stdout
    man = load_manifest(out / "manifest.csv")
    counts = man.df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", "normal"): 234, ("test", "pneumonia"): 234, ("train", "normal"): 1214,
                      ("train", "pneumonia"): 1214, ("val", "normal"): 135, ("val", "pneumonia"): 135}
    assert man.df["patient_id"].nunique() == 3166 and man.problems == []
    assert len(list((out / "images").rglob("*.png"))) == 3166


def test_checksum_mismatch_and_unknown_dataset(tmp_path: Path) -> None:
    bad = tmp_path / "pneumoniamnist.npz"
    shutil.copy(NPZ, bad)
    with bad.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(MedvitError, match="is not the known pneumoniamnist.npz"):
        import_dataset("pneumoniamnist", bad, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()
    r = subprocess.run([str(MEDVIT), "import", "pneumoniamnist", str(bad), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    with pytest.raises(MedvitError, match="source not found"):
        import_dataset("pneumoniamnist", tmp_path / "missing.npz", tmp_path / "out")
    with pytest.raises(MedvitError, match="unknown dataset 'chestmnist'"):
        import_dataset("chestmnist", NPZ, tmp_path / "out")
