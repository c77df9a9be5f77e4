"""Resampling by patient: anomaly-ratio resampling and label-efficiency subsets.

:func:`resample_to_anomaly_ratio` reproduces the anomaly-aware setting of the brain-tumour
study ("Realism in Action"): the data are resampled so that abnormal cases form a realistic
minority (9 normal : 1 tumour), either *by patients* (whole patients are kept or dropped) or
*by images*. Both only ever drop data -- nothing is duplicated -- so the achieved fraction is
the closest reachable one; it is returned so the report can state it.

:func:`subsample_patients` keeps a stratified fraction of patients (e.g. the label-efficiency
experiments of DVPT: train on 40% of the labelled patients).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from medvit.data.manifest import finding_sets
from medvit.data.splits import patient_labels
from medvit.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)


def default_is_abnormal(df: pd.DataFrame, normal_class: str = "normal") -> pd.Series:
    """Sample-level abnormality when none is given: ``label != normal_class``, else a non-empty ``labels``.

    Raises:
        ManifestError: the table has neither a ``label`` nor a ``labels`` column.
    """
    if "label" in df.columns:
        return df["label"].astype(str) != normal_class
    if "labels" in df.columns:
        return finding_sets(df).map(len) > 0
    raise ManifestError("cannot tell normal from abnormal samples: the manifest has no 'label' or 'labels' column")


def _closest_count(target: float, available: int) -> int:
    """Integer in [1, available] closest to the real-valued ``target`` count."""
    return int(min(max(1, round(target)), available))


def _best_k(other: int, fraction: float, available: int) -> int:
    """Number k (1..available) of the minority side so that k / (k + other) is closest to ``fraction``."""
    exact = fraction * other / (1.0 - fraction)
    candidates = {min(max(1, c), available) for c in (math.floor(exact), math.ceil(exact))}
    return min(sorted(candidates), key=lambda k: abs(k / (k + other) - fraction))


def _choose(rng: np.random.Generator, items: np.ndarray, k: int) -> np.ndarray:
    return np.sort(rng.choice(items, size=k, replace=False)) if k < len(items) else items


def _thin_excess(rng: np.random.Generator, abnormal: np.ndarray, normal: np.ndarray, abnormal_fraction: float,
                 unit: str) -> np.ndarray:
    """Downsample whichever side (abnormal or normal units) is in excess of the target
    fraction, never duplicating; return the kept units."""
    _require(len(abnormal), len(normal), unit)
    if len(abnormal) / (len(abnormal) + len(normal)) > abnormal_fraction:
        abnormal = _choose(rng, abnormal, _best_k(len(normal), abnormal_fraction, len(abnormal)))
    else:
        normal = _choose(rng, normal, _best_k(len(abnormal), 1.0 - abnormal_fraction, len(normal)))
    return np.concatenate([abnormal, normal])


def resample_to_anomaly_ratio(df: pd.DataFrame, abnormal_fraction: float, by: str = "patient", seed: int = 0,
                              is_abnormal: pd.Series | np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Downsample so that abnormal cases form ``abnormal_fraction`` of patients or of images.

    ``by="patient"``: a patient is abnormal if any of their samples is abnormal. Whichever
    side (normal or abnormal patients) is in excess is downsampled by choosing whole patients
    at random; every sample of a kept patient is kept. ``by="image"``: abnormal images are
    downsampled (all normal images -- including the normal slices of abnormal patients -- are
    kept) until they form the fraction of images; if abnormal images are already rarer than
    that, normal images are downsampled instead. Nothing is ever duplicated.

    Args:
        df: manifest rows with ``patient_id``.
        abnormal_fraction: target fraction in (0, 1), e.g. 0.1 for 9 normal : 1 abnormal.
        by: ``"patient"`` or ``"image"``.
        seed: random seed (same seed, same rows).
        is_abnormal: boolean per row, aligned with ``df`` (a Series with df's index, or an
            array of len(df)); None uses :func:`default_is_abnormal`.

    Returns:
        ``(rows, achieved)``: the kept rows (original order and index) and ``{"by",
        "target_abnormal_fraction", "patients_normal", "patients_abnormal", "images_normal",
        "images_abnormal", "achieved_patient_fraction", "achieved_image_fraction"}``
        measured on the kept rows.

    Raises:
        ConfigError: fraction outside (0, 1) or unknown ``by``.
        ManifestError: no normal or no abnormal cases to resample.
    """
    if not 0.0 < abnormal_fraction < 1.0:
        raise ConfigError("abnormal fraction (anomaly_ratio) must be between 0 and 1, exclusive; got "
                          f"{abnormal_fraction}")
    if by not in ("patient", "image"):
        raise ConfigError(f"resample_by must be 'patient' or 'image'; got {by!r}")
    if is_abnormal is None:
        abnormal = default_is_abnormal(df).to_numpy(dtype=bool)
    elif isinstance(is_abnormal, pd.Series):
        aligned = is_abnormal.reindex(df.index)
        if aligned.isna().any():
            raise ValueError("is_abnormal must have a value for every row of df (same index)")
        abnormal = aligned.to_numpy(dtype=bool)
    else:
        abnormal = np.asarray(is_abnormal, dtype=bool)
        if abnormal.shape != (len(df),):
            raise ValueError(f"is_abnormal has shape {abnormal.shape}; expected ({len(df)},)")
    rng = np.random.default_rng(seed)
    pid = df["patient_id"].astype(str).to_numpy()

    if by == "patient":
        per_patient = pd.Series(abnormal).groupby(pid).any()
        abn_p = np.asarray(per_patient.index[per_patient.to_numpy()], dtype=object)
        nor_p = np.asarray(per_patient.index[~per_patient.to_numpy()], dtype=object)
        keep = np.isin(pid, _thin_excess(rng, abn_p, nor_p, abnormal_fraction, "patients"))
    else:
        idx = np.arange(len(df))
        keep = np.isin(idx, _thin_excess(rng, idx[abnormal], idx[~abnormal], abnormal_fraction, "images"))

    out = df[keep]
    kept_abn = abnormal[keep]
    kept_pat = pd.Series(kept_abn).groupby(pid[keep]).any()
    achieved = {
        "by": by,
        "target_abnormal_fraction": float(abnormal_fraction),
        "patients_normal": int((~kept_pat).sum()),
        "patients_abnormal": int(kept_pat.sum()),
        "images_normal": int((~kept_abn).sum()),
        "images_abnormal": int(kept_abn.sum()),
        "achieved_patient_fraction": float(kept_pat.mean()),
        "achieved_image_fraction": float(kept_abn.mean()),
    }
    logger.info("resampled by %s to %.3f abnormal: kept %d of %d rows (%s)", by, abnormal_fraction, len(out),
                len(df), achieved)
    return out, achieved


