"""The evaluate stage: predictions.csv -> metrics.json (Contract 3).

Thresholds are chosen on the ``val`` rows and applied to the ``test`` rows; every metric is
reported on ``test``, at patient level (the headline: sample scores aggregated per patient)
and at sample level (beside it), each with a bootstrap confidence interval over test
patients. Everything is computed from the predictions table alone::

    result = evaluate_predictions(pd.read_csv("predictions.csv"), aggregate="max")
    result["metrics"]["auroc"]            # {"value": 0.91, "ci95": [0.84, 0.97], "n_boot": 1000}

Metric names per kind (docs/metrics.md defines each):

* binary: ``auroc``, ``ap``, ``accuracy``, ``balanced_accuracy``, ``sensitivity``,
  ``specificity``, ``f1``, ``kappa``;
* multiclass (argmax, no threshold): ``accuracy``, ``balanced_accuracy``, ``kappa``,
  ``f1_macro``, ``auroc_macro``, ``ap_macro`` (one-vs-rest);
* multilabel (one threshold per finding): ``auroc_macro``, ``ap_macro``, ``f1_macro``,
  ``sensitivity_macro``, ``specificity_macro``, ``auroc_<finding>``;
* plus ``dice`` and ``hd95`` (means) when the predictions carry them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit.config import load_study
from medvit.evaluation import metrics as M
from medvit.evaluation.aggregate import (
    ID_COLUMNS,
    Kind,
    PredictionsError,
    aggregate_patients,
    check_predictions,
    infer_kind,
)
from medvit.evaluation.bootstrap import Statistic, cluster_bootstrap
from medvit.fileio import atomic_write_json, sha256_file
from medvit.provenance import provenance

SEGMENTATION_COLUMNS = ("dice", "hd95")
KINDS = ("binary", "multiclass", "multilabel")


@dataclass
class _Metric:
    value: float
    stat: Statistic


class _ChunkCache:
    """Shares per-class results between the statistics evaluated on one resample chunk
    (e.g. ``auroc_<f>`` and ``auroc_macro``), so each is computed once per chunk."""

    def __init__(self) -> None:
        self._weights: np.ndarray | None = None
        self._values: dict[tuple, Any] = {}

    def get(self, key: tuple, weights: np.ndarray, compute) -> Any:
        if weights is not self._weights:  # a new chunk (the reference keeps its id from being reused)
            self._weights, self._values = weights, {}
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


def ci_key(ci: float) -> str:
    """JSON key of an interval: ``ci95`` for 0.95, ``ci90`` for 0.9, ``ci97_5`` for 0.975."""
    return "ci" + f"{100 * ci:g}".replace(".", "_")


# ------------------------------------------------------------------------ metric suites
def _suite(kind: Kind, classes: Sequence[str], table: pd.DataFrame,
           thresholds: np.ndarray | None) -> tuple[dict[str, _Metric], list[str]]:
    """Point estimates and bootstrap statistics of every metric of one level's test rows."""
    truth = table[[f"true_{c}" for c in classes]].to_numpy(np.int64)
    scores = table[[f"score_{c}" for c in classes]].to_numpy(float)
    out: dict[str, _Metric] = {}
    notes: list[str] = []
    cache = _ChunkCache()

    if kind == "binary":
        y, s = truth[:, 0], scores[:, 0]
        pred = M.binarize(s, thresholds[0])
        out["auroc"] = _Metric(M.auroc(y, s), lambda W: _ranking(cache, y, s, W)[0])
        out["ap"] = _Metric(M.average_precision(y, s), lambda W: _ranking(cache, y, s, W)[1])
        points = {"accuracy": M.accuracy(y, pred), "balanced_accuracy": M.balanced_accuracy(y, pred),
                  "sensitivity": M.sensitivity(y, pred), "specificity": M.specificity(y, pred),
                  "f1": M.f1(y, pred), "kappa": M.cohen_kappa(y, pred)}
        for name, value in points.items():
            out[name] = _Metric(value, lambda W, n=name: cache.get(("binary",), W,
                                                                   lambda: M.binary_metrics(y, pred, W))[n])
        if not (y.any() and not y.all()):
            notes.append(f"test holds a single class for {classes[0]!r}: auroc is undefined")
    elif kind == "multiclass":
        y, pred = truth.argmax(1), scores.argmax(1)
        k = len(classes)
        points = {"accuracy": M.accuracy(y, pred), "balanced_accuracy": M.balanced_accuracy(y, pred),
                  "kappa": M.cohen_kappa(y, pred), "f1_macro": M.f1(y, pred, average="macro")}
        for name, value in points.items():
            out[name] = _Metric(value, lambda W, n=name: cache.get(
                ("confusion",), W, lambda: M.confusion_metrics(M.weighted_confusion(y, pred, k, W)))[n])
        out.update(_ranking_macros(classes, truth, scores, notes, cache))
    else:
        pred = M.binarize(scores, thresholds)
        out.update(_ranking_macros(classes, truth, scores, notes, cache))
        points = {"f1_macro": M.f1(truth, pred, average="macro"),
                  "sensitivity_macro": M.macro(M.per_class(M.sensitivity, truth, pred))[0],
                  "specificity_macro": M.macro(M.per_class(M.specificity, truth, pred))[0]}

        def per_finding(W: np.ndarray) -> list[dict[str, np.ndarray]]:
            return cache.get(("binary",), W, lambda: [M.binary_metrics(truth[:, j], pred[:, j], W)
                                                      for j in range(truth.shape[1])])

        for name, value in points.items():
            base = name.removesuffix("_macro")
            out[name] = _Metric(value, lambda W, b=base: _nanmean_cols(np.stack([m[b] for m in per_finding(W)], 1)))
        for j, c in enumerate(classes):
            out[f"auroc_{c}"] = _Metric(M.auroc(truth[:, j], scores[:, j]),
                                        lambda W, j=j: _ranking(cache, truth[:, j], scores[:, j], W, j)[0])

    for col in SEGMENTATION_COLUMNS:
        if col in table.columns:
            v = table[col].to_numpy(float)
            n_nan = int(np.isnan(v).sum())
            if n_nan:
                notes.append(f"{col}: {n_nan} of {v.size} rows undefined (one mask empty) and skipped")
            defined = v[~np.isnan(v)]
            out[col] = _Metric(float(defined.mean()) if defined.size else math.nan,
                               lambda W, v=v: M.weighted_nanmean(v, W))
    return out, notes


