"""Model packages: a trained model's folder as everything inference needs.

A classifier's folder holds ``model.safetensors`` and ``model.json``. Training writes the
weights and the training record; evaluation (``medvit evaluate``, run by every study) adds
the ``inference`` block once the operating threshold is chosen on validation, and writes
``MODEL_CARD.md`` beside it. ``medvit infer`` and ``medvit export`` read only the folder: no
study config, split or manifest of the training data.

The ``inference`` block (format :data:`PACKAGE_FORMAT`)::

    {"format": "medvit-package/1", "kind": "classification",
     "architecture": {"name": "resnet18", "kwargs": {"in_chans": 1, "num_classes": 1}},
     "channels": ["image"],                      # manifest image column(s), stacked in this order
     "image_size": [28, 28],                     # (H, W) the image is resized to
     "preprocess": {"intensity": "percentile", "percentiles": [0.5, 99.5], "range": [0, 1],
                    "channel_wise": true, "resize": "area", "window": false},
     "input_norm": {"mean": [...], "std": [...]} | null,   # ViT/DeiT: applied inside the model
     "task": {"kind": "binary", "classes": ["pneumonia"], "all_classes": ["normal", "pneumonia"]},
     "aggregate": {"method": "max", "top_k": null},        # sample scores -> patient score
     "threshold": {"method": "youden", "selected_on": "val",
                   "patient": {"pneumonia": 0.74}, "sample": {"pneumonia": 0.74}}}

A package missing a field is refused with a message naming it (:func:`read_package`); no
field is ever filled in with a guess.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medvit.config import is_vit, load_study, task_config
from medvit.engine import load_weights
from medvit.errors import MedvitError
from medvit.fileio import atomic_write_json, atomic_write_text
from medvit.models import create_model
from medvit.models.deit import is_deit
from medvit.models.registry import list_models, model_spatial_dims
from medvit.tasks.common import SEGMENTATION_TASKS
from medvit.tasks.segmentation import FoldEnsemble

PACKAGE_FORMAT = "medvit-package/1"

# Every field inference reads, as "block.key" paths inside model.json's `inference` block.
REQUIRED_FIELDS = {
    "classification": ["format", "kind", "architecture.name", "architecture.kwargs", "channels", "image_size",
                       "preprocess", "input_norm", "task.kind", "task.classes", "aggregate.method",
                       "threshold.patient", "threshold.sample"],
    "segmentation": ["format", "kind", "architecture.name", "architecture.kwargs", "channels", "image_size",
                     "roi_size", "preprocess", "sliding_window.overlap", "sliding_window.sw_batch_size", "task.kind",
                     "task.classes", "mask_threshold", "aggregate.method", "threshold.patient", "threshold.sample",
                     "ensemble.members"],
    "detection": ["format", "kind", "detector", "names", "channels", "image_size", "window.percentiles",
                  "window.per", "conf", "nms.conf_floor", "nms.iou", "nms.max_det", "nms.agnostic", "task.kind",
                  "task.classes", "aggregate.method"],
}

# The deterministic preprocessing of every classifier (medvit.data.transforms.load_transforms).
CLASSIFIER_PREPROCESS = {"intensity": "percentile", "percentiles": [0.5, 99.5], "range": [0.0, 1.0],
                         "channel_wise": True, "resize": "area", "window": False}


class PackageError(MedvitError):
    """A model folder is not a usable package (missing file or field, unknown format)."""


def _image_columns(split_manifest: str | Path | None) -> list[str] | None:
    if not split_manifest or not Path(split_manifest).is_file():
        return None
    import pandas as pd

    columns = list(pd.read_csv(split_manifest, nrows=0).columns)
    if "image" in columns:
        return ["image"]
    chans = [c for c in columns if c.startswith("image_")]
    return chans or None


def architecture(meta: dict[str, Any]) -> dict[str, Any]:
    """The registry name and builder arguments of a trained classifier, from its model.json."""
    name = meta["model_name"] if "model_name" in meta else meta["model"]
    kwargs: dict[str, Any] = {"in_chans": int(meta["in_chans"]), "num_classes": len(meta["spec"]["classes"])}
    if is_vit(name) or is_deit(name):
        kwargs.update(img_size=int(meta["image_size"]), patch_size=int(meta["patch_size"]))
    return {"name": name, "kwargs": kwargs}


def classifier_package(meta: dict[str, Any], metrics: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The ``inference`` block of a classifier from its training record and its metrics.json.

    Args:
        meta: model.json as training wrote it (``spec``, ``in_chans``, ``image_size``, ...).
        metrics: the evaluation's metrics.json (``threshold``, ``aggregate``).
        model_name: the registry name of the architecture (a distillation role's folder
            records its role in metrics.json but the architecture in model.json).

    Raises:
        PackageError: a field the training record must provide is absent.
    """
    for key in ("spec", "in_chans", "image_size"):
        if key not in meta:
            raise PackageError(f"model.json has no {key!r}: it was not written by a classifier's training")
    arch = architecture({**meta, "model_name": model_name})
    size = int(meta["image_size"])
    spec = meta["spec"]
    thr = metrics.get("threshold") or {}
    return {
        "format": PACKAGE_FORMAT, "kind": "classification", "architecture": arch,
        "channels": _image_columns(meta.get("split_manifest")) or ["image"],
        "image_size": [size, size], "preprocess": dict(CLASSIFIER_PREPROCESS),
        "input_norm": meta.get("input_norm"),
        "task": {"kind": spec["kind"], "classes": list(spec["classes"]),
                 "all_classes": list(spec.get("all_classes") or spec["classes"])},
        "aggregate": {"method": metrics["aggregate"]["method"], "top_k": metrics["aggregate"].get("top_k")},
        "threshold": {"method": thr.get("method"), "selected_on": thr.get("selected_on"),
                      "rule": thr.get("rule"), "patient": thr.get("patient"), "sample": thr.get("sample")},
    }


