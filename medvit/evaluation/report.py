"""The report page: metrics.json records and the stages' report parts -> one self-contained
HTML page (the stage that writes it: :mod:`medvit.tasks.report`).

The page has inline CSS only and no external reference (no scripts, fonts or images from
the network), so it opens offline and can be attached to an e-mail. Every value from the
metrics files is HTML-escaped.

The page is a list of :class:`Section` objects rendered in order; a richer report adds
section builders (figures, per-patient tables, ...) without touching the page frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from medvit.config import TASKS, mae_encoder_path
from medvit.errors import MedvitError
from medvit.evaluation.adapt_report import adapt_parts
from medvit.evaluation.brain_report import brain_parts
from medvit.evaluation.compare_report import compare_parts
from medvit.evaluation.html import (
    Section,
    esc,
    figure_html,
    format_count,
    format_metric,
    format_seconds,
    html_table,
    metric_label,
)
from medvit.evaluation.prostate_report import prostate_parts

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:90rem;
     padding:0 1rem;color:#1b1f24;line-height:1.4}
figure{margin:1rem 0} figure img{max-width:100%;image-rendering:pixelated} figcaption{color:#57606a}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#57606a;font-size:.9rem} .meta span{margin-right:1.5rem}
.pair{display:flex;flex-wrap:wrap;gap:2rem;align-items:flex-start}
table{border-collapse:separate;border-spacing:0;font-size:.88rem;margin:.6rem 0;display:block;overflow-x:auto;
      max-width:100%}
caption{text-align:left;font-weight:600;padding:.3rem 0;position:sticky;left:0}
th,td{border:1px solid #d0d7de;padding:.3rem .55rem;text-align:right;white-space:nowrap}
th{background:#f6f8fa} td:first-child,th:first-child,td.t,th.t{text-align:left}
td:first-child,th:first-child{position:sticky;left:0;z-index:1} td:first-child{background:#fff}
td.t,th.t{white-space:normal;min-width:7rem;max-width:32rem}
table.summary{display:table;width:100%} table.summary td,table.summary th{white-space:normal}
.warn{border-left:4px solid #bf8700;background:#fff8c5;padding:.4rem .8rem;margin:.6rem 0;font-size:.9rem}
.chance{color:#9a6700;font-weight:600}
.settings,.notes{color:#57606a;font-size:.85rem} .notes li{margin:.1rem 0}
.card table td{white-space:normal;text-align:left;max-width:60rem} .card{margin:.8rem 0}
nav.toc{font-size:.9rem} nav.toc a{margin-right:1rem}
details pre{background:#f6f8fa;padding:.6rem;overflow:auto;font-size:.8rem}
@media print{
 body{max-width:none;margin:0;padding:0;font-size:10pt;color:#000}
 nav.toc{display:none} h2{break-after:avoid;page-break-after:avoid}
 table{display:table;overflow:visible;font-size:7.5pt;max-width:100%} th,td{white-space:normal;padding:.15rem .3rem}
 td:first-child,th:first-child,caption{position:static}
 figure,table,.card,.warn{break-inside:avoid;page-break-inside:avoid} figure img{max-width:100%;max-height:24cm}
 .pair{display:block} details{display:none}
 a{color:#000;text-decoration:none}
}
"""


class ReportError(MedvitError):
    """A metrics file handed to the report is missing or not a medvit metrics.json."""


