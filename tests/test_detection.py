"""The YOLOv8 detector stage runs fully offline (every socket call raises), writes Contract-3
predictions and safetensors weights that load back; the cascade runs on its detections."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medvit.engine import save_weights
from medvit.errors import ConfigError
from medvit.models import create_model
from medvit.tasks.cascade import cascade_stage, crop_region


def test_detector_trains_and_predicts_without_network(detector):
    _, split, out, attempts = detector
    assert attempts == []
    for name in ("model.safetensors", "model.json", "predictions.csv", "boxes.csv", "detection_metrics.json",
                 "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.rglob("*.pt"))  # no pickled checkpoint left behind
    # ultralytics' own run folder is inside the stage's folder, not under its runs_dir setting
    assert (out / "ultralytics" / "args.yaml").exists() and (out / "val_test").is_dir()
    # the study's settings reach ultralytics
    args = yaml.safe_load((out / "ultralytics" / "args.yaml").read_text())
    assert (args["imgsz"], args["epochs"], args["mosaic"]) == (32, 1, 0.25)
    preds = pd.read_csv(out / "predictions.csv")
    rows = pd.read_csv(split)
    assert set(preds["sample_id"]) == set(rows.loc[rows["split"].isin(["val", "test"]), "sample_id"])
    assert preds["score_tumor"].between(0, 1).all()
    assert (preds["true_tumor"] == preds["sample_id"].map(rows.set_index("sample_id")["label"].eq("tumor"))).all()
    boxes = pd.read_csv(out / "boxes.csv")
    best = boxes.groupby("sample_id")["conf"].max()
    assert np.allclose(preds.set_index("sample_id")["score_tumor"].reindex(best.index), best, atol=1e-4)
    metrics = json.loads((out / "detection_metrics.json").read_text())
    for split_name in ("val", "test"):
        assert set(metrics["splits"][split_name]) == {"map50", "map50_95", "precision", "recall"}
    card = json.loads((out / "model.json").read_text())
    assert card["detector"] == "yolov8n" and card["names"] == ["tumor"] and card["params"] > 1_000_000


def test_weights_load_back_from_safetensors(detector):
    from medvit.tasks.detection import load_detector

    _, _, out, attempts = detector
    yolo = load_detector(out / "model.safetensors")
    img = next((out / "dataset" / "images" / "test").glob("*.png"))
    r = yolo.predict(str(img), imgsz=32, conf=0.001, device="cpu", verbose=False)[0]
    got = r.boxes.conf.max().item() if len(r.boxes) else 0.0
    preds = pd.read_csv(out / "predictions.csv").set_index("sample_id")
    assert got == pytest.approx(preds.loc[img.stem, "score_tumor"], abs=1e-4)
    assert attempts == []


def test_crop_region_enlarges_and_clips():
    image = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    crop = crop_region(image, np.array([0.5, 0.5, 0.2, 0.2]), margin=0.5, size=4)
    assert crop.shape == (1, 4, 4)
    # box 2x2 px at the centre, enlarged by half its size per side -> 4x4 px = rows/cols 3..6
    assert torch.allclose(crop, image[:, 3:7, 3:7])
    edge = crop_region(image, np.array([0.0, 0.0, 0.2, 0.2]), margin=0.0, size=2)
    assert torch.allclose(edge, image[:, 0:1, 0:1].expand(1, 2, 2))


@pytest.mark.parametrize("mode", ["slice", "region"])
def test_cascade_scores_flagged_slices_only(detector, tmp_path, monkeypatch, mode):
    study, split, out, _ = detector
    monkeypatch.setenv("MEDVIT_DATA_ROOTS", str(study.parent))  # the study copy sits apart from its manifest
    cfg = yaml.safe_load(study.read_text())
    cfg["tasks"]["brain"]["cascade"]["input"] = mode
    study2 = tmp_path / "s.yaml"
    study2.write_text(yaml.safe_dump(cfg))
    clf = create_model("resnet10t", in_chans=1, num_classes=1)
    spec = {"kind": "binary", "classes": ["tumor"], "column": "label", "all_classes": ["normal", "tumor"]}
    weights = save_weights(tmp_path / "clf" / "model.safetensors", clf,
                           {"model": "resnet10t", "in_chans": 1, "image_size": 32, "spec": spec, "params": 1})
    metrics = cascade_stage(study2, "brain", split, out, weights, tmp_path / "cascade")
    preds = pd.read_csv(tmp_path / "cascade" / "predictions.csv")
    flagged = preds["det_score"] >= 0.01
    assert (preds.loc[~flagged, "score_tumor"] == 0).all() and preds.loc[~flagged, "cls_prob"].isna().all()
    assert np.allclose(preds.loc[flagged, "score_tumor"], preds.loc[flagged, "cls_prob"], atol=1e-5)
    assert json.loads(metrics.read_text())["model"] == "cascade"
    ptp = json.loads((tmp_path / "cascade" / "ptp.json").read_text())
    assert ptp["conf"] == 0.0 and ptp["source"] == "cascade"


def test_cascade_flags_at_the_classifiers_validation_threshold(detector, tmp_path, monkeypatch):
    """With no number in the config, a flagged slice stays positive from the classifier's own
    validation-chosen threshold (its metrics.json), not from a fixed 0.5."""
    study, split, out, _ = detector
    monkeypatch.setenv("MEDVIT_DATA_ROOTS", str(study.parent))
    cfg = yaml.safe_load(study.read_text())
    del cfg["tasks"]["brain"]["cascade"]["threshold"]
    study2 = tmp_path / "s.yaml"
    study2.write_text(yaml.safe_dump(cfg))
    spec = {"kind": "binary", "classes": ["tumor"], "column": "label", "all_classes": ["normal", "tumor"]}
    weights = save_weights(tmp_path / "clf" / "model.safetensors", create_model("resnet10t", in_chans=1, num_classes=1),
                           {"model": "resnet10t", "in_chans": 1, "image_size": 32, "spec": spec, "params": 1})
    with pytest.raises(ConfigError, match="threshold"):  # nothing to read the threshold from yet
        cascade_stage(study2, "brain", split, out, weights, tmp_path / "cascade")
    (weights.parent / "metrics.json").write_text(json.dumps(
        {"threshold": {"method": "youden", "selected_on": "val", "sample": {"tumor": 0.123},
                       "patient": {"tumor": 0.5}}}))
    cascade_stage(study2, "brain", split, out, weights, tmp_path / "cascade")
    card = json.loads((tmp_path / "cascade" / "model.json").read_text())
    assert card["threshold"] == pytest.approx(0.123) and "validation" in card["threshold_source"]
    ptp = json.loads((tmp_path / "cascade" / "ptp.json").read_text())
    assert ptp["conf"] == pytest.approx(0.123)
    preds = pd.read_csv(tmp_path / "cascade" / "predictions.csv")
    test = preds[preds["split"] == "test"]
    expected = (test["score_tumor"] >= 0.123).groupby(test["patient_id"].astype(str)).sum()
    assert {r["patient_id"]: r["flagged"] for r in ptp["patients"]} == expected.to_dict()
