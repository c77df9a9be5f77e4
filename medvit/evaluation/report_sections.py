"""The parts of the evaluation report beyond the metric tables: the summary a reader sees
first, per-task figures (ROC/PR with the validation operating point, calibration, confusion
matrices, cost comparison) and paired tests, the data section, provenance and model cards.

Everything is computed from files the pipeline wrote under ``results/<study>/``: each
model's ``metrics.json`` and the ``predictions.csv`` beside it, each task's ``split.json`` /
``split.csv``, the rule benchmarks. Only pseudonymous patient ids exist in those files; the
report shows counts, never a patient id, and strips file paths from quarantine reasons.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from medvit.config import TASKS, manifest_origin
from medvit.data.manifest import leaking_patients
from medvit.evaluation.aggregate import aggregate_patients
from medvit.evaluation.evaluate import read_predictions
from medvit.evaluation.figures import comparison_figure, confusion_figure, reliability_figure, roc_pr_figure
from medvit.evaluation.html import (
    Section,
    esc,
    figure_html,
    format_count,
    format_metric,
    format_seconds,
    format_value,
    html_table,
    metric_label,
)
from medvit.evaluation.paired import paired_auroc_comparisons, paired_bootstrap_test
from medvit.provenance import git_version, hardware, package_versions

# Headline metric of a task, first present wins (patient level).
HEADLINE = ("auroc_macro", "auroc", "balanced_accuracy", "accuracy", "dice")
INTENDED_USE = ("Research use only: a model trained by an automated pipeline for method comparison. It is "
                "not a medical device and has not been validated for clinical decisions.")


@dataclass
class TaskResults:
    """What the report knows about one task: its metrics records, patient-level test tables
    per model and the split summary."""

    task: str
    records: list[dict[str, Any]]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    split_csv: Path | None = None
    dirs: dict[str, Path] = field(default_factory=dict)
    samples: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.records[0].get("kind", "binary")) if self.records else "binary"

    @property
    def classes(self) -> list[str]:
        return list(self.records[0].get("classes", [])) if self.records else []

    def thresholds(self) -> dict[str, dict[str, float]]:
        """model -> class -> patient-level threshold chosen on validation."""
        return {r["model"]: {c: float(v) for c, v in ((r.get("threshold") or {}).get("patient") or {}).items()
                             if isinstance(v, (int, float))} for r in self.records}


def headline(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(metric name, entry) of the record's headline patient-level metric."""
    metrics = record.get("metrics") or {}
    for name in HEADLINE:
        entry = metrics.get(name)
        if entry and isinstance(entry.get("value"), (int, float)) and math.isfinite(entry["value"]):
            return name, entry
    return None


def load_task_results(records: Sequence[dict[str, Any]], metrics_paths: Sequence[Path],
                      study_root: Path) -> dict[str, TaskResults]:
    """Group records by task and read each model's predictions beside its metrics.json into a
    patient-level test table (aggregated as the evaluation did)."""
    out: dict[str, TaskResults] = {}
    for record, path in zip(records, metrics_paths):
        task = str(record.get("task", "?"))
        tr = out.setdefault(task, TaskResults(task, []))
        tr.records.append(record)
        predictions = Path(path).parent / "predictions.csv"
        tr.dirs[str(record["model"])] = Path(path).parent
        if predictions.is_file():
            df = read_predictions(predictions)
            df["line"] = np.arange(len(df)) + 2  # line in predictions.csv (after the header)
            agg = record.get("aggregate") or {}
            patients = aggregate_patients(df, agg.get("method") or "max", agg.get("top_k") or 3, record.get("kind"))
            key = df["patient_id"].astype(str)
            patients["lines"] = patients["patient_id"].map(df.groupby(key, sort=False)["line"].agg(list))
            patients = patients.drop(columns="line")
            tr.tables[str(record["model"])] = patients[patients["split"] == "test"].reset_index(drop=True)
            tr.samples[str(record["model"])] = df[df["split"].astype(str).str.lower() == "test"].reset_index(drop=True)
    out = {t: out[t] for t in [t for t in TASKS if t in out] + sorted(t for t in out if t not in TASKS)}
    for task, tr in out.items():
        split_json = study_root / task / "split.json"
        if split_json.is_file():
            tr.split = json.loads(split_json.read_text(encoding="utf-8"))
            tr.split_csv = split_json.with_suffix(".csv")
    return out


