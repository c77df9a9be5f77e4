"""bpMRI volumes: T2w, ADC and high-b DWI (HBV) NIfTI, one lesion mask per patient.

The gland is a walnut-like ellipsoid (wider at the base) with a transition zone (TZ),
peripheral zone (PZ) and anterior fibromuscular stroma, surrounded by fat, muscle and
the rectum. A csPCa lesion is dark on ADC, bright on HBV and slightly dark on T2w,
mostly in the PZ. Half of the negative patients carry a benign mimic (prostatitis/BPH
nodule) with a milder ADC drop and HBV rise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from medvit.data.synth.common import TUMOUR_FRACTION, Sample, positive_patients, value_counts
from medvit.data.synth.shapes import noise

PROSTATE_FOV_MM = 48.0
COLUMNS = ["patient_id", "study_id", "sample_id", "image_t2w", "image_adc", "image_hbv", "mask", "label"]


def plan(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [{"lesion": bool(p)} for p in positive_patients(rng, n, TUMOUR_FRACTION)]


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    return value_counts(df["label"])


def patient(rng: np.random.Generator, pid: str, plan: dict[str, Any], size: int, seed: int) -> list[Sample]:
    vols, mask = render(rng, size, plan["lesion"])
    sp = PROSTATE_FOV_MM / size
    affine = np.diag([sp, sp, sp, 1.0])
    affine[:3, 3] = -PROSTATE_FOV_MM / 2 + sp / 2  # volume centred on the scanner origin
    sid = f"{pid}_00"
    row: dict[str, Any] = {"patient_id": pid, "study_id": f"{pid}_st00", "sample_id": sid}
    files = []
    for ch in ("t2w", "adc", "hbv"):
        rel = f"images/{pid}/{sid}_{ch}.nii.gz"
        row[f"image_{ch}"] = rel
        files.append((rel, nifti_writer(vols[ch], affine)))
    rel = f"masks/{pid}/{sid}_mask.nii.gz"
    row["mask"] = rel
    files.append((rel, nifti_writer(mask, affine)))
    row["label"] = "cspca" if plan["lesion"] else "no_cspca"
    return [Sample(row, files)]


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
    tex = noise(rng, shape, 0.03 * px)
    t2w *= 1 + 0.08 * tex
    adc *= 1 + 0.04 * tex

    def blob(center: tuple[float, float, float], r: float) -> np.ndarray:
        d = np.sqrt(((x - center[0]) / (r * rng.uniform(0.7, 1.3))) ** 2
                    + ((y - center[1]) / (r * rng.uniform(0.7, 1.3))) ** 2
                    + ((z - center[2]) / (r * rng.uniform(0.8, 1.5))) ** 2)
        d = d * (1 + 0.2 * noise(rng, shape, 0.05 * px))  # irregular margin
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


def nifti_writer(data: np.ndarray, affine: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import nibabel as nib

        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units(xyz="mm")
        nib.save(img, str(path))

    return write
