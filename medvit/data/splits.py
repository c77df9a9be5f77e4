"""Patient-level splits: train/val/test assignment, k-fold folds and the leakage guard.

Every split here groups by ``patient_id``: all samples of a patient land in the same split
(or fold), so no patient's images are seen in training and then scored in evaluation.
Stratification works on one *stratum per patient* (:func:`patient_labels`):

* single-label (``label``) with a normal class (``"normal"`` by default): a patient with any
  non-normal sample is in the stratum of their most frequent non-normal class, otherwise
  ``normal`` -- for binary tasks this is "abnormal if any sample is abnormal", which matches
  how patient-level metrics aggregate (e.g. the maximum slice score);
* single-label without a normal class: the patient's majority class (ties: alphabetical);
* multi-label (``labels``): ``finding`` if any sample has a finding, else ``no_finding``;
* no label column: one stratum.

All functions are deterministic given ``seed``; patients are sorted first so the row order of
the manifest does not change the result.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd

from medvit.data.manifest import SPLITS, class_names, finding_names, finding_sets
from medvit.errors import ConfigError, LeakageError, ManifestError

logger = logging.getLogger(__name__)

UNLABELED = "(unlabeled)"


def _label_column(df: pd.DataFrame, label_column: str | None) -> str | None:
    if label_column is not None:
        if label_column not in df.columns:
            raise ManifestError(f"label column {label_column!r} is not in the manifest "
                                f"(columns: {', '.join(map(str, df.columns))})")
        return label_column
    return next((c for c in ("label", "labels") if c in df.columns), None)


def patient_labels(df: pd.DataFrame, label_column: str | None = None, normal_class: str = "normal") -> pd.Series:
    """One stratification stratum per patient (rules in the module docstring).

    Args:
        df: manifest rows with ``patient_id`` and optionally ``label``/``labels``.
        label_column: column to stratify on; None picks ``label``, else ``labels``, else none.
            ``labels`` is read as multi-label; any other column as single-label.
        normal_class: the class that means "no disease" for the any-abnormal rule.

    Returns:
        Series indexed by sorted patient id (str) with the stratum name (str). Patients whose
        rows carry no label get ``"(unlabeled)"``.
    """
    col = _label_column(df, label_column)
    patients = pd.Index(sorted(df["patient_id"].astype(str).unique()), name="patient_id")
    if col is None:
        return pd.Series("all", index=patients, name="stratum")
    pid = df["patient_id"].astype(str)
    if col == "labels":
        any_finding = (finding_sets(df).map(len) > 0).groupby(pid).any()
        return any_finding.map({True: "finding", False: "no_finding"}).reindex(patients).rename("stratum")
    values = df[col].astype(str)
    labelled = pd.DataFrame({"patient_id": pid, "c": values})[values != ""]
    counts = labelled.groupby(["patient_id", "c"]).size().rename("n").reset_index()
    counts["is_normal"] = counts["c"] == normal_class  # False sorts first: non-normal classes win
    counts = counts.sort_values(["patient_id", "is_normal", "n", "c"], ascending=[True, True, False, True])
    strata = counts.drop_duplicates("patient_id").set_index("patient_id")["c"]
    return strata.reindex(patients).fillna(UNLABELED).astype(str).rename("stratum")


def check_no_leakage(df: pd.DataFrame, column: str = "split") -> None:
    """Refuse a table in which a patient appears in more than one split (or fold).

    Every training and evaluation stage calls this before using a split.

    Args:
        df: rows with ``patient_id`` and ``column``. Empty cells are ignored.
        column: the split or fold column.

    Raises:
        ManifestError: there is no such column.
        LeakageError: naming every patient found in more than one split.
    """
    if column not in df.columns:
        raise ManifestError(f"no {column!r} column to check for patient leakage "
                            f"(columns: {', '.join(map(str, df.columns))})")
    values = df[column].astype(str)
    given = pd.DataFrame({"patient_id": df["patient_id"].astype(str), "s": values})[(values != "") & df[column].notna()]
    per_patient = given.groupby("patient_id")["s"].unique()
    leaking = per_patient[per_patient.map(len) > 1]
    if len(leaking):
        shown = "; ".join(f"{p} in {', '.join(sorted(s))}" for p, s in leaking.head(10).items())
        raise LeakageError(list(leaking.index), detail=f"column {column!r}: {shown}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    ok = 0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0
    if not ok:
        raise ConfigError(f"split fractions val_fraction={val_fraction}, test_fraction={test_fraction}: "
                          f"each must be in [0, 1) and their sum below 1 (the rest is train)")


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Patients per split; every split with a positive fraction gets at least one."""
    sizes = {"test": max(1, round(test_fraction * n)) if test_fraction > 0 else 0,
             "val": max(1, round(val_fraction * n)) if val_fraction > 0 else 0}
    while n - sizes["test"] - sizes["val"] < 1:  # keep one training patient: shrink the larger held-out split
        big = max(("test", "val"), key=lambda s: sizes[s])
        sizes[big] -= 1
    sizes["train"] = n - sizes["test"] - sizes["val"]
    return sizes


