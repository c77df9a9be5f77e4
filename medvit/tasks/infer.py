"""Apply a trained model package to new images: ``medvit infer``.

No labels, split or study config: the model folder (:mod:`medvit.tasks.package`) says how to
read, resize and scale an image, which network to build, the class names, how sample scores
become a patient score and the operating thresholds chosen on validation.

Input is a manifest CSV (Contract 1; only ``patient_id`` and the image column(s) the package
names are read) or a folder. A folder goes through :func:`medvit.data.ingest.ingest`, the
identifier-free path of ``medvit ingest``: DICOM files are grouped into series, ids become
keyed pseudonyms and ``OUT/input/manifest_images/`` links each pseudonymous sample to its
source file. Without a key (``--key`` or ``$MEDVIT_PSEUDONYM_KEY``) a random one is used for
this run only, so its pseudonyms link to no other run.

Outputs in ``OUT``:

* ``predictions.csv``: one row per sample (``level = sample``) and one per patient
  (``level = patient``), ``score_<c>`` and the thresholded ``call_<c>`` per class (multiclass:
  ``call_<c>`` marks the argmax, also named in ``predicted``).
* ``quarantine.csv``: every input left out (``source``, ``patient_id``, ``sample_id``,
  ``reason``); the run goes on without it.
* ``infer.json``: the package read (weights SHA-256), input, counts, device and timing.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit.config import TASK_MODALITIES
from medvit.data.ingest import ENV_KEY, ingest
from medvit.data.io import read_sample
from medvit.data.manifest import load_manifest
from medvit.data.transforms import load_transforms
from medvit.data.yolo import _png_bytes, _stems, volume_window, window_to_uint8
from medvit.engine import resolve_device
from medvit.errors import MedvitError
from medvit.evaluation.aggregate import aggregate_patients
from medvit.fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from medvit.tasks.classification import probabilities
from medvit.tasks.common import TaskSpec
from medvit.tasks.detection import load_detector, setup_ultralytics, ultralytics_device
from medvit.tasks.package import build_classifier, build_segmenter, read_package
from medvit.tasks.segmentation import write_maps

logger = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ["source", "patient_id", "sample_id", "reason"]


class InferError(MedvitError):
    """The input cannot be scored at all (missing, empty, wrong columns)."""


@dataclass
class InferResult:
    predictions: Path
    quarantine: Path
    n_samples: int
    n_patients: int
    n_quarantined: int

    def summary(self) -> str:
        return (f"scored {self.n_samples} sample(s) of {self.n_patients} patient(s) -> {self.predictions}; "
                f"{self.n_quarantined} quarantined -> {self.quarantine}")


def _input_manifest(source: Path, out_dir: Path, key: str | None) -> tuple[pd.DataFrame, Path, list[list[str]], str]:
    """The rows to score, their root folder, quarantine rows from reading the input, and how
    the input was read (``manifest`` or ``folder``)."""
    quarantine: list[list[str]] = []
    if source.is_file() and source.suffix.lower() == ".csv":
        manifest = load_manifest(source, check_files=False, confine=True)
        for p in manifest.problems:
            if p.row is not None:
                quarantine.append([f"{source.name} row {p.row}", "", "", f"{p.column}: {p.reason}"])
        return manifest.df, manifest.root, quarantine, "manifest"
    if source.is_dir():
        if key is None and not os.environ.get(ENV_KEY):
            key = secrets.token_hex(32)
            logger.warning("no pseudonymisation key (--key or $%s): a random key for this run; its pseudonyms "
                           "link to no other run (OUT/input/manifest_images/ maps them to the source files)", ENV_KEY)
        result = ingest(source, out_dir / "input" / "manifest.csv", key=key)
        with open(result.quarantine, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                quarantine.append([row["file"], row.get("patient_id", ""), "", row["reason"]])
        if result.n_samples == 0:
            return pd.DataFrame(columns=["patient_id", "sample_id", "image"]), result.manifest.parent, quarantine, \
                "folder"
        manifest = load_manifest(result.manifest, check_files=False)
        return manifest.df, manifest.root, quarantine, "folder"
    if not source.exists():
        raise InferError(f"input {source} does not exist")
    raise InferError(f"input {source} is neither a folder nor a manifest .csv")


def _other_modalities(df: pd.DataFrame, task: str | None, quarantine: list[list[str]]) -> pd.DataFrame:
    """``df`` without the rows whose DICOM modality (the ``modality`` column: folder input, or a
    manifest that has one) is not one the task's models learn from; each goes to quarantine.
    Rows without a modality (PNG, NIfTI, .npy) are kept."""
    allowed = TASK_MODALITIES.get(str(task))
    if not allowed or "modality" not in df.columns or df.empty:
        return df
    modality = df["modality"].fillna("").astype(str).str.strip().str.upper()
    other = (modality != "") & ~modality.isin(allowed)
    for (_, row), value in zip(df[other].iterrows(), modality[other], strict=True):
        quarantine.append([str(row.get("image", "")), str(row["patient_id"]), str(row["sample_id"]),
                           f"modality {value}: this {task} model learned from {'/'.join(allowed)} images "
                           "(--any-modality scores it anyway)"])
    if other.any():
        logger.warning("%d input(s) of another modality than %s quarantined (--any-modality scores them)",
                       int(other.sum()), "/".join(allowed))
    return df[~other].reset_index(drop=True)


def _check_columns(df: pd.DataFrame, channels: list[str], source: Path) -> None:
    if channels == ["image"]:
        if len(df) and "image" not in df.columns:
            raise InferError(f"{source} has no `image` column; the model reads one image per sample")
        return
    missing = [c for c in channels if c not in df.columns]
    if missing:
        hint = ("; a folder gives one image per file or series: list the channels of each sample in a manifest "
                "with these columns" if source.is_dir() else "")
        raise InferError(f"{source} lacks the column(s) {missing}: the model was trained on the channels "
                         f"{channels}, stacked in that order{hint}")


def _row_for(row: dict[str, Any], channels: list[str]) -> dict[str, Any]:
    """The row as the reader sees it: only the package's image column(s), in package order."""
    return {c: row[c] for c in channels}


