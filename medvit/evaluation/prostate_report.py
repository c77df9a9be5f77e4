"""Report part of the prostate segmentation study (:mod:`medvit.tasks.segmentation`): the
cross-validation table, the external test, the SSL note and the slice overlays, from
``prostate/cv_summary.json``; and the overlays figure itself (:func:`save_overlays`, drawn by
``medvit cv-summary``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit.config import study_dir
from medvit.data.io import read_image, read_sample
from medvit.evaluation.html import esc, figure_html, format_count, format_metric, html_table
from medvit.fileio import atomic_path, read_json


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


def save_overlays(df: pd.DataFrame, root: Path, positive: str, task_dir: Path, models: Sequence[str], path: Path,
                  n: int = 3) -> Path | None:
    """PNG: for ``n`` out-of-fold test patients (lesion patients first), the axial slice
    through the largest lesion area (or the highest predicted probability): T2w with the
    true lesion outline, then each model's probability map over T2w with its patient score.

    Args:
        df: the task's split manifest (``sample_id``, the image columns, ``mask``).
        root: the manifest's folder (its paths are relative to it).
        positive: the positive class (``true_<positive>``/``score_<positive>`` columns).
        task_dir: the task folder holding ``<model>/predictions.csv`` and the maps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = {m: pd.read_csv(task_dir / m / "predictions.csv", dtype={"sample_id": str, "patient_id": str},
                             keep_default_na=False).set_index("sample_id") for m in models}
    first = pooled[models[0]]
    if n <= 0 or first.empty:
        return None
    order = first.assign(pos=pd.to_numeric(first[f"true_{positive}"])).sort_values(["pos"], ascending=False,
                                                                                   kind="stable")
    chosen = [s for s in order.index if all(pooled[m].loc[s, "prob_map"] for m in models)][:n]
    if not chosen:
        return None
    rows_by_sid = df.set_index(df["sample_id"].astype(str))
    fig, axes = plt.subplots(len(chosen), len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.3 * len(chosen)),
                             squeeze=False)
    for r, sid in enumerate(chosen):
        row = rows_by_sid.loc[sid].to_dict()
        image = read_sample(row, root).array[0]
        truth = (read_image(root / row["mask"]).array[0] > 0.5) if row.get("mask") else None
        maps = {m: read_image(task_dir / m / pooled[m].loc[sid, "prob_map"]).array[0] for m in models}
        if truth is not None and truth.any():
            z = int(truth.sum(axis=(1, 2)).argmax())
        else:
            z = int(np.unravel_index(int(np.argmax(maps[models[0]])), maps[models[0]].shape)[0])
        lo, hi = np.percentile(image[z], [1, 99])
        for c in range(len(models) + 1):
            ax = axes[r, c]
            ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if c:
                m = models[c - 1]
                ax.imshow(np.ma.masked_less(maps[m][z], 0.05), cmap="hot", vmin=0, vmax=1, alpha=0.6)
                ax.set_title(f"{m}\nscore {float(pooled[m].loc[sid, f'score_{positive}']):.2f}", fontsize=7)
            else:
                ax.set_title(f"{sid} ({'csPCa' if int(first.loc[sid, f'true_{positive}']) else 'no csPCa'})\n"
                             f"T2w slice {z}", fontsize=7)
            if truth is not None and truth[z].any():
                ax.contour(truth[z].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