# ------------------------------------------------------------------------ sections
def _metric_names(blocks: Iterable[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for block in blocks:
        names += [n for n in block if n not in names]
    return names


def _metrics_table(records: Sequence[dict[str, Any]], level: str) -> str:
    blocks = [r.get("metrics", {}) if level == "patient" else r.get("sample_level", {}).get("metrics", {})
              for r in records]
    names = _metric_names(blocks)
    if level == "patient":
        headers = ["model", "patients", "samples", *map(metric_label, names), "params", "trainable", "train time"]
        rows = [[r.get("model", "?"), format_count(r.get("n_patients")), format_count(r.get("n_samples")),
                 *[format_metric(b.get(n)) for n in names], format_count(r.get("params")),
                 format_count(r.get("trainable_params")), format_seconds(r.get("train_seconds"))]
                for r, b in zip(records, blocks)]
        caption = "Patient level (test)"
    else:
        headers = ["model", "samples", *map(metric_label, names)]
        rows = [[r.get("model", "?"), format_count(r.get("sample_level", {}).get("n_samples")),
                 *[format_metric(b.get(n)) for n in names]] for r, b in zip(records, blocks)]
        caption = "Sample level (test)"
    return html_table(headers, rows, caption)


def _settings_line(record: dict[str, Any]) -> str:
    agg = record.get("aggregate") or {}
    thr = record.get("threshold") or {}
    boot = record.get("bootstrap") or {}
    parts = [f"kind: {record.get('kind', '?')}",
             f"patient score: {agg.get('method', '?')}" + (f" (k={agg['top_k']})" if agg.get("top_k") else ""),
             f"threshold: {thr.get('method', '?')}" + (" chosen on val" if thr.get("selected_on") else ""),
             f"CI: {boot.get('ci', '?')} percentile bootstrap over patients, {boot.get('n', '?')} resamples"]
    return f'<p class="settings">{esc("; ".join(parts))}</p>'


def _notes(records: Sequence[dict[str, Any]]) -> str:
    items = [f"<li>{esc(r.get('model', '?'))}: {esc(n)}</li>" for r in records for n in r.get("notes") or []]
    return f'<ul class="notes">{"".join(items)}</ul>' if items else ""


def task_section(task: str, records: Sequence[dict[str, Any]],
                 figures: Sequence[tuple[str, Path]] = (), parts: Sequence[str] = ()) -> Section:
    """One task: the patient-level table (rows = models) with the sample-level table beside
    it, then the task's figures (``(caption, png)`` pairs) and its stage-specific ``parts``
    (HTML fragments, see :data:`PART_BUILDERS`)."""
    tables = ""
    if records:
        tables = (_settings_line(records[0])
                  + f'<div class="pair">{_metrics_table(records, "patient")}{_metrics_table(records, "sample")}</div>'
                  + _notes(records))
    body = tables + "".join(figure_html(c, p) for c, p in figures) + "".join(parts)
    return Section(f"Task: {task}", body, anchor=f"task-{task}")


PART_BUILDERS: tuple[Callable[[dict[str, Any]], dict[str, list[str]]], ...] = (
    compare_parts, brain_parts, adapt_parts, prostate_parts)
"""Stage-specific report parts, one module each beside this one. Each function takes the
validated study dict and returns ``{task: [html fragment, ...]}`` built from the files its
stage wrote under the study folder (tables escaped with :func:`html_table`, figures inlined
with :func:`figure_html`); it returns nothing for a task whose files are absent."""


def task_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """The fragments of every builder in :data:`PART_BUILDERS`, per task."""
    parts: dict[str, list[str]] = {}
    for build in PART_BUILDERS:
        for task, fragments in build(study).items():
            parts.setdefault(task, []).extend(fragments)
    return parts


def task_figures(study: dict[str, Any]) -> dict[str, list[tuple[str, Path]]]:
    """Figures the stages left for the report: the MAE reconstructions of a pretrained task."""
    figures: dict[str, list[tuple[str, Path]]] = {}
    for task in study.get("tasks", {}):
        png = mae_encoder_path(study, task).parent / "reconstructions.png"
        if png.is_file():
            ratio = study["tasks"][task].get("pretrain", {}).get("mask_ratio")
            figures.setdefault(task, []).append(
                (f"MAE pretraining on training images: input / masked (mask ratio {ratio}) / reconstruction", png))
    return figures


def task_sections(records: Sequence[dict[str, Any]],
                  figures: dict[str, Sequence[tuple[str, Path]]] | None = None,
                  parts: dict[str, Sequence[str]] | None = None) -> list[Section]:
    """One section per task, in pipeline order, then any other task alphabetically."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task", "?")), []).append(r)
    for t in parts or {}:
        by_task.setdefault(t, [])
    order = [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS)
    return [task_section(t, by_task[t], (figures or {}).get(t, ()), (parts or {}).get(t, ())) for t in order]


def render_page(title: str, meta: dict[str, str], sections: Sequence[Section]) -> str:
    """The page frame: title, a metadata line and the sections."""
    meta_html = "".join(f"<span>{esc(k)}: {esc(v)}</span>" for k, v in meta.items())
    parts = [f'<h2 id="{esc(s.anchor)}">{esc(s.title)}</h2>{s.body}' if s.anchor else
             f"<h2>{esc(s.title)}</h2>{s.body}" for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"meta\">{meta_html}</p>"
            + "".join(parts) + "</body></html>\n")


# ------------------------------------------------------------------------ inputs
def load_metrics(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read metrics.json files.

    Raises:
        ReportError: a file is missing, not JSON, or lacks ``task``/``model``/``metrics``.
    """
    records = []
    for p in map(Path, paths):
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(f"metrics file not found: {p}") from None
        except (OSError, ValueError) as exc:
            raise ReportError(f"{p}: not a readable JSON file ({exc})") from None
        missing = [k for k in ("task", "model", "metrics") if not isinstance(record, dict) or k not in record]
        if missing:
            raise ReportError(f"{p}: not a medvit metrics.json (missing {', '.join(missing)})")
        records.append(record)
    return records
