"""`medvit infer` and `medvit export` on the YOLO detector's package: boxes in image
coordinates and overlays that reproduce the detection stage's own predictions, the package's
confidence and NMS settings, a non-empty weights folder, ONNX through ultralytics' exporter."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medvit.cli import main
from medvit.tasks.package import read_package

pytestmark = pytest.mark.slow


def test_the_detector_folder_is_a_package_with_confidence_and_nms(detector):
    _, _, out, _ = detector
    block, meta = read_package(out)
    assert block["kind"] == "detection" and block["names"] == ["tumor"] and block["image_size"] == 32
    assert block["conf"] == 0.01  # the study's detection.conf
    assert block["nms"] == {"conf_floor": 0.001, "iou": 0.7, "max_det": 20, "agnostic": False}
    assert block["window"]["percentiles"] == [0.5, 99.5] and block["window"]["per"] == "study_id"
    weights = out / "ultralytics" / "weights"
    assert (weights / "best.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "medvit infer" in (weights / "README.md").read_text() and not list(weights.glob("*.pt"))


def test_infer_reproduces_the_detection_stages_boxes(detector, tmp_path):
    _, split, out, attempts = detector
    rows = pd.read_csv(split, keep_default_na=False)
    test = rows[rows["split"] == "test"].drop(columns=["label", "boxes", "split"])  # no labels, no split
    manifest = split.parent.parent / "data" / "new_slices.csv"  # beside the images it names
    test.to_csv(manifest, index=False)
    res = tmp_path / "res"
    assert main(["infer", "--model", str(out), "--input", str(manifest), "--out", str(res)]) == 0
    assert attempts == []
    pred = pd.read_csv(res / "predictions.csv", keep_default_na=False)
    samples = pred[pred["level"] == "sample"].set_index("sample_id")
    ref = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("sample_id")
    assert sorted(samples.index) == sorted(test["sample_id"])
    assert np.abs(samples["score_tumor"] - ref.loc[samples.index, "score_tumor"]).max() <= 1e-4
    assert ((samples["score_tumor"] >= 0.01).astype(int) == samples["call_tumor"]).all()
    # boxes: pixel coordinates of the input image, the stage's normalised boxes at or above conf
    boxes = pd.read_csv(res / "boxes.csv")
    assert (boxes["conf"] >= 0.01).all() and set(boxes["class"]) <= {"tumor"}
    assert (boxes["image_width"] == 32).all() and (boxes["image_height"] == 32).all()
    stage = pd.read_csv(out / "boxes.csv")
    stage = stage[stage["sample_id"].isin(test["sample_id"]) & (stage["conf"] >= 0.01)]
    assert len(boxes) == len(stage)
    mine = boxes.assign(cx=(boxes.x1 + boxes.x2) / 64, cy=(boxes.y1 + boxes.y2) / 64, w=(boxes.x2 - boxes.x1) / 32,
                        h=(boxes.y2 - boxes.y1) / 32).sort_values(["sample_id", "conf"]).reset_index(drop=True)
    stage = stage.sort_values(["sample_id", "conf"]).reset_index(drop=True)
    for col in ("conf", "cx", "cy", "w", "h"):
        assert np.abs(mine[col] - stage[col]).max() <= 1e-3, col
    overlays = sorted(p.stem for p in (res / "overlays").glob("*.png"))
    assert len(overlays) == len(test)
    info = json.loads((res / "infer.json").read_text())
    assert info["kind"] == "detection" and info["nms"]["iou"] == 0.7 and info["n_boxes"] == len(boxes)


def test_detector_exports_to_onnx_through_ultralytics(detector, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import shutil

    _, _, out, attempts = detector
    pkg = tmp_path / "det"
    pkg.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(out / name, pkg / name)
    assert main(["export", "--model", str(pkg), "--format", "onnx"]) == 0
    assert "max abs difference to PyTorch" in capsys.readouterr().out
    record = json.loads((pkg / "model.onnx.export.json").read_text())
    assert record["exporter"].startswith("ultralytics") and record["batches"] == [1, 2]
    assert record["max_abs_diff"] <= 1e-4 * max(1.0, record["max_abs_output"])
    assert record["nms"]["iou"] == 0.7 and record["conf"] == 0.01
    assert main(["export", "--model", str(pkg), "--format", "torchscript"]) == 2
    assert "ONNX only" in capsys.readouterr().err
    assert attempts == []