def _require(n_abnormal: int, n_normal: int, what: str) -> None:
    if n_abnormal == 0 or n_normal == 0:
        raise ManifestError(f"cannot resample to an anomaly ratio: the data have {n_abnormal} abnormal and "
                            f"{n_normal} normal {what}; both are needed")


def subsample_patients(df: pd.DataFrame, fraction: float, seed: int = 0, label_column: str | None = None,
                       normal_class: str = "normal") -> pd.DataFrame:
    """Keep a stratified random fraction of patients (all samples of each kept patient).

    Within each stratum of :func:`medvit.data.splits.patient_labels`, ``round(fraction * n)``
    patients are kept, at least one, so every class stays represented. Apply it to the
    training split only, so evaluation stays comparable.

    Args:
        df: manifest rows with ``patient_id``.
        fraction: fraction of patients to keep, in (0, 1]; 1 returns ``df`` unchanged.
        seed: random seed.
        label_column: passed to :func:`patient_labels`.
        normal_class: passed to :func:`patient_labels`.

    Returns:
        The kept rows (original order and index).

    Raises:
        ConfigError: ``fraction`` outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"patient fraction must be in (0, 1]; got {fraction}")
    if fraction == 1.0:
        return df
    rng = np.random.default_rng(seed)
    strata = patient_labels(df, label_column, normal_class)
    kept: list[str] = []
    for _, members in strata.groupby(strata, sort=True):
        ids = np.asarray(members.index, dtype=object)
        kept.extend(_choose(rng, ids, _closest_count(fraction * len(ids), len(ids))))
    return df[df["patient_id"].astype(str).isin(kept)]


__all__ = ["resample_to_anomaly_ratio", "subsample_patients", "default_is_abnormal"]
