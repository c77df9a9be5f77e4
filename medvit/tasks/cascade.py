"""Detection then classification (the brain study's cascade), evaluated per patient.

The detector (:mod:`medvit.tasks.detection`) flags a slice when one of its boxes reaches
``detection.conf``; the chosen classifier of the distillation stage (default the distilled
DeiT student) then scores each flagged slice, either the whole slice (``input: slice``, the
classifier's own input) or the region around the slice's most confident box enlarged by
``margin`` of its size on each side (``input: region``). A slice's cascade score is the
classifier's tumour probability when flagged and 0 otherwise, so the classifier can only
veto detections, never add findings the detector missed.

A flagged slice stays positive when its classifier probability reaches the cascade's
``threshold``: by default (``threshold: null``) the classifier's own slice threshold chosen on
the validation split (``threshold.sample`` of the metrics.json beside its weights), since a
classifier's probabilities are rarely calibrated around 0.5; a number in the config overrides it.

Outputs in ``out_dir``: predictions.csv (Contract 3, with ``det_score`` and ``cls_prob``),
model.json (the two models' parameters and training time, and the ``threshold`` used with
where it came from), metrics.json (:func:`medvit.tasks.evaluate.evaluate_stage`) and
ptp.json (PTP with that threshold as the flagging rule and ``detection.min_slices`` as k).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai import transforms as mt

from medvit.config import block_defaults
from medvit.data.transforms import LoadSampled
from medvit.engine import resolve_device
from medvit.errors import ConfigError
from medvit.evaluation.evaluate import read_predictions, write_json
from medvit.evaluation.ptp import ptp_stage
from medvit.tasks.classification import probabilities
from medvit.tasks.common import load_context, read_sidecar, write_predictions
from medvit.tasks.detection import detection_config
from medvit.tasks.distill import load_classifier
from medvit.tasks.evaluate import evaluate_stage
from medvit.tasks.training import split_dataset


def cascade_config(tcfg: dict[str, Any]) -> dict[str, Any]:
    """The task's ``cascade`` block over the schema's defaults."""
    return {**block_defaults("cascade"), **(tcfg.get("cascade") or {})}


def cascade_threshold(ccfg: dict[str, Any], classifier_weights: str | Path, positive: str) -> tuple[float, str]:
    """The classifier probability from which a flagged slice stays positive, and its source.

    ``ccfg["threshold"]`` when it is a number; otherwise the classifier's slice threshold chosen on
    validation (``threshold.sample[positive]`` of the metrics.json beside ``classifier_weights``).

    Raises:
        ConfigError: no number in the config and no validation-chosen threshold beside the weights.
    """
    if ccfg.get("threshold") is not None:
        return float(ccfg["threshold"]), "config (cascade.threshold)"
    metrics_path = Path(classifier_weights).parent / "metrics.json"
    record = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    threshold = ((record.get("threshold") or {}).get("sample") or {}).get(positive)
    if threshold is None:
        raise ConfigError(f"cascade.threshold is null (use the classifier's validation threshold), but "
                          f"{metrics_path} holds no threshold.sample.{positive}: evaluate the classifier first, "
                          "or set tasks.<task>.cascade.threshold to a number")
    return float(threshold), f"classifier validation ({record['threshold'].get('method', '?')}, {metrics_path})"


def crop_region(image: torch.Tensor, box: np.ndarray, margin: float, size: int) -> torch.Tensor:
    """Crop a normalised box ``(cx, cy, w, h)`` enlarged by ``margin`` of its size per side.

    Args:
        image: (C, H, W) tensor.
        box: (4,) normalised centre x, centre y, width, height.
        margin: added on each side as a fraction of the box's width/height.
        size: side of the returned square crop.

    Returns:
        (C, size, size) crop (area interpolation), at least one pixel of the image.
    """
    _, h, w = image.shape
    cx, cy, bw, bh = (float(v) for v in box)
    bw, bh = bw * (1 + 2 * margin), bh * (1 + 2 * margin)
    x0, x1 = int(np.floor((cx - bw / 2) * w)), int(np.ceil((cx + bw / 2) * w))
    y0, y1 = int(np.floor((cy - bh / 2) * h)), int(np.ceil((cy + bh / 2) * h))
    x0, y0 = max(0, min(x0, w - 1)), max(0, min(y0, h - 1))
    x1, y1 = max(x0 + 1, min(x1, w)), max(y0 + 1, min(y1, h))
    crop = image[:, y0:y1, x0:x1]
    return F.interpolate(crop[None].float(), size=(size, size), mode="area")[0]


@torch.no_grad()
def cascade_stage(config_path: str | Path, task: str, split_path: str | Path, detector_dir: str | Path,
                  classifier_weights: str | Path, out_dir: str | Path) -> Path:
    """Run the cascade on the val and test slices and evaluate it (module docstring).

    Returns:
        the path of ``metrics.json``.

    Raises:
        ConfigError: not a binary task.
    """
    ctx = load_context(config_path, task, split_path)
    if ctx.spec.kind != "binary":
        raise ConfigError(f"tasks.{task}.cascade needs a binary task; {task} is {ctx.spec.kind}")
    ccfg, det = cascade_config(ctx.tcfg), detection_config(ctx.tcfg)
    detector_dir, out_dir = Path(detector_dir), Path(out_dir)
    c = ctx.spec.classes[0]
    det_pred = read_predictions(detector_dir / "predictions.csv").set_index("sample_id")
    rows = ctx.rows(["val", "test"])
    sids = rows["sample_id"].astype(str)
    missing = sorted(set(sids) - set(det_pred.index))
    if missing:
        raise ConfigError(f"the detector's predictions lack {len(missing)} val/test slice(s) of the split "
                          f"(e.g. {missing[:3]}): rerun the detector on this split")
    det_score = det_pred.loc[sids, f"score_{c}"].to_numpy(float)
    flagged = det_score >= float(det["conf"])
    threshold, threshold_source = cascade_threshold(ccfg, classifier_weights, c)

    device = resolve_device(ctx.study["device"])
    model = load_classifier(classifier_weights, ctx.spec, device)
    meta = read_sidecar(classifier_weights)
    size = int(meta["image_size"])
    probs = np.full(len(rows), np.nan)
    idx = np.flatnonzero(flagged)
    if ccfg["input"] == "slice":
        dataset = split_dataset(ctx, ["val", "test"], [size, size], cache=False)
        inputs = [dataset[int(i)]["image"] for i in idx]
    else:
        boxes = pd.read_csv(detector_dir / "boxes.csv", dtype={"sample_id": str})
        best = boxes.sort_values("conf", ascending=False).drop_duplicates("sample_id").set_index("sample_id")
        load = mt.Compose([LoadSampled(ctx.manifest.root),
                           mt.ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                              clip=True, channel_wise=True)])
        inputs = []
        for i in idx:
            image = torch.as_tensor(np.asarray(load({"row": rows.iloc[int(i)].to_dict()})["image"]),
                                    dtype=torch.float32)
            inputs.append(crop_region(image, best.loc[sids.iloc[int(i)], ["cx", "cy", "w", "h"]].to_numpy(float),
                                      float(ccfg["margin"]), size))
    batch = int(ctx.tcfg["train"]["batch_size"])
    for start in range(0, len(inputs), batch):
        x = torch.stack([torch.as_tensor(t) for t in inputs[start:start + batch]]).to(device)
        probs[idx[start:start + batch]] = probabilities(ctx.spec, model(x))[:, 0].cpu().numpy()
    score = np.where(flagged, np.nan_to_num(probs, nan=0.0), 0.0)
    write_predictions(out_dir / "predictions.csv", rows, ctx.spec, score[:, None],
                      {"det_score": det_score, "cls_prob": probs})
    det_meta = read_sidecar(detector_dir / "model.safetensors")
    write_json(out_dir / "model.json", {
        "task": task, "model": "cascade", "split_manifest": str(split_path), "cascade": ccfg,
        "threshold": threshold, "threshold_source": threshold_source,
        "detector": det_meta.get("detector"), "classifier": meta.get("model"),
        "params": (det_meta.get("params") or 0) + (meta.get("params") or 0),
        "trainable_params": (det_meta.get("params") or 0) + (meta.get("params") or 0),
        "train_seconds": (det_meta.get("train_seconds") or 0.0) + (meta.get("train_seconds") or 0.0),
        "flagged_slices": int(flagged.sum()), "slices": len(rows)})
    ptp_stage(config_path, task, out_dir / "predictions.csv", out_dir / "ptp.json", section="cascade", conf=threshold)
    return evaluate_stage(config_path, task, "cascade", out_dir / "predictions.csv", out_dir / "metrics.json")


__all__ = ["cascade_config", "cascade_stage", "cascade_threshold", "crop_region"]
