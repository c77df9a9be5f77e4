"""Classification stage of the brain study: a CNN teacher, a DeiT student distilled from it
with DeiT's hard-label distillation, and the same student without the teacher.

DeiT hard distillation (Touvron et al., ICML 2021, eq. 3): the student has a class token
and a distillation token, each with a linear head. With ``y_t = argmax teacher(x)``::

    L = 1/2 * CE(cls_logits, y) + 1/2 * CE(dist_logits, y_t)

and at inference the two heads' logits are averaged (timm's ``VisionTransformerDistilled``
in eval mode). For a binary task the models have one logit ``z`` (sigmoid), so CE is the
binary cross-entropy and ``y_t = [z_teacher > 0]``, which is the same loss as the two-class
softmax CE over logits ``(0, z)``. The teacher sees the same augmented image as the student
(as in DeiT) and is frozen in eval mode.

The *plain student* is the same architecture trained with the same loss where the
distillation head's target is the true label (no teacher): the comparison isolates what
the teacher adds.

Roles and their folders under ``<task>/distill/``: ``teacher`` (trained by
:func:`medvit.tasks.classification.train`, the task's ``train`` recipe), ``student`` and
``student_distilled`` (``distill.train`` recipe), each with model.safetensors, model.json,
predictions.csv and metrics.json (:func:`medvit.tasks.evaluate.evaluate_stage`);
:func:`distill_compare_stage` writes ``comparison.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from medvit.config import block_defaults, load_study, task_config
from medvit.data.transforms import augment_transforms
from medvit.engine import TrainConfig, Trainer, load_weights, seed_everything
from medvit.engine.compute import count_flops, measure_latency
from medvit.errors import ConfigError
from medvit.evaluation.evaluate import read_predictions, write_json
from medvit.fileio import atomic_write_bytes
from medvit.models import count_parameters, create_model
from medvit.models.deit import is_deit
from medvit.tasks.classification import probabilities, standardize_input, validation_metric
from medvit.tasks.classification import train as train_cnn
from medvit.tasks.common import (
    StageContext,
    TaskSpec,
    load_context,
    read_sidecar,
    write_predictions,
)
from medvit.tasks.evaluate import evaluate_stage
from medvit.tasks.training import (
    fit_and_save,
    load_for_inference,
    split_dataset,
)

ROLES = ("teacher", "student", "student_distilled")

def distill_config(tcfg: dict[str, Any]) -> dict[str, Any]:
    """The task's ``distill`` block over the schema's defaults."""
    return {**block_defaults("distill"), **(tcfg.get("distill") or {})}


# ------------------------------------------------------------------------------- the loss
def teacher_labels(teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Hard teacher decisions: class index (multiclass, (B,) int64) or 0/1 ((B, 1) float, binary)."""
    if kind == "multiclass":
        return teacher_logits.argmax(1)
    return (teacher_logits > 0).to(teacher_logits.dtype)


def _ce(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "multiclass":
        return F.cross_entropy(logits.float(), target.long())
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def hard_distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor,
                           teacher_logits: torch.Tensor | None, kind: str = "multiclass") -> torch.Tensor:
    """DeiT's hard-label distillation loss (module docstring).

    Args:
        cls_logits: (B, K) class-token head logits.
        dist_logits: (B, K) distillation-token head logits.
        targets: (B,) class indices (multiclass) or (B, K) 0/1 floats (binary, K = 1).
        teacher_logits: (B, K) teacher logits, or None: the distillation head then learns the
            true labels (the plain student).
        kind: ``multiclass`` or ``binary``.

    Returns:
        the scalar loss ``0.5 * CE(cls, y) + 0.5 * CE(dist, y_teacher)``.
    """
    if kind not in ("multiclass", "binary"):
        raise ConfigError(f"hard distillation needs a binary or multiclass task, not {kind!r}")
    dist_target = targets if teacher_logits is None else teacher_labels(teacher_logits.detach(), kind)
    return 0.5 * _ce(cls_logits, targets, kind) + 0.5 * _ce(dist_logits, dist_target, kind)


