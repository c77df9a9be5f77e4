"""Report part of the adaptation comparison (:mod:`medvit.tasks.adapt`): per adapted task the
method table at the largest fraction of training patients, the label-efficiency table and
figure."""

from __future__ import annotations

import json
from typing import Any

from medvit.config import percent_label, study_dir
from medvit.evaluation.html import figure_html, format_count, format_metric, format_seconds, html_table

METHOD_LABELS = {"linear": "linear probe", "vpt": "VPT-deep", "dvpt": "DVPT", "full": "full fine-tuning"}


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def adapt_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """Per adapted task: the method table at the largest fraction of training patients, the
    label-efficiency table and figure."""
    parts: dict[str, list[str]] = {}
    for task in study.get("tasks", {}):
        path = study_dir(study) / task / "adapt" / "comparison.json"
        if not path.is_file():
            continue
        comp = json.loads(path.read_text(encoding="utf-8"))
        rows = comp["rows"]
        if not rows:
            continue
        top = max(r["fraction"] for r in rows)
        auroc_name, kappa_name = rows[0]["auroc_metric"], rows[0]["kappa_metric"]
        table = html_table(
            ["method", f"test {auroc_name}", f"test {kappa_name}", "trainable params", "% of backbone",
             "stored per task", "% of full model", "train time"],
            [[METHOD_LABELS.get(r["method"], r["method"]), format_metric(r["auroc"]), format_metric(r["kappa"]),
              format_count(r["trainable_params"]), f"{r['trainable_percent']:.3g}%", _fmt_bytes(r["adapter_bytes"]),
              f"{r['storage_percent']:.3g}%", format_seconds(r["train_seconds"])]
             for r in rows if r["fraction"] == top],
            caption=f"Adapting one frozen {comp['backbone']['model']} backbone (patient level, 95% CI; "
                    f"{percent_label(top)}% of the training patients; same split, data and epochs)")
        fractions = sorted({r["fraction"] for r in rows})
        eff = html_table(
            ["method"] + [f"{percent_label(f)}% ({next(r['train_patients'] for r in rows if r['fraction'] == f)} pts)"
                          for f in fractions],
            [[METHOD_LABELS.get(m, m)] + [format_metric(next((r["auroc"] for r in rows
                                                              if r["method"] == m and r["fraction"] == f), None))
                                          for f in fractions]
             for m in dict.fromkeys(r["method"] for r in rows)],
            caption=f"Label efficiency: test {auroc_name} by fraction of training patients")
        html = "<h3>Adaptation methods (DVPT vs linear probe, VPT-deep, full fine-tuning)</h3>" + table + eff
        png = path.parent / comp.get("figure", "label_efficiency.png")
        if png.is_file():
            html += figure_html("Label efficiency: test metrics against the fraction of training patients", png)
        parts.setdefault(task, []).append(html)
    return parts
