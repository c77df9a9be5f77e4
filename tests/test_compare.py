"""The comparison stage: mean ± sd over seeds from each run's metrics.json, one FLOP counter
for every model, CPU latency, the figure, the report part and the DVPT row when present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import f1_score

from medvit.engine.compute import count_flops as model_flops
from medvit.errors import ConfigError
from medvit.evaluation.compare_report import compare_parts, format_mean_sd
from medvit.evaluation.evaluate import evaluate_predictions, write_json
from medvit.tasks.compare import (
    compare_stage,
    measure_compute,
    run_dir,
    run_metrics,
    summarize,
    training_seeds,
)


def _study(tmp_path: Path, models: list[str], seeds: int = 2, label_column: str = "label") -> tuple[Path, dict]:
    study = {"study": "cmp", "seed": 3, "results_dir": str(tmp_path / "results"), "evaluation": {"bootstrap": 20},
             "tasks": {"histo": {"image_size": 32, "patch_size": 8, "models": models, "label_column": label_column,
                                 "compare": {"seeds": seeds, "latency_batches": [1, 4], "latency_repeats": 2}}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    from medvit.config import load_study

    return path, load_study(path)


def _predictions(seed: int, classes: list[str], binary: bool) -> pd.DataFrame:
    """Val and test patches of 12 patients (4 patches each) with noisy but informative scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(12):
        split = "val" if p < 5 else "test"
        truth = p % len(classes) if not binary else p % 2
        for i in range(4):
            row = {"patient_id": f"P{p}", "sample_id": f"P{p}_{i}", "split": split}
            if binary:
                row.update({f"true_{classes[0]}": truth, f"score_{classes[0]}": float(
                    np.clip(0.5 + (truth - 0.5) * 0.6 + rng.normal(0, 0.3), 0, 1))})
            else:
                logits = rng.normal(0, 1, len(classes))
                logits[truth] += 1.5
                probs = np.exp(logits) / np.exp(logits).sum()
                for j, c in enumerate(classes):
                    row.update({f"true_{c}": int(j == truth), f"score_{c}": probs[j]})
            rows.append(row)
    return pd.DataFrame(rows)


