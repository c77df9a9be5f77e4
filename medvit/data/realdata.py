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

from medvit.config import SOURCES
from medvit.errors import MedvitError
from medvit.fileio import sha256_file

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


NIH_CXR14_SHA256 = "20d28d54107a12b1d116e28983e3486853050a7f58987ea3297bc96d698f7207"
NIH_CXR14_ATTRIBUTION = """\
- Source dataset: NIH Clinical Center ChestX-ray14. Xiaosong Wang, Yifan Peng, Le Lu, Zhiyong Lu,
  Mohammadhadi Bagheri, Ronald M. Summers. "ChestX-ray8: Hospital-scale Chest X-ray Database and
  Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases."
  CVPR 2017. NIH states the data may be used without restriction; acknowledge the NIH Clinical
  Center as the source and cite the paper. Keep this attribution with the file.
- Where from: images from GitHub `dinbe0527/kcr2019d1` (`NIH1000/`); labels joined from the
  ChestX-ray14 label lists in GitHub `arnoweng/CheXNet` (`ChestX-ray14/labels/`).
"""

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCES: dict[str, Path] = SOURCES
"""Where ``medvit import NAME`` reads each dataset when no source is given (relative to the
repository root; a path the user gives is read as given). The same table names the file a
study's ``source`` imports."""


def default_source(name: str) -> Path:
    """The default file of dataset ``name``: :data:`DEFAULT_SOURCES` under the repository root."""
    if name not in DEFAULT_SOURCES:
        raise MedvitError(f"unknown dataset {name!r}; known: {', '.join(sorted(DEFAULT_SOURCES))}")
    return Path(os.path.normpath(_REPO_ROOT / DEFAULT_SOURCES[name]))


def _verify_source(source: Path, filename: str, expected: str) -> None:
    """Refuse a missing file or one whose SHA-256 is not ``expected``."""
    if not source.is_file():
        raise MedvitError(f"{filename} source not found: {source}")
    digest = sha256_file(source)
    if digest != expected:
        raise MedvitError(f"{source} is not the known {filename}: SHA-256 {digest}, expected {expected}")


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
    _verify_source(source, "pneumoniamnist.npz", PNEUMONIAMNIST_SHA256)
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
            print(f"  {split}: {len(images)} images "
                  f"({', '.join(f'{c} {counts.get(c, 0)}' for c in PNEUMONIAMNIST_CLASSES)})",
                  flush=True)
    manifest = out_dir / "manifest.csv"
    _write_atomic_csv(pd.DataFrame(rows), manifest)
    (out_dir / "ATTRIBUTION.md").write_text(
        "# PneumoniaMNIST (class-balanced subset) -- attribution and licence\n\n"
        f"Imported by `medvit import pneumoniamnist` from a file with SHA-256 {PNEUMONIAMNIST_SHA256}.\n"
        "No patient ids are included: each image is treated as its own patient.\n\n"
        + PNEUMONIAMNIST_ATTRIBUTION, encoding="utf-8")
    return manifest


