"""Synthetic medical imaging studies: real files plus a Contract-1 manifest.

Four modalities mirror the systems medvit reproduces:

* ``xray``: chest radiographs with multi-label findings (PNG 8/16-bit and DICOM CR/DX).
* ``brain``: axial MRI slices (16-bit PNG) with tumour labels and YOLO boxes.
* ``prostate``: 3-channel bpMRI volumes (T2w/ADC/HBV NIfTI) with a lesion mask.
* ``histo``: H&E-like RGB patches with benign/malignant labels and four subtypes.

Every study is learnable but not trivial: patients differ in nuisance factors (position,
size, contrast, stain, noise, scanner), lesion contrast ranges from obvious to barely
visible, there are lesion mimics and (for ``xray``) a little label noise. A study is a
pure function of ``(modality, n_patients, seed, image_size)``: the same arguments write the
same files byte for byte. Patient ``i`` draws from its own random stream, so its anatomy
does not change when ``n_patients`` changes (study-level assignments such as which
patients are positive do).

The user documentation (contents, signal, sizes, timings) is ``docs/synthetic.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from medvit import __version__
from medvit.errors import MedvitError

__all__ = [
    "MODALITIES",
    "DEFAULT_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "MIN_PATIENTS",
    "XRAY_FINDINGS",
    "HISTO_SUBTYPES",
    "SynthError",
    "synthesize",
]

MODALITIES: tuple[str, ...] = ("xray", "brain", "prostate", "histo")
DEFAULT_IMAGE_SIZE: dict[str, int] = {"xray": 64, "brain": 64, "prostate": 32, "histo": 64}
MIN_IMAGE_SIZE: dict[str, int] = {"xray": 32, "brain": 32, "prostate": 16, "histo": 32}
# Upper bounds keep a typo (e.g. 5120 instead of 512) from filling the disk.
MAX_IMAGE_SIZE: dict[str, int] = {"xray": 1024, "brain": 1024, "prostate": 256, "histo": 1024}
# Four patients is the least that can hold both classes of every task (and the four histo
# subtypes, each patient having exactly one).
MIN_PATIENTS = 4
# Progress bars appear from this many patients on (small studies finish in a second).
PROGRESS_MIN_PATIENTS = 100

XRAY_FINDINGS: tuple[str, ...] = ("cardiomegaly", "consolidation", "effusion", "nodule")
_XRAY_PREVALENCE = {"cardiomegaly": 0.30, "consolidation": 0.20, "effusion": 0.25, "nodule": 0.25}
HISTO_SUBTYPES: dict[str, str] = {
    "adenosis": "benign",
    "fibroadenoma": "benign",
    "ductal_carcinoma": "malignant",
    "lobular_carcinoma": "malignant",
}
HISTO_MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")
_TUMOUR_FRACTION = 0.35  # brain tumour patients (paper: 30 of 81) and prostate csPCa patients
_PATIENT_PREFIX = {"xray": "XR", "brain": "BR", "prostate": "PR", "histo": "HI"}
_MODALITY_KEY = {"xray": 1, "brain": 2, "prostate": 3, "histo": 4}
SITES = 3  # synthetic acquisition sites in the `site` column
# Synthetic studies get UIDs under pydicom's example root; never a real organisation's.
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
PROSTATE_FOV_MM = 48.0


class SynthError(MedvitError):
    """Bad arguments for :func:`synthesize` (unknown modality, too few patients, bad size)."""


@dataclass
class _Sample:
    """One manifest row plus the files it needs; the writer turns it into files."""

    row: dict[str, Any]
    files: list[tuple[str, Callable[[Path], None]]]  # (relative path, writer(abs_path))


# ----------------------------------------------------------------------------- public API


def synthesize(
    modality: str,
    n_patients: int,
    out_dir: str | Path,
    seed: int = 0,
    image_size: int | None = None,
) -> Path:
    """Generate a synthetic study: image files plus ``out_dir/manifest.csv``.

    Args:
        modality: one of :data:`MODALITIES`.
        n_patients: number of patients (at least :data:`MIN_PATIENTS`).
        out_dir: folder to write into (created; files of an earlier run with the same
            names are overwritten, others are left alone).
        seed: non-negative integer; the same arguments give byte-identical files.
        image_size: side length in pixels (2D) or voxels (``prostate``: in-plane size and
            depth, a cube). ``None`` uses :data:`DEFAULT_IMAGE_SIZE`.

    Returns:
        Path of the manifest (``out_dir/manifest.csv``). Paths in it are relative to
        ``out_dir``. Columns: ``patient_id, study_id, sample_id`` and, per modality,
        ``image, labels`` (xray), ``image, label, boxes, slice_index`` (brain),
        ``image_t2w, image_adc, image_hbv, mask, label`` (prostate) or
        ``image, label, subtype, magnification`` (histo), then ``sex`` (F/M) and ``site``
        (site_1..site_3) per patient, for subgroup analyses (``evaluation.subgroups``); they
        are drawn independently of the findings. There is no ``split`` column.

    Raises:
        SynthError: unknown modality, too few patients, image size out of range, bad seed.
    """
    modality, n_patients, seed, size = _check_args(modality, n_patients, seed, image_size)
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A run that fails half-way must not leave an older manifest pointing at new files.
        manifest.unlink(missing_ok=True)
    except OSError as exc:
        raise SynthError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc

    root = np.random.SeedSequence([seed, _MODALITY_KEY[modality]])
    # spawn(): child i depends only on (seed, modality, i), so patient i is the same
    # whatever n_patients is; child 0 drives study-level assignments.
    study_ss, *patient_ss = root.spawn(n_patients + 1)
    study_rng = np.random.default_rng(study_ss)
    width = max(4, len(str(n_patients)))
    pids = [f"{_PATIENT_PREFIX[modality]}{i + 1:0{width}d}" for i in range(n_patients)]
    make = _GENERATORS[modality]
    plan = make.plan(study_rng, n_patients)
    # Their own stream, so adding them left every image and label as it was.
    demographics_rng = np.random.default_rng(np.random.SeedSequence([seed, _MODALITY_KEY[modality], 1]))
    sexes = demographics_rng.choice(["F", "M"], n_patients)
    sites = demographics_rng.choice([f"site_{k}" for k in range(1, SITES + 1)], n_patients)

    rows: list[dict[str, Any]] = []
    for i in _progress(range(n_patients), modality, n_patients):
        rng = np.random.default_rng(patient_ss[i])
        for sample in make.patient(rng, pids[i], plan[i], size, seed):
            for rel, writer in sample.files:
                path = out / rel
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer(path)
                except OSError as exc:
                    raise SynthError(f"cannot write {path}: {exc.strerror or exc}") from exc
            rows.append({**sample.row, "sex": sexes[i], "site": sites[i]})

    df = pd.DataFrame(rows, columns=[*make.columns, "sex", "site"])
    _atomic_write_text(manifest, df.to_csv(index=False, lineterminator="\n"))
    info = {
        "generator": f"medvit.data.synth {__version__}",
        "modality": modality,
        "n_patients": n_patients,
        "n_samples": len(df),
        "seed": seed,
        "image_size": size,
        "classes": make.class_counts(df),
    }
    _atomic_write_text(out / "synth.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return manifest


# ----------------------------------------------------------------------------- arguments, IO


def _check_args(modality: Any, n_patients: Any, seed: Any, image_size: Any) -> tuple[str, int, int, int]:
    if modality not in MODALITIES:
        raise SynthError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)):
        raise SynthError(f"n_patients must be an integer, got {n_patients!r}")
    if n_patients < MIN_PATIENTS:
        raise SynthError(
            f"n_patients={n_patients} is too small for a {modality} study: at least {MIN_PATIENTS} "
            "patients are needed so that every class (and every histo subtype) is present"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    size = DEFAULT_IMAGE_SIZE[modality] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise SynthError(f"image_size must be an integer, got {image_size!r}")
    lo, hi = MIN_IMAGE_SIZE[modality], MAX_IMAGE_SIZE[modality]
    if not lo <= size <= hi:
        raise SynthError(
            f"image_size={size} is out of range for {modality}: allowed {lo}..{hi} "
            f"(default {DEFAULT_IMAGE_SIZE[modality]}); smaller images cannot show the anatomy"
        )
    return str(modality), int(n_patients), int(seed), int(size)


def _progress(it: range, modality: str, n: int) -> Iterator[int]:
    if n < PROGRESS_MIN_PATIENTS:
        return iter(it)
    from tqdm import tqdm

    return iter(tqdm(it, desc=f"synth {modality}", unit="patient", file=sys.stderr, dynamic_ncols=True))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _png_writer(arr: np.ndarray) -> Callable[[Path], None]:
    """PNG writer for uint8 (gray or RGB) or uint16 (gray) arrays."""
    from PIL import Image

    def write(path: Path) -> None:
        if arr.dtype == np.uint16:
            # Pillow maps uint16 to mode "I;16", which round-trips as a 16-bit grayscale PNG.
            img = Image.fromarray(np.ascontiguousarray(arr, dtype="<u2"))
        else:
            img = Image.fromarray(np.ascontiguousarray(arr))
        img.save(path, format="PNG", optimize=False)

    return write


def _text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="ascii")

    return write


# ----------------------------------------------------------------------------- geometry helpers


def _grid2d(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (yy, xx), each (size, size); y points down."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="ij")


def _ellipse_r(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float,
               theta: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside) of an ellipse rotated by ``theta`` radians."""
    dy, dx = y - cy, x - cx
    if theta:
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = dx * c + dy * s, -dx * s + dy * c
    return np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2)