def chance_level(name: str, record: dict[str, Any]) -> float | None:
    """The value of a metric for a model that ranks or guesses at random: 0.5 for an AUROC,
    1 / (number of classes) for balanced accuracy; None where chance depends on prevalence
    (accuracy, AP) or is not defined (Dice)."""
    if name == "auroc" or name.startswith("auroc_"):
        return 0.5
    if name == "balanced_accuracy":
        k = len(record.get("classes") or []) if record.get("kind") == "multiclass" else 2
        return 1.0 / max(k, 2)
    return None


def interval(entry: dict[str, Any] | None) -> tuple[float, float] | None:
    """The (lo, hi) confidence interval of a metrics.json entry, None when undefined."""
    ci = next((v for k, v in (entry or {}).items() if k.startswith("ci") and isinstance(v, list)), None)
    if ci and len(ci) == 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def includes_chance(name: str, entry: dict[str, Any] | None, record: dict[str, Any]) -> float | None:
    """The chance level when the entry's CI includes it (the model is not shown to be better
    than chance), else None. A CI that cannot be computed counts as including chance."""
    chance = chance_level(name, record)
    if chance is None or not entry:
        return None
    ci = interval(entry)
    return chance if ci is None or ci[0] <= chance else None


def under_count_baseline(record: dict[str, Any]) -> tuple[str, dict[str, Any], float] | None:
    """(metric, model entry, baseline value) when the headline metric's CI does not clear the
    score of ranking patients by their number of samples alone (metrics.json's
    ``sample_count_baseline``) and that score is itself above chance (its CI excludes it), else
    None: the patient-level figure may then measure how many images a patient has, not what is
    in them."""
    h = headline(record)
    baseline = ((record.get("sample_count_baseline") or {}).get("metrics") or {}).get(h[0]) if h else None
    if not h or not baseline or not isinstance(baseline.get("value"), (int, float)):
        return None
    value = float(baseline["value"])
    if not math.isfinite(value) or includes_chance(h[0], baseline, record) is not None:
        return None  # counting images is itself no better than chance here: nothing to warn about
    ci = interval(h[1])
    return (h[0], h[1], value) if ci is None or ci[0] <= value else None


def degenerate_points(tr: TaskResults) -> list[dict[str, Any]]:
    """Operating points (threshold chosen on validation, applied to the test patients) that
    call every test patient positive, or every one negative: their sensitivity, specificity
    and confusion matrix describe the threshold, not the model's discrimination."""
    out = []
    if tr.kind == "multiclass":
        return out
    thresholds = tr.thresholds()
    for model, table in tr.tables.items():
        for c in tr.classes:
            thr = thresholds.get(model, {}).get(c)
            if thr is None or f"score_{c}" not in table or table.empty:
                continue
            y = table[f"true_{c}"].to_numpy().astype(int)
            pred = table[f"score_{c}"].to_numpy(float) >= thr
            if pred.all() or not pred.any():
                out.append({"model": model, "class": c, "threshold": thr,
                            "all": "positive" if pred.all() else "negative",
                            "n": int(len(pred)), "tn": int(np.sum(~pred & (y == 0))),
                            "tp": int(np.sum(pred & (y == 1)))})
    return out


def degenerate_html(points: list[dict[str, Any]], kind: str) -> str:
    if not points:
        return ""
    items = []
    for d in points:
        what = f"{d['model']}" + (f" ({d['class']})" if kind != "binary" else "")
        zero = "0 true negatives: specificity 0" if d["all"] == "positive" else "0 true positives: sensitivity 0"
        items.append(f"<li>{esc(what)}: the threshold chosen on validation ({d['threshold']:.3g}) calls every one of "
                     f"the {d['n']} test patients {d['all']} ({esc(zero)}). Its sensitivity, specificity, F1 and "
                     "confusion matrix describe this threshold, not the model; read AUROC and the curves.</li>")
    return ('<div class="warn"><b>Degenerate operating point.</b><ul>' + "".join(items) + "</ul></div>")


