"""Cross-validation folds by patient (:func:`fold_split`, the rules are in the package
docstring), a stage context on one fold's split and where that fold's SSL encoder lives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from medvit.data.splits import assign_splits, check_no_leakage, patient_kfold
from medvit.engine.seed import derive_seed
from medvit.errors import ConfigError
from medvit.tasks.common import StageContext, load_context


def fold_split(df: pd.DataFrame, folds: int, fold: int, seed: int, val_fraction: float) -> pd.DataFrame:
    """The split of cross-validation fold ``fold`` (the package docstring).

    Args:
        df: the split manifest (``split`` column; ``unlabeled`` rows are kept as they are).
        folds: k; 1 keeps the given train/val/test split.
        fold: 0-based fold index (< k).
        seed: the study seed (folds and the validation draw depend on it only).
        val_fraction: fraction of the non-test patients held out for validation.

    Returns:
        A copy with ``split`` (``train``/``val``/``test``/``unlabeled``) and ``fold`` (the
        test fold of each labelled patient, -1 for unlabeled rows).

    Raises:
        ConfigError: ``fold`` out of range.
        ManifestError: too few patients for k folds plus train and validation patients.
    """
    if not 0 <= fold < max(folds, 1):
        raise ConfigError(f"fold {fold} is out of range for tasks.prostate.folds {folds}; allowed: 0 to {folds - 1}")
    df = df.copy()
    unlabeled = df["split"].astype(str) == "unlabeled"
    if folds == 1:
        df["fold"] = np.where(unlabeled, -1, 0)
        return df
    labeled = patient_kfold(df.loc[~unlabeled].drop(columns=["split"]), k=folds, seed=seed)
    test = labeled["fold"] == fold
    rest = assign_splits(labeled.loc[~test].drop(columns=["fold"]), seed=derive_seed(seed, "cv-val", fold) % 2**31,
                         val_fraction=val_fraction, test_fraction=0.0)
    df["fold"] = -1
    df.loc[labeled.index, "fold"] = labeled["fold"].to_numpy()
    df.loc[labeled.index[test.to_numpy()], "split"] = "test"
    df.loc[rest.index, "split"] = rest["split"].to_numpy()
    check_no_leakage(df)
    return df


def fold_context(config_path: str | Path, task: str, split_path: str | Path, fold: int) -> StageContext:
    """A stage context whose ``split`` column is the split of ``fold`` (:func:`fold_split`)."""
    ctx = load_context(config_path, task, split_path)
    df = fold_split(ctx.df, ctx.tcfg["folds"], fold, ctx.study["seed"], ctx.tcfg["split"]["val_fraction"])
    return dataclasses.replace(ctx, manifest=dataclasses.replace(ctx.manifest, df=df))


def ssl_encoder_path(split_path: str | Path, fold: int) -> Path:
    """``<task folder>/ssl/fold<i>/encoder.safetensors``: the SSL encoder of a fold."""
    return Path(split_path).parent / "ssl" / f"fold{fold}" / "encoder.safetensors"
