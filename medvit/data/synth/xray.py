"""Chest radiographs (PA/AP), 2-4 per patient, multi-label findings.

Findings and their image signatures:
  * cardiomegaly: heart silhouette 25-55 % wider (cardiothoracic ratio > ~0.5);
    anatomical, so it persists in every image of the patient.
  * effusion: fluid opacity at one lung base with a lateral meniscus.
  * consolidation: patchy airspace opacity in a lung zone.
  * nodule: a small round Gaussian opacity (sigma 2-4 % of the image width) in a lung field.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from medvit.data.synth.common import Sample, png_writer, positive_patients
from medvit.data.synth.shapes import ellipse_r, grid2d, inside, noise

XRAY_FINDINGS: tuple[str, ...] = ("cardiomegaly", "consolidation", "effusion", "nodule")
_XRAY_PREVALENCE = {"cardiomegaly": 0.30, "consolidation": 0.20, "effusion": 0.25, "nodule": 0.25}
# Synthetic studies get UIDs under pydicom's example root; never a real organisation's.
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
COLUMNS = ["patient_id", "study_id", "sample_id", "image", "labels", "view"]
_FORMATS = ("dicom", "png16", "png8")
_PERSIST = 0.85  # probability a patient's acute finding is visible on a follow-up image
_ACUTE_NEW = 0.04  # probability an acute finding appears on a follow-up image
_LABEL_NOISE = 0.04  # reader error per (follow-up image, finding)


def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    findings = {f: positive_patients(rng, n, _XRAY_PREVALENCE[f]) for f in XRAY_FINDINGS}
    # One "site" per patient decides the file format, so every format is represented.
    formats = rng.permutation(np.resize(np.arange(len(_FORMATS)), n))
    plans = []
    n_dicom = 0
    for i in range(n):
        fmt = _FORMATS[formats[i]]
        plans.append({
            "findings": {f: bool(findings[f][i]) for f in XRAY_FINDINGS},
            "format": fmt,
            # Alternate DICOM vendors: CR/DX and, every third DICOM patient, MONOCHROME1.
            "dicom_modality": "CR" if n_dicom % 2 == 0 else "DX",
            "monochrome1": fmt == "dicom" and n_dicom % 3 == 1,
        })
        n_dicom += fmt == "dicom"
    return plans


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    labels = df["labels"].fillna("")
    counts = {f: int(labels.str.split("|").apply(lambda ls, f=f: f in ls).sum()) for f in XRAY_FINDINGS}
    counts["no_finding"] = int((labels == "").sum())
    return counts


def anatomy(rng: np.random.Generator, plan: dict[str, Any]) -> dict[str, Any]:
    f = plan["findings"]
    a = {
        "dy": rng.uniform(-0.06, 0.06), "dx": rng.uniform(-0.06, 0.06),
        "rot": rng.uniform(-0.07, 0.07), "scale": rng.uniform(0.9, 1.04),
        "body_w": rng.uniform(0.82, 0.98),
        "lung_w": rng.uniform(0.92, 1.06), "lung_h": rng.uniform(0.9, 1.06),
        "heart_rx": 0.25 * rng.uniform(0.88, 1.12), "heart_ry": 0.27 * rng.uniform(0.92, 1.08),
        "rib_amp": rng.uniform(0.03, 0.09), "rib_freq": rng.uniform(4.5, 6.0),
        "vessel_amp": rng.uniform(0.02, 0.05),
        "d_lo": rng.uniform(-0.12, 0.0), "d_hi": rng.uniform(0.75, 0.95),
        "gamma": rng.uniform(0.7, 1.4), "noise": rng.uniform(0.008, 0.035),
        "blur": rng.uniform(0.3, 1.0),
        "view": "PA" if rng.random() < 0.7 else "AP",
    }
    if f["cardiomegaly"]:
        a["heart_rx"] *= rng.uniform(1.25, 1.55)
    # Lesion properties are fixed per patient (the same nodule on every image);
    # amplitudes are drawn wide so some cases are barely visible.
    side = lambda: -1 if rng.random() < 0.5 else 1  # noqa: E731  (-1 = image left)
    a["effusion"] = {"side": side(), "h": rng.uniform(0.1, 0.3), "amp": rng.uniform(0.4, 1.0)}
    a["consolidation"] = {"side": side(), "u": rng.uniform(-0.6, 0.6), "v": rng.uniform(-0.5, 0.5),
                          "r": rng.uniform(0.13, 0.24), "amp": rng.uniform(0.4, 1.0)}
    nod_side = side()
    while True:  # a point well inside the lung ellipse, above the base
        u, v = rng.uniform(-0.75, 0.55), rng.uniform(-0.7, 0.7)
        if u * u + v * v < 0.55:
            break
    a["nodule"] = {"side": nod_side, "u": u, "v": v, "sigma": rng.uniform(0.045, 0.075),
                   "amp": rng.uniform(0.3, 0.55)}
    return a


def render(rng: np.random.Generator, size: int, a: dict[str, Any], shown: dict[str, bool]) -> np.ndarray:
    """One radiograph, float in [0, 1] (display: bright = attenuating), shape (size, size)."""
    yy, xx = grid2d(size)
    th = a["rot"] + rng.uniform(-0.02, 0.02)
    sc = a["scale"] * rng.uniform(0.98, 1.02)
    dy, dx = a["dy"] + rng.uniform(-0.02, 0.02), a["dx"] + rng.uniform(-0.02, 0.02)
    c, s = math.cos(th), math.sin(th)
    # Image -> patient coordinates (a rigid jitter of the patient in the field).
    y = ((yy - dy) * c - (xx - dx) * s) / sc
    x = ((yy - dy) * s + (xx - dx) * c) / sc
    lw, lh = a["lung_w"], a["lung_h"] * rng.uniform(0.97, 1.03)  # inspiration varies

    # A squarish (superelliptic) trunk that fills most of the field.
    body = inside(((np.abs(y - 0.15) / 1.25) ** 3 + (np.abs(x) / a["body_w"]) ** 3) ** (1 / 3), 0.04)
    lungs, base = {}, {}
    for sgn in (-1, 1):
        cx, cy, ry, rx = sgn * 0.36 * lw, -0.1, 0.6 * lh, 0.25 * lw
        lat = np.clip((x - cx) * sgn / rx, -1, 1)  # +1 lateral, -1 medial
        base[sgn] = cy + 0.78 * ry
        y_base = base[sgn] + 0.08 * lat  # diaphragm dome: costophrenic angle lowest
        lungs[sgn] = inside(ellipse_r(y, x, cy, cx, ry, rx, -sgn * 0.1), 0.05) * expit((y_base - y) / 0.025)
    lung = np.maximum(lungs[-1], lungs[1])
    hrx, hry = a["heart_rx"], a["heart_ry"]
    heart = inside(ellipse_r(y, x, 0.28, 0.08 + (hrx - 0.25) * 0.6, hry, hrx, 0.35), 0.04)
    med = expit((0.11 - np.abs(x - 0.01)) / 0.02) * expit((0.35 - y) / 0.05)
    knob = inside(ellipse_r(y, x, -0.22, 0.12, 0.08, 0.08), 0.1)
    air = lung * (1 - heart) * (1 - med) * (1 - knob)
    d = 0.6 * body - 0.45 * air + 0.05 * heart * body
    d += 0.08 * expit((0.06 - np.abs(x)) / 0.02) * body  # spine
    thorax = inside(ellipse_r(y, x, -0.05, 0.0, 0.75 * lh, 0.72 * lw), 0.05)
    d += a["rib_amp"] * (0.5 + 0.5 * np.cos(2 * np.pi * (y + 0.35 * x**2) * a["rib_freq"])) ** 8 * thorax
    ax = np.abs(x)
    clav = (np.exp(-(((y - (-0.62 + 0.15 * (ax - 0.1))) / 0.025) ** 2)) * expit((ax - 0.08) / 0.02)
            * expit((0.6 - ax) / 0.03))
    d += 0.12 * clav
    px = size / 2.0  # pixels per normalised unit
    vessels = np.clip(noise(rng, (size, size), 0.02 * px), 0, None)
    hilum = sum(np.exp(-((x - sgn * 0.15) ** 2 + y**2) / 0.15) for sgn in (-1, 1))
    d += a["vessel_amp"] * vessels * lung * (0.4 + hilum)

    if shown["effusion"]:
        e = a["effusion"]
        sgn = e["side"]
        cx, rx = sgn * 0.36 * lw, 0.25 * lw
        lat = np.clip((x - cx) * sgn / rx, 0, 1)
        y_surf = base[sgn] - e["h"] - 0.1 * lat  # meniscus climbs laterally
        amp = e["amp"] * rng.uniform(0.85, 1.15)
        d += amp * 0.42 * expit((y - y_surf) / 0.03) * lungs[sgn] * (1 - heart)
    if shown["consolidation"]:
        e = a["consolidation"]
        sgn = e["side"]
        cy, cx = -0.1 + e["v"] * 0.6 * lh, sgn * 0.36 * lw + e["u"] * 0.25 * lw * 0.7
        patchy = np.clip(0.5 + 0.7 * noise(rng, (size, size), 0.05 * px), 0, 1)
        amp = e["amp"] * rng.uniform(0.85, 1.15)
        d += amp * 0.4 * inside(ellipse_r(y, x, cy, cx, e["r"], e["r"] * 0.8), 0.15) * patchy * lungs[sgn]
    if shown["nodule"]:
        e = a["nodule"]
        sgn = e["side"]
        cy, cx = -0.1 + e["v"] * 0.6 * lh, sgn * 0.36 * lw + e["u"] * 0.25 * lw
        d += e["amp"] * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * e["sigma"] ** 2))

    v = (d - a["d_lo"]) / (a["d_hi"] - a["d_lo"]) * rng.uniform(0.95, 1.05)  # exposure
    v = gaussian_filter(v, a["blur"] * size / 64.0)
    v = np.clip(v, 0, 1) ** a["gamma"]
    v = v + a["noise"] * rng.standard_normal(v.shape)
    return np.clip(v, 0, 1)


def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[Sample]:
    a = anatomy(rng, plan)
    has = plan["findings"]
    n_img = int(rng.integers(2, 5))
    fake_name = "SYNTH^" + "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 6))
    fake_mrn = f"SYN{rng.integers(0, 10**7):07d}"
    birth = f"19{rng.integers(30, 99)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    sex = "F" if rng.random() < 0.5 else "M"
    day0 = int(rng.integers(0, 3000))
    samples = []
    for k in range(n_img):
        if k == 0:  # the first image is a faithful, noise-free read of the patient's status
            shown = dict(has)
        else:
            shown = {"cardiomegaly": has["cardiomegaly"]}
            for f in ("effusion", "consolidation"):
                shown[f] = rng.random() < (_PERSIST if has[f] else _ACUTE_NEW)
            shown["nodule"] = has["nodule"] and rng.random() < 0.95
        img = render(rng, size, a, shown)
        reported = dict(shown)
        if k > 0:
            for f in XRAY_FINDINGS:
                if rng.random() < _LABEL_NOISE:
                    reported[f] = not reported[f]
        sid = f"{pid}_{k:02d}"
        study_id = f"{pid}_st{k:02d}"
        fmt = plan["format"]
        if fmt == "dicom":
            rel = f"images/{pid}/{sid}.dcm"
            writer = dicom_writer(
                img, seed=seed, pid=pid, k=k, modality=plan["dicom_modality"],
                monochrome1=plan["monochrome1"], name=fake_name, mrn=fake_mrn, birth=birth, sex=sex,
                day=day0 + 30 * k, view=a["view"], size=size,
            )
        elif fmt == "png16":
            rel = f"images/{pid}/{sid}.png"
            writer = png_writer(np.round(img * 65535).astype(np.uint16))
        else:
            rel = f"images/{pid}/{sid}.png"
            writer = png_writer(np.round(img * 255).astype(np.uint8))
        labels = "|".join(f for f in XRAY_FINDINGS if reported[f])
        row = {"patient_id": pid, "study_id": study_id, "sample_id": sid, "image": rel,
               "labels": labels, "view": a["view"]}
        samples.append(Sample(row, [(rel, writer)]))
    return samples


def dicom_writer(img: np.ndarray, *, seed: int, pid: str, k: int, modality: str, monochrome1: bool,
                 name: str, mrn: str, birth: str, sex: str, day: int, view: str,
                 size: int) -> Callable[[Path], None]:
    """A CR/DX DICOM file (Explicit VR Little Endian, 12 bits stored in 16) of one radiograph."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    sop_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[modality]
    pixels = np.round(img * 4095).astype(np.uint16)
    photometric = "MONOCHROME2"
    if monochrome1:  # MONOCHROME1 stores inverted values: readers must flip them back
        pixels = (4095 - pixels).astype(np.uint16)
        photometric = "MONOCHROME1"
    date = (dt.date(2015, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d")
    spacing = round(0.14 * 2500 / size, 4)  # a 35 cm detector, whatever the matrix size

    def write(path: Path) -> None:
        sop_uid = uid(seed, "xray", pid, k, "sop")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = uid(seed, "xray", pid, k, "study")
        ds.SeriesInstanceUID = uid(seed, "xray", pid, k, "series")
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = ""
        ds.StudyID = str(k + 1)
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.Modality = modality
        ds.Manufacturer = "medvit synthetic"
        ds.InstitutionName = "SYNTHETIC"
        ds.ReferringPhysicianName = ""
        # Fake identifiers (synthetic people) so ingest/pseudonymisation can be exercised.
        ds.PatientName = name
        ds.PatientID = mrn
        ds.PatientBirthDate = birth
        ds.PatientSex = sex
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = view
        ds.PatientOrientation = ["L", "F"] if view == "PA" else ["R", "F"]
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.PixelSpacing = [spacing, spacing]
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        ds.set_pixel_data(pixels, photometric, 12, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)

    return write


def uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=_UID_PREFIX, entropy_srcs=["medvit-synth", str(seed), *map(str, parts)]))