def threshold_phrase(tr: TaskResults) -> str:
    """How a task's operating points were set, read from its records (the same objects the
    numbers come from): chosen on validation, or 0.5 where validation could not choose."""
    fallback, classes = [], set()
    for r in tr.records:
        threshold = r.get("threshold") or {}
        patient = (threshold.get("fallback_classes") or {}).get("patient")
        if patient is None and "fallback" in threshold:  # written before the classes were recorded
            fallback.append(r["model"])
        elif patient:
            fallback.append(r["model"])
            classes |= set(patient)
    chosen = [r["model"] for r in tr.records if r["model"] not in fallback]
    if not fallback:
        return "the threshold chosen on the validation patients"
    n_classes = len(tr.records[0].get("classes") or [])
    if classes and len(classes) < n_classes:
        # multilabel: validation chose every other finding's threshold
        return (f"the threshold chosen on the validation patients, or 0.5 for {', '.join(sorted(classes))} where "
                "validation could not choose one (see the notes)")
    if not chosen:
        return "a threshold of 0.5 (validation could not choose one: see the notes)"
    return (f"the threshold chosen on the validation patients ({', '.join(chosen)}), or 0.5 where validation "
            f"could not choose one ({', '.join(fallback)})")


# ------------------------------------------------------------------------ summary
def best_record(tr: TaskResults) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    scored = [(r, *h) for r in tr.records if (h := headline(r))]
    if not scored:
        return None
    # the headline metric shared by most records, then the highest value
    names = [s[1] for s in scored]
    common = max(set(names), key=names.count)
    return max((s for s in scored if s[1] == common), key=lambda s: s[2]["value"])


def all_patients_positive(split: dict[str, Any], positive: str) -> bool:
    """True when every training and validation patient of a binary task is positive (e.g.
    TCGA-LGG, where every patient has a tumour): patient-level metrics are then undefined."""
    splits = {k: v for k, v in (split.get("splits") or {}).items() if k in ("train", "val")}
    # a split without class counts says nothing either way
    return bool(splits) and all(s.get("strata") and set(s["strata"]) <= {positive} for s in splits.values())


def summary_section(study: dict[str, Any], results: dict[str, TaskResults],
                    comparisons: dict[str, list[dict[str, Any]]]) -> Section:
    """What a reader sees first: per task the data size and the best model with its headline
    patient-level metric, CI, and whether a paired test backs it against the runner-up."""
    rows = []
    for task, tr in results.items():
        splits = tr.split.get("splits", {})
        patients = sum(s.get("patients", 0) for s in splits.values())
        samples = sum(s.get("samples", 0) for s in splits.values())
        best = best_record(tr)
        if best is None:
            rows.append([task, format_count(patients), format_count(samples), "n/a", "", "", ""])
            continue
        record, name, entry = best
        positive = (study.get("tasks", {}).get(task) or {}).get("positive_class")
        if tr.kind == "binary" and positive and all_patients_positive(tr.split, positive):
            # no negative patient outside resampling: a patient-level metric would crown an artefact
            rows.append([task, format_count(patients), format_count(samples),
                         f"none at patient level: every patient has {positive} (the task's slice-level table "
                         "is the result)", f"({metric_label(name)} {format_metric(entry)}: not meaningful)",
                         format_count(record.get("n_patients")), "no model is crowned"])
            continue
        chance = includes_chance(name, entry, record)
        if chance is not None:
            above = [r["model"] for r in tr.records if (h := headline(r)) and h[0] == name
                     and chance_level(name, r) is not None and includes_chance(name, h[1], r) is None]
            verdict = (f"none: the highest, {record['model']}, is no better than chance (its 95% CI includes "
                       f"{chance:g})"
                       + (f"; CI above chance: {', '.join(above)}" if above else ""))
            rows.append([task, format_count(patients), format_count(samples), verdict,
                         f"{metric_label(name)} {format_metric(entry)}", format_count(record.get("n_patients")),
                         "no model is crowned" if not above else "see the task's paired comparison"])
            continue
        backed = _backing(record["model"], tr, comparisons.get(task, []))
        if counted := under_count_baseline(record):
            backed += (f"; its interval does not clear {counted[2]:.3f}, the score of ranking patients by their "
                       "number of images alone (see the task)")
        rows.append([task, format_count(patients), format_count(samples), record["model"],
                     f"{metric_label(name)} {format_metric(entry)}", format_count(record.get("n_patients")), backed])
    table = html_table(["task", "patients", "samples", "best model", "patient-level test metric [95% CI]",
                        "test patients", "against the runner-up (paired test on the same patients)"], rows,
                       text_columns=(3, 4, 6), table_class="summary")
    links = [(f"task-{t}", f"Task: {t}") for t in results] + [("data", "Data"), ("reporting", "Reporting checklist"),
                                                               ("model-cards", "Model cards"),
                                                               ("provenance", "Provenance")]
    nav = '<nav class="toc">' + "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in links) + "</nav>"
    origin = ", ".join(f"{t}: {_origin(study, t)}" for t in results)
    intro = (f'<p>Study <b>{esc(study["study"])}</b>, seed {esc(study["seed"])}; data {esc(origin)}. '
             "All headline numbers are patient level on the held-out test patients, with 95% percentile "
             "bootstrap intervals over patients. A model is called better only where the paired test "
             "column says so, and best only when its interval excludes chance.</p>")
    return Section("Summary", intro + table + nav, anchor="summary")


