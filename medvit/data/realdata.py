"""Import shipped real datasets into image files plus a manifest (``medvit import``).

Only files whose SHA-256 is known are imported, so a manifest built here always describes
exactly the data it claims to. Each importer writes images under ``<out_dir>/images/``, the
manifest at ``<out_dir>/manifest.csv`` and the dataset's attribution at
``<out_dir>/ATTRIBUTION.md`` (the licences require it to travel with the data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medvit.errors import MedvitError
from medvit.provenance import sha256_file

PNEUMONIAMNIST_SHA256 = "f36c2b3e34de9d60c5c734118bc6daff281eaf76b67a57d26ad958da948274b0"
PNEUMONIAMNIST_CLASSES = ("normal", "pneumonia")  # label 0, label 1
PNEUMONIAMNIST_ATTRIBUTION = """\
- Source dataset: MedMNIST v2 — Jiancheng Yang, Rui Shi, Donglai Wei, Zequan Liu, Lin Zhao,
  Bilian Ke, Hanspeter Pfister, Bingbing Ni. "MedMNIST v2 — A large-scale lightweight benchmark
  for 2D and 3D biomedical image classification." Scientific Data, 2023. Licence: CC BY 4.0.
- Original images: Daniel S. Kermany et al. "Identifying Medical Diagnoses and Treatable
  Diseases by Image-Based Deep Learning." Cell, 2018. Licence: CC BY 4.0.
- Redistribution keeps this attribution and the licence; a project that ships the file ships
  this text beside it.
"""


def _write_atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def import_pneumoniamnist(source: str | Path, out_dir: str | Path, limit: int | None = None) -> Path:
    """Turn ``pneumoniamnist.npz`` into 28x28 PNGs and a manifest.

    The file is the class-balanced PneumoniaMNIST subset described in ``ATTRIBUTION.md``
    (train 2428, val 270, test 468 images; label 0 = normal, 1 = pneumonia). It carries no
    patient ids, so each image is its own patient (``patient_id == sample_id``, e.g.
    ``pmn-train-00001``); patient-level metrics on it are therefore image-level metrics.
    The file's own train/val/test split is kept in the ``split`` column.

    Args:
        source: the ``.npz`` file; its SHA-256 must match :data:`PNEUMONIAMNIST_SHA256`.
        out_dir: output folder; gets ``images/<split>/*.png``, ``manifest.csv`` and
            ``ATTRIBUTION.md``.
        limit: import only the first ``limit`` images of each split (for quick tests).

    Returns:
        Path of the manifest.

    Raises:
        MedvitError: missing source, checksum mismatch or unexpected contents.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_file():
        raise MedvitError(f"pneumoniamnist source not found: {source}")
    digest = sha256_file(source)
    if digest != PNEUMONIAMNIST_SHA256:
        raise MedvitError(f"{source} is not the known pneumoniamnist.npz: SHA-256 {digest}, expected "
                          f"{PNEUMONIAMNIST_SHA256}")
    print(f"pneumoniamnist: {source} (SHA-256 verified) -> {out_dir}", flush=True)
    rows = []
    with np.load(source, allow_pickle=False) as data:
        for split in ("train", "val", "test"):
            try:
                images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
            except KeyError as exc:
                raise MedvitError(f"{source} has no array {exc}; expected <split>_images and <split>_labels") from None
            if limit is not None:
                images, labels = images[:limit], labels[:limit]
            folder = out_dir / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in tqdm(range(len(images)), desc=f"pneumoniamnist {split}", unit="img", disable=None):
                sid = f"pmn-{split}-{i + 1:05d}"
                rel = f"images/{split}/{sid}.png"
                Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8)).save(out_dir / rel)
                rows.append({"patient_id": sid, "sample_id": sid, "image": rel,
                             "label": PNEUMONIAMNIST_CLASSES[int(labels[i])], "split": split, "source_index": i})
            counts = pd.Series(labels).map(lambda v: PNEUMONIAMNIST_CLASSES[int(v)]).value_counts()
            print(f"  {split}: {len(images)} images ({', '.join(f'{c} {counts.get(c, 0)}' for c in PNEUMONIAMNIST_CLASSES)})",
                  flush=True)
    manifest = out_dir / "manifest.csv"
    _write_atomic_csv(pd.DataFrame(rows), manifest)
    (out_dir / "ATTRIBUTION.md").write_text(
        "# PneumoniaMNIST (class-balanced subset) -- attribution and licence\n\n"
        f"Imported by `medvit import pneumoniamnist` from a file with SHA-256 {PNEUMONIAMNIST_SHA256}.\n"
        "No patient ids are included: each image is treated as its own patient.\n\n"
        + PNEUMONIAMNIST_ATTRIBUTION, encoding="utf-8")
    return manifest


IMPORTERS: dict[str, Callable[..., Path]] = {"pneumoniamnist": import_pneumoniamnist}


def import_dataset(name: str, source: str | Path, out_dir: str | Path, limit: int | None = None) -> Path:
    """Import a shipped dataset by name (``medvit import NAME SOURCE --out DIR``).

    Args:
        name: one of :data:`IMPORTERS` (``"pneumoniamnist"``).
        source: the dataset file.
        out_dir: output folder for images, manifest and attribution.
        limit: import only the first ``limit`` samples of each split.

    Returns:
        Path of the written manifest.

    Raises:
        MedvitError: unknown dataset, or the importer's own errors.
    """
    if name not in IMPORTERS:
        raise MedvitError(f"unknown dataset {name!r}; known: {', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[name](source, out_dir, limit=limit)


__all__ = ["import_dataset", "import_pneumoniamnist", "IMPORTERS", "PNEUMONIAMNIST_SHA256"]
