"""The report stage: metrics.json files -> one self-contained HTML page.

The page has inline CSS only and no external reference (no scripts, fonts or images from
the network), so it opens offline and can be attached to an e-mail. Every value from the
metrics files is HTML-escaped.

The page is a list of :class:`Section` objects rendered in order; a richer report adds
section builders (figures, per-patient tables, ...) without touching the page frame.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import html
import json
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvit.errors import MedvitError
from medvit.fileio import atomic_write_text

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


@dataclass
class Section:
    """One part of the page.

    Attributes:
        title: heading text (escaped when rendered).
        body: HTML body (already escaped by its builder).
        anchor: id of the heading, for links.
    """

    title: str
    body: str
    anchor: str = ""


# ------------------------------------------------------------------------ formatting
def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included)."""
    return html.escape(str(value), quote=True)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # NumPy numbers too


def format_value(value: Any, digits: int = 3) -> str:
    """A metric value as text; ``n/a`` when missing or undefined."""
    return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def format_metric(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"value": .812, "ci95": [.701, .903]}`` -> ``"0.812 [0.701, 0.903]"``."""
    if not entry:
        return "n/a"
    text = format_value(entry.get("value"), digits)
    interval = next((v for k, v in entry.items() if k.startswith("ci") and isinstance(v, list)), None)
    if text != "n/a" and interval and len(interval) == 2 and all(_is_number(x) for x in interval):
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def format_count(n: Any) -> str:
    return f"{int(n):,}" if _is_number(n) else "n/a"


def format_seconds(seconds: Any) -> str:
    """Seconds as ``42.0 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    if not _is_number(seconds):
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


_COLLECTED: contextvars.ContextVar[list[tuple[str, list[str], list[list[str]], str]] | None] = \
    contextvars.ContextVar("medvit_report_tables", default=None)