def _origin(study: dict[str, Any], task: str) -> str:
    try:
        return manifest_origin(study, task)
    except Exception:  # noqa: BLE001 - a task missing from the config is reported as unknown
        return "unknown"


def _backing(model: str, tr: TaskResults, comparisons: list[dict[str, Any]]) -> str:
    """Runner-up comparison for the summary: DeLong's test for a binary task, a paired
    bootstrap of the macro AUROC otherwise (on the patients both models scored)."""
    others = [r for r in tr.records if r["model"] != model and headline(r)]
    if not others:
        return "only model"
    runner = max(others, key=lambda r: headline(r)[1]["value"])["model"]
    if tr.kind == "binary":
        tests = [c for c in comparisons if {c["model_a"], c["model_b"]} == {model, runner}]
        if not tests:
            return f"no paired test against {runner}"
        p, how = tests[0]["p_holm"], "DeLong, Holm-adjusted"
    else:
        if model not in tr.tables or runner not in tr.tables:
            return f"no paired test against {runner}"
        a, b = tr.tables[model].set_index("patient_id"), tr.tables[runner].set_index("patient_id")
        common = a.index.intersection(b.index)
        truth = a.loc[common, [f"true_{c}" for c in tr.classes]].to_numpy()
        if not np.array_equal(truth, b.loc[common, [f"true_{c}" for c in tr.classes]].to_numpy()):
            return f"not comparable with {runner} (different truth for the same patients)"
        res = paired_bootstrap_test(truth, a.loc[common, [f"score_{c}" for c in tr.classes]].to_numpy(),
                                    b.loc[common, [f"score_{c}" for c in tr.classes]].to_numpy(), n_boot=1000)
        p, how = res["p_value"], "paired bootstrap of the macro AUROC"
    if not math.isfinite(p):
        return f"paired test against {runner} undefined"
    verdict = "significantly better than" if p < 0.05 else "not significantly different from"
    return f"{verdict} {runner} ({how}, p={p:.3g})"


