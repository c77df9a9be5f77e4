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

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from medvit.data.synth.common import Sample, png_writer, value_counts
from medvit.data.synth.shapes import noise

HISTO_SUBTYPES: dict[str, str] = {
    "adenosis": "benign",
    "fibroadenoma": "benign",
    "ductal_carcinoma": "malignant",
    "lobular_carcinoma": "malignant",
}
HISTO_MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")
COLUMNS = ["patient_id", "study_id", "sample_id", "image", "label", "subtype", "magnification"]
_MAG_SCALE = {"40X": 0.55, "100X": 0.75, "200X": 1.0, "400X": 1.35}
# Ruifrok & Johnston optical-density vectors (R, G, B).
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])


def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    names = list(HISTO_SUBTYPES)
    sub = rng.permutation(np.resize(np.arange(len(names)), n))
    return [{"subtype": names[s]} for s in sub]


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = value_counts(df["label"])
    counts.update({f"subtype:{k}": v for k, v in value_counts(df["subtype"]).items()})
    return counts


def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[Sample]:
    subtype = plan["subtype"]
    label = HISTO_SUBTYPES[subtype]
    malignant = label == "malignant"
    p = {
        # Atypia overlaps between classes: some benign lesions look busy and some
        # carcinomas look bland (the hard cases).
        "atypia": rng.beta(5, 2.5) if malignant else rng.beta(2.5, 5),
        "h_vec": _stain(rng, _H), "e_vec": _stain(rng, _E),
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
        img = render(rng, size, subtype, p, _MAG_SCALE[mag])
        sid = f"{pid}_{k:02d}"
        rel = f"images/{pid}/{sid}.png"
        row = {"patient_id": pid, "study_id": f"{pid}_st00", "sample_id": sid, "image": rel,
               "label": label, "subtype": subtype, "magnification": mag}
        samples.append(Sample(row, [(rel, png_writer(img))]))
    return samples


def _stain(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    v = np.clip(base + rng.normal(0, 0.12, 3), 0.02, None)
    return v / np.linalg.norm(v)


def render(rng: np.random.Generator, size: int, subtype: str, p: dict[str, Any], mag: float) -> np.ndarray:
    """One RGB patch, uint8 (size, size, 3)."""
    ps = size / 64.0  # layouts are designed at 64 px
    a = p["atypia"]
    # Stroma (eosin) with fibres along a per-patient direction.
    fib = noise(rng, (size, size), (0.8 * ps, 3.5 * ps))
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
        nest = noise(rng, (size, size), 5 * ps * mag) > rng.uniform(-0.3, 0.9)
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
        fat = noise(rng, (size, size), 6 * ps) > rng.uniform(0.2, 1.2)
        cells = noise(rng, (size, size), 1.5 * ps * mag)
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