def predictions_table(samples: pd.DataFrame, scores: np.ndarray, block: dict[str, Any]) -> pd.DataFrame:
    """Sample and patient rows with scores and thresholded calls (see the module docstring)."""
    task = block["task"]
    classes, kind = task["classes"], task["kind"]
    base = pd.DataFrame({"patient_id": samples["patient_id"].astype(str).to_numpy(),
                         "sample_id": samples["sample_id"].astype(str).to_numpy()})
    for j, c in enumerate(classes):
        base[f"true_{c}"] = 0  # aggregate_patients' table shape; dropped below
        base[f"score_{c}"] = np.clip(scores[:, j], 0.0, 1.0)
    agg = block["aggregate"]
    patients = aggregate_patients(base, agg["method"], agg.get("top_k") or 3, kind)
    parts = []
    for level, table in (("sample", base), ("patient", patients)):
        t = table.drop(columns=[f"true_{c}" for c in classes] + ["n_samples"], errors="ignore").copy()
        if level == "patient":
            t["sample_id"] = ""
            t["n_samples"] = patients["n_samples"].to_numpy()
        else:
            t["n_samples"] = 1
        s = t[[f"score_{c}" for c in classes]].to_numpy(float)
        if kind == "multiclass":
            best = s.argmax(1)
            t["predicted"] = [classes[i] for i in best]
            calls = np.eye(len(classes), dtype=np.int64)[best]
        else:
            thr = np.array([float(block["threshold"][level][c]) for c in classes])
            calls = (s >= thr).astype(np.int64)
        for j, c in enumerate(classes):
            t[f"call_{c}"] = calls[:, j]
        t.insert(0, "level", level)
        parts.append(t)
    out = pd.concat(parts, ignore_index=True)
    first = ["level", "patient_id", "sample_id", "n_samples"]
    return out[first + [c for c in out.columns if c not in first]]