def _inside(r: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``r < 1`` with an edge ``width`` (in units of r)."""
    return expit((1.0 - r) / width)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Smooth Gaussian noise field with zero mean and unit std; ``sigma`` in pixels."""
    n = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-12)


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=_UID_PREFIX, entropy_srcs=["medvit-synth", str(seed), *map(str, parts)]))


def _n_positive(n: int, fraction: float) -> int:
    return int(min(max(round(fraction * n), 1), n - 1))


# ============================================================================= xray


class _Xray:
    """Chest radiographs (PA/AP), 2-4 per patient, multi-label findings.

    Findings and their image signatures:
      * cardiomegaly: heart silhouette 25-55 % wider (cardiothoracic ratio > ~0.5);
        anatomical, so it persists in every image of the patient.
      * effusion: fluid opacity at one lung base with a lateral meniscus.
      * consolidation: patchy airspace opacity in a lung zone.
      * nodule: a small round Gaussian opacity (sigma 2-4 % of the image width) in a lung field.
    """

    columns = ["patient_id", "study_id", "sample_id", "image", "labels", "view"]
    _FORMATS = ("dicom", "png16", "png8")
    _PERSIST = 0.85  # probability a patient's acute finding is visible on a follow-up image
    _ACUTE_NEW = 0.04  # probability an acute finding appears on a follow-up image
    _LABEL_NOISE = 0.04  # reader error per (follow-up image, finding)

    @staticmethod
    def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        findings = {f: np.zeros(n, bool) for f in XRAY_FINDINGS}
        for f in XRAY_FINDINGS:
            findings[f][rng.choice(n, _n_positive(n, _XRAY_PREVALENCE[f]), replace=False)] = True
        # One "site" per patient decides the file format, so every format is represented.
        formats = rng.permutation(np.resize(np.arange(len(_Xray._FORMATS)), n))
        plans = []
        n_dicom = 0
        for i in range(n):
            fmt = _Xray._FORMATS[formats[i]]
            plans.append({
                "findings": {f: bool(findings[f][i]) for f in XRAY_FINDINGS},
                "format": fmt,
                # Alternate DICOM vendors: CR/DX and, every third DICOM patient, MONOCHROME1.
                "dicom_modality": "CR" if n_dicom % 2 == 0 else "DX",
                "monochrome1": fmt == "dicom" and n_dicom % 3 == 1,
            })
            n_dicom += fmt == "dicom"
        return plans

    @staticmethod
    def class_counts(df: pd.DataFrame) -> dict[str, int]:
        labels = df["labels"].fillna("")
        counts = {f: int(labels.str.split("|").apply(lambda ls, f=f: f in ls).sum()) for f in XRAY_FINDINGS}
        counts["no_finding"] = int((labels == "").sum())
        return counts

    @staticmethod
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

    @staticmethod
    def render(rng: np.random.Generator, size: int, a: dict[str, Any], shown: dict[str, bool]) -> np.ndarray:
        """One radiograph, float in [0, 1] (display: bright = attenuating), shape (size, size)."""
        yy, xx = _grid2d(size)
        th = a["rot"] + rng.uniform(-0.02, 0.02)
        sc = a["scale"] * rng.uniform(0.98, 1.02)
        dy, dx = a["dy"] + rng.uniform(-0.02, 0.02), a["dx"] + rng.uniform(-0.02, 0.02)
        c, s = math.cos(th), math.sin(th)
        # Image -> patient coordinates (a rigid jitter of the patient in the field).
        y = ((yy - dy) * c - (xx - dx) * s) / sc
        x = ((yy - dy) * s + (xx - dx) * c) / sc
        lw, lh = a["lung_w"], a["lung_h"] * rng.uniform(0.97, 1.03)  # inspiration varies

        # A squarish (superelliptic) trunk that fills most of the field.
        body = _inside(((np.abs(y - 0.15) / 1.25) ** 3 + (np.abs(x) / a["body_w"]) ** 3) ** (1 / 3), 0.04)
        lungs, base = {}, {}
        for sgn in (-1, 1):
            cx, cy, ry, rx = sgn * 0.36 * lw, -0.1, 0.6 * lh, 0.25 * lw
            lat = np.clip((x - cx) * sgn / rx, -1, 1)  # +1 lateral, -1 medial
            base[sgn] = cy + 0.78 * ry
            y_base = base[sgn] + 0.08 * lat  # diaphragm dome: costophrenic angle lowest
            lungs[sgn] = _inside(_ellipse_r(y, x, cy, cx, ry, rx, -sgn * 0.1), 0.05) * expit((y_base - y) / 0.025)
        lung = np.maximum(lungs[-1], lungs[1])
        hrx, hry = a["heart_rx"], a["heart_ry"]
        heart = _inside(_ellipse_r(y, x, 0.28, 0.08 + (hrx - 0.25) * 0.6, hry, hrx, 0.35), 0.04)
        med = expit((0.11 - np.abs(x - 0.01)) / 0.02) * expit((0.35 - y) / 0.05)
        knob = _inside(_ellipse_r(y, x, -0.22, 0.12, 0.08, 0.08), 0.1)
        air = lung * (1 - heart) * (1 - med) * (1 - knob)
        d = 0.6 * body - 0.45 * air + 0.05 * heart * body
        d += 0.08 * expit((0.06 - np.abs(x)) / 0.02) * body  # spine
        thorax = _inside(_ellipse_r(y, x, -0.05, 0.0, 0.75 * lh, 0.72 * lw), 0.05)
        d += a["rib_amp"] * (0.5 + 0.5 * np.cos(2 * np.pi * (y + 0.35 * x**2) * a["rib_freq"])) ** 8 * thorax
        ax = np.abs(x)
        clav = (np.exp(-(((y - (-0.62 + 0.15 * (ax - 0.1))) / 0.025) ** 2)) * expit((ax - 0.08) / 0.02)
                * expit((0.6 - ax) / 0.03))
        d += 0.12 * clav
        px = size / 2.0  # pixels per normalised unit
        vessels = np.clip(_noise(rng, (size, size), 0.02 * px), 0, None)
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
            patchy = np.clip(0.5 + 0.7 * _noise(rng, (size, size), 0.05 * px), 0, 1)
            amp = e["amp"] * rng.uniform(0.85, 1.15)
            d += amp * 0.4 * _inside(_ellipse_r(y, x, cy, cx, e["r"], e["r"] * 0.8), 0.15) * patchy * lungs[sgn]
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

    @staticmethod
    def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[_Sample]:
        a = _Xray.anatomy(rng, plan)
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
                    shown[f] = rng.random() < (_Xray._PERSIST if has[f] else _Xray._ACUTE_NEW)
                shown["nodule"] = has["nodule"] and rng.random() < 0.95
            img = _Xray.render(rng, size, a, shown)
            reported = dict(shown)
            if k > 0:
                for f in XRAY_FINDINGS:
                    if rng.random() < _Xray._LABEL_NOISE:
                        reported[f] = not reported[f]
            sid = f"{pid}_{k:02d}"
            study_id = f"{pid}_st{k:02d}"
            fmt = plan["format"]
            if fmt == "dicom":
                rel = f"images/{pid}/{sid}.dcm"
                writer = _xray_dicom_writer(
                    img, seed=seed, pid=pid, k=k, modality=plan["dicom_modality"],
                    monochrome1=plan["monochrome1"], name=fake_name, mrn=fake_mrn, birth=birth, sex=sex,
                    day=day0 + 30 * k, view=a["view"], size=size,
                )
            elif fmt == "png16":
                rel = f"images/{pid}/{sid}.png"
                writer = _png_writer(np.round(img * 65535).astype(np.uint16))
            else:
                rel = f"images/{pid}/{sid}.png"
                writer = _png_writer(np.round(img * 255).astype(np.uint8))
            labels = "|".join(f for f in XRAY_FINDINGS if reported[f])
            row = {"patient_id": pid, "study_id": study_id, "sample_id": sid, "image": rel,
                   "labels": labels, "view": a["view"]}
            samples.append(_Sample(row, [(rel, writer)]))
        return samples