def import_nih_cxr14(source: str | Path, out_dir: str | Path, limit: int | None = None) -> Path:
    """Turn ``chestxray14_nih1000_64.npz`` into 64x64 PNGs and a multi-label manifest.

    1000 frontal NIH ChestX-ray14 radiographs of 264 patients with the 14 findings. Columns:
    ``patient_id`` (the NIH patient number, unpadded so it is no MRN-like digit run:
    ``nih-1234``), ``sample_id`` (the NIH file name without ``.png``, e.g. ``nih-00001234_001``), ``image``,
    ``labels`` (the findings present,
    ``|``-separated, names as in the file's ``class_names``, e.g. ``Effusion|Pleural_Thickening``;
    empty for no finding), ``split`` (the file's patient-disjoint ``chexnet_split``: train 725,
    val 94, test 181 images), ``kcr_split`` (the source repository's own split, ``valid``
    written ``val``; it puts patients in two splits, so the leakage guard refuses it as a
    split), ``follow_up``, ``image_index`` (the NIH file name) and ``source_index``.

    Args:
        source: the ``.npz`` file; its SHA-256 must match :data:`NIH_CXR14_SHA256`.
        out_dir: output folder; gets ``images/<split>/*.png``, ``manifest.csv`` and
            ``ATTRIBUTION.md``.
        limit: import only the first ``limit`` images of each ``chexnet_split`` split.

    Returns:
        Path of the manifest.

    Raises:
        MedvitError: missing source, checksum mismatch or unexpected contents.
    """
    source, out_dir = Path(source), Path(out_dir)
    _verify_source(source, "chestxray14_nih1000_64.npz", NIH_CXR14_SHA256)
    print(f"nih-cxr14: {source} (SHA-256 verified) -> {out_dir}", flush=True)
    with np.load(source, allow_pickle=False) as data:
        try:
            images, labels, names = data["images"], data["labels"], [str(c) for c in data["class_names"]]
            patients, follow_up = data["patient_id"], data["follow_up"]
            index, split, kcr = data["image_index"], data["chexnet_split"], data["kcr_split"]
        except KeyError as exc:
            raise MedvitError(f"{source} has no array {exc}; expected images, labels, class_names, patient_id, "
                              "follow_up, image_index, chexnet_split, kcr_split") from None
    if images.shape[1:] != (64, 64) or labels.shape != (len(images), len(names)):
        raise MedvitError(f"{source}: unexpected shapes images {images.shape}, labels {labels.shape}")
    rows, taken = [], {}
    for i in tqdm(range(len(images)), desc="nih-cxr14", unit="img", disable=None):
        sp = str(split[i])
        if limit is not None and taken.get(sp, 0) >= limit:
            continue
        taken[sp] = taken.get(sp, 0) + 1
        sid = "nih-" + Path(str(index[i])).stem
        rel = f"images/{sp}/{sid}.png"
        (out_dir / "images" / sp).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8)).save(out_dir / rel)
        kcr_value = str(kcr[i])
        rows.append({"patient_id": f"nih-{int(patients[i])}", "sample_id": sid, "image": rel,
                     "labels": "|".join(n for n, v in zip(names, labels[i]) if v),
                     "split": sp, "kcr_split": "val" if kcr_value == "valid" else kcr_value,
                     "follow_up": int(follow_up[i]), "image_index": str(index[i]), "source_index": i})
    df = pd.DataFrame(rows)
    for sp in ("train", "val", "test"):
        part = df[df["split"] == sp]
        print(f"  {sp}: {len(part)} images of {part['patient_id'].nunique()} patients, "
              f"{(part['labels'] != '').sum()} with a finding", flush=True)
    manifest = out_dir / "manifest.csv"
    _write_atomic_csv(df, manifest)
    (out_dir / "ATTRIBUTION.md").write_text(
        "# NIH ChestX-ray14 (1000-image subset, 64 px) -- attribution\n\n"
        f"Imported by `medvit import nih-cxr14` from a file with SHA-256 {NIH_CXR14_SHA256}.\n"
        "Patient ids are the NIH patient numbers; `split` is the patient-disjoint CheXNet split.\n\n"
        + NIH_CXR14_ATTRIBUTION, encoding="utf-8")
    return manifest


LGG_SHA256 = "8df7dbce8c223ba65b601e1d89c7548ed67de0e0724ad1c0dd3edb3b7b745813"
LGG_CHANNELS = ("pre", "flair", "post")  # the file's channel_names: pre-contrast, FLAIR, post-contrast
LGG_ATTRIBUTION = """\
- Source: images from The Cancer Imaging Archive, TCGA-LGG collection; masks from Mateusz Buda,
  Ashirbani Saha, Maciej A. Mazurowski, "Association of genomic subtypes of lower-grade gliomas
  with shape features automatically extracted by a deep learning algorithm", Computers in
  Biology and Medicine, 2019 (their U-Net: 83.6% mean Dice, 22-fold cross-validation, 3D).
- Where from: GitHub `TruongVanHien194276/Brain_Segmentation_data` (`kaggle_3m/`, the "LGG
  Segmentation Dataset" as published on Kaggle), resized from 256 px (bilinear images, nearest masks).
- Licence: not stated in the source files; the Kaggle listing is believed to be CC BY-NC-SA 4.0
  and TCIA's data-use terms apply to the images. Use it for research checks and benchmarks; do
  not copy it into a project or redistribute it.
"""

