"""Report parts a journal reviewer asks for, per task: learning curves, failure cases,
decision support (Brier score, PPV/NPV at a stated prevalence, decision curves), subgroup
results; and, for the whole study, a reporting checklist (TRIPOD+AI, CLAIM) with a generated
methods paragraph, and every table exported as CSV and LaTeX.

Everything is computed from the run's files: each model's ``predictions.csv``,
``metrics.json``, ``model.json`` and ``history.csv`` (via
:class:`medvit.evaluation.report_sections.TaskResults`), and the task's ``split.json``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvit.config import manifest_origin
from medvit.evaluation import clinical as C
from medvit.evaluation.figures import _COLORS, learning_curves_figure, plt, read_history, save_figure
from medvit.evaluation.html import (
    esc,
    figure_html,
    format_count,
    format_metric,
    format_value,
    html_table,
    metric_label,
)
from medvit.evaluation.report import Section
from medvit.evaluation.report_sections import (
    TaskResults,
    chance_level,
    headline,
    includes_chance,
    under_count_baseline,
)
from medvit.fileio import atomic_write_text

FAILURES_PER_KIND = 5  # false positives and false negatives shown per model and class


def _boot(tr: TaskResults) -> dict[str, Any]:
    b = (tr.records[0].get("bootstrap") or {}) if tr.records else {}
    return {"n_boot": int(b.get("n") or 1000), "ci": float(b.get("ci") or 0.95), "seed": int(b.get("seed") or 0)}


def _ci_text(entry: dict[str, Any], digits: int = 3) -> str:
    return format_metric({"value": entry.get("value"), "ci": entry.get("ci")}, digits)


def _model_json(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------------ learning curves
def histories(tr: TaskResults) -> dict[str, tuple[list[dict[str, Any]], str, int | None]]:
    """model (or ``model fold<i>``) -> (history records, metric name, best epoch) from each
    run's ``history.csv`` (a cross-validated model has one per fold folder)."""
    runs: dict[str, tuple[list[dict[str, Any]], str, int | None]] = {}
    for model, folder in tr.dirs.items():
        files = [(model, folder / "history.csv")] if (folder / "history.csv").is_file() else \
            [(f"{model} {p.parent.name}", p) for p in sorted(folder.glob("*/history.csv"))]
        for title, path in files:
            read = read_history(path)
            if read is None:
                continue
            records, name = read
            best = _model_json(path.parent).get("best_epoch")
            if not isinstance(best, int):
                vals = [(r["val_metric"], r["epoch"]) for r in records if r.get("val_metric") is not None]
                best = int(max(vals)[1]) if vals else None
            runs[title] = (records, name, best)
    return runs


def curves_html(tr: TaskResults, figures_dir: Path) -> str:
    runs = histories(tr)
    png = learning_curves_figure(runs, figures_dir / f"{tr.task}_curves.png") if runs else None
    if png is None:
        return ""
    names = sorted({name for _, name, _ in runs.values()})
    return figure_html(f"Learning curves ({len(runs)} training runs): training and validation loss (left axis) and "
                       f"the validation metric ({', '.join(names)}, dashed, right axis) per epoch; the dotted line "
                       "marks the epoch whose weights were kept. A validation loss rising while the training loss "
                       "falls is over-fitting; both high and flat is under-fitting.", png)


# ------------------------------------------------------------------------ failure cases
def _lines(value: Any, limit: int = 4) -> str:
    lines = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    shown = ", ".join(str(int(v)) for v in lines[:limit])
    return shown + (f", ... ({len(lines)} samples)" if len(lines) > limit else "")