def _xray_dicom_writer(img: np.ndarray, *, seed: int, pid: str, k: int, modality: str, monochrome1: bool,
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
        sop_uid = _uid(seed, "xray", pid, k, "sop")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = _uid(seed, "xray", pid, k, "study")
        ds.SeriesInstanceUID = _uid(seed, "xray", pid, k, "series")
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


# ============================================================================= brain


class _Brain:
    """Axial T1-like MRI slices of a 3D head phantom, 8-12 per patient, 16-bit PNG.

    The head is an ellipsoid with scalp, skull, CSF, a gyrated cortex, white matter and
    lateral ventricles. A tumour patient has one ellipsoidal tumour (core, optional
    enhancing ring, edema); slices crossing it (at least a few pixels) are ``tumor`` and
    get a YOLO box that is the bounding box of the drawn core+ring in that slice.
    """

    columns = ["patient_id", "study_id", "sample_id", "image", "label", "boxes", "slice_index"]

    @staticmethod
    def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        tumour = np.zeros(n, bool)
        tumour[rng.choice(n, _n_positive(n, _TUMOUR_FRACTION), replace=False)] = True
        return [{"tumour": bool(t)} for t in tumour]

    @staticmethod
    def class_counts(df: pd.DataFrame) -> dict[str, int]:
        return {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}

    @staticmethod
    def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[_Sample]:
        n_sl = int(rng.integers(8, 13))
        zs = np.linspace(rng.uniform(-0.55, -0.45), rng.uniform(0.5, 0.6), n_sl)
        h = {
            "cy": rng.uniform(-0.05, 0.05), "cx": rng.uniform(-0.05, 0.05),
            "ry": 0.86 * rng.uniform(0.92, 1.04), "rx": 0.72 * rng.uniform(0.92, 1.04),
            "theta": rng.uniform(-0.12, 0.12),
            "gyri": [(k, rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.05)) for k in (7, 11, 17)],
            "vent": rng.uniform(0.7, 1.4),
            "wm": rng.uniform(0.68, 0.8), "gm": rng.uniform(0.48, 0.6), "csf": rng.uniform(0.08, 0.2),
            "scalp": rng.uniform(0.8, 1.0), "skull": rng.uniform(0.04, 0.12),
            "bias": rng.uniform(-0.15, 0.15, size=3), "noise": rng.uniform(0.015, 0.05),
            "texture": rng.uniform(0.03, 0.08), "gain": rng.uniform(1200, 30000),
        }
        t = None
        if plan["tumour"]:
            j = int(rng.integers(1, n_sl - 1))
            dz = zs[1] - zs[0]
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5)
            rxy = rng.uniform(0.09, 0.25)
            t = {
                "z": zs[j] + rng.uniform(-0.3, 0.3) * dz,
                "y": rad * math.sin(ang) * 0.8, "x": rad * math.cos(ang) * 0.7,
                "ry": rxy * rng.uniform(0.75, 1.3), "rx": rxy, "rz": rng.uniform(0.12, 0.32),
                "theta": rng.uniform(0, np.pi),
                "alpha": rng.uniform(0.5, 1.0),  # lesion contrast: 0.5 is subtle
                "core": rng.uniform(0.15, 0.35) if rng.random() < 0.6 else rng.uniform(0.85, 1.0),
                "ring": rng.random() < 0.6, "edema": rng.uniform(0.0, 0.25),
            }
        min_px = max(4, round(4 * (size / 64) ** 2))
        samples = []
        study_id = f"{pid}_st00"
        for k, z in enumerate(zs):
            img, mask = _Brain.render(rng, size, h, float(z), t, min_px)
            sid = f"{pid}_{k:02d}"
            rel = f"images/{pid}/{sid}.png"
            files = [(rel, _png_writer(np.clip(np.round(img * h["gain"]), 0, 65535).astype(np.uint16)))]
            boxes = ""
            if mask is not None:
                rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
                y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
                box = (f"0 {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                       f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}\n")
                # YOLO convention: labels/ mirrors images/ with the same stem.
                boxes = f"labels/{pid}/{sid}.txt"
                files.append((boxes, _text_writer(box)))
            row = {"patient_id": pid, "study_id": study_id, "sample_id": sid, "image": rel,
                   "label": "tumor" if mask is not None else "normal", "boxes": boxes, "slice_index": k}
            samples.append(_Sample(row, files))
        return samples

    @staticmethod
    def render(rng: np.random.Generator, size: int, h: dict[str, Any], z: float, t: dict[str, Any] | None,
               min_px: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One slice (float, ~[0, 1.2]) and its tumour mask (bool) or None when no tumour is drawn."""
        yy, xx = _grid2d(size)
        fz = math.sqrt(max(1e-3, 1 - (z / 1.05) ** 2))  # the head narrows towards the vertex
        c, s = math.cos(h["theta"]), math.sin(h["theta"])
        y = (yy - h["cy"]) * c - (xx - h["cx"]) * s
        x = (yy - h["cy"]) * s + (xx - h["cx"]) * c
        r = _ellipse_r(y, x, 0, 0, h["ry"] * fz, h["rx"] * fz)
        phi = np.arctan2(y, x)
        gyr = 1 + sum(a * np.sin(k * phi + p + 3 * z) for k, p, a in h["gyri"])
        rg = r * gyr
        px = size / 2.0
        v = np.zeros_like(r)
        v += h["scalp"] * _inside(r, 0.01) * (r > 0.94)
        v += h["skull"] * ((r > 0.86) & (r <= 0.94))
        brain = _inside(rg / 0.84, 0.01)
        cortex = (rg > 0.64) & (rg <= 0.84)
        tex = 1 + h["texture"] * _noise(rng, (size, size), 0.012 * px)
        tissue = np.where(cortex, h["gm"], h["wm"]) * tex
        # Sulci: CSF clefts at the troughs of the gyral folding.
        sulci = (rg > 0.7) & (np.sin(11 * phi + h["gyri"][1][1] + 3 * z) < -0.85)
        tissue = np.where(sulci, h["csf"], tissue)
        csf_rim = (r > 0.84) & (r <= 0.86)
        v = np.where(csf_rim, h["csf"], v)
        v = np.where(brain > 0.5, tissue, v)
        gz = math.exp(-(((z - 0.1) / 0.25) ** 2)) * h["vent"]
        if gz > 0.15:
            for sgn in (-1, 1):
                vr = _ellipse_r(y, x, -0.05, sgn * 0.11, 0.22 * gz, 0.055 * gz ** 0.5, sgn * 0.3)
                v = np.where(vr < 1, h["csf"], v)
        if z < 0.05:  # deep grey nuclei in the lower slices
            for sgn in (-1, 1):
                v = np.where(_ellipse_r(y, x, 0.12, sgn * 0.2, 0.1, 0.06) < 1, h["gm"] * 1.05, v)
        falx = (np.abs(x) < 0.012) & (y < -0.25) & (brain > 0.5)
        v = np.where(falx, h["csf"], v)

        mask = None
        if t is not None and abs(z - t["z"]) < t["rz"]:
            ft = math.sqrt(1 - ((z - t["z"]) / t["rz"]) ** 2)
            rt = _ellipse_r(y, x, t["y"], t["x"], t["ry"] * ft, t["rx"] * ft, t["theta"])
            inside_brain = r < 0.8
            m = (rt < 1) & inside_brain
            if int(m.sum()) >= min_px:
                mask = m
                a = t["alpha"]
                edema_r = rt * (1 + 0.15 * _noise(rng, (size, size), 0.03 * px))
                edema = (edema_r < 1.6) & (rt >= 1) & inside_brain
                v = np.where(edema, v * (1 - t["edema"] * a), v)
                target = np.where(rt < (0.6 if t["ring"] else 1.0), t["core"], 1.05)
                target = target * (1 + 0.08 * _noise(rng, (size, size), 0.01 * px))
                v = np.where(m, (1 - a) * v + a * target, v)

        b = h["bias"]
        v = v * (1 + b[0] * yy + b[1] * xx + b[2] * (yy**2 + xx**2))
        v = gaussian_filter(v, 0.5 * size / 64.0)
        n1, n2 = (h["noise"] * rng.standard_normal(v.shape) for _ in range(2))
        v = np.sqrt((v + n1) ** 2 + n2**2)  # Rician magnitude noise
        return v, mask


# ============================================================================= prostate


class _Prostate:
    """bpMRI volumes: T2w, ADC and high-b DWI (HBV) NIfTI, one lesion mask per patient.

    The gland is a walnut-like ellipsoid (wider at the base) with a transition zone (TZ),
    peripheral zone (PZ) and anterior fibromuscular stroma, surrounded by fat, muscle and
    the rectum. A csPCa lesion is dark on ADC, bright on HBV and slightly dark on T2w,
    mostly in the PZ. Half of the negative patients carry a benign mimic (prostatitis/BPH
    nodule) with a milder ADC drop and HBV rise.
    """

    columns = ["patient_id", "study_id", "sample_id", "image_t2w", "image_adc", "image_hbv", "mask", "label"]

    @staticmethod
    def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        pos = np.zeros(n, bool)
        pos[rng.choice(n, _n_positive(n, _TUMOUR_FRACTION), replace=False)] = True
        return [{"lesion": bool(p)} for p in pos]

    @staticmethod
    def class_counts(df: pd.DataFrame) -> dict[str, int]:
        return {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}

    @staticmethod
    def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[_Sample]:
        vols, mask = _Prostate.render(rng, size, plan["lesion"])
        sp = PROSTATE_FOV_MM / size
        affine = np.diag([sp, sp, sp, 1.0])
        affine[:3, 3] = -PROSTATE_FOV_MM / 2 + sp / 2  # volume centred on the scanner origin
        sid = f"{pid}_00"
        row: dict[str, Any] = {"patient_id": pid, "study_id": f"{pid}_st00", "sample_id": sid}
        files = []
        for ch in ("t2w", "adc", "hbv"):
            rel = f"images/{pid}/{sid}_{ch}.nii.gz"
            row[f"image_{ch}"] = rel
            files.append((rel, _nifti_writer(vols[ch], affine)))
        rel = f"masks/{pid}/{sid}_mask.nii.gz"
        row["mask"] = rel
        files.append((rel, _nifti_writer(mask, affine)))
        row["label"] = "cspca" if plan["lesion"] else "no_cspca"
        return [_Sample(row, files)]

    @staticmethod
    def render(rng: np.random.Generator, size: int, lesion: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Volumes indexed (x, y, z) in RAS (x: left, y: anterior, z: superior).

        Returns:
            ({"t2w": int16, "adc": int16 (1e-6 mm^2/s), "hbv": int16}, mask uint8), each
            (size, size, size).
        """
        c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
        x, y, z = np.meshgrid(c, c, c, indexing="ij")
        shape = x.shape
        px = size / 2.0
        gx, gy, gz = rng.uniform(-0.08, 0.08), rng.uniform(-0.05, 0.1), rng.uniform(-0.1, 0.1)
        rx, ry, rz = rng.uniform(0.45, 0.7), rng.uniform(0.32, 0.48), rng.uniform(0.4, 0.6)
        rx_z = rx * np.clip(1 + 0.25 * (z - gz) / rz, 0.6, 1.4)  # base (superior) wider than apex
        rg = np.sqrt(((x - gx) / rx_z) ** 2 + ((y - gy) / ry) ** 2 + ((z - gz) / rz) ** 2)
        gland = rg < 1
        rt = np.sqrt(((x - gx) / (0.6 * rx_z)) ** 2 + ((y - gy - 0.15 * ry) / (0.6 * ry)) ** 2
                     + ((z - gz - 0.1 * rz) / (0.7 * rz)) ** 2)
        tz = gland & (rt < 1)
        afs = gland & ~tz & (y - gy > 0.35 * ry)
        pz = gland & ~tz & ~afs
        yr = gy - ry - 0.22
        rr = np.sqrt(((x - gx) / 0.28) ** 2 + ((y - yr) / 0.18) ** 2)
        rect_wall, rect_lumen = (rr < 1) & (rr >= 0.6), rr < 0.6
        muscle = (np.abs(x) > 0.78) | (y < yr - 0.25)
        fat = ~gland & ~(rr < 1) & ~muscle

        # Tissue values per channel: (T2w a.u., ADC 1e-6 mm^2/s, HBV a.u.), per-patient jitter.
        j = lambda lo, hi: rng.uniform(lo, hi)  # noqa: E731
        tissues = [
            (fat, (j(0.7, 0.9), j(150, 400), j(10, 25))),
            (muscle, (j(0.22, 0.35), j(1300, 1500), j(25, 40))),
            (rect_wall, (j(0.25, 0.4), j(1100, 1400), j(40, 60))),
            (rect_lumen, (j(0.05, 0.15), j(1800, 2400), j(10, 30))),
            (pz, (j(0.62, 0.8), j(1550, 1850), j(45, 65))),
            (tz, (j(0.38, 0.52), j(1200, 1400), j(50, 75))),
            (afs, (j(0.15, 0.25), j(1000, 1200), j(30, 45))),
        ]
        t2w, adc, hbv = (np.zeros(shape) for _ in range(3))
        for region, (a, b, cc) in tissues:
            t2w[region], adc[region], hbv[region] = a, b, cc
        # BPH nodules: heterogeneous TZ on T2w (and slightly on ADC).
        for _ in range(int(rng.integers(3, 9))):
            cn = (gx + rng.uniform(-0.5, 0.5) * rx, gy + 0.15 * ry + rng.uniform(-0.4, 0.4) * ry,
                  gz + rng.uniform(-0.5, 0.5) * rz)
            rn = rng.uniform(0.06, 0.14)
            node = tz & (((x - cn[0]) ** 2 + (y - cn[1]) ** 2 + (z - cn[2]) ** 2) < rn**2)
            t2w[node] *= rng.uniform(0.75, 1.3)
            adc[node] *= rng.uniform(0.92, 1.05)
        tex = _noise(rng, shape, 0.03 * px)
        t2w *= 1 + 0.08 * tex
        adc *= 1 + 0.04 * tex

        def blob(center: tuple[float, float, float], r: float) -> np.ndarray:
            d = np.sqrt(((x - center[0]) / (r * rng.uniform(0.7, 1.3))) ** 2
                        + ((y - center[1]) / (r * rng.uniform(0.7, 1.3))) ** 2
                        + ((z - center[2]) / (r * rng.uniform(0.8, 1.5))) ** 2)
            d = d * (1 + 0.2 * _noise(rng, shape, 0.05 * px))  # irregular margin
            return (d < 1) & gland

        def focus_center(zone: np.ndarray) -> tuple[float, float, float]:
            idx = np.flatnonzero(zone)
            if idx.size == 0:
                idx = np.flatnonzero(gland)
            p = np.unravel_index(idx[int(rng.integers(idx.size))], shape)
            return float(c[p[0]]), float(c[p[1]]), float(c[p[2]])

        mask = np.zeros(shape, np.uint8)
        # Interior of a zone (so a lesion is not just a sliver at the gland edge).
        pz_core = pz & (rg < 0.9)
        if lesion:
            zone = pz_core if rng.random() < 0.7 else tz
            # Never empty: the centre is a gland voxel centre, where the blob distance is 0.
            m = blob(focus_center(zone), rng.uniform(0.14, 0.3))
            s = rng.uniform(0.35, 1.0)  # conspicuity: low values are subtle
            adc[m] *= 1 - rng.uniform(0.3, 0.55) * s
            hbv[m] *= 1 + rng.uniform(0.8, 2.5) * s
            t2w[m] *= 1 - rng.uniform(0.05, 0.3) * s
            mask[m] = 1
        elif rng.random() < 0.5:  # benign mimic, no mask
            zone = pz_core if rng.random() < 0.5 else tz
            m = blob(focus_center(zone), rng.uniform(0.1, 0.25))
            s = rng.uniform(0.25, 1.0)
            adc[m] *= 1 - rng.uniform(0.08, 0.25) * s
            hbv[m] *= 1 + rng.uniform(0.2, 0.9) * s
            t2w[m] *= 1 - rng.uniform(0.0, 0.2) * s

        bias = 1 + rng.uniform(-0.15, 0.15) * y + rng.uniform(-0.1, 0.1) * x
        out = {}
        blur = 0.4 * size / 32.0
        t2 = gaussian_filter(t2w * bias, blur) * rng.uniform(600, 1400)
        t2 = t2 + rng.uniform(0.01, 0.04) * t2.max() * rng.standard_normal(shape)
        out["t2w"] = t2
        ad = gaussian_filter(adc, blur * 1.5) + rng.uniform(60, 180) * rng.standard_normal(shape)
        out["adc"] = ad
        hb = gaussian_filter(hbv * bias, blur * 1.5) * rng.uniform(0.6, 2.5)
        sig = rng.uniform(0.08, 0.2) * float(np.percentile(hb, 99))
        hb = np.sqrt((hb + sig * rng.standard_normal(shape)) ** 2 + (sig * rng.standard_normal(shape)) ** 2)
        out["hbv"] = hb
        return {k: np.clip(np.round(v), 0, 32767).astype(np.int16) for k, v in out.items()}, mask


def _nifti_writer(data: np.ndarray, affine: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import nibabel as nib

        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units(xyz="mm")
        nib.save(img, str(path))

    return write


# ============================================================================= histo


class _Histo:
    """H&E-like RGB patches, 8-16 per patient, one subtype per patient.

    The image is rendered from hematoxylin and eosin concentration maps through
    Beer-Lambert optical density with per-patient stain vectors, so stain colour and
    intensity vary strongly between patients. Subtype textures:

      * adenosis: crowded small round glands (white lumen, ring of small regular nuclei).
      * fibroadenoma: fibrous pink stroma, slit-like ducts, sparse spindle nuclei.
      * ductal_carcinoma: solid nests of large, pleomorphic, hyperchromatic nuclei.
      * lobular_carcinoma: single-file cords of small-to-medium uniform nuclei in stroma.

    A per-patient atypia score (overlapping between benign and malignant) scales nuclear
    size, pleomorphism and darkness; magnification scales the apparent nuclear size.
    """

    columns = ["patient_id", "study_id", "sample_id", "image", "label", "subtype", "magnification"]
    _MAG_SCALE = {"40X": 0.55, "100X": 0.75, "200X": 1.0, "400X": 1.35}
    # Ruifrok & Johnston optical-density vectors (R, G, B).
    _H = np.array([0.65, 0.70, 0.29])
    _E = np.array([0.07, 0.99, 0.11])

    @staticmethod
    def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        names = list(HISTO_SUBTYPES)
        sub = rng.permutation(np.resize(np.arange(len(names)), n))
        return [{"subtype": names[s]} for s in sub]

    @staticmethod
    def class_counts(df: pd.DataFrame) -> dict[str, int]:
        counts = {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}
        counts.update({f"subtype:{k}": int(v) for k, v in df["subtype"].value_counts().sort_index().items()})
        return counts

    @staticmethod
    def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[_Sample]:
        subtype = plan["subtype"]
        label = HISTO_SUBTYPES[subtype]
        malignant = label == "malignant"
        p = {
            # Atypia overlaps between classes: some benign lesions look busy and some
            # carcinomas look bland (the hard cases).
            "atypia": rng.beta(5, 2.5) if malignant else rng.beta(2.5, 5),
            "h_vec": _Histo._stain(rng, _Histo._H), "e_vec": _Histo._stain(rng, _Histo._E),
            "h_int": rng.uniform(0.6, 1.4), "e_int": rng.uniform(0.5, 1.4),
            "density": rng.uniform(0.7, 1.3), "blur": rng.uniform(0.3, 1.1),
            "bg": rng.uniform(0.0, 0.06), "noise": rng.uniform(1.5, 5.0),
            "fiber_dir": rng.uniform(0, np.pi),
        }
        n_patch = int(rng.integers(8, 17))
        mags = list(HISTO_MAGNIFICATIONS)
        samples = []
        for k in range(n_patch):
            mag = mags[int(rng.integers(len(mags)))]
            img = _Histo.render(rng, size, subtype, p, _Histo._MAG_SCALE[mag])
            sid = f"{pid}_{k:02d}"
            rel = f"images/{pid}/{sid}.png"
            row = {"patient_id": pid, "study_id": f"{pid}_st00", "sample_id": sid, "image": rel,
                   "label": label, "subtype": subtype, "magnification": mag}
            samples.append(_Sample(row, [(rel, _png_writer(img))]))
        return samples

    @staticmethod
    def _stain(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        v = np.clip(base + rng.normal(0, 0.12, 3), 0.02, None)
        return v / np.linalg.norm(v)

    @staticmethod
    def render(rng: np.random.Generator, size: int, subtype: str, p: dict[str, Any], mag: float) -> np.ndarray:
        """One RGB patch, uint8 (size, size, 3)."""
        ps = size / 64.0  # layouts are designed at 64 px
        a = p["atypia"]
        # Stroma (eosin) with fibres along a per-patient direction.
        fib = _noise(rng, (size, size), (0.8 * ps, 3.5 * ps))
        if rng.random() < 0.5:
            fib = fib.T
        e = 0.45 + 0.12 * fib
        h = np.full((size, size), 0.03)
        white = np.zeros((size, size), bool)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        nuclei: list[tuple[float, float, float, float, float, float]] = []  # cy, cx, r, aspect, angle, dark

        def add(cy: float, cx: float, r: float, aspect: float = 1.0, angle: float | None = None,
                dark: float = 1.0) -> None:
            if -3 < cy < size + 3 and -3 < cx < size + 3:
                nuclei.append((cy, cx, r, aspect, rng.uniform(0, np.pi) if angle is None else angle, dark))

        r0 = (1.2 + 1.0 * a) * mag * ps  # nuclear radius grows with atypia
        pleo = 0.08 + 0.35 * a
        dens = p["density"]
        if subtype == "adenosis":
            n_gl = int(rng.poisson(7 * dens / mag**2 * 1.0) + 2)
            for _ in range(n_gl):
                gy, gx = rng.uniform(0, size, 2)
                R = rng.uniform(3.0, 5.5) * mag * ps
                white |= (yy - gy) ** 2 + (xx - gx) ** 2 < (0.45 * R) ** 2
                for ring, frac, asp in ((0.75, 1.0, 1.2), (1.05, 0.5, 2.2)):
                    m = int(2 * np.pi * ring * R / (2.3 * r0) * frac)
                    for t in np.linspace(0, 2 * np.pi, max(m, 3), endpoint=False) + rng.uniform(0, 1):
                        add(gy + ring * R * math.sin(t), gx + ring * R * math.cos(t),
                            r0 * 0.85 * rng.lognormal(0, pleo * 0.5), asp, t + np.pi / 2, 0.85)
        elif subtype == "fibroadenoma":
            e = 0.5 + 0.22 * fib
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0, size, 2)
                th, length = rng.uniform(0, np.pi), rng.uniform(0.4, 0.9) * size
                for t in np.linspace(-0.5, 0.5, int(length / (2.2 * r0)) + 1):
                    bend = 0.15 * length * math.sin(3 * t)
                    py = cy + t * length * math.sin(th) + bend * math.cos(th)
                    qx = cx + t * length * math.cos(th) - bend * math.sin(th)
                    white |= (yy - py) ** 2 + (xx - qx) ** 2 < (0.9 * mag * ps) ** 2
                    for side in (-1, 1):
                        add(py + side * 1.8 * mag * ps * math.cos(th), qx - side * 1.8 * mag * ps * math.sin(th),
                            r0 * 0.85, 1.4, th, 0.85)
            for _ in range(int(rng.poisson(22 * dens * ps**2 / mag**2))):
                add(*rng.uniform(0, size, 2), r0 * 0.7, rng.uniform(2.2, 3.5), p["fiber_dir"] + rng.normal(0, 0.3), 0.8)
        elif subtype == "ductal_carcinoma":
            # Nest coverage varies a lot: low-grade cases are mostly stroma.
            nest = _noise(rng, (size, size), 5 * ps * mag) > rng.uniform(-0.3, 0.9)
            step = 2.5 * r0 / math.sqrt(dens)
            for cy in np.arange(0, size, step):
                for cx in np.arange(0, size, step):
                    qy, qx = cy + rng.normal(0, 0.3 * step), cx + rng.normal(0, 0.3 * step)
                    iy, ix = int(np.clip(qy, 0, size - 1)), int(np.clip(qx, 0, size - 1))
                    if nest[iy, ix] and rng.random() < 0.75:
                        add(qy, qx, r0 * 1.1 * rng.lognormal(0, pleo), rng.uniform(1.0, 1.6), None,
                            rng.uniform(0.85, 1.25))
            for _ in range(int(rng.poisson(2))):  # cribriform spaces
                cy, cx = rng.uniform(0, size, 2)
                if nest[int(cy), int(cx)]:
                    white |= (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(1.5, 3) * mag * ps) ** 2
        else:  # lobular_carcinoma
            base_dir = rng.uniform(0, np.pi)
            n_lines = int(rng.poisson(6 * dens * ps / mag) + 2)
            for _ in range(n_lines):
                cy, cx = rng.uniform(0, size, 2)
                th = base_dir + rng.normal(0, 0.4)
                steps = int(rng.integers(6, 20))
                for _ in range(-steps // 2, steps // 2):
                    th += rng.normal(0, 0.12)
                    cy += 2.4 * r0 * math.sin(th)
                    cx += 2.4 * r0 * math.cos(th)
                    if rng.random() < 0.9:
                        add(cy + rng.normal(0, 0.3 * r0), cx + rng.normal(0, 0.3 * r0),
                            r0 * 0.95 * rng.lognormal(0, pleo * 0.4), rng.uniform(1.0, 1.3), None, 0.95)
            for _ in range(int(rng.poisson(10 * dens * ps**2 / mag**2))):
                add(*rng.uniform(0, size, 2), r0 * 0.9, 1.1, None, 0.9)
        if rng.random() < 0.4:  # adipose tissue in part of the patch (any subtype)
            fat = _noise(rng, (size, size), 6 * ps) > rng.uniform(0.2, 1.2)
            cells = _noise(rng, (size, size), 1.5 * ps * mag)
            septa = np.abs(cells) < 0.15
            white |= fat & ~septa
            nuclei[:] = [nc for nc in nuclei
                         if not fat[int(np.clip(nc[0], 0, size - 1)), int(np.clip(nc[1], 0, size - 1))]]
        # A few lymphocytes everywhere: small, round, very dark.
        for _ in range(int(rng.poisson(3 * ps**2))):
            add(*rng.uniform(0, size, 2), 0.9 * mag * ps, 1.0, None, 1.3)

        hyper = 0.75 + 0.5 * a  # hyperchromasia
        for cy, cx, r, asp, ang, dark in nuclei:
            ext = r * asp + 2
            y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 2, size)
            x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 2, size)
            if y0 >= y1 or x0 >= x1:
                continue
            sy, sx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            ca, sa = math.cos(ang), math.sin(ang)
            u, v = sx * ca + sy * sa, -sx * sa + sy * ca
            rr = np.sqrt((u / (r * asp)) ** 2 + (v / r) ** 2)
            irregular = 1 + pleo * 0.5 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6.3))
            m = expit((irregular - rr) / 0.12)
            val = dark * hyper * rng.uniform(0.8, 1.1) * (0.75 + 0.25 * (rr > 0.5 * irregular))  # rim darker
            h[y0:y1, x0:x1] = np.maximum(h[y0:y1, x0:x1], val * m)
            e[y0:y1, x0:x1] *= 1 - 0.7 * m
        e = np.where(white, 0.02, e)
        h = np.where(white & (h < 0.3), 0.0, h)
        h = gaussian_filter(h, p["blur"] * ps)
        e = gaussian_filter(np.clip(e, 0, None), p["blur"] * ps)
        od = (p["h_int"] * h[..., None] * p["h_vec"] + p["e_int"] * e[..., None] * p["e_vec"]) * 1.2 + p["bg"]
        rgb = 255 * np.exp(-od) + p["noise"] * rng.standard_normal((size, size, 3))
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


_GENERATORS: dict[str, Any] = {"xray": _Xray, "brain": _Brain, "prostate": _Prostate, "histo": _Histo}