KATHER_SHA256 = "8494fe18421c1a6c34ed325b1973bf3dc427ec5d15b6112657982495471be7fa"
KATHER_ATTRIBUTION = """\
- Source: Jakob Nikolas Kather et al., "Multi-class texture analysis in colorectal cancer
  histology", Scientific Reports 2016 (Zenodo record 53169). Licence: CC BY 4.0; keep this
  attribution with the file.
- Where from: GitHub `Ishil-Puri/colorectal-classifier` (`src/img/test_images/`, 100 tiles, label
  digit in the file name in the order above) and `zeeshanalipnhwr/Texture-Classification-in-Colorectal-Cancer-Histology`
  (`Images/Samples/`, 24 tiles with their original names); resized from 150/224 px.
"""


def _png16(channel: np.ndarray) -> Image.Image:
    """A 16-bit grayscale PNG of an 8-bit channel, scaled by 257 (0 -> 0, 255 -> 65535; exact,
    ``value // 257`` restores it)."""
    return Image.fromarray(np.ascontiguousarray(channel, dtype=np.uint16) * np.uint16(257))


def yolo_box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The YOLO box (``cx cy w h``, normalised to the image) around every non-zero pixel of a 2D
    mask, with pixel edges: a box from column ``x0`` to ``x1`` (inclusive) spans ``x1 + 1 - x0``
    pixels. None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h