def infer_stage(model_dir: str | Path, source: str | Path, out_dir: str | Path, key: str | None = None,
                batch_size: int = 32, device: str = "auto", any_modality: bool = False) -> InferResult:
    """Score every image of ``source`` with the model package in ``model_dir``.

    Args:
        model_dir: a model folder with model.safetensors and a complete model.json package.
        source: a manifest CSV or a folder of DICOM/NIfTI/PNG/JPEG/TIFF/.npy files.
        out_dir: folder for predictions.csv, quarantine.csv, infer.json (and input/ for a folder).
        key: pseudonymisation key for folder input (default ``$MEDVIT_PSEUDONYM_KEY``, else random).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``.
        any_modality: score DICOM inputs of every modality; by default one the model's task
            did not learn from (:data:`medvit.config.TASK_MODALITIES`) is quarantined.

    Raises:
        PackageError: the model folder is not a complete package.
        InferError: the input is missing or lacks the image column(s); nothing could be scored.
    """
    import torch
    from tqdm import tqdm

    started = time.perf_counter()
    block, meta = read_package(model_dir)
    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df, root, quarantine, input_kind = _input_manifest(source, out, key)
    if not any_modality:
        df = _other_modalities(df, meta.get("task"), quarantine)
    channels = list(block["channels"])
    _check_columns(df, channels, source)
    if block["kind"] in ("segmentation", "detection"):
        run = _infer_segmentation if block["kind"] == "segmentation" else _infer_detection
        return run(block, meta, Path(model_dir), df, root, quarantine, out, source, input_kind, device, started)
    in_chans = int(block["architecture"]["kwargs"]["in_chans"])
    size = [int(s) for s in block["image_size"]]
    dev = resolve_device(device)
    model = build_classifier(block, Path(model_dir) / "model.safetensors").to(dev)
    spec = TaskSpec(block["task"]["kind"], list(block["task"]["classes"]), "label",
                    list(block["task"].get("all_classes") or block["task"]["classes"]))
    load = load_transforms(root, size)

    kept: list[int] = []
    scores: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            with torch.no_grad():
                logits = model(torch.stack(batch).to(dev))
            scores.append(probabilities(spec, logits).cpu().numpy())
            batch.clear()

    rows = df.to_dict("records")
    for i, row in enumerate(tqdm(rows, desc="infer", unit="sample", file=sys.stderr, disable=len(rows) < 2)):
        label = str(row.get("image") or next((row[c] for c in channels if row.get(c)), ""))
        try:
            image = torch.as_tensor(load({"row": _row_for(row, channels)})["image"])
        except Exception as exc:  # noqa: BLE001 - any unreadable input is quarantined, the run goes on
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            quarantine.append([label, str(row["patient_id"]), str(row["sample_id"]), str(reason)])
            continue
        if image.shape[0] != in_chans:
            quarantine.append([label, str(row["patient_id"]), str(row["sample_id"]),
                               f"has {image.shape[0]} channel(s); the model takes {in_chans}"])
            continue
        kept.append(i)
        batch.append(image.float())
        if len(batch) >= batch_size:
            flush()
    flush()
    if not kept:
        atomic_write_text(out / "quarantine.csv", pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
                          .to_csv(index=False))
        raise InferError(f"no image of {source} could be scored ({len(quarantine)} quarantined: see "
                         f"{out / 'quarantine.csv'})")
    samples = df.iloc[kept].reset_index(drop=True)
    table = predictions_table(samples, np.concatenate(scores), block)
    pred_path = atomic_write_text(out / "predictions.csv", table.to_csv(index=False, float_format="%.6g"))
    q_path = atomic_write_text(out / "quarantine.csv",
                               pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).to_csv(index=False))
    n_patients = int((table["level"] == "patient").sum())
    atomic_write_json(out / "infer.json", {
        "model_dir": str(model_dir), "model": block["architecture"]["name"], "task": meta.get("task"),
        "weights_sha256": sha256_file(Path(model_dir) / "model.safetensors"), "input": str(source),
        "input_kind": input_kind, "n_samples": len(kept), "n_patients": n_patients,
        "n_quarantined": len(quarantine), "device": dev.type, "seconds": round(time.perf_counter() - started, 3),
        "threshold": block["threshold"], "aggregate": block["aggregate"]})
    return InferResult(Path(pred_path), Path(q_path), len(kept), n_patients, len(quarantine))


