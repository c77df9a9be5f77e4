"""Importing the real LGG brain MRI (read from ../shared/data, never copied into the repository)
and the shipped Kather 2016 H&E tiles: shapes, masks against boxes, patient grouping, checksum
refusal on a corrupted copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvit.data.io import read_sample
from medvit.data.manifest import load_manifest, validate_manifest
from medvit.data.realdata import (
    KATHER_ATTRIBUTION,
    KATHER_SHA256,
    LGG_SHA256,
    default_source,
    import_dataset,
    yolo_box_from_mask,
)
from medvit.data.splits import assign_splits, check_no_leakage, patient_kfold
from medvit.data.yolo import build_yolo_dataset, read_boxes
from medvit.errors import MedvitError

REPO = Path(__file__).resolve().parents[1]
LGG = REPO.parent / "shared" / "data" / "lgg_brain_mri_128.npz"
KATHER = REPO / "data_manifests" / "kather2016" / "kather2016_he_96.npz"
MEDVIT = Path(sys.executable).with_name("medvit")

needs_lgg = pytest.mark.skipif(not LGG.is_file(), reason=f"the LGG file is not beside the repository ({LGG})")


def _corrupt_copy(src: Path, dst: Path, offset: int = 4000) -> Path:
    shutil.copy(src, dst)
    dst.chmod(0o644)
    with dst.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return dst


@pytest.fixture(scope="module")
def lgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LGG.is_file():
        pytest.skip(f"the LGG file is not beside the repository ({LGG})")
    return import_dataset("lgg", None, tmp_path_factory.mktemp("lgg") / "lgg")


def test_box_from_mask() -> None:
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:4] = 1  # rows 2-4, column 3
    assert yolo_box_from_mask(mask) == pytest.approx((3.5 / 10, 3.5 / 8, 1 / 10, 3 / 8))
    assert yolo_box_from_mask(np.zeros((4, 4), np.uint8)) is None


@needs_lgg
def test_lgg_is_never_shipped() -> None:
    assert default_source("lgg").resolve() == LGG.resolve()  # ../shared may be a link
    assert not list(REPO.glob("data_manifests/**/lgg*")), "the LGG data must not be copied into the repository"


@needs_lgg
def test_lgg_import_shapes_masks_boxes(lgg: Path) -> None:
    df = pd.read_csv(lgg, dtype=str, keep_default_na=False)
    assert len(df) == 869 and df["patient_id"].nunique() == 110 and df["sample_id"].is_unique
    assert df["label"].value_counts().to_dict() == {"tumor": 438, "normal": 431}
    assert ((df["boxes"] != "") == (df["label"] == "tumor")).all()
    assert "split" not in df.columns
    with np.load(LGG) as data:
        images, masks, bbox = data["images"], data["masks"], data["bbox_yxyx"]
        assert list(df["patient_id"]) == [str(p) for p in data["patient_id"]]
        for i in (0, 1, 100, 437, 868):
            row = df.iloc[i].to_dict()
            sample = read_sample(row, lgg.parent)
            assert sample.array.shape == (3, 128, 128)
            for c, col in enumerate(("image_pre", "image_flair", "image_post")):
                png = np.asarray(Image.open(lgg.parent / row[col]))
                assert png.dtype == np.uint16 and np.array_equal(png // 257, images[i, :, :, c])
        for i in range(len(df)):  # every slice: mask file = source mask, box tight around it
            row = df.iloc[i]
            mask = np.asarray(Image.open(lgg.parent / row["mask"]))
            assert np.array_equal(mask, (masks[i] > 0).astype(np.uint8))
            if row["label"] != "tumor":
                assert not mask.any() and (bbox[i] == -1).all()
                continue
            (cls, cx, cy, w, h), = read_boxes(lgg.parent / row["boxes"])
            assert cls == 0
            x0, x1 = round((cx - w / 2) * 128), round((cx + w / 2) * 128)
            y0, y1 = round((cy - h / 2) * 128), round((cy + h / 2) * 128)
            assert (y0, x0, y1 - 1, x1 - 1) == tuple(int(v) for v in bbox[i])  # the file's inclusive box
            ys, xs = np.nonzero(mask)
            assert ys.min() == y0 and ys.max() == y1 - 1 and xs.min() == x0 and xs.max() == x1 - 1
    rep = validate_manifest(lgg, check_files=False)
    assert rep.ok, rep.problems
    attribution = " ".join((lgg.parent / "ATTRIBUTION.md").read_text(encoding="utf-8").split())
    assert "TCGA-LGG" in attribution and "Buda" in attribution and "not copy it" in attribution


@needs_lgg
def test_lgg_patient_grouping_and_detector_dataset(lgg: Path, tmp_path: Path) -> None:
    df = load_manifest(lgg).df
    assert (df.groupby("patient_id")["study_id"].nunique() == 1).all()  # one scan per patient
    # ids and file names come from the patient id, never the source case's acquisition date
    assert (df["study_id"] == df["patient_id"] + "_mri").all()
    assert df["sample_id"].str.fullmatch(r"TCGA_[A-Z0-9]{2}_[A-Z0-9]{4}_s\d{3}").all()
    paths = pd.concat([df[c] for c in ("image_pre", "image_flair", "image_post", "mask", "boxes")])
    assert not paths.str.contains(r"\d{8}").any()
    assert (df.groupby("patient_id")["label"].apply(lambda s: (s == "tumor").any())).all()  # all have a tumour
    split = assign_splits(df, seed=0, val_fraction=0.15, test_fraction=0.3)
    check_no_leakage(split)
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    few = split[split["patient_id"].isin(sorted(df["patient_id"].unique())[:12])]
    few = few.assign(split=np.resize(["train", "val", "test"], len(few)))  # rows only; not a patient split
    ds = build_yolo_dataset(few, lgg.parent, tmp_path / "yolo")
    n_box = int((few["boxes"] != "").sum())
    assert sum(c["with_boxes"] for c in ds.summary["splits"].values()) == n_box
    first = few.iloc[0]
    u8 = np.asarray(Image.open(ds.images[str(first["sample_id"])]))
    assert u8.shape == (128, 128, 3) and u8.dtype == np.uint8


@needs_lgg
def test_lgg_checksum_refusal_and_cli(tmp_path: Path) -> None:
    bad = _corrupt_copy(LGG, tmp_path / "lgg_brain_mri_128.npz", offset=123456)
    with pytest.raises(MedvitError, match="is not the known lgg_brain_mri_128.npz"):
        import_dataset("lgg", bad, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()
    r = subprocess.run([str(MEDVIT), "import", "lgg", "--from", str(bad), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and LGG_SHA256 in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(MEDVIT), "import", "lgg", "--from", str(tmp_path / "nope.npz"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "source not found" in r.stderr


def test_kather_shipped_and_imported(tmp_path: Path) -> None:
    from medvit.fileio import sha256_file

    assert default_source("kather2016") == KATHER and sha256_file(KATHER) == KATHER_SHA256
    text = (KATHER.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in text and "Kather" in text
    for bullet in KATHER_ATTRIBUTION.split("\n- "):
        assert bullet.strip().lstrip("- ") in text
    r = subprocess.run([str(MEDVIT), "import", "kather2016", "--out", str(tmp_path / "k")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SHA-256 verified" in r.stdout and "124 tiles, 110 patients" in r.stdout
    manifest = tmp_path / "k" / "manifest.csv"
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert df["label"].value_counts().to_dict() == {"tumor": 21, "adipose": 21, "complex": 16, "lympho": 15,
                                                    "debris": 15, "mucosa": 13, "empty": 12, "stroma": 11}
    with np.load(KATHER) as data:
        for i in (0, 50, 123):
            png = np.asarray(Image.open(manifest.parent / df.loc[i, "image"]))
            assert png.shape == (96, 96, 3) and np.array_equal(png, data["images"][i])
            assert read_sample(df.iloc[i].to_dict(), manifest.parent).array.shape == (3, 96, 96)
    known = df[df["slide_id"] != ""]
    assert len(known) == 24 and (known["patient_id"] == "kather-" + known["slide_id"]).all()
    assert known["patient_id"].nunique() == 10
    unknown = df[df["slide_id"] == ""]
    assert (unknown["patient_id"] == unknown["sample_id"]).all() and unknown["patient_id"].is_unique
    folds = patient_kfold(load_manifest(manifest).df, k=5, seed=0)
    check_no_leakage(folds, "fold")
    assert folds[folds["slide_id"] != ""].groupby("patient_id")["fold"].nunique().max() == 1
    rep = validate_manifest(manifest, check_files=True)
    assert rep.ok, rep.problems


def test_kather_checksum_refusal(tmp_path: Path) -> None:
    bad = _corrupt_copy(KATHER, tmp_path / "kather2016_he_96.npz")
    with pytest.raises(MedvitError, match="is not the known kather2016_he_96.npz"):
        import_dataset("kather2016", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "manifest.csv").exists()
