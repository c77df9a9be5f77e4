"""Importing the shipped NIH ChestX-ray14 subset (multi-label, real patient ids), and the
leakage guard refusing the source repository's own, patient-overlapping split."""

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
from medvit.data.realdata import NIH_CXR14_ATTRIBUTION, NIH_CXR14_SHA256, default_source, import_dataset
from medvit.data.splits import assign_splits, check_no_leakage
from medvit.errors import LeakageError, MedvitError

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO / "data_manifests" / "nih_cxr14" / "chestxray14_nih1000_64.npz"
MEDVIT = Path(sys.executable).with_name("medvit")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_dataset("nih-cxr14", None, tmp_path_factory.mktemp("nih") / "nih")


def test_shipped_file_and_attribution() -> None:
    from medvit.fileio import sha256_file

    assert default_source("nih-cxr14") == NPZ
    assert sha256_file(NPZ) == NIH_CXR14_SHA256
    text = (NPZ.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for bullet in NIH_CXR14_ATTRIBUTION.split("\n- "):
        assert bullet.strip().lstrip("- ") in text
    assert "NIH Clinical Center" in text and "CVPR 2017" in text and NIH_CXR14_SHA256 in text


def test_import_matches_source(imported: Path) -> None:
    df = pd.read_csv(imported, dtype=str, keep_default_na=False)
    assert list(df.columns)[:6] == ["patient_id", "sample_id", "image", "labels", "split", "kcr_split"]
    assert df["split"].value_counts().to_dict() == {"train": 725, "test": 181, "val": 94}
    assert df["patient_id"].nunique() == 264 and df["sample_id"].is_unique
    assert df["patient_id"].str.fullmatch(r"nih-[1-9]\d{0,4}").all()
    assert df.loc[0, "sample_id"] == "nih-00000001_000" and df.loc[0, "patient_id"] == "nih-1"
    assert set(df["kcr_split"]) == {"train", "val", "test"}
    check_no_leakage(df)  # chexnet_split is patient-disjoint
    with np.load(NPZ) as data:
        names = [str(c) for c in data["class_names"]]
        for i in (0, 1, 500, 999):
            row = df.iloc[i]
            assert int(row["source_index"]) == i
            assert np.array_equal(np.asarray(Image.open(imported.parent / row["image"])), data["images"][i])
            assert row["labels"] == "|".join(n for n, v in zip(names, data["labels"][i]) if v)
            assert row["split"] == str(data["chexnet_split"][i])
        per_finding = {n: int(data["labels"][:, j].sum()) for j, n in enumerate(names)}
    sets = df["labels"].map(lambda v: set(v.split("|")) - {""})
    assert {n: int(sets.map(lambda s, n=n: n in s).sum()) for n in names} == per_finding
    assert per_finding["Effusion"] == 170 and (df["labels"] != "").sum() == 500
    assert "NIH Clinical Center" in (imported.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    rep = validate_manifest(imported, check_files=True)
    assert rep.ok, rep.problems
    assert rep.summary["patients"] == 264


def test_leakage_guard_refuses_the_kcr_split(imported: Path) -> None:
    df = load_manifest(imported).df
    with np.load(NPZ) as data:
        pid = pd.Series([f"nih-{int(p)}" for p in data["patient_id"]])
        kcr = pd.Series([str(s) for s in data["kcr_split"]])
    in_train, in_test = set(pid[kcr == "train"]), set(pid[kcr == "test"])
    train_test = sorted(in_train & in_test)
    assert len(train_test) == 8
    leaky = df.assign(split=df["kcr_split"])
    with pytest.raises(LeakageError) as exc:
        check_no_leakage(leaky)
    assert set(train_test) <= set(exc.value.patients)
    # on its train and test rows alone the guard names exactly the 8 patients in both
    with pytest.raises(LeakageError, match="8 patient") as exc:
        check_no_leakage(leaky[leaky["split"].isin(["train", "test"])])
    assert exc.value.patients == train_test
    assert all(p in str(exc.value) for p in train_test)
    # the split stage's entry point refuses it as well
    with pytest.raises(LeakageError):
        assign_splits(leaky, seed=0)


def test_cli_default_source_and_checksum_refusal(tmp_path: Path) -> None:
    bad = tmp_path / "chestxray14_nih1000_64.npz"
    shutil.copy(NPZ, bad)
    bad.chmod(0o644)
    with bad.open("r+b") as fh:
        fh.seek(5000)
        byte = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(MedvitError, match="is not the known chestxray14_nih1000_64.npz"):
        import_dataset("nih-cxr14", bad, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()
    r = subprocess.run([str(MEDVIT), "import", "nih-cxr14", "--from", str(bad), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not the known" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "cli"
    r = subprocess.run([str(MEDVIT), "import", "nih-cxr14", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "SHA-256 verified" in r.stdout and "train: 725 images of" in r.stdout
    assert len(list((out / "images").rglob("*.png"))) == 1000