def _draw(ids: np.ndarray, strata: np.ndarray, k: int, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` of ``ids`` (stratified when every stratum is big enough); returns (drawn, rest)."""
    uniq, counts = np.unique(strata, return_counts=True)
    can = stratify and len(uniq) > 1 and counts.min() >= 2 and k >= len(uniq) and len(ids) - k >= len(uniq)
    if stratify and len(uniq) > 1 and not can:
        logger.info("strata too small to stratify %d of %d patients (%s); drawing them unstratified",
                    k, len(ids), ", ".join(f"{u}: {c}" for u, c in zip(uniq, counts)))
    from sklearn.model_selection import train_test_split  # here: every stage imports this module

    rest, drawn = train_test_split(ids, test_size=k, random_state=seed, shuffle=True,
                                   stratify=strata if can else None)
    return np.sort(drawn), np.sort(rest)


def assign_splits(df: pd.DataFrame, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                  stratify: bool = True, label_column: str | None = None,
                  normal_class: str = "normal") -> pd.DataFrame:
    """Patient-level, stratified train/val/test split.

    The table is collapsed to one row per patient before drawing, so every patient's samples
    share one split by construction (the group-aware equivalent of scikit-learn's
    ``GroupShuffleSplit``, with stratification on the patient's stratum). The test split is
    drawn first, then val from the rest. When a stratum is too small to stratify, that draw
    falls back to an unstratified one (logged).

    A given ``split`` column is kept after :func:`check_no_leakage`. If it is only partly
    filled, patients with a split keep it (their empty rows inherit it) and patients with no
    split at all are assigned with ``val_fraction``/``test_fraction`` of *those* patients (set
    ``test_fraction: 0`` to keep a given external test set as the only test split).

    Args:
        df: manifest rows with ``patient_id``.
        seed: random seed; the same seed and patients give the same split.
        val_fraction: fraction of patients for validation, in [0, 1).
        test_fraction: fraction of patients for testing, in [0, 1).
        stratify: stratify on :func:`patient_labels`.
        label_column: passed to :func:`patient_labels`.
        normal_class: passed to :func:`patient_labels`.

    Returns:
        A copy of ``df`` with a ``split`` column (``train``/``val``/``test``).

    Raises:
        ConfigError: invalid fractions.
        ManifestError: invalid values in a given split column, or too few patients to make
            every requested split non-empty (3 for train/val/test).
        LeakageError: a given split column puts a patient in two splits.
    """
    _check_fractions(val_fraction, test_fraction)
    out = df.copy()
    pid = out["patient_id"].astype(str)
    given: dict[str, str] = {}
    if "split" in out.columns:
        split = out["split"].fillna("").astype(str).str.strip()
        bad = sorted(set(split) - set(SPLITS) - {""})
        if bad:
            raise ManifestError(f"split column has invalid value(s) {', '.join(map(repr, bad))}; "
                                f"allowed: {', '.join(SPLITS)} or empty")
        out["split"] = split
        check_no_leakage(out, "split")
        given = dict(zip(pid[split != ""], split[split != ""]))
    todo = sorted(set(pid) - set(given))
    if todo:
        wanted = ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
        if len(todo) < len(wanted):
            raise ManifestError(f"cannot split {len(todo)} patient(s) into {'/'.join(wanted)} with every split "
                                f"non-empty: at least {len(wanted)} patients are needed (splits are by patient)")
        strata = patient_labels(out, label_column, normal_class).reindex(todo).to_numpy()
        ids = np.asarray(todo, dtype=object)
        sizes = _split_sizes(len(ids), val_fraction, test_fraction)
        for name in ("test", "val"):
            if sizes[name]:
                drawn, rest = _draw(ids, strata, sizes[name], seed, stratify)
                given.update({p: name for p in drawn})
                keep = np.isin(ids, rest)
                ids, strata = ids[keep], strata[keep]
        given.update({p: "train" for p in ids})
        if len(given) > len(todo):
            logger.info("kept the given split of %d patients; assigned %d", len(given) - len(todo), len(todo))
    out["split"] = pid.map(given)
    return out


def patient_kfold(df: pd.DataFrame, k: int = 5, seed: int = 0, label_column: str | None = None,
                  normal_class: str = "normal") -> pd.DataFrame:
    """Assign each patient to one of ``k`` cross-validation folds.

    Uses scikit-learn's ``StratifiedGroupKFold`` (groups = patients, y = the patient's
    stratum from :func:`patient_labels` on each of their samples), shuffled with ``seed``.

    Args:
        df: manifest rows with ``patient_id``.
        k: number of folds (>= 2).
        seed: random seed.
        label_column: passed to :func:`patient_labels`.
        normal_class: passed to :func:`patient_labels`.

    Returns:
        A copy of ``df`` with an int ``fold`` column in ``0..k-1``; every fold has at least one
        patient and each patient is in exactly one fold.

    Raises:
        ConfigError: ``k < 2``.
        ManifestError: fewer patients than folds.
    """
    if int(k) != k or k < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {k!r}")
    k = int(k)
    pid = df["patient_id"].astype(str)
    n = pid.nunique()
    if n < k:
        raise ManifestError(f"{k}-fold cross-validation needs at least {k} patients; the manifest has {n}")
    order = np.argsort(pid.to_numpy(), kind="stable")  # row order must not change the folds
    groups = pid.to_numpy()[order]
    y = patient_labels(df, label_column, normal_class).reindex(groups).to_numpy()
    fold_of: dict[str, int] = {}
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    with warnings.catch_warnings():
        # small strata: StratifiedGroupKFold warns and still returns valid group folds
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(groups, y, groups))
    if any(len(test) == 0 for _, test in splits):
        logger.info("stratified folds left a fold empty; using unstratified GroupKFold")
        splits = list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(groups, y, groups))
    for fold, (_, test) in enumerate(splits):
        fold_of.update({g: fold for g in groups[test]})
    out = df.copy()
    out["fold"] = pid.map(fold_of).astype(int)
    return out


def split_summary(df: pd.DataFrame, column: str = "split", label_column: str | None = None,
                  normal_class: str = "normal") -> dict[str, Any]:
    """Patients and samples per split, per class and per patient stratum.

    Args:
        df: rows with ``patient_id`` and ``column`` (``split`` or ``fold``).
        column: the split column.
        label_column: ``label`` / ``labels`` / another class column; None picks as
            :func:`patient_labels` does.
        normal_class: passed to :func:`patient_labels`.

    Returns:
        ``{split: {"patients", "samples", "strata": {stratum: patients},
        "classes" or "findings": {name: {"patients", "samples"}}}}``, splits in
        train/val/test order (folds in numeric order).
    """
    if column not in df.columns:
        raise ManifestError(f"no {column!r} column to summarise")
    col = _label_column(df, label_column)
    strata = patient_labels(df, col, normal_class)
    values = df[column]
    order = [s for s in SPLITS if (values == s).any()] + sorted(set(values) - set(SPLITS), key=str)
    out: dict[str, Any] = {}
    for name in order:
        sub = df[values == name]
        pats = sorted(sub["patient_id"].astype(str).unique())
        entry: dict[str, Any] = {"patients": len(pats), "samples": int(len(sub)),
                                 "strata": {str(k): int(v) for k,
                                            v in strata.reindex(pats).value_counts().sort_index().items()}}
        if col == "labels":
            sets = finding_sets(sub)
            entry["findings"] = {f: {"patients": int(sub.loc[sets.map(lambda s, f=f: f in s), "patient_id"].nunique()),
                                     "samples": int(sets.map(lambda s, f=f: f in s).sum())}
                                 for f in finding_names(df)}
        elif col is not None:
            entry["classes"] = {c: {"patients": int(sub.loc[sub[col] == c, "patient_id"].nunique()),
                                    "samples": int((sub[col] == c).sum())} for c in class_names(df, col)}
        out[str(name)] = entry
    return out


__all__ = ["assign_splits", "patient_kfold", "check_no_leakage", "patient_labels", "split_summary"]