@contextlib.contextmanager
def collect_tables() -> Iterator[list[tuple[str, list[str], list[list[str]], str]]]:
    """Inside the block every :func:`html_table` also appends ``(caption, headers, rows,
    html)`` to the yielded list (the report exports them as CSV and LaTeX)."""
    tables: list[tuple[str, list[str], list[list[str]], str]] = []
    token = _COLLECTED.set(tables)
    try:
        yield tables
    finally:
        _COLLECTED.reset(token)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "",
               text_columns: Sequence[int] = (), table_class: str = "") -> str:
    """A table from plain-text cells (every cell and header is escaped here). Cells are
    right-aligned (numbers) except the first column and ``text_columns`` (indices); wide
    tables scroll with their first column fixed."""
    left = set(text_columns)
    rows = [list(map(str, r)) for r in rows]

    def cell(tag: str, j: int, value: Any) -> str:
        return f'<{tag} class="t">{esc(value)}</{tag}>' if j in left else f"<{tag}>{esc(value)}</{tag}>"

    head = "".join(cell("th", j, h) for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", j, c) for j, c in enumerate(row)) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    cls = f' class="{esc(table_class)}"' if table_class else ""
    out = f"<table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append((str(caption), [str(h) for h in headers], rows, out))
    return out


_LABELS = {"auroc": "AUROC", "ap": "AP", "accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
           "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1", "kappa": "kappa",
           "dice": "Dice", "hd95": "HD95"}


def metric_label(name: str) -> str:
    """Column heading of a metric: ``auroc_macro`` -> ``AUROC (macro)``, ``auroc_nodule`` -> ``AUROC nodule``."""
    if name in _LABELS:
        return _LABELS[name]
    base, _, rest = name.partition("_")
    if base in _LABELS and rest:
        return f"{_LABELS[base]} (macro)" if rest == "macro" else f"{_LABELS[base]} {rest}"
    if name.endswith("_macro") and name[:-6] in _LABELS:
        return f"{_LABELS[name[:-6]]} (macro)"
    return name


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


def figure_html(caption: str, png: Path) -> str:
    """A PNG inlined as a data URI (the report makes no external request)."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


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


PART_BUILDERS: tuple[str, ...] = (
    "medvit.tasks.compare:report_parts",
    "medvit.evaluation.brain_report:brain_parts",
    "medvit.tasks.adapt:report_parts",
    "medvit.tasks.segmentation:report_parts",
)
"""Task-specific report parts, as ``"module:function"``. Each function takes the validated
study dict and returns ``{task: [html fragment, ...]}`` built from the files its stage wrote
under the study folder (tables escaped with :func:`html_table`, figures inlined with
:func:`figure_html`); it returns nothing for a task whose files are absent."""


def task_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """The fragments of every builder in :data:`PART_BUILDERS`, per task."""
    import importlib

    parts: dict[str, list[str]] = {}
    for spec in PART_BUILDERS:
        module, _, name = spec.partition(":")
        for task, fragments in getattr(importlib.import_module(module), name)(study).items():
            parts.setdefault(task, []).extend(fragments)
    return parts


def task_figures(study: dict[str, Any]) -> dict[str, list[tuple[str, Path]]]:
    """Figures the stages left for the report: the MAE reconstructions of a pretrained task."""
    from medvit.config import mae_encoder_path

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
    from medvit.config import TASKS

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


# ------------------------------------------------------------------------ stage
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


def report_stage(config_path: str | Path, metrics_paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Write the study's HTML report from its metrics.json files.

    Returns:
        ``out_path``.
    """
    from medvit import __version__
    from medvit.config import load_study, study_dir
    from medvit.evaluation import report_review as rr
    from medvit.evaluation import report_sections as rs
    from medvit.evaluation.saliency import saliency_html
    from medvit.provenance import git_version, now_iso

    study = load_study(config_path)
    records = load_metrics(metrics_paths)
    code = git_version()
    commit = (code.get("commit") or "unknown")[:12] + ("-dirty" if code.get("dirty") else "")
    meta = {"study": study["study"], "generated": now_iso(), "code": f"medvit {__version__} ({commit})",
            "results": str(len(records))}
    root = study_dir(study)
    figures_dir = Path(out_path).parent / "figures"  # PNGs also kept as files (Snakemake's --report lists them)
    figures_dir.mkdir(parents=True, exist_ok=True)
    ev = study.get("evaluation") or {}
    subgroups = list(ev.get("subgroups") or [])
    prevalence = ev.get("prevalence") or {}
    with collect_tables() as tables:
        results = rs.load_task_results(records, [Path(p) for p in metrics_paths], root)
        comparisons = rs.task_comparisons(results)
        parts: dict[str, list[str]] = {}
        eces: dict[str, dict[str, float]] = {}
        for task, tr in results.items():
            html_figs, eces[task] = rs.task_figures_html(tr, figures_dir)
            parts[task] = [rr.chance_html(tr), rs.degenerate_html(rs.degenerate_points(tr), tr.kind),
                           rr.curves_html(tr, figures_dir), html_figs, saliency_html(tr, figures_dir, study["seed"]),
                           rs.ece_html(eces[task]),
                           rr.decision_html(tr, figures_dir, prevalence.get(task)),
                           rs.comparisons_html(comparisons.get(task, [])), rr.subgroups_html(tr, subgroups),
                           rr.failures_html(tr)]
        for task, fragments in task_parts(study).items():
            parts.setdefault(task, []).extend(fragments)
        summary = rs.summary_section(study, results, comparisons)
        task_secs = task_sections(records, task_figures(study), parts)
        sections = [summary, *task_secs, rs.data_section(results), rr.reporting_section(study, results, subgroups),
                    rs.model_cards_section(study, results, eces), rs.provenance_section(study, records, root)]
    page = render_page(f"medvit report: {study['study']}", meta, [s for s in sections if s is not None])
    shown = sorted(((page.find(t[3]), t[:3]) for t in tables if t[3] in page), key=lambda x: x[0])
    rr.export_tables([t for _, t in shown], Path(out_path).parent / "tables")  # in page order
    return atomic_write_text(out_path, page)