# ------------------------------------------------------------------------------ segmentation
def _write_outputs(out: Path, table: pd.DataFrame, quarantine: list[list[str]], record: dict[str, Any],
                   n_samples: int) -> InferResult:
    pred_path = atomic_write_text(out / "predictions.csv", table.to_csv(index=False, float_format="%.6g"))
    q_path = atomic_write_text(out / "quarantine.csv",
                               pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).to_csv(index=False))
    n_patients = int((table["level"] == "patient").sum())
    atomic_write_json(out / "infer.json", {**record, "n_samples": n_samples, "n_patients": n_patients,
                                           "n_quarantined": len(quarantine)})
    return InferResult(Path(pred_path), Path(q_path), n_samples, n_patients, len(quarantine))


def _nothing_scored(out: Path, source: Path, quarantine: list[list[str]]) -> InferError:
    atomic_write_text(out / "quarantine.csv", pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).to_csv(index=False))
    return InferError(f"no image of {source} could be scored ({len(quarantine)} quarantined: see "
                      f"{out / 'quarantine.csv'})")


def _record(block: dict[str, Any], meta: dict[str, Any], model_dir: Path, source: Path, input_kind: str,
            dev: str, started: float, name: str) -> dict[str, Any]:
    return {"model_dir": str(model_dir), "model": name, "kind": block["kind"], "task": meta.get("task"),
            "weights_sha256": sha256_file(model_dir / "model.safetensors"), "input": str(source),
            "input_kind": input_kind, "device": dev, "seconds": round(time.perf_counter() - started, 3)}


def _infer_segmentation(block: dict[str, Any], meta: dict[str, Any], model_dir: Path, df: pd.DataFrame, root: Path,
                        quarantine: list[list[str]], out: Path, source: Path, input_kind: str, device: str,
                        started: float) -> InferResult:
    """Segment every volume: sliding-window inference on the package's grid (``image_size``
    cube, ``roi_size`` windows), probabilities resampled to the input's grid and written as
    NIfTI with the input's affine (``maps/<sample>_prob.nii.gz``, ``maps/<sample>_mask.nii.gz``)
    and, for DICOM input, a DICOM SEG (``maps/<sample>_seg.dcm``); the volume score is the
    map's maximum, as in the study's own prediction stage."""
    import torch
    from monai.inferers import sliding_window_inference
    from tqdm import tqdm

    channels = list(block["channels"])
    in_chans = int(block["architecture"]["kwargs"]["in_chans"])
    dev = resolve_device(device)
    model = build_segmenter(block, model_dir / "model.safetensors").to(dev)
    load = load_transforms(root, [int(s) for s in block["image_size"]])
    sw = block["sliding_window"]
    roi = [int(r) for r in block["roi_size"]]
    maps_dir = out / "maps"
    kept: list[int] = []
    scores: list[float] = []
    paths: list[tuple[str, str, str]] = []
    rows = df.to_dict("records")
    for i, row in enumerate(tqdm(rows, desc="infer", unit="volume", file=sys.stderr, disable=len(rows) < 2)):
        label = str(row.get(channels[0], ""))
        ids = [str(row["patient_id"]), str(row["sample_id"])]
        try:
            image = torch.as_tensor(load({"row": _row_for(row, channels)})["image"]).float()
            if image.ndim != 4:
                raise InferError(f"is {image.ndim - 1}D; the model segments 3D volumes")
            if image.shape[0] != in_chans:
                raise InferError(f"has {image.shape[0]} channel(s); the model takes {in_chans}")
            with torch.no_grad():
                logits = sliding_window_inference(image[None].to(dev), roi_size=roi,
                                                  sw_batch_size=int(sw["sw_batch_size"]), predictor=model,
                                                  overlap=float(sw["overlap"]), mode=sw.get("mode", "constant"))
            prob = logits.float().sigmoid().cpu()[0, 0].numpy()
            written = write_maps(prob, {**_row_for(row, channels), "patient_id": ids[0], "sample_id": ids[1]},
                                 root, maps_dir, threshold=float(block["mask_threshold"]))
        except Exception as exc:  # noqa: BLE001 - any unreadable or unwritable volume is quarantined
            reason = getattr(exc, "reason", None) or (str(exc) if isinstance(exc, InferError)
                                                       else f"{type(exc).__name__}: {exc}")
            quarantine.append([label, *ids, str(reason)])
            continue
        kept.append(i)
        scores.append(float(prob.max()))
        paths.append(written)
    if not kept:
        raise _nothing_scored(out, source, quarantine)
    samples = df.iloc[kept].reset_index(drop=True)
    table = predictions_table(samples, np.asarray(scores)[:, None], block)
    maps = pd.DataFrame(paths, columns=["prob_map", "mask_map", "dicom_seg"])
    maps["sample_id"] = samples["sample_id"].astype(str).to_numpy()
    table = table.merge(maps, on="sample_id", how="left")
    for col in ("prob_map", "mask_map", "dicom_seg"):
        table[col] = table[col].fillna("")
    record = _record(block, meta, model_dir, source, input_kind, dev.type, started, block["architecture"]["name"])
    record.update(threshold=block["threshold"], aggregate=block["aggregate"], mask_threshold=block["mask_threshold"],
                  ensemble_members=len(block["ensemble"]["members"]))
    return _write_outputs(out, table, quarantine, record, len(kept))


