"""Sliding-window inference on whole volumes: the patient score (the map's maximum), Dice and
HD95 against the mask, and the maps written on the input's grid (NIfTI, DICOM SEG for DICOM
inputs) beside a ``predictions.csv``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medvit.data.export import ExportError, save_dicom_seg, save_nifti_dicom_grid, save_nifti_like, to_input_grid
from medvit.data.io import read_image
from medvit.evaluation.metrics import dice_score, hd95
from medvit.tasks.common import StageContext, write_predictions
from medvit.tasks.segmentation.data import _check_sizes, volume_dataset


def patient_score(prob_map: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) lesion probabilities -> (B,) patient csPCa score: the map's maximum."""
    return prob_map.flatten(1).amax(1)


def _reference_image(row: dict[str, Any]) -> str:
    """The first image column of a row (the map is written on its grid), e.g. ``image_t2w``."""
    cols = [c for c in row if c == "image" or str(c).startswith("image_")]
    return str(row[cols[0]])


@torch.no_grad()
def predict_rows(ctx: StageContext, model: nn.Module, device: torch.device, rows: pd.DataFrame,
                 maps_dir: Path | None = None, map_splits: Sequence[str] = ("test",)) -> dict[str, np.ndarray]:
    """Segment ``rows`` with sliding-window inference; write maps of ``map_splits`` rows.

    Returns:
        per row: ``score`` (patient-level: map maximum), ``dice`` and ``hd95`` (mm, model grid)
        against the mask, ``seconds`` (inference wall time per volume) and ``prob_map``/``mask_map``
        (paths relative to ``maps_dir.parent``, empty when not written).
    """
    _, roi = _check_sizes(ctx.tcfg)
    dataset = volume_dataset(ctx, rows, cache=False)
    out: dict[str, list[Any]] = {k: [] for k in ("score", "dice", "hd95", "seconds", "prob_map", "mask_map",
                                                 "dicom_seg")}
    for i, row in enumerate(rows.to_dict("records")):
        sample = dataset[i]
        t0 = time.perf_counter()
        logits = sliding_window_inference(sample["image"][None].to(device), roi_size=roi, sw_batch_size=2,
                                          predictor=model, overlap=0.25)
        probs = logits.float().sigmoid().cpu()
        out["seconds"].append(time.perf_counter() - t0)
        out["score"].append(float(patient_score(probs)[0]))
        pred, truth = (probs[0, 0] > 0.5).numpy(), sample["label"][0].numpy() > 0.5
        source = read_image(ctx.manifest.root / _reference_image(row))
        grid_mm = [sp * n / m for sp, n, m in zip(source.spacing, source.shape[1:], pred.shape)]
        out["dice"].append(dice_score(pred, truth))
        out["hd95"].append(hd95(pred, truth, spacing=grid_mm))
        paths = ("", "", "")
        if maps_dir is not None and row["split"] in map_splits:
            paths = write_maps(probs[0, 0].numpy(), row, ctx.manifest.root, maps_dir)
        for key, p in zip(("prob_map", "mask_map", "dicom_seg"), paths):
            out[key].append(p)
    return {k: np.asarray(v) for k, v in out.items()}


def write_maps(prob: np.ndarray, row: dict[str, Any], root: Path, maps_dir: Path,
               threshold: float = 0.5) -> tuple[str, str, str]:
    """Write a model-grid probability map as ``<sample_id>_prob.nii.gz`` and its mask
    (``prob > threshold``) as ``<sample_id>_mask.nii.gz`` on the input's grid and affine,
    plus ``<sample_id>_seg.dcm`` (DICOM SEG) when the input is DICOM (whose NIfTI maps carry
    the series' affine from its position/orientation headers).

    Returns:
        (prob, mask, seg) paths relative to ``maps_dir.parent`` ("" for a file not written).
    """
    ref = root / _reference_image(row)
    source = read_image(ref)
    prob_in = to_input_grid(prob, source.shape[1:], mode="trilinear")
    mask_in = (prob_in > threshold).astype(np.uint8)
    sid = str(row["sample_id"])
    base = maps_dir.parent
    if source.source_format == "nifti":
        p = save_nifti_like(prob_in, ref, maps_dir / f"{sid}_prob.nii.gz", dtype=np.float32)
        m = save_nifti_like(mask_in, ref, maps_dir / f"{sid}_mask.nii.gz", dtype=np.uint8)
        return str(p.relative_to(base)), str(m.relative_to(base)), ""
    if source.source_format in ("dicom", "dicom-series"):
        s = save_dicom_seg(mask_in, ref, maps_dir / f"{sid}_seg.dcm", patient_id=str(row["patient_id"]))
        try:  # NIfTI on the series' grid too, where its headers give the geometry
            p = save_nifti_dicom_grid(prob_in, ref, maps_dir / f"{sid}_prob.nii.gz", dtype=np.float32)
            m = save_nifti_dicom_grid(mask_in, ref, maps_dir / f"{sid}_mask.nii.gz", dtype=np.uint8)
        except ExportError:
            return "", "", str(s.relative_to(base))
        return str(p.relative_to(base)), str(m.relative_to(base)), str(s.relative_to(base))
    return "", "", ""


def _fold_predictions(ctx: StageContext, model: nn.Module, device: torch.device, out_path: Path,
                      splits: Sequence[str], maps_dir: Path | None) -> pd.DataFrame:
    rows = ctx.rows(list(splits))
    res = predict_rows(ctx, model, device, rows, maps_dir=maps_dir)
    extra = {"fold": rows["fold"].to_numpy() if "fold" in rows else np.zeros(len(rows), int),
             "dice": res["dice"], "hd95": res["hd95"], "seconds": res["seconds"],
             "prob_map": res["prob_map"], "mask_map": res["mask_map"], "dicom_seg": res["dicom_seg"]}
    return write_predictions(out_path, rows, ctx.spec, res["score"][:, None], extra=extra)