# ------------------------------------------------------------------------ per task
def task_figures_html(tr: TaskResults, figures_dir: Path) -> tuple[str, dict[str, float]]:
    """Curves, calibration, confusion matrices and the cost chart of a task (HTML) and each
    model's ECE."""
    if not tr.tables:
        return "", {}
    parts: list[str] = []
    thresholds = tr.thresholds() if tr.kind != "multiclass" else {}
    roc = roc_pr_figure(tr.tables, tr.classes, thresholds, figures_dir / f"{tr.task}_roc_pr.png")
    if roc:
        parts.append(figure_html("ROC and precision-recall curves of the test patients; dots mark the operating point "
                                 "at "
                                 f"{threshold_phrase(tr)}",
                                 roc))
    rel, eces = reliability_figure(tr.tables, tr.classes, figures_dir / f"{tr.task}_calibration.png")
    conf = confusion_figure(tr.tables, tr.classes, tr.kind, thresholds, figures_dir / f"{tr.task}_confusion.png",
                            negative=_negative_name(tr))
    conf_how = "(argmax class)" if tr.kind == "multiclass" else f"at {threshold_phrase(tr)}"
    pair = "".join(figure_html(c, p) for c, p in (
        ("Reliability diagram of the test patients (all classes one-vs-rest); ECE = expected calibration "
         "error over 10 bins", rel),
        ("Confusion matrices of the test patients " + conf_how, conf)) if p)
    if pair:
        parts.append(f'<div class="pair">{pair}</div>')
    points = []
    for r in tr.records:
        h = headline(r)
        if h:
            name, entry = h
            ci = next((v for k, v in entry.items() if k.startswith("ci")), None)
            points.append({"model": r["model"], "value": entry["value"], "ci": ci, "params": r.get("params"),
                           "flops": r.get("flops"), "latency_ms": r.get("latency_ms"),
                           "train_seconds": r.get("train_seconds")})
    if points:
        chart = comparison_figure(points,
                                  f"{metric_label(headline(tr.records[0])[0]) if headline(tr.records[0]) else 'metric'}"
                                  " (patient level)", figures_dir / f"{tr.task}_comparison.png")
        if chart:
            parts.append(figure_html("Headline patient-level metric (95% CI) against what each model costs", chart))
    return "".join(parts), eces


def _negative_name(tr: TaskResults) -> str:
    """The negative class of a binary task (the split summary names every class)."""
    names = {c for s in (tr.split.get("splits") or {}).values() for c in (s.get("classes") or {})}
    negatives = sorted(names - set(tr.classes))
    return negatives[0] if len(negatives) == 1 else "negative"


def comparisons_html(comparisons: list[dict[str, Any]]) -> str:
    """The paired DeLong table of a task."""
    if not comparisons:
        return ""
    rows = [[c["model_a"], c["model_b"], c["class"], format_count(c["n_patients"]), format_value(c["auc_a"]),
             format_value(c["auc_b"]), f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]",
             f"{c['p_value']:.3g}", f"{c['p_holm']:.3g}"] for c in comparisons]
    return html_table(["model A", "model B", "class", "patients", "AUROC A", "AUROC B", "A - B [95% CI]",
                       "p (DeLong)", "p (Holm)"], rows, text_columns=(1, 2), caption=
                      "Paired comparison on the same test patients (DeLong's test for correlated AUROCs; Holm "
                      "adjustment over the task's comparisons)")


def ece_html(eces: dict[str, float]) -> str:
    if not eces:
        return ""
    return html_table(["model", "ECE (test patients, 10 bins)"], [[m, format_value(v)] for m, v in eces.items()],
                      "Calibration")


# ------------------------------------------------------------------------ data
_PATHLIKE = re.compile(r"\S*[/\\]\S*|\S+\.(?:png|jpe?g|tiff?|dcm|nii(?:\.gz)?|npy|txt)\b", re.IGNORECASE)


def redact_paths(text: str) -> str:
    """Replace file paths in a message by ``<file>``: real exports put patient names in paths."""
    return _PATHLIKE.sub("<file>", text)


