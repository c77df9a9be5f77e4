"""A synthetic study from its arguments: checks them, draws the study-level assignments and
each patient's random stream, asks the modality's generator (:mod:`.xray`, :mod:`.brain`,
:mod:`.prostate`, :mod:`.histo`: each offers ``COLUMNS``, ``plan``, ``class_counts`` and
``patient``) for the samples, writes their files, ``manifest.csv`` and ``synth.json``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from medvit import __version__
from medvit.data.synth import brain, histo, prostate, xray
from medvit.errors import MedvitError

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
_PATIENT_PREFIX = {"xray": "XR", "brain": "BR", "prostate": "PR", "histo": "HI"}
_MODALITY_KEY = {"xray": 1, "brain": 2, "prostate": 3, "histo": 4}
SITES = 3  # synthetic acquisition sites in the `site` column
_GENERATORS: dict[str, ModuleType] = {"xray": xray, "brain": brain, "prostate": prostate, "histo": histo}


class SynthError(MedvitError):
    """Bad arguments for :func:`synthesize` (unknown modality, too few patients, bad size)."""


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

    df = pd.DataFrame(rows, columns=[*make.COLUMNS, "sex", "site"])
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