def _fake_run(folder: Path, model: str, seed: int, classes: list[str], binary: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    df = _predictions(seed, classes, binary)
    df.to_csv(folder / "predictions.csv", index=False)
    result = evaluate_predictions(df, n_bootstrap=20, seed=0)
    record = {"study": "cmp", "task": "histo", "model": model, **result, "params": 1, "train_seconds": 1.5 + seed}
    write_json(folder / "metrics.json", record)
    card = {"model": model, "in_chans": 3, "image_size": 32, "spec": {"classes": classes}}
    if model.startswith("vit_"):
        card["patch_size"] = 8
    (folder / "model.json").write_text(json.dumps(card))
    return record


def _fill(study: dict, models: list[str], classes: list[str], binary: bool = True) -> dict:
    records = {}
    for m in models:
        for s in training_seeds(study, "histo"):
            records[(m, s)] = _fake_run(run_dir(study, "histo", m, s), m, s, classes, binary)
    return records


def test_seed_layout(tmp_path):
    _, study = _study(tmp_path, ["resnet10t"], seeds=3)
    assert training_seeds(study, "histo") == [3, 4, 5]
    base = Path(study["results_dir"]) / "cmp" / "histo" / "resnet10t"
    assert run_dir(study, "histo", "resnet10t", 3) == base
    assert run_dir(study, "histo", "resnet10t", 5) == base / "seed5"


def test_summarize_mean_and_sample_sd():
    s = summarize([0.8, 0.9, math.nan, 0.7])
    assert s["mean"] == pytest.approx(0.8) and s["sd"] == pytest.approx(0.1) and s["n"] == 3
    assert s["values"][2] is None
    one = summarize([0.5])
    assert one["sd"] is None and format_mean_sd(one) == "0.500"
    assert format_mean_sd({"mean": 0.8, "sd": 0.0123}) == "0.800 ± 0.012"
    assert format_mean_sd(summarize([])) == "n/a"


def test_binary_macro_f1_uses_the_validation_threshold(tmp_path):
    folder = tmp_path / "run"
    record = _fake_run(folder, "resnet10t", 0, ["malignant"])
    got = run_metrics(folder / "metrics.json")
    df = pd.read_csv(folder / "predictions.csv")
    test = df[df["split"] == "test"]
    thr = record["threshold"]["sample"]["malignant"]
    expected = f1_score(test["true_malignant"], test["score_malignant"] >= thr, average="macro")
    assert got["sample"]["f1_macro"] == pytest.approx(expected)
    assert got["sample"]["accuracy"] == pytest.approx(record["sample_level"]["metrics"]["accuracy"]["value"])
    assert got["patient"]["auroc"] == pytest.approx(record["metrics"]["auroc"]["value"])
    assert 0 <= got["patient"]["f1_macro"] <= 1


def test_compare_stage_reports_mean_sd_and_compute(tmp_path):
    models = ["dct_histo_tiny", "vit_tiny"]
    path, study = _study(tmp_path, models, seeds=2, label_column="subtype")
    classes = ["adenosis", "ductal_carcinoma", "fibroadenoma", "lobular_carcinoma"]
    records = _fill(study, models, classes, binary=False)
    out = Path(study["results_dir"]) / "cmp" / "histo"
    compare_stage(path, "histo", out)
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["seeds"] == [3, 4] and comp["kind"] == "multiclass"
    by_model = {e["model"]: e for e in comp["models"]}
    assert set(by_model) == set(models)
    for m in models:
        values = [records[(m, s)]["metrics"]["f1_macro"]["value"] for s in (3, 4)]
        summary = by_model[m]["patient"]["f1_macro"]
        assert summary["values"] == pytest.approx(values)
        assert summary["mean"] == pytest.approx(np.mean(values))
        assert summary["sd"] == pytest.approx(np.std(values, ddof=1))
        auroc = [records[(m, s)]["sample_level"]["metrics"]["auroc_macro"]["value"] for s in (3, 4)]
        assert by_model[m]["sample"]["auroc"]["mean"] == pytest.approx(np.mean(auroc))
        c = by_model[m]["compute"]
        assert c["params"] > 0 and c["flops"] > 0 and c["input"] == [1, 3, 32, 32]
        assert set(c["latency"]) == {"1", "4"} and c["latency"]["4"]["throughput"] > 0
    # one counter for all, at the same input size: the DCT model is the cheaper one
    assert by_model["dct_histo_tiny"]["compute"]["flops"] < by_model["vit_tiny"]["compute"]["flops"]
    assert by_model["vit_tiny"]["patch_size"] == 8
    assert any("DVPT" in n for n in comp["notes"])
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    html = "".join(compare_parts(study)["histo"])
    assert "±" in html and "dct_histo_tiny" in html and "MFLOPs (32x32)" in html and "data:image/png;base64" in html


def test_compare_stage_names_a_missing_run(tmp_path):
    path, study = _study(tmp_path, ["resnet10t", "dct_histo_tiny"], seeds=2)
    _fill(study, ["resnet10t"], ["malignant"])
    with pytest.raises(ConfigError, match=r"dct_histo_tiny.*seed 3|metrics.json not found"):
        compare_stage(path, "histo", tmp_path / "out")


def test_dvpt_run_joins_the_table_when_present(tmp_path):
    path, study = _study(tmp_path, ["resnet10t", "dct_histo_tiny"], seeds=1)
    _fill(study, ["resnet10t", "dct_histo_tiny"], ["malignant"])
    adapt = Path(study["results_dir"]) / "cmp" / "histo" / "adapt"
    for fraction, name in ((0.5, "dvpt_p50"), (1.0, "dvpt_p100")):
        record = _fake_run(adapt / name, "adapt/" + name, 0, ["malignant"])
        write_json(adapt / name / "metrics.json", {**record, "fraction": fraction, "trainable_params": 1234,
                                                   "params": 5_000_000})
    out = Path(study["results_dir"]) / "cmp" / "histo"
    compare_stage(path, "histo", out)
    comp = json.loads((out / "comparison.json").read_text())
    dvpt = [e for e in comp["models"] if e["model"] == "dvpt"]
    assert len(dvpt) == 1 and dvpt[0]["fraction"] == 1.0 and "dvpt_p100" in dvpt[0]["source"]
    # no adapter file here: compute falls back to the recorded parameter counts, with a note
    assert dvpt[0]["compute"]["trainable_params"] == 1234 and dvpt[0]["compute"]["flops"] is None
    assert any("DVPT compute not measured" in n for n in comp["notes"])
    assert any("no standard deviation" in n for n in comp["notes"])


def test_model_flops_counts_attention_on_the_cpu():
    class Attention(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 3, 10, 16)  # (B, heads, N, head_dim)
    # Q K^T and (softmax) V: 2 * 2 * B * heads * N^2 * head_dim
    assert model_flops(Attention(), q) == 2 * 2 * 2 * 3 * 10 * 10 * 16


def test_measure_compute_restores_threads():
    before = torch.get_num_threads()
    out = measure_compute(torch.nn.Conv2d(3, 4, 3), (3, 8, 8), batches=(1, 2), repeats=1, threads=1)
    assert torch.get_num_threads() == before
    assert out["flops"] == 2 * 6 * 6 * 3 * 4 * 9 and out["cpu_threads"] == 1
    assert out["latency"]["2"]["batch"] == 2