def failures_per_kind(tr: TaskResults) -> int:
    """Errors of each kind shown per model and class: fewer when a multi-label task has many findings."""
    return FAILURES_PER_KIND if tr.kind != "multilabel" else max(2, FAILURES_PER_KIND - len(tr.classes) // 2)


def failure_rows(tr: TaskResults, model: str) -> list[list[str]]:
    """Table rows of one model's most confident errors: patients (threshold chosen on
    validation patients) then images (threshold chosen on validation samples)."""
    record = next(r for r in tr.records if r["model"] == model)
    thr = record.get("threshold") or {}
    n = failures_per_kind(tr)
    rows: list[list[str]] = []
    patients = tr.tables.get(model)
    if patients is not None and not patients.empty:
        keep = [c for c in patients.columns if c.startswith(("true_", "score_"))] + ["lines", "n_samples"]
        for case in C.failure_cases(patients[[c for c in keep if c in patients.columns]], tr.classes, tr.kind,
                                    thr.get("patient"), n):
            rows.append([model, "patient", case["class"], case["error"], format_value(case["score"]),
                         format_value(case["threshold"]), format_count(case.get("n_samples")),
                         _lines(case.get("lines", []))])
    samples = tr.samples.get(model)
    if samples is not None and not samples.empty and samples["patient_id"].nunique() < len(samples):
        keep = [c for c in samples.columns if c.startswith(("true_", "score_"))] + ["line"]
        for case in C.failure_cases(samples[keep], tr.classes, tr.kind, thr.get("sample"), n):
            rows.append([model, "image", case["class"], case["error"], format_value(case["score"]),
                         format_value(case["threshold"]), "1", _lines(case.get("line"))])
    return rows


def failures_html(tr: TaskResults) -> str:
    rows = [row for model in tr.tables for row in failure_rows(tr, model)]
    if not rows:
        return ""
    how = ("the wrong predictions with the highest predicted probability" if tr.kind == "multiclass" else
           f"up to {failures_per_kind(tr)} false positives with the highest scores and {failures_per_kind(tr)} "
           "false negatives with the lowest per class, at the operating threshold")
    return html_table(["model", "level", "class", "error", "score", "threshold", "samples", "predictions.csv lines"],
                      rows, text_columns=(1, 2, 3, 7), caption=
                      f"Failure cases (test): {how}. Patients are named by their lines in the model's predictions.csv "
                      "(the report prints no patient id); image rows are single samples at the sample-level threshold.")


# ------------------------------------------------------------------------ decision support
def decision_html(tr: TaskResults, figures_dir: Path, prevalence: float | None) -> str:
    """Brier scores (every kind); for a binary task PPV/NPV at the stated prevalence and the
    decision curve."""
    if not tr.tables:
        return ""
    boot = _boot(tr)
    parts = []
    brier_rows = []
    for model, table in tr.tables.items():
        b = C.brier_score(table, tr.classes, tr.kind, **boot)
        brier_rows.append([model, format_count(b["n"]), _ci_text(b)])
    what = {"binary": "mean of (p - y)^2", "multilabel": "mean of (p - y)^2 over patients and findings",
            "multiclass": "sum over classes of (p_k - y_k)^2, mean over patients"}[tr.kind]
    parts.append(html_table(["model", "test patients", "Brier score [95% CI]"], brier_rows,
                            caption=f"Brier score of the patient-level probabilities ({what}; 0 is perfect, lower is "
                                    "better)"))
    if tr.kind != "binary":
        return "".join(parts)
    c = tr.classes[0]
    thresholds = tr.thresholds()
    pv_rows, curves = [], {}
    prev_text = ""
    for model, table in tr.tables.items():
        y = table[f"true_{c}"].to_numpy(int)
        s = table[f"score_{c}"].to_numpy(float)
        thr = thresholds.get(model, {}).get(c)
        if thr is not None and len(y):
            pv = C.predictive_values(y, s, thr, prevalence, **boot)
            source = "(stated in the study config)" if pv["prevalence_source"] == "stated" else "(the test prevalence)"
            prev_text = f"{pv['prevalence']:.3g} {source}"
            pv_rows.append([model, format_value(thr), format_value(pv["sensitivity"]), format_value(pv["specificity"]),
                            _ci_text(pv["ppv"]), _ci_text(pv["npv"])])
        if len(y) and 0 < y.sum() < len(y):
            curves[model] = C.decision_curve(y, s, prevalence=prevalence)
    if pv_rows:
        parts.append(html_table(["model", "threshold", "sensitivity", "specificity", "PPV [95% CI]", "NPV [95% CI]"],
                                pv_rows,
                                caption=f"Predictive values of {c} at the operating threshold for a prevalence "
                                                 f"of {prev_text} (Bayes' rule from sensitivity and specificity)"))
    if curves:
        png = decision_curve_figure(curves, c, figures_dir / f"{tr.task}_decision_curve.png")
        parts.append(figure_html(f"Decision curve (net benefit against threshold probability) of {c} at a prevalence "
                                 f"of {prev_text}: a model is useful where its curve lies above both 'treat all' and "
                                 "'treat none'", png))
    return "".join(parts)


def decision_curve_figure(curves: dict[str, dict[str, np.ndarray]], positive: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    first = next(iter(curves.values()))
    for k, (model, cur) in enumerate(curves.items()):
        ax.plot(cur["threshold"], cur["model"], color=_COLORS[k % len(_COLORS)], lw=1.6, label=model)
    ax.plot(first["threshold"], first["treat_all"], color="grey", lw=1, ls="--", label=f"treat all ({positive})")
    ax.plot(first["threshold"], first["treat_none"], color="black", lw=1, ls=":", label="treat none")
    top = max(float(np.nanmax(c["model"])) for c in curves.values())
    top = max(top, float(first["treat_all"][0]), 0.01)
    ax.set(xlim=(0, 1), ylim=(-0.05 * top - 0.01, 1.15 * top), xlabel="threshold probability", ylabel="net benefit",
           title="Decision curve (test patients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------ subgroups
def subgroup_values(tr: TaskResults, model: str, column: str) -> dict[str, str] | None:
    """patient id -> the patient's value of ``column`` (its first sample's, as text): read
    from the model's predictions.csv, or from the task's split.csv for predictions written
    before the study named the column; None when neither has it."""
    import pandas as pd

    for path in (tr.dirs.get(model, Path("-")) / "predictions.csv", tr.split_csv):
        if path is None or not Path(path).is_file():
            continue
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c in ("patient_id", column))
        except (OSError, ValueError):
            continue
        if column in df.columns:
            return df.groupby("patient_id", sort=False)[column].first().to_dict()
    return None


def subgroup_results(tr: TaskResults, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per model and subgroup column, :func:`medvit.evaluation.clinical.subgroup_metrics` of
    the model's headline metric on its patient-level test table."""
    out = []
    boot = _boot(tr)
    thresholds = tr.thresholds()
    for r in tr.records:
        h = headline(r)
        table = tr.tables.get(r["model"])
        if h is None or table is None or h[0] not in ("auroc", "auroc_macro", "balanced_accuracy", "accuracy"):
            continue
        for col in columns:
            values = subgroup_values(tr, r["model"], col)
            if values is not None:
                table = table.assign(**{col: table["patient_id"].astype(str).map(values).fillna("")})
                res = C.subgroup_metrics(table, col, tr.classes, tr.kind, h[0], thresholds.get(r["model"]),
                                         boot["n_boot"], boot["ci"], boot["seed"])
                out.append({"model": r["model"], **res})
    return out


def subgroups_html(tr: TaskResults, columns: Sequence[str]) -> str:
    if not columns or not tr.tables:
        return ""
    results = subgroup_results(tr, columns)
    missing = [c for c in columns if not any(r["column"] == c for r in results)]
    parts = []
    for col in columns:
        rows = []
        for res in (r for r in results if r["column"] == col):
            p = res["p_value"]
            test = (f"p={p:.3g} (range {res['difference']:.3f}, {res['n_permutations']} permutations)"
                    if p is not None else "not tested (fewer than two subgroups with a value)")
            for g in res["groups"]:
                sens = g.get("sensitivity")
                rows.append([res["model"], g["value"], format_count(g["n"]),
                             "" if g.get("n_positive") is None else format_count(g["n_positive"]),
                             _ci_text(g["metric"]), "" if sens is None else format_value(sens),
                             "" if g.get("specificity") is None else format_value(g["specificity"]), test])
        if rows:
            label = metric_label(results[0]["metric"]) if results else "metric"
            parts.append(html_table(["model", col, "patients", "positive", f"{label} [95% CI]", "sensitivity",
                                     "specificity", "difference between subgroups"], rows, text_columns=(1, 7),
                                    caption=f"Subgroups by {col} (test patients): headline metric per subgroup with "
                                            "its bootstrap CI; permutation test of the spread between subgroups"))
    if missing:
        parts.append(f'<p class="notes">Subgroup column(s) {esc(", ".join(missing))}: not in this task\'s '
                     "predictions or split manifest.</p>")
    return "".join(parts)


# ------------------------------------------------------------------------ chance
def chance_html(tr: TaskResults) -> str:
    """The models whose headline metric is not shown better than chance."""
    items = []
    for r in tr.records:
        h = headline(r)
        if h and (chance := includes_chance(h[0], h[1], r)) is not None:
            items.append(f"<li>{esc(r['model'])}: {esc(metric_label(h[0]))} {esc(format_metric(h[1]))} includes "
                         f"chance ({chance:g}): not shown to be better than chance.</li>")
    html = ('<div class="warn"><b>No better than chance.</b><ul>' + "".join(items) + "</ul></div>") if items else ""
    counted = [(r["model"], found) for r in tr.records if (found := under_count_baseline(r))]
    if counted:
        metric, _, count_score = counted[0][1]  # the task's test patients: the same count for every model
        html += ('<div class="warn"><b>Not shown better than counting images.</b> A patient\'s label is the union '
                 "over their images, so ranking test patients by their number of images alone scores "
                 + esc(f"{metric_label(metric)} {count_score:.3f}")
                 + "; these models' intervals do not clear it, and their patient-level figure may measure how "
                 "many images a patient has rather than what is in them (see the sample-level table):<ul>"
                 + "".join(f"<li>{esc(m)}: {esc(format_metric(found[1]))}</li>" for m, found in counted)
                 + "</ul></div>")
    return html


# ------------------------------------------------------------------------ reporting checklist
def _split_counts(tr: TaskResults) -> str:
    splits = tr.split.get("splits") or {}
    return ", ".join(f"{n} {s.get('patients', 0)} patients / {s.get('samples', 0)} samples" for n, s in splits.items())


def methods_paragraph(study: dict[str, Any], results: dict[str, TaskResults]) -> str:
    """A methods paragraph whose every number is read from the run (config, split summaries,
    metrics files, model cards)."""
    ev = study.get("evaluation") or {}
    out = []
    for task, tr in results.items():
        if not tr.records:
            continue
        try:
            origin = manifest_origin(study, task)
        except Exception:  # noqa: BLE001 - a task missing from the config
            origin = "unknown"
        r0 = tr.records[0]
        thr = r0.get("threshold") or {}
        boot = r0.get("bootstrap") or {}
        q = len(tr.split.get("quarantined") or [])
        metas = {m: _model_json(d) for m, d in tr.dirs.items()}
        epochs = sorted({str((m.get("train") or {}).get("epochs")) for m in metas.values() if m.get("train")})
        models = ", ".join(f"{r['model']} ({format_count(r.get('params'))} parameters)" for r in tr.records)
        text = (f"Task {task} ({r0.get('kind')}: {', '.join(tr.classes)}). Data: {origin} manifest; "
                f"{q} input(s) were quarantined before splitting. Patients were split by patient "
                f"({_split_counts(tr) or 'split summary missing'}); a leakage check confirmed that no patient is in "
                f"two splits. Models: {models}"
                + (f", each trained for {', '.join(epochs)} epoch(s)" if epochs else "")
                + ", keeping the epoch with the best validation metric. "
                f"Sample scores were aggregated per patient by {(r0.get('aggregate') or {}).get('method')}; "
                + (f"the decision threshold was chosen on the validation patients by {thr.get('method')} and applied "
                   "to the test patients. " if r0.get("kind") != "multiclass"
                   else "the predicted class is the argmax. ")
                + f"Metrics are reported on {format_count(r0.get('n_patients'))} test patients "
                f"({format_count(r0.get('n_samples'))} samples) with {boot.get('ci', ev.get('ci'))} percentile "
                f"bootstrap confidence intervals over patients ({boot.get('n')} resamples, seed {boot.get('seed')}); "
                "models were compared on the same patients with DeLong's test (binary) or a paired bootstrap "
                "(macro AUROC), Holm-adjusted.")
        results_text = []
        for r in tr.records:
            h = headline(r)
            if h:
                results_text.append(f"{r['model']} {metric_label(h[0])} {format_metric(h[1])}")
        if results_text:
            text += " Results (patient level, test): " + "; ".join(results_text) + "."
        out.append(text)
    return "".join(f"<p>{esc(t)}</p>" for t in out)


_AUTHORS = "authors must write this"


def checklist_rows(study: dict[str, Any], results: dict[str, TaskResults],
                   subgroups: Sequence[str]) -> list[list[str]]:
    """TRIPOD+AI / CLAIM items with what this run can fill, or that the authors must write."""
    def per_task(fn) -> str:
        return "; ".join(f"{t}: {fn(t, tr)}" for t, tr in results.items()) or "n/a"

    def origin(t: str, tr: TaskResults) -> str:
        try:
            o = manifest_origin(study, t)
        except Exception:  # noqa: BLE001
            o = "unknown"
        sha = next(((r.get("provenance") or {}).get("manifest_sha256") for r in tr.records
                    if (r.get("provenance") or {}).get("manifest_sha256")), None)
        return f"{o} manifest" + (f" (sha256 {sha[:12]})" if sha else "")

    def eligibility(t: str, tr: TaskResults) -> str:
        q = tr.split.get("quarantined") or []
        reasons = sorted({re.sub(r"\S*[/\\]\S*", "<file>", str(x.get("reason", ""))).split(":")[0] for x in q})
        return f"{len(q)} input(s) quarantined" + (f" ({'; '.join(reasons[:3])})" if reasons else "")

    def split(t: str, tr: TaskResults) -> str:
        return (_split_counts(tr) or "n/a") + "; split by patient, leakage check in the Data section"

    def model(t: str, tr: TaskResults) -> str:
        return ", ".join(f"{r['model']} ({format_count(r.get('params'))} params)" for r in tr.records)

    def training(t: str, tr: TaskResults) -> str:
        metas = [_model_json(d) for d in tr.dirs.values()]
        parts = []
        for m in metas:
            tcfg = m.get("train") or {}
            if tcfg:
                parts.append(f"{m.get('model')}: {tcfg.get('epochs')} epochs, lr {tcfg.get('lr')}, batch "
                             f"{tcfg.get('batch_size')}, best epoch {m.get('best_epoch')}")
        return "; ".join(parts) or "see model cards"

    def metrics(t: str, tr: TaskResults) -> str:
        return "; ".join(f"{r['model']} {metric_label(h[0])} {format_metric(h[1])}" for r in tr.records
                         if (h := headline(r)))

    seed = study.get("seed")
    rows = [
        ["Title, abstract, background, objectives", "Title/abstract; Introduction", _AUTHORS],
        ["Data source", "Methods: data", per_task(origin)],
        ["Dates of data collection, setting, centres", "Methods: data", _AUTHORS + " (not in the manifest)"],
        ["Eligibility criteria", "Methods: participants / data",
         "inputs the pipeline could not read or validate are quarantined with reasons: " + per_task(eligibility)],
        ["Outcome / reference standard", "Methods: outcome / ground truth",
         "labels as given in the manifest; how they were established: " + _AUTHORS],
        ["Sample size, data partitions", "Methods: sample size / data partitions", per_task(split)],
        ["Model", "Methods: model", per_task(model)],
        ["Training (initialisation, hyperparameters, selection)", "Methods: training", per_task(training)
         + f"; seed {seed}; learning curves per task"],
        ["Performance metrics with uncertainty", "Methods: evaluation; Results: performance",
         per_task(metrics) + " (patient level, 95% bootstrap CI over patients)"],
        ["Statistical comparison of models", "Methods: statistical analysis",
         "DeLong's test / paired bootstrap, Holm-adjusted (task sections)"],
        ["Calibration", "Results: performance", "reliability diagrams, ECE and Brier scores (task sections)"],
        ["Subgroups / fairness", "Methods: fairness; Results",
         (f"by {', '.join(subgroups)} (task sections)" if subgroups else
          "none configured (evaluation.subgroups); " + _AUTHORS)],
        ["Failure analysis", "Results / Discussion", "most confident false positives and negatives (task sections)"],
        ["External validation", "Methods: evaluation",
         "external test reported in the task section where configured; otherwise " + _AUTHORS],
        ["Limitations", "Discussion: limitations", "model cards list the limits the pipeline knows (test size, "
                                                   "calibration, chance-level results, single site); " + _AUTHORS],
        ["Code, data availability, provenance", "Open science", "git commit, config and manifest hashes, package "
                                                               "versions (Provenance)"],
        ["Ethics approval, funding, conflicts of interest", "Open science / other information", _AUTHORS],
    ]
    return rows


def reporting_section(study: dict[str, Any], results: dict[str, TaskResults], subgroups: Sequence[str]):
    if not results:
        return None
    table = html_table(["item", "section of the guidelines", "from this run"],
                       checklist_rows(study, results, subgroups), text_columns=(1, 2),
                       caption="Reporting checklist for TRIPOD+AI (2024) and CLAIM (2024): what the pipeline fills "
                               "from the run, and what the authors must write (match each row to the item numbers "
                               "of the checklist version you submit)")
    methods = methods_paragraph(study, results)
    body = table + ("<h3>Methods (generated from this run)</h3>" + methods if methods else "")
    return Section("Reporting checklist and methods", body, anchor="reporting")


# ------------------------------------------------------------------------ table exports
def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
             ">": r"\textgreater{}"}
    return "".join(table.get(ch, ch) for ch in text)


def latex_table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A booktabs ``table`` environment (every cell escaped)."""
    cols = "l" + "r" * (len(headers) - 1)
    lines = ["\\begin{table}[ht]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{_latex_escape(caption)}}}")
    lines += [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(_latex_escape(h) for h in headers) + " \\\\",
              "\\midrule"]
    lines += [" & ".join(_latex_escape(str(c)) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "table"


def export_tables(tables: Sequence[tuple[str, list[str], list[list[str]]]], folder: Path) -> list[Path]:
    """Write each ``(caption, headers, rows)`` (as :func:`medvit.evaluation.report.collect_tables`
    gathers them) as ``NN_<name>.csv`` and ``NN_<name>.tex``, numbered in page order; files
    of an earlier report in ``folder`` are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.csv")) + list(folder.glob("*.tex")):
        old.unlink()
    written = []
    for i, (caption, headers, rows) in enumerate(tables, 1):
        name = caption.split(":")[0].split("(")[0] if caption else " ".join(h for h in headers[:3] if h)
        stem = f"{i:02d}_{_slug(name)}"
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(headers)
        w.writerows(rows)
        written.append(atomic_write_text(folder / f"{stem}.csv", buf.getvalue()))
        written.append(atomic_write_text(folder / f"{stem}.tex", latex_table(caption, headers, rows)))
    return written


__all__ = ["chance_html", "chance_level", "curves_html", "decision_html", "export_tables",
           "failures_html", "reporting_section", "subgroups_html"]