def data_section(results: dict[str, TaskResults]) -> Section | None:
    """Patients and samples per split and class, the achieved anomaly ratio, quarantined
    inputs with reasons, and the leakage check's result, per task."""
    parts = []
    for task, tr in results.items():
        splits = tr.split.get("splits") or {}
        if not splits:
            continue
        groups = sorted({g for s in splits.values() for g in (s.get("classes") or s.get("findings") or {})})
        rows = []
        for name, s in splits.items():
            per = s.get("classes") or s.get("findings") or {}
            rows.append([name, format_count(s.get("patients")), format_count(s.get("samples")),
                         *[f"{format_count(per.get(g, {}).get('patients', 0))} / "
                           f"{format_count(per.get(g, {}).get('samples', 0))}" for g in groups]])
        body = html_table(["split", "patients", "samples", *[f"{g} (patients / samples)" for g in groups]], rows,
                          f"{task}: {tr.split.get('kind', '')} task")
        anomaly = tr.split.get("anomaly") or {}
        if anomaly:
            arows = [[name, a.get("by", ""), format_value(a.get("target_abnormal_fraction")),
                      format_value(a.get("achieved_patient_fraction")), format_value(a.get("achieved_image_fraction")),
                      f"{a.get('patients_normal', 0)} : {a.get('patients_abnormal', 0)}",
                      f"{a.get('images_normal', 0)} : {a.get('images_abnormal', 0)}"] for name, a in anomaly.items()]
            body += html_table(["split", "resampled by", "target abnormal fraction", "achieved (patients)",
                                "achieved (images)", "patients normal : abnormal", "images normal : abnormal"], arows,
                               "Anomaly distribution after resampling")
        for r in tr.records:  # the metrics' own test set when it is not the split's (cross-validation)
            n_split = (splits.get("test") or {}).get("patients")
            if r.get("n_patients") is not None and r.get("n_patients") != n_split:
                body += (f'<p class="settings">{esc(r["model"])}: the metrics are computed on '
                         f"{esc(evaluated_on(tr, r))}, not on the {esc(format_count(n_split))} patients of the "
                         "test split above.</p>")
        quarantined = tr.split.get("quarantined") or []
        if quarantined:
            body += html_table(["row", "column", "reason"], text_columns=(1, 2), rows=
                               [[format_count(q.get("row")) if q.get("row") else "-", q.get("column") or "-",
                                 redact_paths(str(q.get("reason", "")))] for q in quarantined],
                               caption=f"Quarantined inputs ({len(quarantined)}; left out of every stage)")
        else:
            body += '<p class="settings">Quarantined inputs: none.</p>'
        for warning in tr.split.get("warnings") or []:  # patient ids that look like names, MRNs or dates
            body += f'<p class="settings">Warning: {esc(redact_paths(str(warning)))}</p>'
        if tr.split_csv and tr.split_csv.is_file():
            df = pd.read_csv(tr.split_csv, dtype=str, keep_default_na=False)
            leaks = leaking_patients(df)
            n = df["patient_id"].nunique()
            text = (f"Leakage check passed: each of the {n} patients is in exactly one split."
                    if not leaks else f"Leakage check FAILED: {len(leaks)} patient(s) in more than one split.")
            body += f'<p class="settings">{esc(text)}</p>'
        parts.append(body)
    return Section("Data", "".join(parts), anchor="data") if parts else None


# ------------------------------------------------------------------------ provenance
def stage_times(study_root: Path) -> tuple[list[list[str]], float | None, float | None]:
    """Per-rule wall time from Snakemake's ``benchmark:`` files: table rows, run start and end
    (epoch seconds; start = earliest file time minus its duration)."""
    rows, starts, ends = [], [], []
    for tsv in sorted((study_root / "benchmarks").glob("*/*.tsv")):
        try:
            bench = pd.read_csv(tsv, sep="\t")
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
        if bench.empty or "s" not in bench:
            continue
        seconds = float(bench["s"].iloc[-1])
        rss = bench["max_rss"].iloc[-1] if "max_rss" in bench else None
        mtime = tsv.stat().st_mtime
        starts.append(mtime - seconds)
        ends.append(mtime)
        rows.append([tsv.parent.name, tsv.stem, format_seconds(seconds),
                     f"{float(rss):,.0f} MB" if isinstance(rss, (int, float)) and math.isfinite(rss) else "n/a"])
    return rows, (min(starts) if starts else None), (max(ends) if ends else None)


