"""The HTML report: values present, escaped, parseable, no external references."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from medvit.evaluation.html import format_metric, format_seconds, metric_label
from medvit.evaluation.report import ReportError, load_metrics
from medvit.tasks.report import report_stage


def _metrics(task: str, model: str, auroc: float, extra: dict | None = None) -> dict:
    return {
        "study": "unit", "task": task, "model": model, "level": "patient", "n_patients": 42, "n_samples": 126,
        "kind": "binary", "classes": ["tumor"],
        "threshold": {"method": "youden", "selected_on": "val", "patient": {"tumor": 0.4}},
        "aggregate": {"method": "max", "requested": "max", "top_k": None},
        "metrics": {"auroc": {"value": auroc, "ci95": [auroc - 0.111, auroc + 0.05], "n_boot": 1000},
                    "sensitivity": {"value": None, "ci95": [None, None], "n_boot": 0}, **(extra or {})},
        "sample_level": {"n_samples": 126, "metrics": {"auroc": {"value": 0.7, "ci95": [0.6, 0.8], "n_boot": 1000}}},
        "bootstrap": {"n": 1000, "ci": 0.95, "seed": 0},
        "params": 11_177_538, "trainable_params": 5_000, "train_seconds": 185.2,
        "notes": ["test holds a single class for 'tumor': <b>auroc</b> is undefined"],
    }


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


@pytest.fixture
def report(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: unit\ntasks:\n  brain: {}\n  xray: {}\n")
    paths = []
    for i, (task, model, auroc) in enumerate([("brain", "resnet18", 0.812), ("brain", "deit<script>", 0.9),
                                               ("xray", "densenet121", 0.75)]):
        p = tmp_path / f"m{i}.json"
        p.write_text(json.dumps(_metrics(task, model, auroc, {"auroc_nodule": {"value": 0.5, "ci95": [0.4, 0.6]}}
                                         if task == "xray" else None)))
        paths.append(p)
    out = report_stage(study, paths, tmp_path / "report" / "index.html")
    return out.read_text()


def test_report_contains_table_values(report):
    parser = _Collector()
    parser.feed(report)
    parser.close()
    # patient + sample table per task (plus summary, data, provenance and model-card tables)
    assert report.count("<caption>Patient level (test)</caption>") == 2
    assert report.count("<caption>Sample level (test)</caption>") == 2
    assert "0.812 [0.701, 0.862]" in parser.cells
    assert "0.700 [0.600, 0.800]" in parser.cells
    assert "0.500 [0.400, 0.600]" in parser.cells  # per-finding column of the xray table
    assert "n/a" in parser.cells  # undefined sensitivity
    assert {"11,177,538", "5,000", "3 min 05 s", "42", "126"} <= set(parser.cells)
    assert "medvit report: unit" in report
    assert report.index("Task: xray") < report.index("Task: brain")  # pipeline order (config.TASKS)


def test_report_is_escaped_and_offline(report):
    assert "<script" not in report and "deit&lt;script&gt;" in report
    assert "<b>auroc</b>" not in report and "&lt;b&gt;auroc&lt;/b&gt;" in report
    parser = _Collector()
    parser.feed(report)
    assert not [r for r in parser.refs if r.startswith(("http://", "https://", "//"))]
    assert "http://" not in report and "https://" not in report
    assert report.startswith("<!DOCTYPE html>") and "<style>" in report


def test_formatting_helpers():
    assert format_metric({"value": 0.8124, "ci95": [0.7012, 0.9031]}) == "0.812 [0.701, 0.903]"
    assert format_metric({"value": 0.8, "ci90": [0.7, 0.9]}) == "0.800 [0.700, 0.900]"
    assert format_metric({"value": 0.8, "ci95": [None, None]}) == "0.800"
    assert format_metric(None) == "n/a"
    assert [metric_label(n) for n in ("auroc", "auroc_macro", "auroc_nodule", "balanced_accuracy", "custom")] == [
        "AUROC", "AUROC (macro)", "AUROC nodule", "balanced acc.", "custom"]
    assert format_seconds(42) == "42.0 s" and format_seconds(7384) == "2 h 03 min" and format_seconds(None) == "n/a"


def test_report_refuses_bad_metrics_files(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        load_metrics([tmp_path / "missing.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="not a readable JSON"):
        load_metrics([bad])
    bad.write_text(json.dumps({"task": "x"}))
    with pytest.raises(ReportError, match="missing model, metrics"):
        load_metrics([bad])


def test_task_figures_are_inlined(tmp_path):
    """A task's MAE reconstructions appear in its section as an inline PNG (no file links)."""
    import base64

    from medvit.evaluation.report import task_figures, task_section

    png = tmp_path / "results" / "s" / "xray" / "mae" / "reconstructions.png"
    png.parent.mkdir(parents=True)
    from PIL import Image

    Image.new("L", (4, 4)).save(png)
    study = {"study": "s", "results_dir": str(tmp_path / "results"),
             "tasks": {"xray": {"pretrain": {"mask_ratio": 0.9}}}}
    figures = task_figures(study)
    assert [p for _, p in figures["xray"]] == [png]
    record = {"task": "xray", "model": "m", "metrics": {}, "sample_level": {"metrics": {}}}
    body = task_section("xray", [record], figures["xray"]).body
    assert "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() in body
    assert "mask ratio 0.9" in body and "reconstructions.png" not in body
