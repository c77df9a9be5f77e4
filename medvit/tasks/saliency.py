"""The report's saliency part: Grad-CAM maps (:mod:`medvit.evaluation.saliency`) of every
packaged classifier of a task on the same test patients. Here, not in the evaluation package,
because it rebuilds the models from their packages (:mod:`medvit.tasks.package`) and turns
their logits into the task's probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvit.data.transforms import load_transforms
from medvit.evaluation.html import esc, figure_html
from medvit.evaluation.saliency import N_PATIENTS, choose_patients, gradcam_maps, saliency_figure
from medvit.tasks.classification import probabilities
from medvit.tasks.common import TaskSpec
from medvit.tasks.package import PackageError, build_classifier, read_package


def task_saliency(tr: Any, seed: int, n: int = N_PATIENTS) -> dict[str, Any] | None:
    """Grad-CAM maps of every packaged classifier of a task on the same test samples.

    Returns:
        ``images`` (N, C, H, W) of the first model's input size, ``samples`` (the chosen
        rows), ``models`` (model -> {``maps``, ``scores``, ``layer``}); None when the task has
        no split.csv or no packaged classifier.
    """
    if tr.split_csv is None or not Path(tr.split_csv).is_file():
        return None
    split = pd.read_csv(tr.split_csv, dtype=str, keep_default_na=False)
    truth = None
    if tr.tables and tr.kind != "multiclass" and tr.classes:
        first = next(iter(tr.tables.values()))
        truth = dict(zip(first["patient_id"].astype(str), first[f"true_{tr.classes[0]}"].astype(int)))
    samples = choose_patients(split, truth, n, seed)
    if samples.empty:
        return None
    torch.manual_seed(seed)
    out: dict[str, Any] = {"samples": samples, "models": {}, "images": None}
    for model_name, folder in tr.dirs.items():
        try:
            block, _ = read_package(folder)
        except PackageError:
            continue  # not a packaged model (adapters, older folders)
        if block.get("kind") != "classification":
            continue  # segmentation shows its contours, detection its boxes
        size = [int(s) for s in block["image_size"]]
        load = load_transforms(Path(tr.split_csv).parent, size)
        channels = list(block["channels"])
        images = np.stack([np.asarray(load({"row": {c: r[c] for c in channels}})["image"])
                           for r in samples.to_dict("records")])
        model = build_classifier(block, folder / "model.safetensors")
        maps, logits, layer = gradcam_maps(model, images)
        spec = TaskSpec(block["task"]["kind"], list(block["task"]["classes"]), "label",
                        list(block["task"].get("all_classes") or block["task"]["classes"]))
        probs = probabilities(spec, torch.as_tensor(logits)).numpy()
        out["models"][model_name] = {"maps": maps, "scores": probs, "layer": layer, "images": images,
                                     "classes": list(block["task"]["classes"])}
        if out["images"] is None:
            out["images"] = images
    return out if out["models"] else None


def saliency_html(tr: Any, figures_dir: Path, seed: int) -> str:
    """The task's Grad-CAM figure with its caption ("" when there is nothing to show)."""
    try:
        result = task_saliency(tr, seed)
    except Exception as exc:  # noqa: BLE001 - a figure must not stop the report; the reason is shown
        return f'<p class="notes">Saliency maps not drawn: {esc(type(exc).__name__)}: {esc(exc)}</p>'
    if result is None:
        return ""
    png = saliency_figure(result, figures_dir / f"{tr.task}_saliency.png")
    layers = ", ".join(f"{m}: {v['layer']}" for m, v in result["models"].items())
    target = (f"for the positive class ({tr.classes[0]}; titles give its probability)" if tr.kind == "binary" else
              "for the class or finding the model scores highest (named in each title with its probability)")
    return figure_html(f"Where each model looks (Grad-CAM, MONAI): the same {len(result['samples'])} test patients "
                       "(first image of each; chosen by a seeded hash of the patient id, positives and negatives "
                       f"alternating) for every model, {target}. Target layers: {layers}. "
                       "Maps are scaled to [0, 1] per image: they show where, not how strongly.", png)
