"""Axial T1-like MRI slices of a 3D head phantom, 8-12 per patient, 16-bit PNG.

The head is an ellipsoid with scalp, skull, CSF, a gyrated cortex, white matter and
lateral ventricles. A tumour patient has one ellipsoidal tumour (core, optional
enhancing ring, edema); slices crossing it (at least a few pixels) are ``tumor`` and
get a YOLO box that is the bounding box of the drawn core+ring in that slice.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from medvit.data.synth.common import TUMOUR_FRACTION, Sample, png_writer, positive_patients, text_writer, value_counts
from medvit.data.synth.shapes import ellipse_r, grid2d, inside, noise

COLUMNS = ["patient_id", "study_id", "sample_id", "image", "label", "boxes", "slice_index"]


def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [{"tumour": bool(t)} for t in positive_patients(rng, n, TUMOUR_FRACTION)]


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    return value_counts(df["label"])


def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[Sample]:
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
        img, mask = render(rng, size, h, float(z), t, min_px)
        sid = f"{pid}_{k:02d}"
        rel = f"images/{pid}/{sid}.png"
        files = [(rel, png_writer(np.clip(np.round(img * h["gain"]), 0, 65535).astype(np.uint16)))]
        boxes = ""
        if mask is not None:
            rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            box = (f"0 {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                   f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}\n")
            # YOLO convention: labels/ mirrors images/ with the same stem.
            boxes = f"labels/{pid}/{sid}.txt"
            files.append((boxes, text_writer(box)))
        row = {"patient_id": pid, "study_id": study_id, "sample_id": sid, "image": rel,
               "label": "tumor" if mask is not None else "normal", "boxes": boxes, "slice_index": k}
        samples.append(Sample(row, files))
    return samples


def render(rng: np.random.Generator, size: int, h: dict[str, Any], z: float, t: dict[str, Any] | None,
           min_px: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One slice (float, ~[0, 1.2]) and its tumour mask (bool) or None when no tumour is drawn."""
    yy, xx = grid2d(size)
    fz = math.sqrt(max(1e-3, 1 - (z / 1.05) ** 2))  # the head narrows towards the vertex
    c, s = math.cos(h["theta"]), math.sin(h["theta"])
    y = (yy - h["cy"]) * c - (xx - h["cx"]) * s
    x = (yy - h["cy"]) * s + (xx - h["cx"]) * c
    r = ellipse_r(y, x, 0, 0, h["ry"] * fz, h["rx"] * fz)
    phi = np.arctan2(y, x)
    gyr = 1 + sum(a * np.sin(k * phi + p + 3 * z) for k, p, a in h["gyri"])
    rg = r * gyr
    px = size / 2.0
    v = np.zeros_like(r)
    v += h["scalp"] * inside(r, 0.01) * (r > 0.94)
    v += h["skull"] * ((r > 0.86) & (r <= 0.94))
    brain = inside(rg / 0.84, 0.01)
    cortex = (rg > 0.64) & (rg <= 0.84)
    tex = 1 + h["texture"] * noise(rng, (size, size), 0.012 * px)
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
            vr = ellipse_r(y, x, -0.05, sgn * 0.11, 0.22 * gz, 0.055 * gz ** 0.5, sgn * 0.3)
            v = np.where(vr < 1, h["csf"], v)
    if z < 0.05:  # deep grey nuclei in the lower slices
        for sgn in (-1, 1):
            v = np.where(ellipse_r(y, x, 0.12, sgn * 0.2, 0.1, 0.06) < 1, h["gm"] * 1.05, v)
    falx = (np.abs(x) < 0.012) & (y < -0.25) & (brain > 0.5)
    v = np.where(falx, h["csf"], v)

    mask = None
    if t is not None and abs(z - t["z"]) < t["rz"]:
        ft = math.sqrt(1 - ((z - t["z"]) / t["rz"]) ** 2)
        rt = ellipse_r(y, x, t["y"], t["x"], t["ry"] * ft, t["rx"] * ft, t["theta"])
        inside_brain = r < 0.8
        m = (rt < 1) & inside_brain
        if int(m.sum()) >= min_px:
            mask = m
            a = t["alpha"]
            edema_r = rt * (1 + 0.15 * noise(rng, (size, size), 0.03 * px))
            edema = (edema_r < 1.6) & (rt >= 1) & inside_brain
            v = np.where(edema, v * (1 - t["edema"] * a), v)
            target = np.where(rt < (0.6 if t["ring"] else 1.0), t["core"], 1.05)
            target = target * (1 + 0.08 * noise(rng, (size, size), 0.01 * px))
            v = np.where(m, (1 - a) * v + a * target, v)

    b = h["bias"]
    v = v * (1 + b[0] * yy + b[1] * xx + b[2] * (yy**2 + xx**2))
    v = gaussian_filter(v, 0.5 * size / 64.0)
    n1, n2 = (h["noise"] * rng.standard_normal(v.shape) for _ in range(2))
    v = np.sqrt((v + n1) ** 2 + n2**2)  # Rician magnitude noise
    return v, mask
