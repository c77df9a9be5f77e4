"""Report figures (matplotlib, Agg backend, no fonts or files fetched): ROC and
precision-recall curves with the operating point chosen on validation, reliability diagrams,
confusion matrices and model-comparison charts.

Every function draws from patient-level test tables (one row per patient with ``true_<c>``
and ``score_<c>`` columns, as :func:`medvit.evaluation.aggregate.aggregate_patients` makes
them), writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from medvit.evaluation.metrics import calibration_bins, expected_calibration_error  # noqa: E402
from medvit.fileio import atomic_path  # noqa: E402

DPI = 80
MAX_CLASSES = 8  # curves of at most this many classes (the tables list every class)
_COLORS = plt.get_cmap("tab10").colors


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = DPI, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG atomically (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return path


def _both(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def roc_pr_figure(tables: Mapping[str, pd.DataFrame], classes: Sequence[str],
                  thresholds: Mapping[str, Mapping[str, float]], path: str | Path) -> Path | None:
    """ROC (left) and precision-recall (right) curves per class, one line per model, with the
    operating point of the threshold chosen on validation marked.

    Args:
        tables: model -> patient-level test table.
        classes: class names (curves for the first :data:`MAX_CLASSES`).
        thresholds: model -> class -> threshold chosen on validation (absent: no marker,
            e.g. multiclass argmax).
        path: PNG to write.

    Returns:
        ``path``, or None when no class has both outcomes among the test patients.
    """
    shown = [c for c in classes[:MAX_CLASSES]
             if any(_both(t[f"true_{c}"].to_numpy()) for t in tables.values() if f"true_{c}" in t)]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 2, figsize=(8.4, 3.1 * len(shown)), squeeze=False)
    for row, c in enumerate(shown):
        ax_roc, ax_pr = axes[row]
        for k, (model, table) in enumerate(tables.items()):
            y, s = table[f"true_{c}"].to_numpy().astype(int), table[f"score_{c}"].to_numpy(float)
            if not _both(y):
                continue
            color = _COLORS[k % len(_COLORS)]
            fpr, tpr, _ = roc_curve(y, s)
            prec, rec, _ = precision_recall_curve(y, s)
            ax_roc.plot(fpr, tpr, color=color, lw=1.6, label=model, drawstyle="steps-post")
            ax_pr.plot(rec, prec, color=color, lw=1.6, label=model, drawstyle="steps-post")
            thr = (thresholds.get(model) or {}).get(c)
            if thr is not None and math.isfinite(thr):
                pred = s >= thr
                tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
                op_tpr, op_fpr = tp / y.sum(), fp / (len(y) - y.sum())
                ax_roc.plot([op_fpr], [op_tpr], "o", color=color, ms=6, mec="black")
                if tp + fp > 0:
                    ax_pr.plot([op_tpr], [tp / (tp + fp)], "o", color=color, ms=6, mec="black")
        prevalence = np.mean([t[f"true_{c}"].mean() for t in tables.values()])
        ax_roc.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax_pr.axhline(prevalence, ls=":", color="grey", lw=1)
        ax_roc.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="1 - specificity", ylabel="sensitivity",
                   title=f"ROC: {c}")
        ax_pr.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall (sensitivity)", ylabel="precision",
                  title=f"Precision-recall: {c}")
        ax_roc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def reliability_figure(tables: Mapping[str, pd.DataFrame], classes: Sequence[str], path: str | Path,
                       n_bins: int = 10) -> tuple[Path | None, dict[str, float]]:
    """Reliability diagram (observed frequency against mean predicted probability per bin),
    pooling every class one-vs-rest, one line per model; the legend gives each model's ECE.

    Returns:
        (``path`` or None when there is nothing to draw, model -> ECE).
    """
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5.2, 6.0), gridspec_kw={"height_ratios": [3, 1]},
                                      sharex=True)
    eces: dict[str, float] = {}
    for k, (model, table) in enumerate(tables.items()):
        cols = [c for c in classes if f"score_{c}" in table]
        if not cols or table.empty:
            continue
        y = np.concatenate([table[f"true_{c}"].to_numpy(float) for c in cols])
        p = np.concatenate([table[f"score_{c}"].to_numpy(float) for c in cols])
        bins = calibration_bins(y, p, n_bins)
        eces[model] = expected_calibration_error(y, p, n_bins)
        filled = bins["count"] > 0
        color = _COLORS[k % len(_COLORS)]
        ax.plot(bins["confidence"][filled], bins["frequency"][filled], "o-", color=color, lw=1.5, ms=4,
                label=f"{model} (ECE {eces[model]:.3f})")
        centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        width = 1.0 / n_bins / max(1, len(tables))
        ax_hist.bar(centers - 0.5 / n_bins + (k + 0.5) * width, bins["count"], width=width, color=color)
    if not eces:
        plt.close(fig)
        return None, {}
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency", title="Reliability (test patients)")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.set(xlabel="predicted probability", ylabel="patients x classes")
    fig.tight_layout()
    return save_figure(fig, path), eces


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = truth, columns = prediction."""
    out = np.zeros((n, n), dtype=int)
    np.add.at(out, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return out


def confusion_figure(tables: Mapping[str, pd.DataFrame], classes: Sequence[str], kind: str,
                     thresholds: Mapping[str, Mapping[str, float]], path: str | Path,
                     negative: str = "negative") -> Path | None:
    """Patient-level confusion matrices, one row of panels per model: binary 2x2 at the
    validation threshold, multiclass KxK by argmax, multi-label one 2x2 per finding."""
    panels: list[list[tuple[str, np.ndarray, list[str]]]] = []
    for model, table in tables.items():
        row = []
        if kind == "multiclass":
            truth = table[[f"true_{c}" for c in classes]].to_numpy().argmax(1)
            pred = table[[f"score_{c}" for c in classes]].to_numpy().argmax(1)
            row.append((model, confusion_counts(truth, pred, len(classes)), list(classes)))
        else:
            for c in classes[:MAX_CLASSES]:
                thr = (thresholds.get(model) or {}).get(c, 0.5)
                y = table[f"true_{c}"].to_numpy().astype(int)
                pred = (table[f"score_{c}"].to_numpy(float) >= thr).astype(int)
                title = model if kind == "binary" else f"{model}: {c}"
                if len(pred) and (pred.all() or not pred.any()):  # a degenerate operating point, flagged
                    title += f"\nDEGENERATE: all {'positive' if pred.all() else 'negative'}"
                labels = [negative, c] if kind == "binary" else [f"no {c}", c]
                row.append((title, confusion_counts(y, pred, 2), labels))
        panels.append(row)
    if not panels or not any(panels):
        return None
    ncols = max(len(r) for r in panels)
    size = 2.6 if ncols > 1 or kind != "multiclass" else max(3.0, 0.6 * len(classes) + 1.5)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(size * ncols, size * len(panels)), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            title, counts, labels = row[c]
            ax.imshow(counts, cmap="Blues", vmin=0)
            for (i, j), v in np.ndenumerate(counts):
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if v > counts.max() / 2 else "black", fontsize=9)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def comparison_figure(points: Sequence[dict[str, Any]], metric_label: str, path: str | Path) -> Path | None:
    """Headline metric (with its CI) against model cost, one panel per measured cost.

    Args:
        points: one dict per model: ``model``, ``value``, ``ci`` ([lo, hi] or None) and any of
            ``params``, ``flops``, ``latency_ms``, ``train_seconds`` (missing costs are skipped).
        metric_label: y-axis label.
        path: PNG to write.

    Returns:
        ``path``, or None with fewer than two models or no cost measured.
    """
    costs = [(k, label) for k, label in (("params", "parameters"), ("flops", "FLOPs per sample"),
                                         ("latency_ms", "CPU latency per sample (ms)"),
                                         ("train_seconds", "training time (s)"))
             if sum(isinstance(p.get(k), (int, float)) and p.get(k) > 0 for p in points) >= 2]
    points = [p for p in points if isinstance(p.get("value"), (int, float)) and math.isfinite(p["value"])]
    if len(points) < 2 or not costs:
        return None
    fig, axes = plt.subplots(1, len(costs), figsize=(3.6 * len(costs), 3.2), squeeze=False, sharey=True)
    for ax, (key, label) in zip(axes[0], costs):
        for k, p in enumerate(points):
            x = p.get(key)
            if not isinstance(x, (int, float)) or x <= 0:
                continue
            ci = p.get("ci")
            yerr = None
            if ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci):
                yerr = [[max(0.0, p["value"] - ci[0])], [max(0.0, ci[1] - p["value"])]]
            ax.errorbar([x], [p["value"]], yerr=yerr, fmt="o", color=_COLORS[k % len(_COLORS)], capsize=3,
                        label=p["model"])
        xs = [p[key] for p in points if isinstance(p.get(key), (int, float)) and p[key] > 0]
        if max(xs) / min(xs) > 20:  # a log axis only when the costs span orders of magnitude
            ax.set_xscale("log")
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric_label)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