RANKING_METRICS = ("auroc", "ap", "auroc_macro", "ap_macro")  # threshold-free: defined for any score


def _ranking_macros(classes: Sequence[str], truth: np.ndarray, scores: np.ndarray, notes: list[str],
                    cache: _ChunkCache) -> dict[str, _Metric]:
    """Macro AUROC and AP over the classes where they are defined (one-vs-rest)."""
    out = {}
    for i, (name, fn, why) in enumerate((("auroc_macro", M.auroc, "a single class in test"),
                                         ("ap_macro", M.average_precision, "no positive in test"))):
        value, excluded = M.macro(M.per_class(fn, truth, scores), classes)
        if excluded:
            notes.append(f"{name} excludes {', '.join(map(repr, excluded))} ({why}: undefined)")

        def stat(W: np.ndarray, i: int = i) -> np.ndarray:
            cols = [_ranking(cache, truth[:, j], scores[:, j], W, j)[i] for j in range(truth.shape[1])]
            return _nanmean_cols(np.stack(cols, axis=1))

        out[name] = _Metric(value, stat)
    return out


def _ranking(cache: _ChunkCache, y: np.ndarray, s: np.ndarray, W: np.ndarray, j: int = 0):
    """(auroc, ap) of class ``j`` for the chunk ``W``, computed once per chunk."""
    return cache.get(("ranking", j), W, lambda: M.weighted_ranking(y, s, W))


def _nanmean_cols(a: np.ndarray) -> np.ndarray:
    n = (~np.isnan(a)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(a, axis=1) / n, np.nan)


# ------------------------------------------------------------------------ thresholds
def _thresholds(classes: Sequence[str], val: pd.DataFrame, spec: str | float,
                level: str, notes: list[str]) -> tuple[np.ndarray, dict[str, float], list[str]]:
    """Per-class thresholds chosen on ``val``: values, ``{class: value}`` and the classes whose
    threshold fell back to 0.5 (validation could not choose one)."""
    values, record, fallback = [], {}, []
    for c in classes:
        t = M.select_threshold(val[f"true_{c}"].to_numpy(), val[f"score_{c}"].to_numpy(float), spec)
        if t.note:
            notes.append(f"{level}-level threshold for {c!r}: {t.note}")
        values.append(t.value)
        record[c] = t.value
        if t.method == "fallback":
            fallback.append(c)
    return np.array(values, dtype=float), record, fallback