SLIDING_WINDOW = {"overlap": 0.25, "sw_batch_size": 2, "mode": "constant"}
"""MONAI sliding-window inference as the prostate stages run it (medvit.tasks.segmentation)."""
MASK_THRESHOLD = 0.5
"""Lesion masks are ``probability > 0.5`` (medvit.tasks.segmentation.write_maps)."""


def is_segmentation_folder(model_dir: str | Path, task: str) -> bool:
    """Whether ``model_dir`` holds a pooled fold ensemble of a segmentation task (``medvit cv-pool``):
    weights and a model.json with the fold members, ROI and image size."""
    folder = Path(model_dir)
    card = folder / "model.json"
    if task not in SEGMENTATION_TASKS or not (folder / "model.safetensors").is_file() or not card.is_file():
        return False
    try:
        meta = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(k in meta for k in ("spec", "in_chans", "roi_size", "image_size",
                                                              "members"))


def _fold_members(folder: Path, n: int) -> list[dict[str, Any]]:
    """The fold models pooled into the ensemble: ``fold<i>/`` beside the package, with their
    weights' SHA-256 and best epoch from their model.json (null when the folder is absent)."""
    members = []
    for i in range(n):
        sub = folder / f"fold{i}"
        card: dict[str, Any] = {}
        try:
            card = json.loads((sub / "model.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        members.append({"fold": i, "folder": f"fold{i}", "weights_sha256": card.get("sha256"),
                        "best_epoch": card.get("best_epoch")})
    return members


