"""Detection datasets in the ultralytics (YOLO) layout, built from a split manifest.

Ultralytics reads 8-bit images (``cv2.imread``): a 16-bit MRI slice handed to it directly
would be truncated to its low byte or rescaled per image by whatever decoder runs. The
slices are therefore *windowed deliberately* into derived 8-bit PNGs, written once:

* one window per volume (the manifest's ``study_id``, else the patient), from the
  ``percentiles`` (default 0.5 / 99.5) of every pixel of every slice of that volume, so the
  slices of one scan keep their relative brightness (a per-slice window would stretch a
  tumour-free vertex slice to the same contrast as a mid-brain slice);
* ``u8 = round(255 * clip((x - lo) / (hi - lo), 0, 1))``.

The boxes are not derived: ``labels/<split>/<stem>.txt`` is a symbolic link to the
manifest's ``boxes`` file (YOLO format, ``class cx cy w h`` normalised), which stays valid
because windowing does not move pixels. A slice without a ``boxes`` file is a background
image (no label file, which ultralytics reads as "no object").

Layout under ``out_dir``::

    images/<split>/<stem>.png     windowed 8-bit slices (derived)
    labels/<split>/<stem>.txt     links to the manifest's box files
    data.yaml                     path, train/val/test image folders, class names
    dataset.json                  windows, counts per split, tumour slices without a box
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from medvit.data.io import read_sample
from medvit.errors import ManifestError
from medvit.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

WINDOW_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Default (low, high) percentiles of a volume's intensities mapped to 0 and 255."""

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class YoloDataset:
    """A built detection dataset.

    Attributes:
        root: the dataset folder.
        data_yaml: the ultralytics data YAML (``path``, ``train``, ``val``, ``test``, ``names``).
        images: sample_id -> derived 8-bit image path, for every row written.
        summary: what ``dataset.json`` holds (windows, counts, notes).
    """

    root: Path
    data_yaml: Path
    images: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def volume_window(arrays: Sequence[np.ndarray], percentiles: tuple[float, float] = WINDOW_PERCENTILES
                  ) -> tuple[float, float]:
    """Intensity window (lo, hi) of one volume from the percentiles of all its pixels.

    Args:
        arrays: the volume's slices, any shapes, real intensity units.
        percentiles: (low, high) percentiles in [0, 100].

    Returns:
        ``(lo, hi)`` with ``hi > lo`` (a constant volume gets ``hi = lo + 1``).
    """
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def window_to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]`` (clipped), as uint8 of the same shape."""
    scaled = (np.asarray(array, dtype=np.float64) - lo) / (hi - lo)
    return np.round(255.0 * np.clip(scaled, 0.0, 1.0)).astype(np.uint8)


def _png_bytes(u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def read_boxes(path: Path, n_classes: int = 1) -> np.ndarray:
    """Read a YOLO box file -> (N, 5) float array ``class cx cy w h`` (normalised).

    Raises:
        ManifestError: a line is not five numbers, a class is outside ``[0, n_classes)`` or a
            coordinate is outside [0, 1].
    """
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 5 or not values[0].is_integer() or not 0 <= values[0] < n_classes \
                or not all(0.0 <= v <= 1.0 for v in values[1:]):
            raise ManifestError(f"{path}: line {i} {line!r} is not a YOLO box `class cx cy w h` with class in "
                                f"[0, {n_classes}) and coordinates in [0, 1]")
        rows.append(values)
    return np.array(rows, dtype=float).reshape(-1, 5)


def _stems(sample_ids: Sequence[str]) -> list[str]:
    """File-name-safe, unique stems for the sample ids."""
    seen: dict[str, int] = {}
    out = []
    for sid in sample_ids:
        stem = _SAFE.sub("_", str(sid)) or "sample"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}__{n}")
    return out


def _link(target: Path, link: Path) -> None:
    """A relative symbolic link (a copy where the filesystem has none)."""
    try:
        os.symlink(os.path.relpath(target, link.parent), link)
    except OSError:
        shutil.copyfile(target, link)


def build_yolo_dataset(df: pd.DataFrame, root: str | Path, out_dir: str | Path, names: Sequence[str] = ("tumor",),
                       splits: Sequence[str] = ("train", "val", "test"),
                       percentiles: tuple[float, float] = WINDOW_PERCENTILES, label_column: str = "label",
                       positive_class: str | None = None) -> YoloDataset:
    """Write the ultralytics layout of a split manifest (see the module docstring).

    Args:
        df: split manifest rows with ``patient_id``, ``sample_id``, ``split``, ``image`` and
            optionally ``boxes`` (empty: background) and ``study_id`` (the volume key).
        root: folder the manifest's paths are relative to.
        out_dir: dataset folder; its ``images/``, ``labels/`` and caches are rebuilt.
        names: class names, index = YOLO class id.
        splits: splits written (each becomes a key of the data YAML).
        percentiles: window percentiles per volume.
        label_column, positive_class: slices of this class without a box file are listed in
            the summary (they are background images to the detector).

    Returns:
        A :class:`YoloDataset`.

    Raises:
        ManifestError: no ``boxes`` column, a split without rows, a missing or malformed box file.
        ImageReadError: an unreadable image.
    """
    root, out_dir = Path(root), Path(out_dir)
    if "boxes" not in df.columns:
        raise ManifestError("detection needs a `boxes` column (YOLO txt per slice, empty for background) in "
                            "the manifest")
    for sub in ("images", "labels"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    rows = df[df["split"].isin(splits)].reset_index(drop=True)
    for s in splits:
        if not (rows["split"] == s).any():
            raise ManifestError(f"split {s!r} has no rows: the detector needs train, val and test slices")
    rows = rows.assign(_stem=_stems(rows["sample_id"].astype(str).tolist()))
    vol = rows["study_id"].astype(str) if "study_id" in rows.columns else rows["patient_id"].astype(str)
    vol = vol.where(vol.str.len() > 0, rows["patient_id"].astype(str))
    result = YoloDataset(out_dir, out_dir / "data.yaml")
    counts = {s: {"images": 0, "with_boxes": 0, "background": 0, "boxes": 0} for s in splits}
    windows: dict[str, list[float]] = {}
    unboxed: list[str] = []
    for key, group in rows.groupby(vol, sort=False):
        images = [read_sample(r, root) for r in group.to_dict("records")]
        for img in images:
            if img.array.shape[0] not in (1, 3) or img.array.ndim != 3:
                raise ManifestError(f"detection needs 2D grayscale or RGB slices; got an image of shape "
                                    f"{img.array.shape} (C, ...) in volume {key}")
        lo, hi = volume_window([im.array for im in images], percentiles)
        windows[str(key)] = [lo, hi]
        for row, img in zip(group.to_dict("records"), images):
            split, stem = row["split"], row["_stem"]
            u8 = window_to_uint8(img.array, lo, hi)
            u8 = u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1)
            image_path = out_dir / "images" / split / f"{stem}.png"
            atomic_write_bytes(image_path, _png_bytes(u8))
            result.images[str(row["sample_id"])] = image_path
            c = counts[split]
            c["images"] += 1
            boxes = row.get("boxes")
            if isinstance(boxes, str) and boxes.strip():
                src = root / boxes
                if not src.is_file():
                    raise ManifestError(f"boxes file of sample {row['sample_id']!r} not found: {src}")
                n = len(read_boxes(src, len(names)))
                label = out_dir / "labels" / split / f"{stem}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                _link(src.resolve(), label)
                c["with_boxes"] += int(n > 0)
                c["background"] += int(n == 0)
                c["boxes"] += n
            else:
                c["background"] += 1
                if positive_class is not None and str(row.get(label_column, "")) == positive_class:
                    unboxed.append(str(row["sample_id"]))
    for cache in out_dir.glob("labels/*.cache"):
        cache.unlink()
    data = {"path": str(out_dir.resolve()), **{s: f"images/{s}" for s in splits},
            "names": {i: n for i, n in enumerate(names)}}
    atomic_write_text(result.data_yaml, yaml.safe_dump(data, sort_keys=False))
    result.summary = {
        "window": {"percentiles": list(percentiles), "per": "study_id" if "study_id" in rows.columns else "patient_id",
                   "mapping": "u8 = round(255 * clip((x - lo) / (hi - lo), 0, 1))", "volumes": windows},
        "splits": counts, "names": list(names),
        "abnormal_without_boxes": unboxed,
        "notes": [f"{len(unboxed)} slice(s) labelled abnormal have no boxes file: background images for the detector"]
        if unboxed else [],
    }
    atomic_write_json(out_dir / "dataset.json", result.summary)
    return result


__all__ = ["WINDOW_PERCENTILES", "YoloDataset", "build_yolo_dataset", "read_boxes", "volume_window",
           "window_to_uint8"]
