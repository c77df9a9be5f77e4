"""Quality of every real-data study -> benchmarks/QUALITY.md (``make bench-quality``).

Reads only the files the studies wrote under ``results/<study>/`` (run them first: ``make
bench-quality`` does), so every number in the page comes from those runs. Per study and model:
the test metric with its 95% CI (patient level, or the level named), the paired test against
the study's reference model, wall time and peak memory of its jobs (Snakemake's benchmark
files), and published context where there is any.

    python benchmarks/quality.py [--results results] [--out benchmarks/QUALITY.md] [--studies a b]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medvit.config import load_study  # noqa: E402

# study file, task, reference model, what the page says about published figures
STUDIES = {
    "pneumonia": {"file": "workflows/studies/pneumonia.yaml", "task": "xray", "reference": "resnet18",
                  "context": "MedMNIST v2 reports on its canonical PneumoniaMNIST test split (4708/524/624 images): "
                             "ResNet-18 (28) AUC 0.944 / ACC 0.854, ResNet-50 (28) AUC 0.948 / ACC 0.854. The file "
                             "here is a class-balanced subset with another split (2428/270/468), so the figures are "
                             "context, not a like-for-like comparison. No patient ids: patient = image."},
    "nih_cxr14": {"file": "workflows/studies/nih_cxr14.yaml", "task": "xray", "reference": "densenet121",
                  "context": "The Medical MAE paper reports macro AUROC on the official ChestX-ray14 test split after "
                             "pretraining on ~266k X-rays; 1000 images at 64 px do not reproduce it. Our own plain "
                             "references on this split (20 epochs, 64 px): ResNet-18 0.748 / 0.773 (two seeds), "
                             "DenseNet-121 0.747."},
    "lgg_brain": {"file": "workflows/studies/lgg_brain.yaml", "task": "brain", "reference": "teacher",
                  "context": "Buda et al. (2019) report 83.6% mean Dice for 3D segmentation of this LGG set (22-fold "
                             "CV): a different task, context only. Our own plain references (random 80/15/15 patient "
                             "split): YOLOv8n test mAP50 0.484 after 15 epochs and 0.671 after 40; ResNet-18 slice "
                             "AUROC 0.765."},
    "kather_histo": {"file": "workflows/studies/kather_histo.yaml", "task": "histo", "reference": "resnet18",
                     "context": "Kather et al. (2016) trained and tested on the full 5,000-tile set at 150 px; these "
                                "124 tiles at 64 px are a smoke-scale check that the histopathology path learns real "
                                "stained tissue, not a reproduction."},
}


# ------------------------------------------------------------------------------ helpers
def validation_curve(run_dir: Path) -> list[str]:
    """The validation metric per epoch of a training run: from its history.csv (the engine's
    per-epoch record; the metric is the fourth column), else from the ` val_metric ` lines of
    train.log written before history.csv existed."""
    history, log = run_dir / "history.csv", run_dir / "train.log"
    if history.is_file():
        with history.open(newline="") as fh:
            rows = list(csv.reader(fh))
        return [f"{float(r[3]):.4f}" for r in rows[1:] if len(r) > 3 and r[3]]  # as train.log prints it
    if log.is_file():
        return [ln.split("val_metric ")[1].split()[0] for ln in log.read_text().splitlines() if " val_metric " in ln]
    return []


def fmt(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{d}f}"


def fmt_ci(m: dict[str, Any] | None, d: int = 3) -> str:
    if not m:
        return "n/a"
    lo, hi = (m.get("ci95") or [None, None])[:2]
    return f"{fmt(m.get('value'), d)} [{fmt(lo, d)}, {fmt(hi, d)}]"


def fmt_p(p: Any) -> str:
    return "n/a" if p is None or not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def bench_cost(study_out: Path, keys: list[str]) -> tuple[float, float]:
    """Wall seconds (sum) and peak RSS (MB, max) of the benchmark files named ``<rule>/<job>``
    in ``keys`` (a key ending in ``*`` is a prefix)."""
    secs, peak = 0.0, 0.0
    for tsv in sorted((study_out / "benchmarks").rglob("*.tsv")):
        name = f"{tsv.parent.name}/{tsv.stem}"
        if not any(name.startswith(k[:-1]) if k.endswith("*") else name == k for k in keys):
            continue
        df = pd.read_csv(tsv, sep="\t")
        secs += float(df["s"].iloc[-1])
        peak = max(peak, float(pd.to_numeric(df["max_rss"], errors="coerce").iloc[-1]))
    return secs, peak


def study_cost(study_out: Path) -> tuple[float, float]:
    return bench_cost(study_out, ["*"])


def fmt_cost(secs: float, peak: float) -> str:
    return f"{secs / 60:.1f} min" if secs else "n/a", f"{peak / 1024:.2f} GB" if peak else "n/a"


def test_patients(pred: pd.DataFrame) -> pd.DataFrame:
    from medvit.evaluation.aggregate import aggregate_patients

    return aggregate_patients(pred[pred["split"] == "test"], "max")


# ------------------------------------------------------------------------------ X-ray studies
def xray_section(name: str, spec: dict[str, Any], out: Path, study: dict[str, Any]) -> list[str]:
    from medvit.evaluation.paired import delong_test, paired_bootstrap_test

    task = spec["task"]
    models = list(study["tasks"][task]["models"])
    lines, rows, tables, sample_level, counted = [], [], {}, {}, None
    ref = spec["reference"] if spec["reference"] in models else models[0]
    for model in models:
        folder = out / task / model
        rec = read_json(folder / "metrics.json")
        if rec is None:
            rows.append([model, "not run", "", "", "", "", ""])
            continue
        key = next((k for k in ("auroc", "auroc_macro") if k in rec["metrics"]), None)
        pred = pd.read_csv(folder / "predictions.csv")
        tables[model] = test_patients(pred)
        secs, peak = bench_cost(out, [f"{r}/{task}_{model}" for r in ("train", "predict", "evaluate")])
        rows.append([model, key, fmt_ci(rec["metrics"].get(key)), str(rec["n_patients"]), "", *fmt_cost(secs, peak)])
        sample_level[model] = fmt_ci(rec["sample_level"]["metrics"].get(key))
        counted = ((rec.get("sample_count_baseline") or {}).get("metrics") or {}).get(key)
    for r in rows:
        model = r[0]
        if model not in tables or model == ref or ref not in tables:
            r[4] = "reference" if model == ref else "n/a"
            continue
        a, b = tables[model].set_index("patient_id"), tables[ref].set_index("patient_id")
        common = a.index.intersection(b.index)
        classes = [c[len("score_"):] for c in a.columns if c.startswith("score_")]
        truth = a.loc[common, [f"true_{c}" for c in classes]].to_numpy()
        sa = a.loc[common, [f"score_{c}" for c in classes]].to_numpy()
        sb = b.loc[common, [f"score_{c}" for c in classes]].to_numpy()
        if len(classes) == 1:
            res = delong_test(truth[:, 0], sa[:, 0], sb[:, 0]).to_dict()
            r[4] = f"{res['difference']:+.3f}, DeLong p {fmt_p(res['p_value'])}"
        else:
            res = paired_bootstrap_test(truth, sa, sb, n_boot=2000)
            lo, hi = res["ci95"]
            r[4] = f"{res['difference']:+.3f} [{fmt(lo)}, {fmt(hi)}], bootstrap p {fmt_p(res['p_value'])}"
    lines += table(["model", "test metric (patient level)", "value [95% CI]", "test patients",
                    f"paired vs {ref} (difference, test)", "wall time (train+predict+evaluate)", "peak memory"], rows)
    if counted:
        # patients have different numbers of images: the patient figures beside what counting scores
        lines += [f"Test patients have different numbers of images: ranking them by that number alone scores "
                  f"{fmt_ci(counted)} (the report's image-count baseline). Image level, each image against its own "
                  "labels (CIs over patients): " + "; ".join(f"{m} {v}" for m, v in sample_level.items()) + ".", ""]
    return lines


# ------------------------------------------------------------------------------ LGG
def lgg_section(name: str, spec: dict[str, Any], out: Path, study: dict[str, Any]) -> list[str]:
    from medvit.evaluation.tumour_slices import paired_slice_auroc, slice_detection_summary

    tcfg = study["tasks"]["brain"]
    brain = out / "brain"
    lines = ["Every patient in this set has a tumour (there are tumour-free slices but no tumour-free "
             "patients), so patient-level normal-vs-tumour metrics (PTP sensitivity/specificity, patient AUROC) "
             "**cannot be computed**: the pipeline's PTP tables count a patient whose tumour slices were all "
             "resampled away as 'negative', which is an artefact, not a normal patient. Reported instead, on the "
             f"test split resampled by image to {1 - tcfg['anomaly_ratio']:.0%} tumour-free slices: the per-patient "
             "detection rate at k (patients with a tumour slice in the test split that have at least k tumour "
             "slices flagged), false-positive slices per tumour-free slice, and slice AUROC, all with "
             "patient-cluster bootstrap 95% CIs.", ""]
    split = read_json(brain / "split.json") or {}
    if split:
        s = split["splits"]
        lines += [f"Split (patients / slices): train {s['train']['patients']} / {s['train']['samples']}, "
                  f"val {s['val']['patients']} / {s['val']['samples']}, test {s['test']['patients']} / "
                  f"{s['test']['samples']} (test tumour slices: "
                  f"{s['test']['classes'].get('tumor', {}).get('samples', 0)}).", ""]
    det = read_json(brain / "detector" / "detection_metrics.json")
    if det:
        rows = [[sp, fmt(det["splits"][sp]["map50"]), fmt(det["splits"][sp]["map50_95"]),
                 fmt(det["splits"][sp]["precision"]), fmt(det["splits"][sp]["recall"])] for sp in ("val", "test")]
        secs, peak = bench_cost(out, ["brain/detect"])
        lines += [f"**Detector** YOLOv8n from `yolov8n.yaml` (offline, random init), {det['image_size']} px, "
                  f"{det['epochs']} epochs, mosaic {tcfg['detection']['mosaic']}; {secs / 60:.1f} min, peak "
                  f"{peak / 1024:.2f} GB:", ""]
        lines += table(["split", "mAP50", "mAP50-95", "precision", "recall"], rows)
        curve = brain / "detector" / "ultralytics" / "results.csv"
        if curve.is_file():
            rc = pd.read_csv(curve)
            rc.columns = [c.strip() for c in rc.columns]
            col = next((c for c in rc.columns if "mAP50(B)" in c and "95" not in c), None)
            if col:
                pts = [f"{int(e)}: {v:.3f}" for e, v in zip(rc["epoch"], rc[col])
                       if int(e) % max(1, len(rc) // 8) == 0 or int(e) == int(rc["epoch"].max())]
                lines += [f"Learning curve (validation mAP50 by epoch): {', '.join(pts)}.", ""]
    roles = {"detector (box confidence)": (brain / "detector" / "predictions.csv", tcfg["detection"]["conf"]),
             # the same scores flagged from the slice threshold `medvit evaluate` chose on validation
             "detector, validation-chosen threshold": (brain / "detector" / "predictions.csv", None),
             "teacher ResNet-18": (brain / "distill" / "teacher" / "predictions.csv", None),
             "DeiT-Tiny (plain)": (brain / "distill" / "student" / "predictions.csv", None),
             "DeiT-Tiny (distilled)": (brain / "distill" / "student_distilled" / "predictions.csv", None),
             # the threshold the cascade stage resolved (config, or its classifier's validation choice)
             "cascade (detector -> distilled DeiT)": (brain / "cascade" / "predictions.csv",
                                                      (read_json(brain / "cascade" / "model.json") or {}).get(
                                                          "threshold", tcfg["cascade"].get("threshold")))}
    preds, rows, summaries = {}, [], {}
    for label, (path, thr) in roles.items():
        if not path.is_file():
            rows.append([label, "not run", "", "", "", "", ""])
            continue
        pred = pd.read_csv(path)
        preds[label] = pred
        if thr is None:  # the classifier's slice threshold, chosen on validation by `medvit evaluate`
            rec = read_json(path.parent / "metrics.json") or {}
            thr = float(((rec.get("threshold") or {}).get("sample") or {}).get("tumor", 0.5))
        summ = slice_detection_summary(pred, thr, ks=(1, 2), n_boot=1000, seed=int(study["seed"]))
        summaries[label] = summ
        m = summ["metrics"]
        rows.append([label, f"{thr:.3f}", fmt_ci(m["slice_auroc"]), fmt_ci(m["slice_ap"]),
                     fmt_ci(m["detection_rate_k1"]), fmt_ci(m["detection_rate_k2"]),
                     fmt_ci(m["fp_per_tumour_free_slice"])])
    any_s = next(iter(summaries.values()), None)
    if any_s:
        lines += [f"Test split: {any_s['n_slices']} slices ({any_s['n_tumour_slices']} with tumour) of "
                  f"{any_s['n_patients']} patients, {any_s['n_tumour_patients']} of whom keep a tumour slice after "
                  f"resampling (tumour slices per such patient: {any_s['tumour_slices_per_patient']}).", ""]
    lines += table(["model", "flag threshold", "slice AUROC [95% CI]", "slice AP", "detection rate k=1",
                    "detection rate k=2", "FP slices per tumour-free slice"], rows)
    pair_rows = []
    for a, b in (("DeiT-Tiny (distilled)", "DeiT-Tiny (plain)"), ("DeiT-Tiny (distilled)", "teacher ResNet-18"),
                 ("DeiT-Tiny (plain)", "teacher ResNet-18"), ("cascade (detector -> distilled DeiT)",
                                                              "DeiT-Tiny (distilled)"),
                 ("detector (box confidence)", "teacher ResNet-18")):
        if a in preds and b in preds:
            res = paired_slice_auroc(preds[a], preds[b], n_boot=2000, seed=int(study["seed"]))
            pair_rows.append([f"{a} - {b}", f"{res['difference']:+.3f}",
                              f"[{fmt(res['ci95'][0])}, {fmt(res['ci95'][1])}]",
                              fmt_p(res["p_value"])])
    lines += ["Paired slice-AUROC differences (same test slices; patient-cluster bootstrap, 2000 resamples):", ""]
    lines += table(["comparison", "difference", "95% CI", "p (two-sided)"], pair_rows)
    comp = read_json(brain / "distill" / "comparison.json")
    if comp:
        crow = []
        for role, r in comp["roles"].items():
            secs, peak = bench_cost(out,
                                    [f"brain/distill_{role}"] + (["train/brain_resnet18"] if role == "teacher" else []))
            crow.append([role, r["model"], f"{r['params'] / 1e6:.2f}", f"{r['flops_per_slice'] / 1e6:.0f}",
                         f"{r['cpu_latency_ms_per_slice']:.1f}", f"{secs / 60:.1f} min", f"{peak / 1024:.2f} GB"])
        lines += table(["role", "model", "params (M)", "MFLOPs / slice", "CPU ms / slice (shared machine)",
                        "wall time", "peak memory"], crow)
    # learning curves of the classifiers (validation metric per epoch, from their train logs)
    curves = []
    for role in ("teacher", "student", "student_distilled"):
        log = brain / "distill" / role / "train.log"
        if role == "teacher" and not log.is_file():
            log = brain / "resnet18" / "train.log"
        vals = validation_curve(log.parent)
        if vals:
            curves.append(f"{role}: {', '.join(vals)}")
    if curves:
        lines += ["Learning curves, validation AUROC per epoch (train logs; weights of the best epoch kept): "
                  + "; ".join(curves) + ".", ""]
    # targets
    best = max(((s["metrics"]["slice_auroc"]["value"], k) for k, s in summaries.items() if not k.startswith("detector")
                and not k.startswith("cascade")), default=(float("nan"), "n/a"))
    lines += ["Targets:", ""]
    if det:
        v = det["splits"]["test"]["map50"]
        lines.append(f"- YOLOv8n test mAP50 >= 0.5: {fmt(v)} ({'met' if v >= 0.5 else f'missed by {0.5 - v:.3f}'}).")
    lines.append(f"- best classifier slice AUROC >= 0.95: {best[1]} {fmt(best[0])} "
                 f"({'met' if best[0] >= 0.95 else f'missed by {0.95 - best[0]:.3f}'}).")
    if "DeiT-Tiny (distilled)" in summaries and "DeiT-Tiny (plain)" in summaries:
        d = summaries["DeiT-Tiny (distilled)"]["metrics"]["slice_auroc"]["value"] - \
            summaries["DeiT-Tiny (plain)"]["metrics"]["slice_auroc"]["value"]
        lines.append(f"- distilled DeiT at least matches the plain DeiT: difference {d:+.3f} (paired test above).")
    for label in ("detector (box confidence)", "detector, validation-chosen threshold",
                  "cascade (detector -> distilled DeiT)"):
        if label not in summaries:
            continue
        m = summaries[label]["metrics"]
        v = m["detection_rate_k1"]["value"]
        lines.append(f"- per-patient detection rate at k = 1 >= 0.9, {label} (flag threshold "
                     f"{summaries[label]['threshold']:.3f}): {fmt_ci(m['detection_rate_k1'])} "
                     f"({'met' if v >= 0.9 else f'missed by {0.9 - v:.3f}'}), with "
                     f"{fmt_ci(m['fp_per_tumour_free_slice'])} false-positive slices per tumour-free slice.")
    lines.append("")
    return lines


# ------------------------------------------------------------------------------ Kather (k-fold)
def kather_section(name: str, spec: dict[str, Any], out: Path, study: dict[str, Any]) -> list[str]:
    from medvit.evaluation.paired import paired_bootstrap_test

    comp = read_json(out / "histo" / "comparison.json")
    if comp is None:
        return kather_partial(out, study)
    lines = [f"{comp.get('folds', 1)}-fold patient-level cross-validation, {comp['image_size']} px; tile (sample) "
             "level, which is patient level for the 100 tiles without a slide. Mean ± sd over the folds. Colour: "
             "no stain normalisation; each tile is scaled per channel to its own 0.5/99.5 percentiles.", ""]
    rows = []
    for e in comp["models"]:
        c = e["compute"]
        lat = (c.get("latency") or {}).get("1") or (c.get("latency") or {}).get(1) or {}
        secs, peak = bench_cost(out, [f"{r}/histo_{e['model']}_fold*" for r in ("train", "predict", "evaluate")])
        rows.append([e["model"], fmt_mean_sd(e["sample"]["accuracy"]), fmt_mean_sd(e["sample"]["auroc"]),
                     fmt_mean_sd(e["sample"]["f1_macro"]), f"{c['params'] / 1e6:.2f}", f"{c['flops'] / 1e6:.1f}",
                     f"{lat.get('per_sample_ms', float('nan')):.2f}", f"{secs / 60:.1f} min", f"{peak / 1024:.2f} GB"])
    lines += table(["model", "accuracy", "macro AUROC", "macro-F1", "params (M)", f"MFLOPs ({comp['image_size']} px)",
                    "CPU ms/tile (batch 1, 1 thread)", "wall time (5 folds)", "peak memory"], rows)
    # pooled out-of-fold test predictions: every tile scored once by the model that never saw it
    pooled = {}
    for e in comp["models"]:
        parts = [pd.read_csv(Path(r["path"]).parent / "predictions.csv") for r in e["runs"]]
        df = pd.concat([p[p["split"] == "test"] for p in parts]).sort_values("sample_id").reset_index(drop=True)
        pooled[e["model"]] = df
    ref = spec["reference"]
    if ref in pooled:
        classes = [c[len("score_"):] for c in pooled[ref].columns if c.startswith("score_")]

        def acc(t: np.ndarray, s: np.ndarray) -> float:
            return float(np.mean(t.argmax(1) == s.argmax(1)))

        prow = []
        for model, df in pooled.items():
            truth = df[[f"true_{c}" for c in classes]].to_numpy()
            s = df[[f"score_{c}" for c in classes]].to_numpy()
            if model == ref:
                prow.append([model, fmt(acc(truth, s)), "reference", ""])
                continue
            r = pooled[ref]
            assert (r["sample_id"].to_numpy() == df["sample_id"].to_numpy()).all()
            sr = r[[f"score_{c}" for c in classes]].to_numpy()
            ra = paired_bootstrap_test(truth, s, sr, n_boot=2000, statistic=acc)
            rm = paired_bootstrap_test(truth, s, sr, n_boot=2000)
            prow.append([model, fmt(acc(truth, s)),
                         f"{ra['difference']:+.3f} [{fmt(ra['ci95'][0])}, {fmt(ra['ci95'][1])}], p "
                         f"{fmt_p(ra['p_value'])}",
                         f"{rm['difference']:+.3f} [{fmt(rm['ci95'][0])}, {fmt(rm['ci95'][1])}], p "
                         f"{fmt_p(rm['p_value'])}"])
        lines += [f"Pooled out-of-fold test predictions ({len(pooled[ref])} tiles, each scored once), paired "
                  f"bootstrap against {ref} (2000 resamples of tiles):", ""]
        lines += table(["model", "pooled accuracy", f"accuracy - {ref} [95% CI], p",
                        f"macro AUROC - {ref} [95% CI], p"],
                       prow)
    by = {e["model"]: e for e in comp["models"]}
    if "dct_histo_tiny" in by:
        dct = by["dct_histo_tiny"]
        peers = [e for m, e in by.items() if m != "dct_histo_tiny" and e["sample"]["accuracy"]["mean"] is not None]
        best = max(peers, key=lambda e: e["sample"]["accuracy"]["mean"]) if peers else None
        if best:
            gap = best["sample"]["accuracy"]["mean"] - dct["sample"]["accuracy"]["mean"]
            sd = best["sample"]["accuracy"]["sd"] or 0.0
            fewer = "vit_tiny" in by and dct["compute"]["flops"] < by["vit_tiny"]["compute"]["flops"]
            ok = gap <= sd and fewer
            lines += ["Target: DCT-HistoTransformer accuracy within one sd of the best peer at fewer FLOPs than "
                      f"ViT-Tiny: best peer {best['model']} {fmt_mean_sd(best['sample']['accuracy'])}, DCT "
                      f"{fmt_mean_sd(dct['sample']['accuracy'])} (gap {gap:+.3f}, one sd {sd:.3f}); FLOPs "
                      f"{dct['compute']['flops'] / 1e6:.1f} M vs ViT-Tiny "
                      f"{by['vit_tiny']['compute']['flops'] / 1e6:.1f} M. "
                      + ("**Met.**" if ok else "**Not met**" + (" (accuracy)" if gap > sd else "")
                         + (" (FLOPs)" if not fewer else "") + "."), ""]
    return lines


def kather_partial(out: Path, study: dict[str, Any]) -> list[str]:
    """The folds that finished, when the comparison has not run yet (an interrupted study)."""
    from medvit.tasks.compare import run_metrics, summarize

    k = int(study["tasks"]["histo"].get("folds", 1))
    rows = []
    for model in study["tasks"]["histo"]["models"]:
        done = [out / "histo" / model / f"fold{i}" / "metrics.json" for i in range(k)]
        runs = [run_metrics(p) for p in done if p.is_file()]
        acc = summarize([r["sample"]["accuracy"] for r in runs])
        auc = summarize([r["sample"]["auroc"] for r in runs])
        rows.append([model, f"{len(runs)} of {k}", fmt_mean_sd(acc), fmt_mean_sd(auc)])
    return (["**Incomplete**: the comparison (params, FLOPs, latency, all folds) has not run; the folds that "
             "finished are summarised below (tile level, mean ± sd over those folds).", ""]
            + table(["model", "folds finished", "accuracy", "macro AUROC"], rows))


def fmt_mean_sd(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s.get("sd") is not None else f"{s['mean']:.3f}"


SECTIONS = {"pneumonia": xray_section, "nih_cxr14": xray_section, "lgg_brain": lgg_section,
            "kather_histo": kather_section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "QUALITY.md")
    ap.add_argument("--studies", nargs="*", default=list(STUDIES))
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    import platform

    import torch

    lines = ["# Quality on real data", "",
             f"Written by `make bench-quality` (benchmarks/quality.py) on {dt.date.today()} from the studies' own "
             f"result files under `results/`; code {commit}{' (dirty)' if dirty else ''}; "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Every number below is read from those runs; none is typed in. "
             "95% CIs are percentile bootstraps over patients (clusters); wall times and peak memory (max RSS) come "
             "from Snakemake's benchmark files (a shared machine: indicative).", ""]
    for name in args.studies:
        spec = STUDIES[name]
        lines += [f"## {name} (`{spec['file']}`)", ""]
        study_file = REPO / spec["file"]
        if not study_file.is_file():
            lines += [f"Not in this checkout ({spec['file']} is missing).", ""]
            continue
        study = load_study(study_file)
        out = args.results / study["study"]
        if not out.is_dir():
            lines += [f"Not run: {out} does not exist (`snakemake --configfile {spec['file']}`).", ""]
            continue
        try:
            lines += SECTIONS[name](name, spec, out, study)
        except Exception as exc:  # noqa: BLE001 - a half-finished study is reported, not fatal
            lines += [f"Incomplete results ({type(exc).__name__}: {exc}).", ""]
        secs, peak = study_cost(out)
        lines += [f"Whole study: {secs / 60:.1f} min of job wall time, peak {peak / 1024:.2f} GB.", "",
                  f"Published context: {spec['context']}", ""]
    skipped = [n for n in STUDIES if n not in args.studies]
    if skipped:
        lines += ["## Not in this run", "", "Not requested this time (`make bench-quality QUALITY_STUDIES=\"...\"`): "
                  + ", ".join(f"`{n}` ({STUDIES[n]['file']})" for n in skipped) + ".", ""]
    args.out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
