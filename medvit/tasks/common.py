"""What every task shares: the target specification, the split stage, records and
datasets from a split manifest, and the provenance written beside weights."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from medvit.config import load_schema, load_study, task_config, task_manifest_path
from medvit.data.manifest import (
    Manifest,
    class_names,
    finding_names,
    finding_sets,
    identifying_id_warnings,
    load_manifest,
)
from medvit.data.sampling import resample_to_anomaly_ratio
from medvit.data.splits import assign_splits, check_no_leakage, patient_kfold, split_summary
from medvit.errors import ManifestError
from medvit.fileio import atomic_write_json, atomic_write_text
from medvit.provenance import provenance

logger = logging.getLogger(__name__)

Kind = Literal["binary", "multiclass", "multilabel"]
# Class names read as "negative" when a binary task names no positive class.
_NEGATIVE_NAMES = {"normal", "benign", "negative", "healthy", "no_finding", "none", "0"}
# Tasks whose samples are volumes segmented by a lesion mask.
SEGMENTATION_TASKS = {"prostate"}


@dataclass
class TaskSpec:
    """What a model predicts for a task.

    Attributes:
        kind: ``binary`` (one positive class), ``multiclass`` (softmax over classes) or
            ``multilabel`` (one sigmoid per finding).
        classes: the names written as ``true_<c>``/``score_<c>`` columns (binary: the positive class only).
        column: manifest column holding the truth (``label``, ``labels`` or e.g. ``subtype``).
        all_classes: every class value of ``column`` (binary: ``[negative, positive]``).
    """

    kind: Kind
    classes: list[str]
    column: str
    all_classes: list[str] = field(default_factory=list)

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def targets(self, df: pd.DataFrame) -> np.ndarray:
        """(N, num_outputs) float32 multi-hot/one-hot truth, or (N,) int64 class index for multiclass."""
        if self.kind == "multilabel":
            tokens = df[self.column].fillna("").astype(str).map(lambda s: {t for t in s.split("|") if t})
            return np.array([[c in t for c in self.classes] for t in tokens], dtype=np.float32).reshape(len(df), -1)
        values = df[self.column].astype(str)
        unknown = sorted(set(values) - set(self.all_classes))
        if unknown:
            raise ManifestError(f"column {self.column!r} has values {unknown} outside the task's classes "
                                f"{self.all_classes}")
        if self.kind == "binary":
            return (values == self.classes[0]).to_numpy(np.float32)[:, None]
        return values.map({c: i for i, c in enumerate(self.classes)}).to_numpy(np.int64)

    def one_hot(self, df: pd.DataFrame) -> np.ndarray:
        """(N, num_outputs) 0/1 truth for predictions.csv, whatever the kind."""
        t = self.targets(df)
        return np.eye(len(self.classes), dtype=np.int64)[t] if self.kind == "multiclass" else t.astype(np.int64)


def task_spec(task: str, tcfg: dict[str, Any], df: pd.DataFrame) -> TaskSpec:
    """Derive the target specification from the task config and the manifest's columns."""
    column = tcfg.get("label_column", "label")
    if task == "xray" and "labels" in df.columns and column == "label" and "label" not in df.columns:
        column = "labels"
    if column == "labels":
        findings = list(tcfg.get("findings") or finding_names(df))
        if not findings:
            raise ManifestError("the `labels` column names no finding: a multi-label task needs at least one")
        return TaskSpec("multilabel", findings, "labels", findings)
    if column not in df.columns:
        raise ManifestError(f"task {task!r} needs a {column!r} column in its manifest; columns are "
                            f"{[c for c in df.columns if not c.startswith('_')]}")
    names = class_names(df, column)
    positive = tcfg.get("positive_class")
    if positive is not None and (task != "histo" or column == "label"):  # the study declares a binary task
        _check_binary(task, column, str(positive), names, df)
    if len(names) < 2:
        raise ManifestError(f"column {column!r} has a single class {names}: nothing to learn")
    if len(names) > 2:
        return TaskSpec("multiclass", names, column, names)
    if positive not in names:
        negatives = [n for n in names if n.lower() in _NEGATIVE_NAMES or n.lower().startswith("no_")]
        positive = next(n for n in names if n not in negatives) if len(negatives) == 1 else names[1]
    negative = next(n for n in names if n != positive)
    return TaskSpec("binary", [positive], column, [negative, positive])