def provenance_section(study: dict[str, Any], records: Sequence[dict[str, Any]], study_root: Path) -> Section:
    """Config as run, code version, manifest hashes, packages, hardware, times per stage."""
    code = git_version()
    facts = [["code",
              f"git {code.get('commit') or 'unknown'}" + (" (uncommitted changes)" if code.get("dirty") else "")]]
    prov = next((r.get("provenance") for r in records if r.get("provenance")), {}) or {}
    if prov.get("config_sha256"):
        facts.append(["study config", f"{prov.get('config_path', '')} sha256 {prov['config_sha256']}"])
    for r in records:
        p = r.get("provenance") or {}
        if p.get("manifest_sha256"):
            facts.append([f"split manifest {r.get('task')}/{r.get('model')}", f"sha256 {p['manifest_sha256']}"])
    hw = hardware()
    facts.append(["hardware", f"{hw.get('machine')}, {hw.get('cpu_count')} CPU cores, CUDA "
                              f"{'yes' if hw.get('cuda') else 'no'}, Python {hw.get('python')}"])
    facts.append(["packages", ", ".join(f"{k} {v}" for k, v in package_versions().items() if v)])
    rows, start, end = stage_times(study_root)
    if start is not None:
        def stamp(t: float) -> str:
            return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")

        facts.append(["run", f"first stage started {stamp(start)}, last finished {stamp(end)} "
                             f"({format_seconds(end - start)} wall time)"])
    body = html_table(["", ""], facts, text_columns=(1,))
    if rows:
        total = sum(float(pd.read_csv(t, sep="\t")["s"].iloc[-1]) for t in (study_root / "benchmarks").glob("*/*.tsv")
                    if t.stat().st_size)
        body += html_table(["stage", "job", "wall time", "peak memory"], rows, text_columns=(1,), caption=
                           f"Wall time per job (Snakemake benchmarks; {format_seconds(total)} summed)")
    config_text = yaml.safe_dump(study, sort_keys=False)
    body += f"<details><summary>Study config as run (defaults filled)</summary><pre>{esc(config_text)}</pre></details>"
    return Section("Provenance", body, anchor="provenance")


# ------------------------------------------------------------------------ model cards
_NOTE_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"^(patient|sample) level: test holds a single class for '(.+)': auroc is undefined$"),
     lambda m: f"The {m[1]}-level test set holds only one class for {m[2]}, so its AUROC cannot be computed."),
    (re.compile(r"^(patient|sample) level: (\w+) excludes (.+) \((.+): undefined\)$"),
     lambda m: f"The {m[1]}-level {metric_label(m[2])} averages over the other classes: {m[3]} had {m[4]}."),
    (re.compile(r"^(patient|sample) level: hd95: (\d+) of (\d+) rows undefined \(one mask empty\) and skipped$"),
     lambda m: (f"HD95 (boundary distance) is undefined for {m[2]} of {m[3]} test "
                f"{'patients' if m[1] == 'patient' else 'volumes'} where the predicted or the true lesion mask is "
                "empty (no boundary to measure); the mean HD95 leaves them out, and Dice counts those misses.")),
    (re.compile(r"^(patient|sample) level: dice: (\d+) of (\d+) rows undefined.*$"),
     lambda m: f"Dice is undefined for {m[2]} of {m[3]} test {m[1]}s and left out of its mean."),
    (re.compile(r"^(patient|sample)-level threshold for '(.+)': (\w+) threshold undefined \((.+)\); used ([\d.]+)$"),
     lambda m: (f"Validation could not choose a {m[1]}-level threshold for {m[2]} ({m[4]}), so a fixed threshold "
                f"of {m[5]} was used.")),
    (re.compile(r"^no model.json beside the predictions.*$"),
     lambda m: "The model's card (model.json) was missing at evaluation: parameters and training time are unknown."),
)


def plain_note(note: str) -> str:
    """An evaluator note as a sentence a reader understands (unknown notes are kept, first
    letter capitalised)."""
    text = str(note).strip()
    for pattern, sentence in _NOTE_RULES:
        m = pattern.match(text)
        if m:
            return sentence(m)
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def evaluated_on(tr: TaskResults, record: dict[str, Any]) -> str:
    """The test set a record's numbers come from, read from the record (not the split): the
    pooled out-of-fold patients of a cross-validation, or the test split."""
    n_p, n_s = format_count(record.get("n_patients")), format_count(record.get("n_samples"))
    samples = tr.samples.get(str(record.get("model")))
    if samples is not None and "fold" in samples.columns and samples["fold"].nunique() > 1:
        return (f"{n_p} patients ({n_s} samples) pooled out of fold over {samples['fold'].nunique()} "
                "cross-validation folds (each patient tested once, by the model that did not train on it)")
    return f"{n_p} test patients ({n_s} samples)"