def import_lgg(source: str | Path, out_dir: str | Path, limit: int | None = None) -> Path:
    """Turn ``lgg_brain_mri_128.npz`` (TCGA-LGG brain MRI, read from where it lies; its licence
    does not allow shipping it) into slice files, masks, YOLO boxes and a manifest.

    869 axial 128x128 slices of 110 patients with lower-grade glioma (438 with tumour, 431
    tumour-free). Per slice: ``images/<patient>/<sample>_{pre,flair,post}.png``, one 16-bit
    grayscale PNG per sequence (pre-contrast, FLAIR, post-contrast; the 8-bit source values
    times 257, so 16-bit data would pass the same way), stacked by the manifest's
    ``image_pre, image_flair, image_post`` columns into 3 channels; ``masks/<patient>/<sample>.png``
    (uint8, 1 = FLAIR abnormality); and for a tumour slice ``labels/<patient>/<sample>.txt``, the
    YOLO box around all mask pixels (``0 cx cy w h``), as the brain detector reads it
    (``boxes`` is empty for a tumour-free slice: a background image). Manifest columns:
    ``patient_id`` (the TCGA patient, e.g. ``TCGA_CS_4941``), ``study_id`` (``<patient>_mri``: the
    source has one scan per patient, the detector's window volume), ``sample_id``
    (``<patient>_s<slice>``), the three
    image columns, ``mask``, ``label`` (``tumor``/``normal``), ``boxes``, ``slice_index``,
    ``n_slices``, ``source_index``. No ``split`` column: the study splits by patient.

    Every patient has a tumour (there are tumour-free slices but no tumour-free patients), so
    patient-level normal-vs-tumour metrics cannot be computed on this set.

    Args:
        source: the ``.npz`` file; its SHA-256 must match :data:`LGG_SHA256`.
        out_dir: output folder (results/..., never the repository's data_manifests/).
        limit: import only the slices of the first ``limit`` patients (for quick tests).

    Returns:
        Path of the manifest.

    Raises:
        MedvitError: missing source, checksum mismatch or unexpected contents.
    """
    source, out_dir = Path(source), Path(out_dir)
    _verify_source(source, "lgg_brain_mri_128.npz", LGG_SHA256)
    print(f"lgg: {source} (SHA-256 verified) -> {out_dir}", flush=True)
    with np.load(source, allow_pickle=False) as data:
        try:
            images, masks, has_tumor = data["images"], data["masks"], data["has_tumor"]
            patients, cases = data["patient_id"], data["case_id"]
            slices, n_slices = data["slice_index"], data["n_slices_in_case"]
        except KeyError as exc:
            raise MedvitError(f"{source} has no array {exc}; expected images, masks, has_tumor, patient_id, case_id, "
                              "slice_index, n_slices_in_case") from None
    if images.ndim != 4 or images.shape[3] != 3 or masks.shape != images.shape[:3]:
        raise MedvitError(f"{source}: unexpected shapes images {images.shape}, masks {masks.shape}")
    keep = sorted(set(map(str, patients)))[:limit] if limit is not None else None
    rows = []
    for i in tqdm(range(len(images)), desc="lgg", unit="slice", disable=None):
        pid, case = str(patients[i]), str(cases[i])
        if keep is not None and pid not in keep:
            continue
        # ids and file names from the patient id: the source's case ids end in the scan's
        # acquisition date, which a pseudonymous id should not carry
        if not case.startswith(f"{pid}_"):
            raise MedvitError(f"{source}: slice {i} of patient {pid} belongs to case {case}, not one of that patient")
        study = f"{pid}_mri"
        sid = f"{pid}_s{int(slices[i]):03d}"
        row = {"patient_id": pid, "study_id": study, "sample_id": sid}
        (out_dir / "images" / pid).mkdir(parents=True, exist_ok=True)
        for c, name in enumerate(LGG_CHANNELS):
            rel = f"images/{pid}/{sid}_{name}.png"
            _png16(images[i, :, :, c]).save(out_dir / rel)
            row[f"image_{name}"] = rel
        mask = (masks[i] > 0).astype(np.uint8)
        if bool(mask.any()) != bool(has_tumor[i]):
            raise MedvitError(f"{source}: slice {i} has_tumor={int(has_tumor[i])} but its mask has {int(mask.sum())} "
                              "pixels")
        row["mask"] = f"masks/{pid}/{sid}.png"
        (out_dir / "masks" / pid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(out_dir / row["mask"])
        box = yolo_box_from_mask(mask)
        row["label"] = "tumor" if box is not None else "normal"
        row["boxes"] = ""
        if box is not None:
            row["boxes"] = f"labels/{pid}/{sid}.txt"
            (out_dir / "labels" / pid).mkdir(parents=True, exist_ok=True)
            (out_dir / row["boxes"]).write_text("0 " + " ".join(f"{v:.6f}" for v in box) + "\n", encoding="ascii")
        rows.append({**row, "slice_index": int(slices[i]), "n_slices": int(n_slices[i]), "source_index": i})
    df = pd.DataFrame(rows)
    counts = df["label"].value_counts()
    print(f"  {len(df)} slices of {df['patient_id'].nunique()} patients: tumor {counts.get('tumor', 0)}, "
          f"normal {counts.get('normal', 0)} (every patient has a tumour)", flush=True)
    manifest = out_dir / "manifest.csv"
    _write_atomic_csv(df, manifest)
    (out_dir / "ATTRIBUTION.md").write_text(
        "# LGG brain MRI (TCGA-LGG, Buda et al. masks), 128 px -- attribution and licence\n\n"
        f"Imported by `medvit import lgg` from a file with SHA-256 {LGG_SHA256}.\n"
        "Every patient has a tumour: patient-level normal-vs-tumour metrics cannot be computed on it.\n\n"
        + LGG_ATTRIBUTION, encoding="utf-8")
    print("  licence: research use only, not redistributable (see ATTRIBUTION.md)", flush=True)
    return manifest


def _kather_class(name: str) -> str:
    """``01_TUMOR`` -> ``tumor``."""
    return name.split("_", 1)[-1].lower()


def import_kather2016(source: str | Path, out_dir: str | Path, limit: int | None = None) -> Path:
    """Turn ``kather2016_he_96.npz`` (124 colorectal H&E tiles, 8 tissue classes) into RGB PNGs
    and a manifest.

    Columns: ``patient_id``, ``sample_id`` (``kather-0001`` ...), ``image``, ``label`` (the
    tissue class: ``tumor``, ``stroma``, ``complex``, ``lympho``, ``debris``, ``mucosa``,
    ``adipose``, ``empty``), ``slide_id`` and ``source``, ``source_index``. 24 tiles carry their
    slide (``CRC-Prim-HE-01`` .. ``10``): their patient is the slide (``kather-CRC-Prim-HE-02``),
    so tiles of one slide stay in one split or fold. The other 100 have no known slide: each is
    its own patient (``patient_id`` = ``sample_id``). Those tiles may in truth share slides with
    each other or with the known ones, which patient-level splitting cannot rule out; results on
    them are tile-level. No ``split`` column: the study splits (or cross-validates) by patient.

    Args:
        source: the ``.npz`` file; its SHA-256 must match :data:`KATHER_SHA256`.
        out_dir: output folder; gets ``images/<class>/*.png``, ``manifest.csv``, ``ATTRIBUTION.md``.
        limit: import only the first ``limit`` tiles.

    Returns:
        Path of the manifest.

    Raises:
        MedvitError: missing source, checksum mismatch or unexpected contents.
    """
    source, out_dir = Path(source), Path(out_dir)
    _verify_source(source, "kather2016_he_96.npz", KATHER_SHA256)
    print(f"kather2016: {source} (SHA-256 verified) -> {out_dir}", flush=True)
    with np.load(source, allow_pickle=False) as data:
        try:
            images, labels = data["images"], data["labels"]
            names = [_kather_class(str(c)) for c in data["class_names"]]
            slides, origin = data["slide_ids"], data["source"]
        except KeyError as exc:
            raise MedvitError(f"{source} has no array {exc}; expected images, labels, class_names, slide_ids, "
                              "source") from None
    if images.ndim != 4 or images.shape[3] != 3 or len(labels) != len(images):
        raise MedvitError(f"{source}: unexpected shapes images {images.shape}, labels {labels.shape}")
    n = len(images) if limit is None else min(limit, len(images))
    rows = []
    for i in range(n):
        sid, label, slide = f"kather-{i + 1:04d}", names[int(labels[i])], str(slides[i])
        rel = f"images/{label}/{sid}.png"
        (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8), mode="RGB").save(out_dir / rel)
        rows.append({"patient_id": f"kather-{slide}" if slide else sid, "sample_id": sid, "image": rel,
                     "label": label, "slide_id": slide, "source": str(origin[i]), "source_index": i})
    df = pd.DataFrame(rows)
    known = (df["slide_id"] != "").sum()
    print(f"  {len(df)} tiles, {df['patient_id'].nunique()} patients ({known} tiles of "
          f"{df.loc[df['slide_id'] != '', 'slide_id'].nunique()} known slides; {len(df) - known} tiles without a "
          "slide, "
          "each its own patient)", flush=True)
    print("  " + ", ".join(f"{c} {int((df['label'] == c).sum())}" for c in names), flush=True)
    manifest = out_dir / "manifest.csv"
    _write_atomic_csv(df, manifest)
    (out_dir / "ATTRIBUTION.md").write_text(
        "# Kather 2016 colorectal H&E tiles (124, 96 px) -- attribution and licence\n\n"
        f"Imported by `medvit import kather2016` from a file with SHA-256 {KATHER_SHA256}.\n"
        "Tiles without a known slide are treated as their own patient.\n\n" + KATHER_ATTRIBUTION, encoding="utf-8")
    return manifest


