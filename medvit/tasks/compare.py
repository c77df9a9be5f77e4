"""Comparison stage: every model of a 2D classification task side by side, accuracy against
compute (the DCT-HistoTransformer table of the histo task; any classification task works).

For each model of ``tasks.<task>.models`` it reads the ``metrics.json`` of every training
seed (``compare.seeds`` runs: the study seed in ``<task>/<model>/``, the others in
``<task>/<model>/seed<s>/``), takes patch (sample) and patient-level accuracy, balanced
accuracy, macro-F1 and AUROC of the test split and reports their mean and sample standard
deviation over the seeds. Then it measures each architecture on the CPU at the task's input
size: parameters, FLOPs of one image (one counter for all models,
:func:`medvit.engine.compute.count_flops`, attention included) and
latency/throughput at the batch sizes of ``compare.latency_batches``. A DVPT-adapted ViT of
the task (``<task>/adapt/dvpt_p*/``, written by :mod:`medvit.tasks.adapt`) joins the table
when its files exist.

Outputs: ``<out_dir>/comparison.json`` and ``<out_dir>/accuracy_vs_flops.png``;
:func:`medvit.evaluation.compare_report.compare_parts` renders them in the report.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medvit.config import block_defaults, is_vit, load_study, study_dir, task_config
from medvit.engine.compute import count_flops, measure_latency
from medvit.errors import ConfigError
from medvit.evaluation import metrics as M
from medvit.evaluation.aggregate import aggregate_patients
from medvit.evaluation.compare_report import LEVEL_LABELS, LEVELS, METRIC_LABELS, METRICS
from medvit.evaluation.evaluate import read_predictions, write_json
from medvit.fileio import atomic_write_bytes
from medvit.models import count_parameters, create_model
from medvit.provenance import provenance
from medvit.tasks.adapt import build_from_card, read_adapter_card
from medvit.tasks.common import read_sidecar

# metrics.json name of each table metric, per task kind; binary macro-F1 is recomputed (below)
_SOURCE = {"binary": {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "auroc": "auroc"},
           "multiclass": {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "f1_macro": "f1_macro",
                          "auroc": "auroc_macro"}}


# ------------------------------------------------------------------------------ layout
def compare_config(tcfg: dict[str, Any]) -> dict[str, Any]:
    """A task's ``compare`` block over the schema's defaults."""
    return {**block_defaults("compare"), **(tcfg.get("compare") or {})}


def training_seeds(study: dict[str, Any], task: str) -> list[int]:
    """The seeds each model of ``task`` is trained with: ``seed, seed + 1, ...`` (``compare.seeds`` of them)."""
    n = int(compare_config(task_config(study, task))["seeds"])
    return [int(study["seed"]) + k for k in range(n)]


def run_dir(study: dict[str, Any], task: str, model: str, seed: int) -> Path:
    """Folder of one training run: ``<task>/<model>/`` for the study seed, ``<task>/<model>/seed<s>/`` otherwise."""
    base = study_dir(study) / task / model
    return base if int(seed) == int(study["seed"]) else base / f"seed{int(seed)}"


def cv_folds(study: dict[str, Any], task: str) -> int:
    """Cross-validation folds of ``task`` (``tasks.<task>.folds``; 1 = none)."""
    return int(task_config(study, task).get("folds", 1) or 1)


def run_folders(study: dict[str, Any], task: str, model: str) -> list[tuple[dict[str, int], Path]]:
    """The runs of one model the comparison summarises: with ``folds`` >= 2 the k fold runs
    (``<task>/<model>/fold<i>/``, ``{"fold": i}``), otherwise one run per training seed
    (:func:`run_dir`, ``{"seed": s}``)."""
    k = cv_folds(study, task)
    if k > 1:
        return [({"fold": i}, study_dir(study) / task / model / f"fold{i}") for i in range(k)]
    return [({"seed": s}, run_dir(study, task, model, s)) for s in training_seeds(study, task)]


# ------------------------------------------------------------------------------ compute
def measure_compute(model: nn.Module, input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
                    repeats: int = 10, threads: int | None = 1) -> dict[str, Any]:
    """Parameters, FLOPs per image and CPU latency/throughput of ``model``.

    Args:
        model: the network (moved to the CPU here, evaluated in eval mode).
        input_shape: one image's shape (C, H, W).
        batches: batch sizes timed.
        repeats: timed calls per batch size (after 3 warm-up calls).
        threads: torch CPU threads while timing (restored after); None keeps the current setting.

    Returns:
        ``{"params", "trainable_params", "flops", "input": [1, C, H, W], "cpu_threads",
        "latency": {"<batch>": {"batch", "median_s", "per_sample_ms", "throughput"}}}``.
    """
    model = model.cpu().eval()
    params, trainable = count_parameters(model)
    example = torch.zeros(1, *input_shape)
    flops = count_flops(model, example)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        gen = torch.Generator().manual_seed(0)
        latency = {str(b): measure_latency(model, torch.randn(int(b), *input_shape, generator=gen), repeats=repeats)
                   for b in batches}
    finally:
        torch.set_num_threads(previous)
    return {"params": params, "trainable_params": trainable, "flops": flops, "input": [1, *map(int, input_shape)],
            "cpu_threads": torch.get_num_threads() if not threads else int(threads), "latency": latency}


def build_from_model_card(card: dict[str, Any]) -> nn.Module:
    """Rebuild (randomly initialised) the architecture described by a ``model.json``."""
    name = card["model"]
    kwargs: dict[str, Any] = {}
    if is_vit(name):
        kwargs = {"img_size": card["image_size"], "patch_size": card.get("patch_size", 16)}
    return create_model(name, in_chans=int(card["in_chans"]), num_classes=len(card["spec"]["classes"]), **kwargs)


# ------------------------------------------------------------------------------ accuracy
def _binary_macro_f1(record: dict[str, Any], predictions: Path) -> dict[str, float]:
    """Macro-F1 (mean F1 of both classes) of a binary run at the thresholds its metrics.json
    chose on validation, per level, recomputed from predictions.csv."""
    df = read_predictions(predictions)
    (cls,) = record["classes"]
    thr = record.get("threshold") or {}
    tables = {"sample": df[df["split"] == "test"],
              "patient": aggregate_patients(df, (record.get("aggregate") or {}).get("method", "max"),
                                            (record.get("aggregate") or {}).get("top_k") or 3, "binary")}
    tables["patient"] = tables["patient"][tables["patient"]["split"] == "test"]
    out = {}
    for level, table in tables.items():
        t = (thr.get(level) or {}).get(cls)
        if t is None or table.empty:
            out[level] = math.nan
            continue
        y = table[f"true_{cls}"].to_numpy(np.int64)
        pred = M.binarize(table[f"score_{cls}"].to_numpy(float), t).astype(np.int64)
        out[level] = M.f1(y, pred, average="macro")
    return out


def run_metrics(metrics_path: str | Path) -> dict[str, dict[str, float]]:
    """The table metrics of one run: ``{"sample": {metric: value}, "patient": {...}}`` (test
    split; NaN when undefined) from its metrics.json (and predictions.csv beside it for the
    macro-F1 of a binary task)."""
    metrics_path = Path(metrics_path)
    record = json.loads(metrics_path.read_text(encoding="utf-8"))
    kind = record.get("kind")
    if kind not in _SOURCE:
        raise ConfigError(f"{metrics_path}: a {kind!r} task; the comparison handles binary and multiclass tasks")
    blocks = {"patient": record.get("metrics") or {}, "sample": (record.get("sample_level") or {}).get("metrics") or {}}
    out: dict[str, dict[str, float]] = {}
    for level in LEVELS:
        values = {}
        for name in METRICS:
            src = _SOURCE[kind].get(name)
            entry = blocks[level].get(src) if src else None
            value = entry.get("value") if isinstance(entry, dict) else None
            values[name] = math.nan if value is None else float(value)
        out[level] = values
    if kind == "binary":
        predictions = metrics_path.parent / "predictions.csv"
        f1 = _binary_macro_f1(record, predictions) if predictions.is_file() else {}
        for level in LEVELS:
            out[level]["f1_macro"] = f1.get(level, math.nan)
    return out


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; null with one value) over the defined values."""
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    mean = float(np.mean(defined)) if defined else None
    sd = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(defined), "values": [None if v is None or math.isnan(v) else float(v)
                                                                   for v in values]}