class DistillTrainer(Trainer):
    """:class:`Trainer` for a DeiT student with a distillation token.

    In training mode :meth:`forward` returns ``(cls_logits, dist_logits, teacher_logits)``
    (teacher None for the plain student); in eval mode the student's averaged logits, so
    validation and model selection see exactly what inference sees.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, teacher_size: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.teacher_size = teacher_size
        self.model.set_distilled_training(True)

    def forward(self, batch: dict[str, Any]) -> Any:
        x = batch["image"]
        if not self.model.training:
            return self.model(x)
        cls_logits, dist_logits = self.model(x)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                xt = x if self.teacher_size in (None, x.shape[-1]) else F.interpolate(
                    x, size=(self.teacher_size, self.teacher_size), mode="bilinear", align_corners=False)
                teacher_logits = self.teacher(xt)
        return cls_logits, dist_logits, teacher_logits


# ------------------------------------------------------------------------------- models
def build_classifier(meta: dict[str, Any], spec: TaskSpec) -> nn.Module:
    """Rebuild a teacher (CNN) or student (DeiT) from its model card (random weights)."""
    name = meta["model"]
    kwargs: dict[str, Any] = {}
    if is_deit(name):
        kwargs = {"img_size": meta["image_size"], "patch_size": meta["patch_size"]}
    return create_model(name, in_chans=int(meta["in_chans"]), num_classes=spec.num_outputs, **kwargs)


def load_classifier(weights: str | Path, spec: TaskSpec, device: torch.device | str = "cpu") -> nn.Module:
    """A trained teacher or student from ``model.safetensors`` (+ its model.json), eval mode."""
    model = build_classifier(read_sidecar(weights), spec)
    load_weights(weights, model)
    return model.to(device).eval()


def _check_task(ctx: StageContext) -> None:
    if ctx.spec.kind not in ("binary", "multiclass"):
        raise ConfigError(f"tasks.{ctx.task}.distill needs a binary or multiclass task; {ctx.task} is {ctx.spec.kind}")


def train_student(ctx: StageContext, split_path: str | Path, out_dir: str | Path,
                  teacher_weights: str | Path | None = None) -> Path:
    """Train the DeiT student (with distillation when ``teacher_weights`` is given)."""
    _check_task(ctx)
    dcfg = distill_config(ctx.tcfg)
    size = int(ctx.tcfg["image_size"])
    if size % dcfg["patch_size"]:
        raise ConfigError(f"tasks.{ctx.task}.image_size ({size}) must be a multiple of "
                          f"tasks.{ctx.task}.distill.patch_size ({dcfg['patch_size']})")
    cfg = TrainConfig.from_study(ctx.study, dcfg["train"])
    seed_everything(cfg.seed, cfg.deterministic)
    augment = augment_transforms(2, flips=ctx.tcfg["augment"]["flips"])
    train_ds = split_dataset(ctx, "train", [size, size], augment=augment)
    val_ds = split_dataset(ctx, "val", [size, size])
    in_chans = int(train_ds[0]["image"].shape[0])
    model = create_model(dcfg["student"], in_chans=in_chans, num_classes=ctx.spec.num_outputs, img_size=size,
                         patch_size=dcfg["patch_size"], drop_path=dcfg["drop_path"])
    # the student standardises its input itself (training-split statistics); the teacher gets
    # the same unstandardised image it was trained on
    norm = standardize_input(model, train_ds)
    teacher, teacher_meta = None, {}
    if teacher_weights is not None:
        teacher_meta = read_sidecar(teacher_weights)
        teacher = load_classifier(teacher_weights, ctx.spec)
    kind = ctx.spec.kind

    def loss_fn(outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        cls_logits, dist_logits, teacher_logits = outputs
        return hard_distillation_loss(cls_logits, dist_logits, batch["label"], teacher_logits, kind)

    distilled = teacher is not None
    card = {"distillation": "hard" if distilled else "none (distillation head learns the true labels)",
            "teacher": teacher_meta.get("model"), "teacher_weights": str(teacher_weights) if distilled else None,
            "in_chans": in_chans, "image_size": size, "patch_size": dcfg["patch_size"], "drop_path": dcfg["drop_path"],
            **norm}
    return fit_and_save(ctx, dcfg["student"], split_path, out_dir, cfg, model, train_ds, val_ds, loss_fn,
                        validation_metric(ctx.spec), trainer_cls=DistillTrainer,
                        trainer_kwargs={"teacher": teacher, "teacher_size": teacher_meta.get("image_size")}, **card)


@torch.no_grad()
def predict_classifier(ctx: StageContext, weights: str | Path, out_path: str | Path) -> pd.DataFrame:
    """Score the val and test slices with a teacher or student -> predictions.csv."""
    meta = read_sidecar(weights)
    model, device = load_for_inference(ctx, weights, lambda c: build_classifier({**meta, "in_chans": c}, ctx.spec))
    size = int(meta.get("image_size", ctx.tcfg["image_size"]))
    dataset = split_dataset(ctx, ["val", "test"], [size, size], cache=False)
    loader = DataLoader(dataset, batch_size=ctx.tcfg["train"]["batch_size"], shuffle=False)
    scores = [probabilities(ctx.spec, model(b["image"].to(device))).cpu().numpy() for b in loader]
    return write_predictions(out_path, ctx.rows(["val", "test"]), ctx.spec, np.concatenate(scores))


def distill_stage(config_path: str | Path, task: str, role: str, split_path: str | Path, out_dir: str | Path,
                  teacher_weights: str | Path | None = None, reuse: str | Path | None = None) -> Path:
    """Train one role, predict val and test, evaluate -> ``out_dir/metrics.json``.

    Args:
        role: ``teacher``, ``student`` or ``student_distilled`` (needs ``teacher_weights``).
        reuse: for the teacher, the ``model.safetensors`` of the same model already trained by
            the task's train stage (same split, same ``train`` recipe, same code): it is
            copied with its model card instead of being trained a second time.
    """
    if role not in ROLES:
        raise ConfigError(f"distillation role {role!r} is not allowed; allowed: {', '.join(ROLES)}")
    if role == "student_distilled" and teacher_weights is None:
        raise ConfigError("the distilled student needs the teacher's weights (--teacher)")
    out_dir = Path(out_dir)
    ctx = load_context(config_path, task, split_path)
    _check_task(ctx)
    if role == "teacher" and reuse is not None:
        weights = _copy_weights(Path(reuse), out_dir, distill_config(ctx.tcfg)["teacher"])
    elif role == "teacher":
        weights = train_cnn(config_path, task, distill_config(ctx.tcfg)["teacher"], split_path, out_dir)
    else:
        weights = train_student(ctx, split_path, out_dir, teacher_weights if role == "student_distilled" else None)
    predict_classifier(ctx, weights, out_dir / "predictions.csv")
    return evaluate_stage(config_path, task, role, out_dir / "predictions.csv", out_dir / "metrics.json")


def _copy_weights(source: Path, out_dir: Path, model_name: str) -> Path:
    """Copy a trained model's weights and card into ``out_dir`` (checking it is ``model_name``)."""
    meta = read_sidecar(source)
    if meta.get("model") != model_name:
        raise ConfigError(f"{source} holds {meta.get('model')!r}, not the teacher {model_name!r}")
    atomic_write_bytes(out_dir / "model.safetensors", source.read_bytes())
    atomic_write_bytes(out_dir / "model.json", source.with_suffix(".json").read_bytes())
    return out_dir / "model.safetensors"