def rows_with(df: pd.DataFrame, column: str, value: str, limit: int = 10) -> str:
    """Where ``value`` occurs in ``column``: ``"rows 17, 18 (split test)"`` (1-based manifest rows;
    the splits they are in when the rows have one)."""
    if column == "labels":
        hit = finding_sets(df).map(lambda s: value in s)
    else:
        hit = df[column].astype(str) == value
    part = df[hit.to_numpy()]
    rows = [str(r) for r in part["_row"]] if "_row" in part.columns else [str(i + 1) for i in part.index]
    text = f"row{'s' * (len(rows) > 1)} {', '.join(rows[:limit])}{' ...' if len(rows) > limit else ''}"
    if "split" in part.columns:
        splits = sorted({str(s) for s in part["split"]} - {""})
        if splits:
            text += f" (split {', '.join(splits)})"
    return text


def _positive_default(task: str) -> Any:
    tasks = load_schema()["properties"]["tasks"]["properties"]
    return tasks.get(task, {}).get("properties", {}).get("positive_class", {}).get("default")


def _check_binary(task: str, column: str, positive: str, names: list[str], df: pd.DataFrame) -> None:
    """``positive_class`` declares a binary task: a column holding that class must hold exactly one
    other, and a positive class the study sets (not the schema's default) must be in the data."""
    if positive not in names and positive != _positive_default(task):
        raise ManifestError(f"tasks.{task}.positive_class: {positive!r} is not a class of column {column!r}, "
                            f"whose classes are {', '.join(names) or 'none'}; allowed: one of them (the task is "
                            "binary: positive_class and one other class)")
    if positive in names and len(names) > 2:
        counts = df[column].astype(str).value_counts()
        negative = max((n for n in names if n != positive), key=lambda n: (counts.get(n, 0), n))
        extra = [n for n in names if n not in (positive, negative)]
        shown = "; ".join(f"{n!r} in {rows_with(df, column, n)}" for n in extra)
        raise ManifestError(f"tasks.{task}.positive_class {positive!r} declares a binary task ({positive} vs "
                            f"{negative}), but column {column!r} has {len(names)} classes: {shown}. A binary "
                            "model cannot learn them; relabel or remove those rows (or, for a multiclass "
                            "task, set positive_class to null where the task allows it)")


def check_trained_classes(spec: TaskSpec, df: pd.DataFrame, source: str | Path) -> None:
    """Refuse a class (or finding) the training split never shows: its output would stay
    untrained and still count in the macro metrics.

    Args:
        spec: the task's targets.
        df: rows with a ``split`` column (``_row``: their row numbers in ``source``).
        source: the manifest the rows come from, named in the message.

    Raises:
        ManifestError: naming each such class, its rows and their splits.
    """
    if "split" not in df.columns or spec.column not in df.columns:
        return
    labeled = labeled_rows(df)
    train = labeled[labeled["split"] == "train"]
    if spec.kind == "multilabel":
        seen = set().union(*finding_sets(train)) if len(train) else set()
    else:
        seen = set(train[spec.column].astype(str))
    missing = [c for c in spec.all_classes if c not in seen]
    if missing:
        what = "finding" if spec.kind == "multilabel" else "class"
        shown = "; ".join(f"{what} {c!r} of column {spec.column!r} occurs only in {rows_with(labeled, spec.column, c)}"
                          for c in missing)
        raise ManifestError(f"{source}: {shown}. The training split has no sample of it, so the model would "
                            f"never learn it (an untrained output that still counts in the metrics); give it "
                            "training patients, relabel or remove those rows"
                            + (", or list the findings to train in `findings`" if what == "finding" else ""))


@dataclass
class StageContext:
    """A task's config, split manifest and target spec, loaded once per stage."""

    study: dict[str, Any]
    config_path: Path
    task: str
    tcfg: dict[str, Any]
    manifest: Manifest
    spec: TaskSpec

    @property
    def df(self) -> pd.DataFrame:
        return self.manifest.df

    def rows(self, split: str | list[str]) -> pd.DataFrame:
        """The rows of the split(s); ``attrs["carry"]`` names the ``evaluation.subgroups``
        columns that :func:`write_predictions` copies into predictions.csv."""
        splits = [split] if isinstance(split, str) else split
        out = self.df[self.df["split"].isin(splits)].reset_index(drop=True)
        subgroups = (self.study.get("evaluation") or {}).get("subgroups") or []
        out.attrs["carry"] = [c for c in subgroups if c in out.columns]
        return out