def _aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {level: {name: summarize([r[level][name] for r in runs]) for name in METRICS} for level in LEVELS}


# ------------------------------------------------------------------------------ DVPT
def _dvpt_entry(study: dict[str, Any], task: str, cmp: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """The DVPT-adapted ViT trained on all training patients, if the adaptation stage ran."""
    adapt_dir = study_dir(study) / task / "adapt"
    candidates = []
    for path in sorted(adapt_dir.glob("dvpt_p*/metrics.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates.append((float(record.get("fraction") or 0.0), path, record))
    if not candidates:
        notes.append(f"no DVPT-adapted ViT for {task} (no {adapt_dir}/dvpt_p*/metrics.json): not in the table")
        return None
    fraction, path, record = max(candidates, key=lambda c: c[0])
    entry: dict[str, Any] = {"model": "dvpt", "label": f"{record.get('model', 'adapt/dvpt')} (DVPT, frozen ViT)",
                             "source": str(path), "fraction": fraction, "seeds": [int(study["seed"])],
                             "runs": [{"seed": int(study["seed"]), "path": str(path), **run_metrics(path)}],
                             "train_seconds": summarize([record.get("train_seconds") or math.nan])}
    entry.update(_aggregate_runs(entry["runs"]))
    try:
        card = read_adapter_card(path.parent / "adapter.safetensors")
        model = build_from_card(card)
        size = int(card["image_size"])
        entry["compute"] = measure_compute(model, (int(card["in_chans"]), size, size), cmp["latency_batches"],
                                           cmp["latency_repeats"], cmp["cpu_threads"])
        entry["compute"]["trainable_params"] = record.get("trainable_params")
    except Exception as exc:  # the adaptation stage is optional here: report, never fail
        notes.append(f"DVPT compute not measured ({type(exc).__name__}: {exc})")
        entry["compute"] = {"params": record.get("params"), "trainable_params": record.get("trainable_params"),
                            "flops": None, "latency": {}}
    return entry


# ------------------------------------------------------------------------------ stage
def compare_stage(config_path: str | Path, task: str, out_dir: str | Path) -> Path:
    """Compare every model of ``task`` over its seeds -> ``<out_dir>/comparison.json`` (+ figure).

    Raises:
        ConfigError: a model's metrics.json or model.json is missing (train and evaluate it first).
    """
    study = load_study(config_path)
    tcfg = task_config(study, task)
    cmp = compare_config(tcfg)
    folds = cv_folds(study, task)
    seeds = training_seeds(study, task) if folds == 1 else [int(study["seed"])]
    over = "folds" if folds > 1 else "seeds"
    notes: list[str] = []
    entries: list[dict[str, Any]] = []
    kind = classes = None
    for model in tcfg["models"]:
        runs, train_s = [], []
        folders = run_folders(study, task, model)
        for key, folder in folders:
            path = folder / "metrics.json"
            if not path.is_file():
                what = ", ".join(f"{k} {v}" for k, v in key.items())
                raise ConfigError(f"{path} not found: train, predict and evaluate {model} ({what}) first")
            record = json.loads(path.read_text(encoding="utf-8"))
            kind, classes = record.get("kind"), record.get("classes")
            runs.append({**key, "path": str(path), **run_metrics(path)})
            train_s.append(record.get("train_seconds") or math.nan)
        card = read_sidecar(folders[0][1] / "model.safetensors")
        if not card:
            raise ConfigError(f"model.json of {model} not found beside {folders[0][1]}")
        size = int(card["image_size"])
        compute = measure_compute(build_from_model_card(card), (int(card["in_chans"]), size, size),
                                  cmp["latency_batches"], cmp["latency_repeats"], cmp["cpu_threads"])
        entry = {"model": model, "label": model, "seeds": seeds, "runs": runs, "compute": compute,
                 "train_seconds": summarize(train_s)}
        if "patch_size" in card:
            entry["patch_size"] = card["patch_size"]
        entry.update(_aggregate_runs(runs))
        entries.append(entry)
    dvpt = _dvpt_entry(study, task, cmp, notes)
    if dvpt is not None:
        entries.append(dvpt)
    if folds > 1:
        notes.append(f"{folds}-fold patient-level cross-validation: each fold's test patients are scored by the "
                     "model trained without them; mean ± sd over the folds")
    elif len(seeds) == 1:
        notes.append("one training seed per model: no standard deviation (set compare.seeds to 2 or more)")
    out_dir = Path(out_dir)
    figure = plot_accuracy_vs_flops(entries, out_dir / "accuracy_vs_flops.png", task, over=over)
    record = {"study": study["study"], "task": task, "kind": kind, "classes": classes,
              "image_size": tcfg["image_size"], "seeds": seeds, "runs_over": over, "folds": folds,
              "metrics": list(METRICS), "levels": list(LEVELS),
              "sd": f"sample standard deviation over {over} (ddof 1)", "compare": cmp,
              "flop_counter": "torch.utils.flop_counter (2 FLOPs per multiply-add of matmuls and convolutions; "
                              "attention via the SDPA math backend; norms, activations, softmax not counted)",
              "models": entries, "figure": figure.name, "notes": notes,
              "provenance": provenance(config=study, config_path=config_path)}
    return write_json(out_dir / "comparison.json", record)


# ------------------------------------------------------------------------------ figure
def plot_accuracy_vs_flops(entries: Sequence[dict[str, Any]], path: str | Path, task: str,
                           metric: str = "accuracy", over: str = "seeds") -> Path:
    """Test ``metric`` (mean ± sd over seeds or folds, ``over``; patch and patient level) against FLOPs per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"sample": dict(marker="o", linestyle="none"), "patient": dict(marker="s", linestyle="none",
                                                                          fillstyle="none")}
    for level in LEVELS:
        pts = [(e["compute"]["flops"], e[level][metric]) for e in entries if e["compute"].get("flops")]
        if not pts:
            continue
        x = [p[0] / 1e6 for p in pts]
        y = [np.nan if s["mean"] is None else s["mean"] for _, s in pts]
        err = [0.0 if s["sd"] is None else s["sd"] for _, s in pts]
        ax.errorbar(x, y, yerr=err, capsize=3, label=f"{LEVEL_LABELS[level]} level", **styles[level])
    for e in entries:
        flops, s = e["compute"].get("flops"), e["sample"][metric]
        if flops and s["mean"] is not None:
            ax.annotate(e["label"], (flops / 1e6, s["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per image (M, log scale)")
    ax.set_ylabel(f"test {METRIC_LABELS[metric]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = max((len(e["runs"]) for e in entries), default=0)
    unit = over[:-1]
    ax.set_title(f"{task}: {METRIC_LABELS[metric]} against compute (mean ± sd over {n} {unit}{'s' * (n != 1)})",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