IMPORTERS: dict[str, Callable[..., Path]] = {"pneumoniamnist": import_pneumoniamnist,
                                             "nih-cxr14": import_nih_cxr14,
                                             "lgg": import_lgg, "kather2016": import_kather2016}


def import_dataset(name: str, source: str | Path | None, out_dir: str | Path, limit: int | None = None) -> Path:
    """Import a shipped dataset by name (``medvit import NAME [SOURCE] --out DIR``).

    Args:
        name: one of :data:`IMPORTERS`.
        source: the dataset file; None reads :func:`default_source`.
        out_dir: output folder for images, manifest and attribution.
        limit: import only the first ``limit`` samples of each split.

    Returns:
        Path of the written manifest.

    Raises:
        MedvitError: unknown dataset, or the importer's own errors.
    """
    if name not in IMPORTERS:
        raise MedvitError(f"unknown dataset {name!r}; known: {', '.join(sorted(IMPORTERS))}")
    if source is None:
        source = default_source(name)
    return IMPORTERS[name](source, out_dir, limit=limit)


__all__ = ["import_dataset", "import_pneumoniamnist", "import_nih_cxr14", "default_source", "IMPORTERS",
           "DEFAULT_SOURCES", "PNEUMONIAMNIST_SHA256", "NIH_CXR14_SHA256", "import_lgg", "import_kather2016",
           "yolo_box_from_mask", "LGG_SHA256", "KATHER_SHA256"]
