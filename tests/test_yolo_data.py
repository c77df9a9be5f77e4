"""Detection data of the brain study: anomaly resampling of the split (by patients and by
images), per-volume windowing of 16-bit slices to 8 bit, the ultralytics layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medvit.data.manifest import load_manifest
from medvit.data.splits import assign_splits
from medvit.data.synth import synthesize
from medvit.data.yolo import (
    build_yolo_dataset,
    read_boxes,
    volume_window,
    window_to_uint8,
)
from medvit.errors import ManifestError
from medvit.tasks.common import split_stage


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    out = tmp_path_factory.mktemp("brain")
    return synthesize("brain", n_patients=60, out_dir=out, seed=3, image_size=32)


@pytest.mark.parametrize("by", ["patient", "image"])
def test_resampled_splits_reach_the_ratio_by_patients_and_by_images(brain, tmp_path, monkeypatch, by):
    monkeypatch.setenv("MEDVIT_DATA_ROOTS", str(brain.parent))  # the shared manifest lies beside neither
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "results_dir": str(tmp_path / "r"), "tasks": {
        "brain": {"manifest": str(brain), "anomaly_ratio": 0.1, "resample_by": by}}}))
    out = split_stage(study, "brain", tmp_path / "split.csv")
    df = pd.read_csv(out)
    record = json.loads(out.with_suffix(".json").read_text())["anomaly"]
    assert set(record) == {"train", "test"}
    for split in ("train", "test"):
        part = df[df["split"] == split]
        tumour = part["label"] == "tumor"
        per_patient = tumour.groupby(part["patient_id"]).any()
        image_fraction, patient_fraction = tumour.mean(), per_patient.mean()
        # measured on the written rows, equal to what split.json records
        assert record[split]["achieved_image_fraction"] == pytest.approx(image_fraction)
        assert record[split]["achieved_patient_fraction"] == pytest.approx(patient_fraction)
        assert record[split]["patients_abnormal"] == per_patient.sum()
        if by == "patient":  # whole patients dropped: 9 normal : 1 tumour patients, to one patient
            assert abs(patient_fraction - 0.1) <= 1 / len(per_patient)
            assert part.groupby("patient_id").size().min() >= 8  # every slice of a kept patient kept
        else:  # single slices dropped: 9 normal : 1 tumour slices, to one slice
            assert abs(image_fraction - 0.1) <= 1 / len(part)
    # validation keeps its natural mix
    orig = load_manifest(brain).df
    val = df[df["split"] == "val"]
    assert len(val) == orig["patient_id"].isin(val["patient_id"]).sum()


def test_window_maps_volume_percentiles_not_low_byte():
    rng = np.random.default_rng(0)
    vol = [rng.uniform(1000, 30000, (32, 32)) for _ in range(3)]
    vol[1][0, 0] = 65535  # one hot pixel must not set the window
    lo, hi = volume_window(vol, (0.5, 99.5))
    assert 1000 <= lo < 1300 and 29700 < hi < 30000
    u8 = window_to_uint8(np.array([[lo, hi], [(lo + hi) / 2, 65535.0]]), lo, hi)
    assert u8.dtype == np.uint8 and u8.tolist() == [[0, 255], [128, 255]]
    # a 16-bit value above 255 is not truncated to its low byte
    assert window_to_uint8(np.array([256.0]), 0.0, 512.0)[0] == 128
    assert volume_window([np.full((2, 2), 7.0)]) == (7.0, 8.0)


def test_yolo_layout_links_boxes_and_windows_per_volume(brain, tmp_path):
    m = load_manifest(brain)
    df = assign_splits(m.df, seed=0, val_fraction=0.2, test_fraction=0.2)
    ds = build_yolo_dataset(df, m.root, tmp_path / "yolo", positive_class="tumor")
    data = yaml.safe_load(ds.data_yaml.read_text())
    assert data["names"] == {0: "tumor"} and {data[s] for s in ("train", "val", "test")} == {
        "images/train", "images/val", "images/test"}
    assert len(ds.images) == len(df)
    for row in df.to_dict("records"):
        img = ds.images[row["sample_id"]]
        assert img.parent == tmp_path / "yolo" / "images" / row["split"]
        label = tmp_path / "yolo" / "labels" / row["split"] / f"{img.stem}.txt"
        if isinstance(row["boxes"], str) and row["boxes"]:
            assert label.is_symlink() and label.resolve() == (m.root / row["boxes"]).resolve()
            assert read_boxes(label).shape == (1, 5)
        else:
            assert not label.exists()  # background slice
    # the slices of one volume share one window: recompute it from the 16-bit files
    pid = df["patient_id"].iloc[0]
    rows = df[df["patient_id"] == pid]
    raw = [np.asarray(Image.open(m.root / p), dtype=np.float64) for p in rows["image"]]
    assert max(r.max() for r in raw) > 255  # really 16-bit
    lo, hi = volume_window(raw)
    for sid, r in zip(rows["sample_id"], raw):
        u8 = np.asarray(Image.open(ds.images[sid]))
        assert u8.dtype == np.uint8 and np.array_equal(u8, window_to_uint8(r, lo, hi))
    counts = ds.summary["splits"]
    assert sum(c["images"] for c in counts.values()) == len(df)
    assert sum(c["with_boxes"] for c in counts.values()) == (df["label"] == "tumor").sum()
    # rebuilding replaces the layout
    build_yolo_dataset(df, m.root, tmp_path / "yolo")
    assert len(list((tmp_path / "yolo" / "images").rglob("*.png"))) == len(df)


def test_bad_box_file_and_missing_column_are_reported(brain, tmp_path):
    m = load_manifest(brain)
    df = assign_splits(m.df, seed=0, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ManifestError, match="boxes"):
        build_yolo_dataset(df.drop(columns=["boxes"]), m.root, tmp_path / "a")
    bad = tmp_path / "bad.txt"
    bad.write_text("0 0.5 0.5 1.7 0.2\n")
    with pytest.raises(ManifestError, match="line 1"):
        read_boxes(bad)
    df2 = df.copy()
    df2.loc[df2["boxes"].astype(str).str.len() > 0, "boxes"] = os.path.relpath(bad, m.root)
    with pytest.raises(ManifestError, match="YOLO box"):
        build_yolo_dataset(df2, m.root, tmp_path / "b")
