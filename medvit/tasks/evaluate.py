"""The evaluate stage: one model's predictions.csv -> metrics.json
(:func:`medvit.evaluation.evaluate.write_metrics`), then, for a classifier or a segmentation
model trained here, its folder becomes a self-describing package (:mod:`medvit.tasks.package`:
model.json's inference block and MODEL_CARD.md) now that its threshold is chosen."""

from __future__ import annotations

import json
from pathlib import Path

from medvit.evaluation.evaluate import write_metrics
from medvit.tasks.package import is_classifier_folder, is_segmentation_folder, write_package


def evaluate_stage(config_path: str | Path, task: str, model: str, predictions_path: str | Path,
                   out_path: str | Path) -> Path:
    """Evaluate ``predictions_path`` -> ``out_path`` (metrics.json) and package the model
    folder beside it when it holds a model this pipeline trained.

    Returns:
        ``out_path``.
    """
    out = write_metrics(config_path, task, model, predictions_path, out_path)
    folder = Path(predictions_path).parent
    if is_classifier_folder(folder, task) or is_segmentation_folder(folder, task):
        write_package(folder, json.loads(out.read_text(encoding="utf-8")))
    return out