def load_context(config_path: str | Path, task: str, split_path: str | Path) -> StageContext:
    """Load the study config and a split manifest, and run the leakage guard."""
    study = load_study(config_path)
    tcfg = task_config(study, task)
    manifest = load_manifest(split_path)
    if "split" not in manifest.df.columns:
        raise ManifestError(f"{split_path} has no `split` column: make it with `medvit split`")
    check_no_leakage(manifest.df)
    spec = task_spec(task, tcfg, labeled_rows(manifest.df))
    check_trained_classes(spec, manifest.df, split_path)
    return StageContext(study, Path(config_path), task, tcfg, manifest, spec)


def _relocate_paths(df: pd.DataFrame, src_root: Path, dst_root: Path) -> pd.DataFrame:
    """Rewrite the manifest's path columns so they are relative to ``dst_root``."""
    df = df.copy()
    path_cols = [c for c in df.columns if c in ("image", "mask", "boxes") or c.startswith("image_")]
    for col in path_cols:
        df[col] = [os.path.relpath(src_root / v, dst_root) if isinstance(v, str) and v else v for v in df[col]]
    return df


def split_stage(config_path: str | Path, task: str, out_path: str | Path) -> Path:
    """Patient-level split of a task's manifest -> ``split.csv`` (+ ``split.json`` summary).

    Rows whose files are missing or unreadable are quarantined (listed in ``split.json``);
    a given ``split`` column is kept after the leakage check; the brain task's train and test
    splits are resampled to the configured anomaly distribution.
    """
    study = load_study(config_path)
    tcfg = task_config(study, task)
    manifest = load_manifest(task_manifest_path(study, task), check_files=True)
    df = manifest.df
    id_warnings = identifying_id_warnings(df)
    if id_warnings and study.get("identifying_patient_ids") == "error":
        raise ManifestError(f"manifest {manifest.path}: patient ids look identifying (identifying_patient_ids: "
                            "error):\n  " + "\n  ".join(id_warnings))
    for line in id_warnings:
        logger.warning("manifest %s: %s", manifest.path, line)
    spec = task_spec(task, tcfg, labeled_rows(df))
    split_cfg = tcfg["split"]
    df = assign_splits(df, seed=study["seed"], val_fraction=split_cfg["val_fraction"],
                       test_fraction=split_cfg["test_fraction"], stratify=True)
    summary: dict[str, Any] = {"task": task, "kind": spec.kind, "classes": spec.classes,
                               "manifest": str(manifest.path), "n_quarantined": len(manifest.problems),
                               "quarantined": [{"row": p.row, "column": p.column, "reason": p.reason}
                                               for p in manifest.problems], "warnings": id_warnings}
    if tcfg.get("anomaly_ratio") is not None:  # a key of the brain task's schema only
        df, summary["anomaly"] = _resample_brain(df, spec, tcfg, study["seed"])
    check_no_leakage(df)
    if int(tcfg.get("folds", 1)) > 1:  # cross-validation folds beside the hold-out split
        supervised = labeled_rows(df)
        folds = patient_kfold(supervised, k=int(tcfg["folds"]), seed=study["seed"], label_column=spec.column)
        df["fold"] = folds["fold"].reindex(df.index).astype("Int64")
        check_no_leakage(df, "fold")
        summary["folds"] = split_summary(df[df["fold"].notna()], column="fold")
    check_trained_classes(spec, df, manifest.path)
    summary["splits"] = split_summary(df)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    df = _relocate_paths(df, manifest.root, out_path.parent.resolve())
    atomic_write_text(out_path, df.drop(columns=["_row"], errors="ignore").to_csv(index=False))
    atomic_write_json(out_path.with_suffix(".json"), summary)
    return out_path