# ------------------------------------------------------------------------ evaluation
def evaluate_predictions(df: pd.DataFrame, kind: Kind | None = None, aggregate: str = "max", top_k: int = 3,
                         threshold: str | float = "youden", n_bootstrap: int = 1000, ci: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
    """Patient- and sample-level metrics with bootstrap intervals from a predictions table.

    Args:
        df: predictions (Contract 3) with ``val`` and ``test`` rows (other splits are ignored).
        kind: ``binary``/``multiclass``/``multilabel``; inferred from ``df`` when None.
        aggregate: ``max``, ``mean`` or ``topk`` (patient score from sample scores; multiclass
            always averages the softmax vectors).
        top_k: k of ``topk``.
        threshold: ``youden``, ``f1`` or a fixed number in [0, 1]; chosen per class on ``val``
            (patient level for patient metrics, sample level for sample metrics). Unused for
            multiclass (argmax).
        n_bootstrap: bootstrap resamples of the test patients (0: no intervals).
        ci: interval coverage.
        seed: bootstrap seed.

    Returns:
        The evaluation part of metrics.json: ``level``, ``n_patients``, ``n_samples``, ``kind``,
        ``classes``, ``threshold``, ``aggregate``, ``metrics``, ``sample_level``,
        ``sample_count_baseline`` (the ranking metrics of scoring each test patient by their
        number of samples, with CIs from the same resamples; None where every patient has as
        many samples, or for multiclass), ``support``, ``bootstrap`` and ``notes``. Undefined
        values are NaN (written as null).

    Raises:
        PredictionsError: the table breaks Contract 3 or has no test rows.
        LeakageError: a patient appears in both val and test.
    """
    threshold = M.parse_threshold(threshold)
    df = df.copy()
    classes = check_predictions(df)
    if "sample_id" not in df.columns:
        df["sample_id"] = [f"r{i + 1}" for i in range(len(df))]
    df["patient_id"] = df["patient_id"].astype(str)
    df["split"] = df["split"].astype(str).str.strip().str.lower()
    df = df[df["split"].isin(["val", "test"])].reset_index(drop=True)
    if kind is None:
        kind = infer_kind(df, classes)
    elif kind not in KINDS:
        raise PredictionsError(f"kind {kind!r} is not allowed; use one of {', '.join(KINDS)}")
    if (kind == "binary") != (len(classes) == 1):
        raise PredictionsError(f"kind {kind!r} does not fit {len(classes)} true_<c>/score_<c> pair(s): binary "
                               "predictions have exactly one (the positive class), multiclass/multilabel several")
    method = "mean" if kind == "multiclass" else aggregate
    patients = aggregate_patients(df, method, top_k, kind)

    test_s, val_s = df[df["split"] == "test"], df[df["split"] == "val"]
    test_p = patients[patients["split"] == "test"].reset_index(drop=True)
    val_p = patients[patients["split"] == "val"]
    if test_s.empty:
        raise PredictionsError("predictions have no `test` rows to evaluate (split column values: "
                               + ", ".join(sorted(df["split"].unique())) + ")")

    notes: list[str] = []
    if kind == "multiclass":
        thr_p = thr_s = None
        threshold_record: dict[str, Any] = {"method": "argmax"}
    else:
        thr_p, rec_p, used_p = _thresholds(classes, val_p, threshold, "patient", notes)
        thr_s, rec_s, used_s = _thresholds(classes, val_s, threshold, "sample", notes)
        threshold_record = {"method": "fixed" if isinstance(threshold, float) else threshold, "selected_on": "val",
                            "rule": "positive when score >= threshold", "patient": rec_p, "sample": rec_s}
        if used_p or used_s:  # the classes whose threshold validation could not choose, per level
            threshold_record["fallback"] = 0.5
            threshold_record["fallback_classes"] = {"patient": used_p, "sample": used_s}

    suite_p, notes_p = _suite(kind, classes, test_p, thr_p)
    suite_s, notes_s = _suite(kind, classes, test_s, thr_s)
    notes += [f"patient level: {n}" for n in notes_p] + [f"sample level: {n}" for n in notes_s]

    codes = pd.Index(test_p["patient_id"]).get_indexer(test_s["patient_id"])
    key = ci_key(ci)
    boot_p = cluster_bootstrap({n: m.stat for n, m in suite_p.items()}, np.arange(len(test_p)), n_bootstrap, ci, seed)
    boot_s = cluster_bootstrap({n: m.stat for n, m in suite_s.items()}, codes, n_bootstrap, ci, seed)

    def block(suite: dict[str, _Metric], boot) -> dict[str, Any]:
        return {n: {"value": m.value, key: [boot[n].lo, boot[n].hi], "n_boot": boot[n].n_used}
                for n, m in suite.items()}

    count_baseline = None
    if kind != "multiclass" and test_p["n_samples"].nunique() > 1:
        # A patient's label is the union over their images, so patients with more images are
        # positive more often, and a max/top-k score rises with the number of images drawn:
        # ranking patients by their image count alone is the floor a model must clear.
        counted = test_p.copy()
        for c in classes:
            counted[f"score_{c}"] = counted["n_samples"].astype(float)
        suite_c, _ = _suite(kind, classes, counted, np.full(len(classes), np.inf))
        suite_c = {n: m for n, m in suite_c.items() if n in RANKING_METRICS}
        boot_c = cluster_bootstrap({n: m.stat for n, m in suite_c.items()}, np.arange(len(test_p)), n_bootstrap,
                                   ci, seed)
        count_baseline = {"score": "number of test images of the patient", "metrics": block(suite_c, boot_c)}

    def support(table: pd.DataFrame) -> dict[str, int]:
        return {c: int(table[f"true_{c}"].sum()) for c in classes}

    return {
        "level": "patient",
        "n_patients": int(len(test_p)),
        "n_samples": int(len(test_s)),
        "kind": kind,
        "classes": list(classes),
        "threshold": threshold_record,
        "aggregate": {"method": method, "requested": aggregate, "top_k": int(top_k) if method == "topk" else None},
        "metrics": block(suite_p, boot_p),
        "sample_level": {"n_samples": int(len(test_s)), "n_patients": int(len(test_p)),
                         "metrics": block(suite_s, boot_s)},
        "sample_count_baseline": count_baseline,
        "support": {"split": "test", "patient": support(test_p), "sample": support(test_s),
                    "val_patients": int(len(val_p)), "val_samples": int(len(val_s))},
        "bootstrap": {"n": int(n_bootstrap), "ci": float(ci), "seed": int(seed),
                      "method": "percentile; test patients resampled with replacement, all samples of a "
                                "drawn patient kept (cluster bootstrap); resamples where a metric is "
                                "undefined are skipped (n_boot = resamples used)"},
        "notes": notes,
    }


# ------------------------------------------------------------------------ IO
def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read predictions.csv keeping identifiers as text and empty cells as NaN in numeric columns.

    Raises:
        PredictionsError: the file is missing or not a CSV table.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"predictions file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PredictionsError(f"{path}: not a readable CSV table ({exc})") from None
    for col in df.columns:
        if col in ID_COLUMNS:
            continue
        text = df[col].str.strip()
        num = pd.to_numeric(text.where(text != "", None), errors="coerce")
        known = col.startswith(("true_", "score_")) or col in SEGMENTATION_COLUMNS
        if known or num.notna().sum() == (text != "").sum():
            df[col] = num.astype(float)
    return df


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy/pandas values and paths to JSON types; NaN and inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN -> null)."""
    return atomic_write_json(path, to_jsonable(obj), nan_as_null=True)


def _read_model_json(folder: Path, notes: list[str]) -> dict[str, Any]:
    path = folder / "model.json"
    if not path.is_file():
        notes.append(f"no model.json beside the predictions ({path}): params and train time unknown")
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"model.json unreadable ({exc}): params and train time unknown")
        return {}
    return meta if isinstance(meta, dict) else {}


def write_metrics(config_path: str | Path, task: str, model: str, predictions_path: str | Path,
                  out_path: str | Path) -> Path:
    """Evaluate one model's predictions.csv with the study's settings -> metrics.json (the
    evaluate stage, :func:`medvit.tasks.evaluate.evaluate_stage`, then packages the model).

    Reads ``evaluation`` (bootstrap, ci, aggregate, top_k, threshold) and ``seed`` from the
    study, and ``params``, ``trainable_params``, ``train_seconds``, ``flops`` (per sample),
    ``latency_ms`` (per sample, batch 1, on ``latency_device``) and ``split_manifest`` from the
    ``model.json`` written by training beside predictions.csv (null when absent).

    Returns:
        ``out_path``.
    """
    study = load_study(config_path)
    ev = study["evaluation"]
    predictions_path = Path(predictions_path)
    df = read_predictions(predictions_path)
    result = evaluate_predictions(df, aggregate=ev["aggregate"], top_k=ev["top_k"], threshold=ev["threshold"],
                                  n_bootstrap=ev["bootstrap"], ci=ev["ci"], seed=study["seed"])
    notes = result.pop("notes")
    meta = _read_model_json(predictions_path.parent, notes)
    manifest = meta.get("split_manifest")
    if manifest and not Path(manifest).is_file():
        notes.append(f"split manifest {manifest} recorded in model.json not found: its hash is not recorded")
        manifest = None
    prov = provenance(config=study, config_path=config_path, manifest_path=manifest)
    prov["predictions_path"] = str(predictions_path)
    prov["predictions_sha256"] = sha256_file(predictions_path)
    record = {"study": study["study"], "task": task, "model": model, **result,
              "params": meta.get("params"), "trainable_params": meta.get("trainable_params"),
              "train_seconds": meta.get("train_seconds"), "flops": meta.get("flops"),
              "latency_ms": meta.get("latency_ms"), "latency_device": meta.get("latency_device"),
              "notes": notes, "provenance": prov}
    return write_json(out_path, record)