def segmentation_package(meta: dict[str, Any], metrics: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """The ``inference`` block of a segmentation fold ensemble (``medvit cv-pool``'s folder).

    The weights hold the whole ensemble (the k fold models; their probabilities are averaged);
    ``ensemble.members`` lists the fold folders they came from.
    """
    for key in ("spec", "in_chans", "roi_size", "image_size", "members"):
        if key not in meta:
            raise PackageError(f"model.json has no {key!r}: it was not written by `medvit cv-pool`")
    spec = meta["spec"]
    size = int(meta["image_size"])
    thr = metrics.get("threshold") or {}
    n = int(meta["members"])
    return {
        "format": PACKAGE_FORMAT, "kind": "segmentation",
        "architecture": {"name": meta["model"], "kwargs": {"in_chans": int(meta["in_chans"]), "num_classes": 1,
                                                           **(meta.get("model_kwargs") or {})}},
        "channels": _image_columns(meta.get("split_manifest")) or ["image"],
        "image_size": [size, size, size], "roi_size": [int(r) for r in meta["roi_size"]],
        "preprocess": dict(CLASSIFIER_PREPROCESS), "sliding_window": dict(SLIDING_WINDOW),
        "input_norm": None,
        "task": {"kind": spec["kind"], "classes": list(spec["classes"]),
                 "all_classes": list(spec.get("all_classes") or spec["classes"])},
        "mask_threshold": MASK_THRESHOLD,
        "score": "the maximum of the volume's lesion probability map",
        "aggregate": {"method": metrics["aggregate"]["method"], "top_k": metrics["aggregate"].get("top_k")},
        "threshold": {"method": thr.get("method"), "selected_on": thr.get("selected_on"),
                      "rule": thr.get("rule"), "patient": thr.get("patient"), "sample": thr.get("sample")},
        "ensemble": {"combine": "mean probability of the fold models" if n > 1 else "single model",
                     "folds": meta.get("folds"), "members": _fold_members(Path(folder), n)},
    }


def detection_package(det: dict[str, Any], names: list[str], window: dict[str, Any], iou: float,
                      conf_floor: float, max_det: int) -> dict[str, Any]:
    """The ``inference`` block of the YOLO detector (written by ``medvit detect``).

    Args:
        det: the task's ``detection`` settings (``model``, ``image_size``, ``conf``).
        names: class names.
        window: ``{"percentiles": [lo, hi], "per": "study_id"|"patient_id"}``: how slices
            become 8-bit images (:mod:`medvit.data.yolo`).
        iou, conf_floor, max_det: the NMS settings of prediction.
    """
    return {
        "format": PACKAGE_FORMAT, "kind": "detection", "detector": det["model"], "names": list(names),
        "channels": ["image"], "image_size": int(det["image_size"]),
        "window": {"percentiles": [float(p) for p in window["percentiles"]], "per": window["per"],
                   "mapping": "u8 = round(255 * clip((x - lo) / (hi - lo), 0, 1)), one window per volume"},
        "conf": float(det["conf"]),
        "nms": {"conf_floor": float(conf_floor), "iou": float(iou), "max_det": int(max_det), "agnostic": False},
        "task": {"kind": "binary", "classes": list(names)},
        "score": "the highest box confidence of the slice",
        "aggregate": {"method": "max", "top_k": None},
    }


def _get(block: dict[str, Any], dotted: str) -> Any:
    value: Any = block
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def read_package(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check a model package.

    Returns:
        ``(inference, meta)``: the ``inference`` block and the whole model.json.

    Raises:
        PackageError: no model.json or weights, no ``inference`` block, an unknown format, or
            a required field missing (named, with how to complete the package).
    """
    folder = Path(model_dir)
    card = folder / "model.json"
    if not folder.is_dir():
        raise PackageError(f"model folder {folder} does not exist")
    if not card.is_file():
        raise PackageError(f"{folder} has no model.json: not a trained medvit model folder")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise PackageError(f"{folder} has no model.safetensors: not a trained medvit model folder")
    try:
        meta = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(f"{card} is unreadable: {exc}") from None
    block = meta.get("inference")
    if not isinstance(block, dict) and not (is_classifier_folder(folder, str(meta.get("task")))
                                             or is_segmentation_folder(folder, str(meta.get("task")))):
        if meta.get("detector"):
            raise PackageError(f"{card} is a detector's card without an 'inference' block: it was trained by an "
                               "older medvit; rerun the detection stage (`medvit detect`) to write the package")
        raise PackageError(f"{folder} holds a {meta.get('model')!r} model of task {meta.get('task')!r}, which is "
                           "not served as a package (classifiers, the prostate fold ensembles and the YOLO detector "
                           "are; adapters are not: docs/inference.md)")
    if not isinstance(block, dict):
        raise PackageError(f"{card} has no 'inference' block: the model was trained by an older medvit or not "
                           "evaluated yet. Complete the package from its study with `medvit package --config "
                           f"STUDY.yaml --task TASK --model-dir {folder}` (needs its metrics.json)")
    if block.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{card}: package format {block.get('format')!r} is not supported; this medvit reads "
                           f"{PACKAGE_FORMAT}")
    kind = block.get("kind")
    if kind not in REQUIRED_FIELDS:
        raise PackageError(f"{card}: package kind {kind!r} is not served; served: {', '.join(REQUIRED_FIELDS)}")
    missing = []
    for field in REQUIRED_FIELDS[kind]:
        try:
            value = _get(block, field)
        except KeyError:
            missing.append(field)
            continue
        if value is None and field != "input_norm":
            missing.append(field)
    if missing:
        raise PackageError(f"{card}: the package lacks {', '.join('inference.' + f for f in missing)}; inference "
                           "never guesses a field. Re-evaluate the model with this medvit (`medvit package`)")
    return block, meta


def build_classifier(block: dict[str, Any], weights: str | Path):
    """The package's network with its weights loaded, in eval mode on the CPU."""
    arch = block["architecture"]
    model = create_model(arch["name"], **arch["kwargs"])
    load_weights(weights, model)
    return model.eval()


def build_segmenter(block: dict[str, Any], weights: str | Path):
    """The package's segmentation network (the fold ensemble when it has several members) with
    its weights loaded, in eval mode on the CPU."""
    arch = block["architecture"]
    members = [create_model(arch["name"], **arch["kwargs"]) for _ in block["ensemble"]["members"]]
    model = FoldEnsemble(members)
    load_weights(weights, model)
    return model.eval()


# ------------------------------------------------------------------------------ writing
def _fmt_metric(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "n/a"
    value = entry["value"]
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    ci = entry.get("ci95") or [None, None]
    if ci[0] is None or ci[1] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def model_card(meta: dict[str, Any], metrics: dict[str, Any], block: dict[str, Any]) -> str:
    """MODEL_CARD.md: intended use, training data, patient-level test metrics with CIs,
    limits and provenance."""
    spec = block["task"]
    prov = meta.get("provenance") or {}
    code = prov.get("code") or {}
    if block["kind"] == "segmentation":
        use = (f"Research use: lesion segmentation of `{meta.get('task')}` volumes ({', '.join(block['channels'])}):"
               f" a {spec['classes'][0]} probability map and mask (probability > {block['mask_threshold']}) per "
               f"volume, a volume score (the map's maximum) aggregated per patient "
               f"({block['aggregate']['method']}); {block['ensemble']['combine']} of "
               f"{len(block['ensemble']['members'])} fold model(s).")
        size = "x".join(str(s) for s in block["image_size"])
    else:
        use = (f"Research use: {spec['kind']} classification of `{meta.get('task')}` images into "
               f"{', '.join(spec['all_classes'])} (scores for {', '.join(spec['classes'])}), scored per image and "
               f"aggregated per patient ({block['aggregate']['method']}).")
        size = f"{block['image_size'][0]}x{block['image_size'][1]}"
    lines = [f"# Model card: {meta.get('task')} / {block['architecture']['name']}", "",
             "## Intended use", "",
             use + " Not a medical device; not validated for clinical decisions.", "",
             "Apply it with `medvit infer --model THIS_FOLDER --input DIR_OR_MANIFEST --out OUT` (docs/inference.md).",
             "", "## Training data", ""]
    split = meta.get("split_manifest")
    digest = prov.get("manifest_sha256")
    lines.append(f"- split manifest: `{split}`" + (f" (SHA-256 {digest})" if digest else ""))
    if prov.get("config_path"):
        lines.append(f"- study config: `{prov['config_path']}` (SHA-256 {prov.get('config_sha256')})")
    support = metrics.get("support") or {}
    if support:
        lines.append(f"- test support: {json.dumps(support)}")
    lines += [f"- input: {len(block['channels'])} channel(s) {block['channels']}, resized to "
              f"{size}, intensities scaled per image by the "
              f"{block['preprocess']['percentiles'][0]}/{block['preprocess']['percentiles'][1]} percentiles",
              f"- best epoch {meta.get('best_epoch')}, validation metric {meta.get('best_val_metric')}", "",
              f"## Test metrics (patient level, {metrics.get('n_patients')} patients, 95% bootstrap CIs)", "",
              "| metric | value [95% CI] |", "|---|---|"]
    for name, entry in (metrics.get("metrics") or {}).items():
        lines.append(f"| {name} | {_fmt_metric(entry)} |")
    thr = block["threshold"]
    lines += ["", "## Operating point", "",
              f"Threshold method {thr.get('method')}, chosen on {thr.get('selected_on')}: patient "
              f"{thr.get('patient')}, sample {thr.get('sample')} ({thr.get('rule')}).", "",
              "## Limits", "",
              "- Trained and tested on one study's data; performance on other scanners, sites or populations is "
              "unknown until measured there.",
              "- The threshold was chosen on the validation split of the training study; recalibrate it on local "
              "data before relying on the calls.",
              f"- Images must match the training input ({len(block['channels'])} channel(s)); others are "
              "quarantined by `medvit infer`.", "",
              "## Provenance", "",
              f"- weights: `{meta.get('weights')}` SHA-256 {meta.get('sha256')}",
              f"- created {meta.get('created')}; code {json.dumps(code) if code else 'n/a'}", ""]
    for note in metrics.get("notes") or []:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def is_classifier_folder(model_dir: str | Path, task: str) -> bool:
    """Whether ``model_dir`` holds a 2D classifier trained by this pipeline (the folders whose
    evaluation completes a package): weights, and a model.json naming a registered 2D model."""
    folder = Path(model_dir)
    card = folder / "model.json"
    if task in SEGMENTATION_TASKS or not (folder / "model.safetensors").is_file() or not card.is_file():
        return False
    try:
        meta = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = meta.get("model")
    return (isinstance(meta, dict) and name in list_models() and model_spatial_dims(name) == 2
            and all(k in meta for k in ("spec", "in_chans", "image_size")))


def write_package(model_dir: str | Path, metrics: dict[str, Any], model_name: str | None = None) -> Path:
    """Add the ``inference`` block to ``model_dir/model.json`` and write ``MODEL_CARD.md``.

    Args:
        model_dir: a classifier's folder (model.safetensors + model.json), or a segmentation
            task's pooled fold ensemble (``medvit cv-pool``).
        metrics: its metrics.json (as a dict).
        model_name: the architecture's registry name (default: model.json's ``model``).

    Returns:
        the model.json path.
    """
    folder = Path(model_dir)
    card = folder / "model.json"
    meta = json.loads(card.read_text(encoding="utf-8"))
    if is_segmentation_folder(folder, str(meta.get("task"))):
        block = segmentation_package(meta, metrics, folder)
    else:
        block = classifier_package(meta, metrics, model_name or meta["model"])
    meta["inference"] = block
    atomic_write_json(card, meta)
    atomic_write_text(folder / "MODEL_CARD.md", model_card(meta, metrics, block))
    return card


def package_stage(config_path: str | Path, task: str, model_dir: str | Path) -> Path:
    """Complete the package of an already trained and evaluated classifier (``medvit package``):
    the same block evaluation writes, from model.json and the folder's metrics.json.

    Raises:
        PackageError: no metrics.json, or model.json is not a classifier's.
    """
    study = load_study(config_path)
    task_config(study, task)
    folder = Path(model_dir)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise PackageError(f"{folder} has no metrics.json: evaluate the model first (`medvit evaluate`)")
    return write_package(folder, json.loads(metrics_path.read_text(encoding="utf-8")))
