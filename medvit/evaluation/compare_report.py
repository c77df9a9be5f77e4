"""Report part of the model comparison (:mod:`medvit.tasks.compare`): per task with a
``comparison.json``, the accuracy table (mean ± sd over seeds or folds, patch and patient
level), the compute table and the accuracy-vs-FLOPs figure."""

from __future__ import annotations

import json
from typing import Any

from medvit.config import study_dir
from medvit.evaluation.html import esc, figure_html, format_count, html_table

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auroc")
"""Metrics of the table (names in comparison.json), each at patch and patient level."""

LEVELS = ("sample", "patient")
LEVEL_LABELS = {"sample": "patch", "patient": "patient"}
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "f1_macro": "macro-F1", "auroc": "AUROC"}

def format_mean_sd(summary: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"mean": .8, "sd": .02}`` -> ``"0.800 ± 0.020"`` (``n/a`` when undefined)."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    text = f"{summary['mean']:.{digits}f}"
    return text + (f" ± {summary['sd']:.{digits}f}" if summary.get("sd") is not None else "")


def _mflops(flops: Any) -> str:
    return f"{flops / 1e6:.1f}" if isinstance(flops, (int, float)) and flops else "n/a"


def comparison_tables(comp: dict[str, Any]) -> list[str]:
    """The accuracy table (mean ± sd, both levels) and the compute table of a comparison.json."""
    entries = comp["models"]
    over = comp.get("runs_over", "seeds")
    n_seeds = comp.get("folds", 1) if over == "folds" else len(comp["seeds"])
    headers = ["model"] + [f"{LEVEL_LABELS[lv]} {METRIC_LABELS[m]}" for lv in LEVELS for m in METRICS] + [over]
    rows = [[e["label"], *[format_mean_sd(e[lv][m]) for lv in LEVELS for m in METRICS], str(len(e["runs"]))]
            for e in entries]
    classes = comp.get("classes") or []
    what = (f"binary, positive class {classes[0]}" if comp.get("kind") == "binary" and classes
            else f"{comp.get('kind')}: {', '.join(classes)}")
    runs = "cross-validation fold" if over == "folds" else "training seed"
    accuracy = html_table(headers, rows, caption=f"Test accuracy, mean ± sd over {n_seeds} {runs}"
                                                 f"{'s' * (n_seeds != 1)} ({what})")
    batches = [str(b) for b in comp["compare"]["latency_batches"]]
    size = comp["image_size"]
    headers = ["model", "params", "trainable", f"MFLOPs ({size}x{size})"] + \
              [h for b in batches for h in (f"ms/image (batch {b})", f"images/s (batch {b})")]
    rows = []
    for e in entries:
        c = e["compute"]
        lat = c.get("latency") or {}
        rows.append([e["label"], format_count(c.get("params")), format_count(c.get("trainable_params")),
                     _mflops(c.get("flops")),
                     *[v for b in batches for v in ((f"{lat[b]['per_sample_ms']:.2f}", f"{lat[b]['throughput']:.0f}")
                                                     if b in lat else ("n/a", "n/a"))]])
    threads = comp["compare"]["cpu_threads"]
    compute = html_table(headers, rows, caption=f"Compute per model (CPU, {threads} thread{'s' * (threads != 1)}; "
                                                f"latency on a shared machine is indicative)")
    return [accuracy, compute]


def compare_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """Per task with a ``comparison.json``: the accuracy and compute tables and the
    accuracy-vs-FLOPs figure."""
    parts: dict[str, list[str]] = {}
    for task in study.get("tasks", {}):
        path = study_dir(study) / task / "comparison.json"
        if not path.is_file():
            continue
        comp = json.loads(path.read_text(encoding="utf-8"))
        fragments = ["<h3>Model comparison: accuracy and compute</h3>", *comparison_tables(comp)]
        png = path.parent / comp.get("figure", "accuracy_vs_flops.png")
        if png.is_file():
            over = comp.get("runs_over", "seeds")
            fragments.append(figure_html(f"Test accuracy (mean ± sd over {over}) against FLOPs per image", png))
        if comp.get("notes"):
            fragments.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in comp["notes"]) + "</ul>")
        parts[task] = fragments
    return parts