# ------------------------------------------------------------------------------- compare
COMPARED = ("auroc", "ap", "sensitivity", "specificity", "f1", "balanced_accuracy")


def role_decisions(predictions: pd.DataFrame, metrics: dict[str, Any], spec: TaskSpec) -> np.ndarray:
    """A role's decisions on its prediction rows, as it is deployed: the argmax class (one-hot)
    for a multiclass task, else ``score_<c> >= `` the slice threshold chosen on validation
    (``threshold.sample`` of its metrics.json; 0.5 where it has none). A fixed 0.5 would compare
    models whose probabilities sit on different scales.

    Returns:
        (rows, classes) boolean array in the order of ``spec.classes``.
    """
    scores = predictions[[f"score_{c}" for c in spec.classes]].to_numpy(float)
    if spec.kind == "multiclass":
        return scores == scores.max(1, keepdims=True)
    chosen = (metrics.get("threshold") or {}).get("sample") or {}
    return scores >= np.array([float(chosen.get(c, 0.5)) for c in spec.classes])


def distill_compare_stage(config_path: str | Path, task: str, distill_dir: str | Path,
                          out_path: str | Path) -> Path:
    """Teacher vs distilled student vs plain student -> comparison.json.

    Per role: model, parameters, FLOPs and CPU latency per slice (batch of one, median of
    ``distill.latency_repeats`` timed calls after warm-up; wall-clock, so noisy on a shared
    machine), training time, the patient-level (and sample-level AUROC) test metrics with
    their intervals from metrics.json, and the share of test slices on which the role's
    decision (:func:`role_decisions`) agrees with the teacher's.
    """
    study = load_study(config_path)
    tcfg = task_config(study, task)
    dcfg = distill_config(tcfg)
    distill_dir = Path(distill_dir)
    roles: dict[str, Any] = {}
    teacher_pred = None
    torch.set_grad_enabled(False)
    for role in ROLES:
        folder = distill_dir / role
        weights = folder / "model.safetensors"
        metrics = json.loads((folder / "metrics.json").read_text())
        preds = read_predictions(folder / "predictions.csv")
        spec = TaskSpec(**read_sidecar(weights)["spec"])
        model = load_classifier(weights, spec, "cpu")
        meta = read_sidecar(weights)
        example = torch.zeros(1, int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))
        latency = measure_latency(model, example, warmup=3, repeats=int(dcfg["latency_repeats"]))
        params, _ = count_parameters(model)
        test = preds[preds["split"] == "test"].reset_index(drop=True)
        decisions = role_decisions(test, metrics, spec)
        if role == "teacher":
            teacher_pred = decisions
        roles[role] = {
            "model": meta["model"], "params": params, "flops_per_slice": count_flops(model, example),
            "cpu_latency_ms_per_slice": latency["per_sample_ms"], "train_seconds": meta.get("train_seconds"),
            "distillation": meta.get("distillation", "teacher"),
            "patient_metrics": {k: metrics["metrics"][k] for k in COMPARED if k in metrics["metrics"]},
            "sample_auroc": metrics.get("sample_level", {}).get("metrics", {}).get("auroc"),
            "n_test_patients": metrics.get("n_patients"), "n_test_slices": metrics.get("n_samples"),
            "teacher_agreement": float((decisions == teacher_pred).all(1).mean()) if teacher_pred is not None
            and len(decisions) == len(teacher_pred) else None,
        }
    torch.set_grad_enabled(True)
    return write_json(out_path, {"study": study["study"], "task": task, "teacher": dcfg["teacher"],
                                 "student": dcfg["student"], "latency_device": "cpu", "roles": roles,
                                 "threads": torch.get_num_threads(),
                                 "note": "latency is wall-clock on a possibly shared machine; FLOPs are exact"})


__all__ = [
    "ROLES",
    "DistillTrainer",
    "build_classifier",
    "distill_compare_stage",
    "distill_config",
    "distill_stage",
    "hard_distillation_loss",
    "load_classifier",
    "predict_classifier",
    "role_decisions",
    "teacher_labels",
    "train_student",
]