def chance_limits(tr: TaskResults, record: dict[str, Any]) -> list[str]:
    """Model-card limits from the chance and degenerate-threshold checks."""
    limits = []
    h = headline(record)
    if h and (chance := includes_chance(h[0], h[1], record)) is not None:
        limits.append(f"its {metric_label(h[0])} interval includes chance ({chance:g}): the test data do not show "
                      "it to be better than guessing")
    if found := under_count_baseline(record):
        limits.append(f"its patient-level {metric_label(found[0])} interval does not clear {found[2]:.3f}, the score "
                      "of ranking patients by their number of images alone: it is not shown to read more than how "
                      "many images a patient has")
    for d in degenerate_points(tr):
        if d["model"] == record["model"]:
            limits.append(f"at the threshold chosen on validation it calls every test patient {d['all']}"
                          + (f" for {d['class']}" if tr.kind != "binary" else "")
                          + ": its sensitivity and specificity describe the threshold, not the model")
    return limits


def model_cards_section(study: dict[str, Any], results: dict[str, TaskResults],
                        eces: dict[str, dict[str, float]]) -> Section | None:
    """One card per trained model: intended use, data, training, metrics, limits."""
    cards = []
    for task, tr in results.items():
        splits = tr.split.get("splits") or {}
        data = ", ".join(f"{n}: {s.get('patients', 0)} patients / {s.get('samples', 0)} samples"
                         for n, s in splits.items())
        for r in tr.records:
            h = headline(r)
            metric = f"{metric_label(h[0])} {format_metric(h[1])}" if h else "n/a"
            limits = []
            if _origin(study, task) == "synthetic":
                limits.append("trained and tested on synthetic images: the numbers test the pipeline, not a clinical "
                              "claim")
            n_test = r.get("n_patients") or 0
            if n_test and n_test < 100:
                limits.append(f"only {n_test} test patients: wide confidence intervals")
            limits.extend(chance_limits(tr, r))
            ece = eces.get(task, {}).get(r["model"])
            if ece is not None and math.isfinite(ece) and ece > 0.1:
                limits.append(f"poorly calibrated (ECE {ece:.2f}): scores are rankings, not probabilities")
            limits.append("single site/dataset: performance on other scanners and populations is unknown")
            notes = list(dict.fromkeys(plain_note(n) for n in r.get("notes") or []))
            limits_text = "; ".join(limits) + "." + (" " + " ".join(notes) if notes else "")
            rows = [["intended use", f"{INTENDED_USE} Task: {task} ({r.get('kind', '')}: {', '.join(tr.classes)})."],
                    ["data", data or "n/a"],
                    ["evaluated on", evaluated_on(tr, r)],
                    ["training",
                     f"{format_count(r.get('params'))} parameters ({format_count(r.get('trainable_params'))} "
                                 f"trainable), trained {format_seconds(r.get('train_seconds'))}"],
                    ["test metric (patient level)", metric],
                    ["limits", limits_text[:1].upper() + limits_text[1:]]]
            caption = f"Model card: {task} / {r['model']}"
            cards.append(f'<div class="card">{html_table(["", ""], rows, caption)}</div>')
    return Section("Model cards", "".join(cards), anchor="model-cards") if cards else None


def task_comparisons(results: dict[str, TaskResults]) -> dict[str, list[dict[str, Any]]]:
    """Paired DeLong tests per task over its models' common test patients."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task, tr in results.items():
        if len(tr.tables) >= 2:
            try:
                out[task] = paired_auroc_comparisons(tr.tables, tr.classes)
            except ValueError:  # models evaluated on different truths: not comparable
                out[task] = []
    return out
