"""The report stage: a study's metrics.json files and the files its stages left -> one
self-contained HTML page (:mod:`medvit.evaluation.report` builds the page; the Grad-CAM part,
which rebuilds the trained models, comes from :mod:`medvit.tasks.saliency`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medvit import __version__
from medvit.config import load_study, study_dir
from medvit.evaluation import report_review as rr
from medvit.evaluation import report_sections as rs
from medvit.evaluation.html import collect_tables
from medvit.evaluation.report import load_metrics, render_page, task_figures, task_parts, task_sections
from medvit.fileio import atomic_write_text
from medvit.provenance import git_version, now_iso
from medvit.tasks.saliency import saliency_html


def report_stage(config_path: str | Path, metrics_paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Write the study's HTML report from its metrics.json files.

    Returns:
        ``out_path``.
    """
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
