"""Evaluation speed: patient-level metrics with 1000 cluster-bootstrap resamples.

    python benchmarks/bench_evaluation.py          # prints a table, writes benchmarks/results/evaluation.json

Synthetic predictions (scores follow the truth) for binary, multiclass and 14-finding
multilabel tasks at a few study sizes; the figure of merit is seconds per evaluation.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medvit.evaluation.evaluate import evaluate_predictions
from medvit.provenance import hardware, now_iso

OUT = Path(__file__).resolve().parent / "results" / "evaluation.json"


def predictions(kind: str, n_patients: int, per_patient: int, n_classes: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    patient = np.repeat(np.arange(n_patients), per_patient)
    df = pd.DataFrame({"patient_id": [f"P{p:05d}" for p in patient], "sample_id": [f"S{i:07d}" for i in range(n)],
                       "split": np.where(patient < 0.3 * n_patients, "val", "test")})
    if kind == "multiclass":
        truth = np.eye(n_classes, dtype=int)[rng.integers(0, n_classes, n_patients)[patient]]
        logits = rng.normal(size=(n, n_classes)) + 1.5 * truth
        scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    else:
        truth = (rng.random((n_patients, n_classes)) < 0.3)[patient].astype(int)
        scores = 1 / (1 + np.exp(-(rng.normal(size=(n, n_classes)) + 1.5 * (2 * truth - 1))))
    for j in range(n_classes):
        df[f"true_c{j}"] = truth[:, j]
        df[f"score_c{j}"] = scores[:, j]
    return df


def main() -> None:
    cases = [("binary", 300, 5, 1), ("multiclass", 300, 5, 4), ("multilabel", 300, 5, 14), ("binary", 100, 100, 1),
             ("binary", 3000, 3, 1)]
    rows = []
    for kind, n_patients, per_patient, n_classes in cases:
        df = predictions(kind, n_patients, per_patient, n_classes)
        evaluate_predictions(df, n_bootstrap=50)  # warm-up
        t0 = time.perf_counter()
        evaluate_predictions(df, n_bootstrap=1000)
        seconds = time.perf_counter() - t0
        rows.append({"kind": kind, "patients": n_patients, "samples": len(df), "classes": n_classes,
                     "bootstrap": 1000, "seconds": round(seconds, 3)})
        print(f"{kind:10s} {n_patients:5d} patients {len(df):6d} samples {n_classes:2d} classes: {seconds:6.2f} s")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"created": now_iso(), "hardware": hardware(), "python": platform.python_version(),
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
