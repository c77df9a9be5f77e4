"""Report part of the brain study (Realism in Action): anomaly resampling, common detection
metrics, the patient-to-patient (PTP) table, example detections, the cascade and the
distillation comparison. Registered in :data:`medvit.evaluation.report.PART_BUILDERS`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medvit.config import study_dir
from medvit.evaluation.html import (
    esc,
    figure_html,
    format_count,
    format_metric,
    format_value,
    html_table,
)
from medvit.evaluation.report_sections import all_patients_positive
from medvit.evaluation.tumour_slices import slice_detection_summary


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _anomaly(split: dict[str, Any]) -> str:
    achieved = split.get("anomaly") or {}
    if not achieved:
        return ""
    rows = [[name, a.get("by", "?"), format_value(a.get("target_abnormal_fraction")),
             f"{a.get('patients_abnormal', '?')} / {a.get('patients_normal', '?')}",
             format_value(a.get("achieved_patient_fraction")),
             f"{a.get('images_abnormal', '?')} / {a.get('images_normal', '?')}",
             format_value(a.get("achieved_image_fraction"))] for name, a in achieved.items()]
    return html_table(["split", "resampled by", "target abnormal fraction", "patients tumour / normal",
                       "achieved (patients)", "slices tumour / normal", "achieved (slices)"], rows,
                      "Anomaly distribution after resampling (validation keeps its natural mix)")


def _detection(det: dict[str, Any]) -> str:
    rows = [[split, format_value(m.get("map50")), format_value(m.get("map50_95")), format_value(m.get("precision")),
             format_value(m.get("recall"))] for split, m in det.get("splits", {}).items()]
    return html_table(["split", "mAP50", "mAP50-95", "precision", "recall"], rows,
                      f"Detector {det.get('model', '?')} at {det.get('image_size', '?')} px, {det.get('epochs', '?')} "
                      "epochs: common detection metrics (ultralytics)")


def _ptp_rows(label: str, ptp: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in ptp.get("by_k") or [ptp]:
        m = r.get("metrics", {})
        mark = " (configured)" if r.get("k") == ptp.get("k") else ""
        rows.append([label, f"{r.get('k')}{mark}", format_value(r.get("conf"), 2),
                     f"{r.get('n_positive_patients', '?')} / {r.get('n_negative_patients', '?')}",
                     format_metric(m.get("sensitivity")), format_metric(m.get("specificity")),
                     format_metric(m.get("precision")), format_metric(m.get("f1")),
                     format_metric(m.get("fp_slices_per_normal_patient"), 2)])
    return rows


def _distill(comp: dict[str, Any]) -> str:
    rows = []
    for role, r in comp.get("roles", {}).items():
        pm = r.get("patient_metrics", {})
        rows.append([role, r.get("model", "?"), format_count(r.get("params")),
                     f"{r['flops_per_slice'] / 1e6:.1f}" if r.get("flops_per_slice") else "n/a",
                     format_value(r.get("cpu_latency_ms_per_slice"), 2), format_metric(pm.get("auroc")),
                     format_metric(pm.get("sensitivity")), format_metric(pm.get("specificity")),
                     format_metric(pm.get("f1")), format_metric(r.get("sample_auroc")),
                     format_value(r.get("teacher_agreement"))])
    return html_table(["role", "model", "params", "MFLOPs / slice", "CPU ms / slice", "patient AUROC",
                       "sensitivity", "specificity", "F1", "slice AUROC", "agreement with teacher"], rows,
                      "Distillation: CNN teacher vs DeiT student with hard distillation vs the same student "
                      "without teacher (test, patient level)")


def _slice_level(root: Path, study: dict[str, Any]) -> str:
    """Slice-level detection table for data without tumour-free patients
    (:mod:`medvit.evaluation.tumour_slices`)."""
    import pandas as pd

    tcfg = study["tasks"]["brain"]
    sources = [("detector", root / "detector" / "predictions.csv", tcfg["detection"]["conf"]),
               ("teacher", root / "distill" / "teacher" / "predictions.csv", None),
               ("student", root / "distill" / "student" / "predictions.csv", None),
               ("student_distilled", root / "distill" / "student_distilled" / "predictions.csv", None),
               # the threshold the cascade stage resolved (config, or its classifier's validation choice)
               ("cascade", root / "cascade" / "predictions.csv",
                (_read(root / "cascade" / "model.json") or {}).get("threshold", tcfg["cascade"]["threshold"]))]
    rows = []
    for label, path, thr in sources:
        if not path.is_file():
            continue
        if thr is None:
            rec = _read(path.parent / "metrics.json") or {}
            thr = float(((rec.get("threshold") or {}).get("sample") or {}).get(tcfg["positive_class"], 0.5))
        pred = pd.read_csv(path)
        score, truth = f"score_{tcfg['positive_class']}", f"true_{tcfg['positive_class']}"
        s = slice_detection_summary(pred, thr, ks=(1, 2), score=score, truth=truth,
                                    n_boot=int(study.get("evaluation", {}).get("bootstrap", 1000)),
                                    seed=int(study["seed"]))
        m = s["metrics"]
        rows.append([label, format_value(thr), f"{s['n_tumour_patients']} / {s['n_tumour_slices']} / {s['n_slices']}",
                     format_metric(m["slice_auroc"]), format_metric(m["detection_rate_k1"]),
                     format_metric(m["detection_rate_k2"]), format_metric(m["fp_per_tumour_free_slice"])])
    if not rows:
        return ""
    return html_table(["source", "flag threshold", "tumour patients / tumour slices / slices", "slice AUROC",
                       "detection rate k=1", "detection rate k=2", "FP slices per tumour-free slice"], rows,
                      "Slice level, test split (every patient has a tumour): detection rate = patients with a "
                      "tumour slice in the test split with at least k tumour slices flagged; 95% CIs by "
                      "patient-cluster bootstrap")


def brain_parts(study: dict[str, Any]) -> dict[str, list[str]]:
    """HTML fragments of the brain task from the files its stages wrote (none when absent)."""
    if "brain" not in study.get("tasks", {}):
        return {}
    root = Path(study_dir(study)) / "brain"
    parts: list[str] = []
    split = _read(root / "split.json")
    if split:
        parts.append(_anomaly(split))
    det = _read(root / "detector" / "detection_metrics.json")
    if det:
        parts.append(_detection(det))
    all_tumour = bool(split) and all_patients_positive(split, study["tasks"]["brain"].get("positive_class", "tumor"))
    if all_tumour:
        parts.append('<p class="notes"><b>Every patient in this data has a tumour</b> (tumour-free slices, but no '
                     "tumour-free patients), so patient-level normal-vs-tumour metrics cannot be computed. In the "
                     "PTP and distillation tables below, the 'normal' test patients are tumour patients whose "
                     "tumour slices were resampled away, and their specificity and patient AUROC are artefacts of "
                     "that, not results. The slice-level table is the evaluation to read.</p>")
        parts.append(_slice_level(root, study))
    rows = []
    for label, path in (("detector", root / "detector" / "ptp.json"), ("cascade", root / "cascade" / "ptp.json")):
        ptp = _read(path)
        if ptp:
            rows += _ptp_rows(label, ptp)
    if rows:
        parts.append(html_table(["source", "k", "conf", "patients tumour / normal", "sensitivity", "specificity",
                                 "precision", "F1", "FP slices / normal patient"], rows,
                                "Patient-to-patient (PTP), test split: a patient is positive when at least k of "
                                "their slices have a detection >= conf (cascade: classifier probability >= "
                                "threshold on a flagged slice)"))
    figure = root / "detector" / "examples.png"
    if figure.is_file():
        parts.append(figure_html("Test slices with true (green) and predicted (red) tumour boxes", figure))
    comp = _read(root / "distill" / "comparison.json")
    if comp:
        parts.append(_distill(comp))
        parts.append(f'<p class="settings">{esc(comp.get("note", ""))}</p>')
    return {"brain": [p for p in parts if p]} if parts else {}


__all__ = ["brain_parts"]