_HISTORY_FIXED = ("epoch", "train_loss", "val_loss", "lr", "seconds")


def read_history(path: str | Path) -> tuple[list[dict[str, Any]], str] | None:
    """A trainer's ``history.csv`` -> (one dict per epoch with ``val_metric``, the metric's
    name); None when the file is missing or unreadable."""
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    if "epoch" not in df.columns or df.empty:
        return None
    metric = next((c for c in df.columns if c not in _HISTORY_FIXED), "val_metric")
    records = []
    for _, row in df.iterrows():
        rec = {c: (float(row[c]) if c in df.columns and pd.notna(row[c]) else None) for c in _HISTORY_FIXED}
        rec["val_metric"] = float(row[metric]) if metric in df.columns and pd.notna(row[metric]) else None
        records.append(rec)
    return records, metric


def learning_curves_figure(runs: Mapping[str, tuple[Sequence[Mapping[str, Any]], str, int | None]],
                           path: str | Path, ncols: int = 4) -> Path | None:
    """Learning curves, one small multiple per run: training and validation loss (left axis)
    and the validation metric (right axis, dashed) per epoch; a vertical line marks the best
    epoch (the weights kept).

    Args:
        runs: title (e.g. the model; "" for none) -> (history records with ``epoch``,
            ``train_loss``, ``val_loss``, ``val_metric``; the metric's name; best epoch or None).
        path: PNG to write.

    Returns:
        ``path``, or None when no run has an epoch.
    """
    runs = {k: v for k, v in runs.items() if v[0]}
    if not runs:
        return None
    ncols = min(ncols, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.ravel()[len(runs):]:
        ax.axis("off")
    for ax, (title, (history, metric_name, best)) in zip(axes.ravel(), runs.items()):
        epochs = [int(r["epoch"]) for r in history]

        def series(key: str, history: list[dict] = history) -> list[float]:
            return [float(r[key]) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) else np.nan
                    for r in history]

        ax.plot(epochs, series("train_loss"), "-", color=_COLORS[0], lw=1.5, marker="." if len(epochs) < 30 else None,
                label="train loss")
        val_loss = series("val_loss")
        if not all(np.isnan(val_loss)):
            ax.plot(epochs, val_loss, "-", color=_COLORS[1], lw=1.5, marker="." if len(epochs) < 30 else None,
                    label="val loss")
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        handles, labels = ax.get_legend_handles_labels()
        metric = series("val_metric")
        if not all(np.isnan(metric)):
            ax2 = ax.twinx()
            ax2.plot(epochs, metric, "--", color=_COLORS[2], lw=1.5, label=metric_name)
            ax2.set_ylabel(metric_name, fontsize=8, color=_COLORS[2])
            ax2.tick_params(labelsize=7)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if best:
            ax.axvline(best, color="grey", ls=":", lw=1)
            handles.append(plt.Line2D([], [], color="grey", ls=":"))
            labels.append(f"best epoch {best}")
        ax.legend(handles, labels, fontsize=6, loc="best")
        ax.set_title(title, fontsize=9)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    fig.tight_layout()
    return save_figure(fig, path)
