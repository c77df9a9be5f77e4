"""Report part of the prostate segmentation study (:mod:`medvit.tasks.segmentation`): the
cross-validation table, the external test, the SSL note and the slice overlays, from
``prostate/cv_summary.json``."""

from __future__ import annotations

from typing import Any

from medvit.config import study_dir
from medvit.evaluation.html import esc, figure_html, format_count, format_metric, html_table
from medvit.fileio import read_json


def _fmt(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def prostate_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """The prostate comparison: the fold table, the external test, the SSL note and the slice
    overlays (nothing before ``cv_summary.json`` exists)."""
    if "prostate" not in study.get("tasks", {}):
        return {}
    task_dir = study_dir(study) / "prostate"
    summary = read_json(task_dir / "cv_summary.json", {})
    if not summary:
        return {}
    k = summary["folds"]
    rows, ext_rows = [], []
    for name, m in summary["models"].items():
        pooled = m.get("pooled", {})
        rows.append([name, _fmt(m["auroc"]), _fmt(m["ap"]), format_metric(pooled.get("auroc")),
                     format_metric(pooled.get("ap")), _fmt(m["dice"]), _fmt(m["hd95"], 1),
                     format_count(m["params"]), f"{m['flops'] / 1e9:.2f}",
                     "–" if m["seconds"]["mean"] is None else f"{m['seconds']['mean']:.3f}"])
        if "external" in m:
            e = m["external"]["metrics"]
            ext_rows.append([name, str(m["external"]["n_patients"]), format_metric(e.get("auroc")),
                             format_metric(e.get("ap")), format_metric(e.get("dice")), format_metric(e.get("hd95"))])
    what = (f"{k}-fold patient-level cross-validation" if k > 1 else "single train/val/test split")
    parts = [html_table(["model", "AUROC (mean ± sd over folds)", "AP (mean ± sd)", "pooled AUROC [CI]",
                         "pooled AP [CI]", "lesion Dice", "HD95 (mm)", "params", "GFLOPs / patch",
                         "s / volume"], rows,
                        caption=f"Prostate csPCa: {what}, patient score = maximum of the lesion map; FLOPs of one "
                                f"{summary['roi_size']} patch; inference time is CPU wall time per volume "
                                "(noisy on a shared machine)")]
    if ext_rows:
        parts.append(html_table(["model", "patients", "AUROC [CI]", "AP [CI]", "Dice", "HD95"], ext_rows,
                                caption="External test: the ensemble of each model's fold models on the external "
                                        "cohort (thresholds at 0.5: the cohort has no validation rows)"))
    ssl = summary["models"].get("cswin_unet_ssl", {}).get("ssl")
    if ssl:
        parts.append(f"<p>cswin_unet_ssl: encoder pretrained per fold with {esc(', '.join(ssl['tasks'] or []))} on "
                     f"{esc(', '.join(ssl['splits_seen']))} rows only ({esc(ssl['train_patients'])} patients per "
                     "fold); validation and test patients never reach pretraining.</p>")
        png = task_dir / "ssl" / "fold0" / "inpainting.png"
        if png.is_file():
            parts.append(figure_html("SSL (fold 0): patch, rotated + masked view, inpainting reconstruction", png))
    if summary.get("overlays") and (task_dir / summary["overlays"]).is_file():
        parts.append(figure_html("Out-of-fold predictions: T2w slice with the true lesion (cyan) and each model's "
                                 "lesion probability map", task_dir / summary["overlays"]))
    return {"prostate": parts}