def fold_split_stage(split_path: str | Path, fold: int, out_path: str | Path) -> Path:
    """The train/val/test split of cross-validation fold ``fold`` of a split manifest with a
    ``fold`` column (``medvit split`` with ``folds`` >= 2): test = fold ``i``, validation =
    fold ``(i + 1) mod k``, training = the other folds; ``unlabeled`` rows stay unlabeled.
    Paths are rewritten relative to the output's folder.

    Raises:
        ManifestError: no ``fold`` column, or ``fold`` outside ``0..k-1``.
    """
    manifest = load_manifest(split_path)
    df = manifest.df
    if "fold" not in df.columns:
        raise ManifestError(f"{split_path} has no `fold` column: set the task's `folds` to 2 or more")
    folds = pd.to_numeric(df["fold"], errors="coerce")
    k = int(folds.max()) + 1
    if not 0 <= int(fold) < k:
        raise ManifestError(f"fold {fold} is outside 0..{k - 1} of {split_path}")
    labeled = folds.notna()
    split = np.where(folds == fold, "test", np.where(folds == (int(fold) + 1) % k, "val", "train"))
    df = df.assign(split=np.where(labeled, split, df["split"] if "split" in df.columns else "unlabeled"))
    check_no_leakage(df)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    df = _relocate_paths(df, manifest.root, out_path.parent.resolve())
    atomic_write_text(out_path, df.drop(columns=["_row"], errors="ignore").to_csv(index=False))
    return out_path


def _resample_brain(df: pd.DataFrame, spec: TaskSpec, tcfg: dict, seed: int) -> tuple[pd.DataFrame, dict]:
    """Resample train and test (``anomaly_splits``) to the anomaly distribution (validation keeps
    its natural mix, so the operating threshold is chosen on unresampled data)."""
    parts, achieved = [], {}
    for name, part in df.groupby("split", sort=False):
        if name in tcfg.get("anomaly_splits", ("train", "test")):
            abnormal = part[spec.column].astype(str) == spec.classes[0]
            part, achieved[name] = resample_to_anomaly_ratio(part, tcfg["anomaly_ratio"], by=tcfg["resample_by"],
                                                             seed=seed, is_abnormal=abnormal)
        parts.append(part)
    return pd.concat(parts).sort_values("_row").reset_index(drop=True), achieved


def labeled_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with a supervised role: all but ``split == "unlabeled"`` (pretraining-only images)."""
    return df[df["split"] != "unlabeled"] if "split" in df.columns else df


def records(ctx: StageContext, df: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per sample for :class:`medvit.data.datasets.SampleDataset`. ``target`` is the
    row's truth (:meth:`TaskSpec.targets`); on ``unlabeled`` rows, which only pretraining
    reads, it is NaN (class index -1 for multiclass)."""
    labeled = (df["split"] != "unlabeled").to_numpy() if "split" in df.columns else np.ones(len(df), bool)
    known = ctx.spec.targets(df[labeled])
    targets = np.full((len(df), *known.shape[1:]), -1 if known.dtype.kind == "i" else np.nan, dtype=known.dtype)
    targets[labeled] = known
    recs = []
    for i, row in enumerate(df.to_dict("records")):
        recs.append({"row": row, "patient_id": str(row["patient_id"]), "sample_id": str(row["sample_id"]),
                     "target": targets[i]})
    return recs


def write_predictions(path: str | Path, df: pd.DataFrame, spec: TaskSpec, scores: np.ndarray,
                      extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Write predictions.csv (Contract 3): patient_id, sample_id, split, true_<c>, score_<c>[, extra],
    then the subgroup columns ``df.attrs["carry"]`` names (see :meth:`StageContext.rows`)."""
    truth = spec.one_hot(df)
    out = pd.DataFrame({"patient_id": df["patient_id"].astype(str).values,
                        "sample_id": df["sample_id"].astype(str).values,
                        "split": df["split"].values})
    for j, c in enumerate(spec.classes):
        out[f"true_{c}"] = truth[:, j]
        out[f"score_{c}"] = np.clip(scores[:, j], 0.0, 1.0)
    for name, values in (extra or {}).items():
        out[name] = values
    for name in df.attrs.get("carry") or []:
        if name in df.columns and name not in out.columns:
            out[name] = df[name].fillna("").astype(str).values
    atomic_write_text(path, out.to_csv(index=False, float_format="%.6g"))
    return out


def model_sidecar(ctx: StageContext, model_name: str, split_path: str | Path, **fields: Any) -> dict[str, Any]:
    """Metadata stored in model.json beside the weights (read back by evaluation)."""
    return {"task": ctx.task, "model": model_name, "spec": asdict(ctx.spec), "split_manifest": str(split_path),
            **fields, "provenance": provenance(config=ctx.study, config_path=ctx.config_path,
                                               manifest_path=split_path)}


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    path = Path(weights).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}
