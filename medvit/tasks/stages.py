"""The train and predict stages of every task: prostate is volumetric segmentation
(:mod:`medvit.tasks.segmentation`), the others image classification
(:mod:`medvit.tasks.classification`)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from medvit.errors import ConfigError
from medvit.models import model_spatial_dims
from medvit.tasks import classification, segmentation
from medvit.tasks.common import SEGMENTATION_TASKS


def _module(task: str) -> ModuleType:
    return segmentation if task in SEGMENTATION_TASKS else classification


def train_stage(config_path: str | Path, task: str, model: str, split_path: str | Path, out_dir: str | Path,
                seed: int | None = None) -> Path:
    """Train one model of a task -> ``<out_dir>/model.safetensors`` (+ model.json, checkpoints/, train.log).
    ``seed`` (classification tasks) replaces the study seed for this run."""
    expected = 3 if task in SEGMENTATION_TASKS else 2
    if model_spatial_dims(model) != expected:
        raise ConfigError(f"tasks.{task}.models: {model!r} is a {model_spatial_dims(model)}D model; "
                          f"task {task!r} needs a {expected}D one")
    if seed is None:
        return _module(task).train(config_path, task, model, split_path, out_dir)
    if task in SEGMENTATION_TASKS:
        raise ConfigError(f"a training seed other than the study's is supported for classification tasks, "
                          f"not {task!r}")
    return _module(task).train(config_path, task, model, split_path, out_dir, seed=seed)


def predict_stage(config_path: str | Path, task: str, model: str, split_path: str | Path,
                  weights: str | Path, out_path: str | Path) -> Path:
    """Predict the val and test rows of a split -> predictions.csv."""
    return _module(task).predict(config_path, task, model, split_path, weights, out_path)