# ------------------------------------------------------------------------------ detection
def _volume_keys(df: pd.DataFrame, per: str) -> pd.Series:
    """The volume of each slice, as the detector's training windowed them (``study_id`` where
    the package says so and the input has it, else the patient)."""
    patients = df["patient_id"].astype(str)
    if per == "study_id" and "study_id" in df.columns:
        vol = df["study_id"].fillna("").astype(str)
        return vol.where(vol.str.len() > 0, patients)
    return patients


def _overlay(png: Path, boxes: list[dict[str, Any]], path: Path) -> None:
    """The windowed slice in colour with its boxes (red) and their confidence."""
    from PIL import Image, ImageDraw

    with Image.open(png) as im:
        img = im.convert("RGB")
    scale = max(1, 256 // max(img.size))  # small slices are enlarged so boxes and labels stay legible
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for b in boxes:
        xy = [b["x1"] * scale, b["y1"] * scale, b["x2"] * scale, b["y2"] * scale]
        draw.rectangle(xy, outline=(255, 0, 0), width=max(1, scale // 2))
        draw.text((xy[0] + 2, max(0, xy[1] - 11)), f"{b['class']} {b['conf']:.2f}", fill=(255, 64, 64))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _infer_detection(block: dict[str, Any], meta: dict[str, Any], model_dir: Path, df: pd.DataFrame, root: Path,
                     quarantine: list[list[str]], out: Path, source: Path, input_kind: str, device: str,
                     started: float) -> InferResult:
    """Run the YOLO detector on every slice: the slices of a volume are windowed to 8 bits
    together (the package's ``window``), boxes come from ultralytics' prediction with the
    package's NMS settings, in the input image's pixel coordinates. Writes ``boxes.csv``
    (boxes at or above the package's confidence ``conf``), ``overlays/<sample>.png`` and
    ``predictions.csv`` (a slice's score is its highest box confidence, called at ``conf``;
    a patient's is the maximum over its slices)."""
    setup_ultralytics(out / "ultralytics_config")
    yolo = load_detector(model_dir / "model.safetensors")
    dev = ultralytics_device(device)
    nms, conf, names = block["nms"], float(block["conf"]), list(block["names"])
    percentiles = tuple(float(p) for p in block["window"]["percentiles"])
    df = df.reset_index(drop=True)
    stems = _stems(df["sample_id"].astype(str).tolist())
    slices_dir = out / "input" / "slices"
    kept: list[int] = []
    pngs: list[Path] = []
    for _, group in df.groupby(_volume_keys(df, block["window"]["per"]), sort=False):
        images: dict[int, np.ndarray] = {}
        for i, row in zip(group.index, group.to_dict("records")):
            try:
                arr = read_sample(_row_for(row, ["image"]), root).array
                if arr.ndim != 3 or arr.shape[0] not in (1, 3):
                    raise InferError(f"has shape {arr.shape} (C, ...); the detector reads 2D grayscale or RGB slices")
            except Exception as exc:  # noqa: BLE001 - a bad slice is quarantined, the run goes on
                reason = getattr(exc, "reason", None) or (str(exc) if isinstance(exc, InferError)
                                                           else f"{type(exc).__name__}: {exc}")
                quarantine.append([str(row.get("image", "")), str(row["patient_id"]), str(row["sample_id"]),
                                   str(reason)])
                continue
            images[i] = arr
        if not images:
            continue
        lo, hi = volume_window(list(images.values()), percentiles)
        for i, arr in images.items():
            u8 = window_to_uint8(arr, lo, hi)
            u8 = u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1)
            kept.append(i)
            pngs.append(atomic_write_bytes(slices_dir / f"{stems[i]}.png", _png_bytes(u8)))
    if not kept:
        raise _nothing_scored(out, source, quarantine)
    order = np.argsort(kept, kind="stable")
    kept, pngs = [kept[j] for j in order], [Path(pngs[j]) for j in order]
    scores, box_rows = [], []
    from tqdm import tqdm

    batch = 16
    progress = tqdm(total=len(kept), desc="infer", unit="slice", file=sys.stderr, disable=len(kept) < 2)
    for start in range(0, len(kept), batch):
        results = yolo.predict([str(p) for p in pngs[start:start + batch]], imgsz=int(block["image_size"]),
                               conf=float(nms["conf_floor"]), iou=float(nms["iou"]), max_det=int(nms["max_det"]),
                               agnostic_nms=bool(nms["agnostic"]), device=dev, verbose=False)
        for i, png, r in zip(kept[start:start + batch], pngs[start:start + batch], results):
            row = df.loc[i]
            b = r.boxes
            confs = b.conf.cpu().numpy()
            scores.append(float(confs.max()) if len(confs) else 0.0)
            h, w = r.orig_shape
            mine = []
            for c, cls, xyxy in zip(confs, b.cls.cpu().numpy().astype(int), b.xyxy.cpu().numpy()):
                if c >= conf:
                    mine.append({"patient_id": str(row["patient_id"]), "sample_id": str(row["sample_id"]),
                                 "class": names[cls], "conf": float(c), "x1": float(xyxy[0]), "y1": float(xyxy[1]),
                                 "x2": float(xyxy[2]), "y2": float(xyxy[3]), "image_width": int(w),
                                 "image_height": int(h)})
            box_rows += mine
            _overlay(png, mine, out / "overlays" / f"{png.stem}.png")
        progress.update(len(results))
    progress.close()
    samples = df.iloc[kept].reset_index(drop=True)
    called = {**block, "threshold": {"sample": {c: conf for c in block["task"]["classes"]},
                                     "patient": {c: conf for c in block["task"]["classes"]}}}
    table = predictions_table(samples, np.asarray(scores)[:, None], called)
    counts = pd.DataFrame(box_rows, columns=["sample_id"]).value_counts("sample_id") if box_rows else pd.Series()
    table["n_boxes"] = [int(counts.get(s, 0)) if lvl == "sample" else int(table.loc[(table["level"] == "sample")
                        & (table["patient_id"] == p), "sample_id"].map(lambda x: counts.get(x, 0)).sum())
                        for lvl, s, p in zip(table["level"], table["sample_id"], table["patient_id"])]
    columns = ["patient_id", "sample_id", "class", "conf", "x1", "y1", "x2", "y2", "image_width", "image_height"]
    atomic_write_text(out / "boxes.csv", pd.DataFrame(box_rows, columns=columns)
                      .to_csv(index=False, float_format="%.6g"))
    record = _record(block, meta, model_dir, source, input_kind, dev, started, block["detector"])
    record.update(conf=conf, nms=nms, window=block["window"], n_boxes=len(box_rows),
                  boxes="pixel coordinates of the input image: x = column, y = row, from its top-left corner")
    return _write_outputs(out, table, quarantine, record, len(kept))
