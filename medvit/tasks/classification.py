"""Image classification stages (chest X-ray findings, brain slices, histopathology patches):
binary, multi-class or multi-label, any registered 2D model.

ViTs (``vit_*`` models) get the Medical MAE fine-tuning recipe of the task's ``finetune``
block: initialisation from the task's MAE encoder (``vit_<size>_mae``, or ``init: mae``), from
scratch, or from a local checkpoint; layer-wise learning-rate decay; DropPath; optional
RandAugment (off by default, see :func:`medvit.data.transforms.classifier_augmentation`) on top
of the mild augmentation every classifier gets; optional mixup. ViTs standardise their input
inside the model (``input_norm``): with the training split's per-channel mean and std, or, when
initialised from an MAE encoder, with the statistics the encoder was pretrained on. The MAE
encoder is read from ``<split folder>/mae/encoder.safetensors``, where ``medvit pretrain``
writes it in the workflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medvit.config import block_defaults, is_vit, needs_mae
from medvit.data.transforms import classifier_augmentation
from medvit.engine import Trainer
from medvit.engine.pretrained import load_pretrained
from medvit.engine.speed import resolve_num_workers
from medvit.fileio import sha256_file
from medvit.models import create_model
from medvit.models.vit import layer_decay_param_groups
from medvit.tasks.common import StageContext, TaskSpec, load_context, read_sidecar, write_predictions
from medvit.tasks.pretrain import recipe_unchanged
from medvit.tasks.training import fit_and_save, load_for_inference, seeded_train_config, split_dataset


def loss_function(spec: TaskSpec) -> nn.Module:
    return nn.CrossEntropyLoss() if spec.kind == "multiclass" else nn.BCEWithLogitsLoss()


def probabilities(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) -> probabilities (B, K): softmax for multiclass, sigmoid otherwise."""
    return logits.float().softmax(1) if spec.kind == "multiclass" else logits.float().sigmoid()


def validation_metric(spec: TaskSpec):
    """Model selection metric on the validation split (higher is better): sample-level macro
    AUROC over the classes present, or balanced accuracy when no class has both values."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    def metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        probs = probabilities(spec, outputs).numpy()
        truth = np.eye(probs.shape[1])[targets.numpy().astype(int)] if spec.kind == "multiclass" else targets.numpy()
        aucs = [roc_auc_score(truth[:, j], probs[:, j]) for j in range(probs.shape[1])
                if 0 < truth[:, j].sum() < len(truth)]
        if aucs:
            return float(np.mean(aucs))
        return float(balanced_accuracy_score(truth.argmax(1), probs.argmax(1)))

    metric.metric_name = "val_auroc_macro"  # type: ignore[attr-defined]  # names it in the log and history.csv
    return metric


def train_augmentation(tcfg: dict[str, Any], randaug_magnitude: int = 0):
    """The training augmentation of a task's classifiers: flips as its ``augment.flips`` says
    (off by default for chest X-rays, where left and right are anatomy)."""
    return classifier_augmentation(flips=tcfg["augment"]["flips"], randaug_magnitude=randaug_magnitude)


def standardize_input(model: nn.Module, train_ds, loaded_with_weights: bool = False) -> dict[str, Any]:
    """Give ``model`` (a ViT or DeiT with ``input_norm``) the training split's per-channel mean
    and std, unless its initial weights brought the statistics they were pretrained with (an
    MAE encoder): the encoder then keeps seeing the input distribution it learned on.

    Returns:
        model-card fields: ``input_norm`` (mean, std) and ``input_norm_source``.
    """
    if not loaded_with_weights:
        stats = train_ds.channel_statistics()
        model.input_norm.set_statistics(stats["mean"], stats["std"])
    return {"input_norm": model.input_norm.statistics(),
            "input_norm_source": "initial weights" if loaded_with_weights else "training split"}


def _size(ctx: StageContext) -> list[int]:
    return [ctx.tcfg["image_size"]] * 2


def finetune_config(ctx: StageContext) -> dict[str, Any]:
    """The task's ViT fine-tuning recipe: its ``finetune`` block over the schema's defaults
    (a task without the block, e.g. histo, fine-tunes its ViTs with them)."""
    return {**block_defaults("finetune"), **(ctx.tcfg.get("finetune") or {})}


def vit_kwargs(ctx: StageContext, image_size: int | None = None) -> dict[str, Any]:
    """Builder arguments of the task's ViTs: image size and the MAE stage's patch size (else
    the task's own ``patch_size``, else 16)."""
    patch = (ctx.tcfg.get("pretrain") or {}).get("patch_size", ctx.tcfg.get("patch_size", 16))
    return {"img_size": image_size or ctx.tcfg["image_size"], "patch_size": patch}


def init_source(ctx: StageContext, model_name: str, split_path: str | Path) -> Path | None:
    """The weights a ViT starts from: the MAE encoder beside the split, a local checkpoint,
    or None (from scratch)."""
    if needs_mae(ctx.study, ctx.task, model_name):
        return Path(split_path).parent / "mae" / "encoder.safetensors"
    init = finetune_config(ctx)["init"]
    return None if init == "scratch" else Path(init)


class FinetuneTrainer(Trainer):
    """:class:`Trainer` with optional mixup (Zhang et al., ICLR 2018) of training batches:
    ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``, targets mixed the
    same way (class indices become one-hot probabilities first)."""

    def __init__(self, *args: Any, mixup: float = 0.0, num_classes: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mixup = float(mixup)
        self.num_classes = num_classes

    def mix(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A mixed copy of ``batch`` (unchanged when mixup is off)."""
        if self.mixup <= 0:
            return batch
        x, y = batch["image"], batch["label"]
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        if not y.is_floating_point():
            y = nn.functional.one_hot(y.long(), self.num_classes).float()
        return {**batch, "image": lam * x + (1 - lam) * x[perm], "label": lam * y + (1 - lam) * y[perm]}

    def train_step(self, batch: dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        return super().train_step(self.mix(batch), scale)


def _train_vit(ctx: StageContext, model_name: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """Fine-tune a ViT with the Medical MAE recipe (see the module docstring)."""
    cfg = seeded_train_config(ctx)
    ft = finetune_config(ctx)
    train_ds = split_dataset(ctx, "train", _size(ctx), augment=train_augmentation(ctx.tcfg, ft["randaug_magnitude"]))
    val_ds = split_dataset(ctx, "val", _size(ctx))
    in_chans = int(train_ds[0]["image"].shape[0])
    kwargs = vit_kwargs(ctx)
    model = create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs,
                         drop_path=ft["drop_path"], **kwargs)
    source = init_source(ctx, model_name, split_path)
    init: dict[str, Any] = {"init": "scratch"}
    from_mae = needs_mae(ctx.study, ctx.task, model_name)
    loaded_norm = False
    if source is not None:
        loaded_norm = load_pretrained(model, source, fresh_final_norm=from_mae)["input_norm"]
        init = {"init": "mae" if from_mae else "file", "init_weights": str(source),
                "init_sha256": sha256_file(source)}
    norm = standardize_input(model, train_ds, loaded_with_weights=loaded_norm)
    # Layer-wise decay keeps pretrained low-level features; a randomly initialised ViT has
    # none to keep, so from scratch every layer trains at the full rate.
    layer_decay = ft["layer_decay"] if source is not None else 1.0
    groups = layer_decay_param_groups(model, layer_decay, cfg.weight_decay)
    loss = loss_function(ctx.spec)

    def loss_fn(outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return loss(outputs, batch["label"])

    recipe = {"finetune": ft, **kwargs, **init}
    return fit_and_save(ctx, model_name, split_path, out_dir, cfg, model, train_ds, val_ds, loss_fn,
                        validation_metric(ctx.spec), trainer_cls=FinetuneTrainer,
                        trainer_kwargs={"param_groups": groups, "mixup": ft["mixup"],
                                        "num_classes": ctx.spec.num_outputs},
                        resume=recipe_unchanged(out_dir, recipe), finetune=ft, layer_decay_applied=layer_decay,
                        in_chans=in_chans, image_size=kwargs["img_size"], patch_size=kwargs["patch_size"], **init,
                        **norm)


def _build(ctx: StageContext, model_name: str, in_chans: int, meta: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a trained model for inference (ViTs at the image and patch size of their card)."""
    kwargs: dict[str, Any] = {}
    if is_vit(model_name):
        kwargs = vit_kwargs(ctx)
        kwargs.update({k2: meta[k1] for k1, k2 in (("image_size", "img_size"), ("patch_size", "patch_size"))
                       if meta and k1 in meta})
    return create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs, **kwargs)


def train(config_path: str | Path, task: str, model_name: str, split_path: str | Path, out_dir: str | Path,
          seed: int | None = None) -> Path:
    """Train ``model_name`` on the split's train rows, select on val; write model.safetensors + model.json.
    ``seed`` replaces the study seed for this run (initialisation, data order, augmentation)."""
    ctx = load_context(config_path, task, split_path)
    if seed is not None:
        ctx.study["seed"] = int(seed)
    if is_vit(model_name):
        return _train_vit(ctx, model_name, split_path, out_dir)
    cfg = seeded_train_config(ctx)
    train_ds = split_dataset(ctx, "train", _size(ctx), augment=train_augmentation(ctx.tcfg))
    val_ds = split_dataset(ctx, "val", _size(ctx))
    in_chans = int(train_ds[0]["image"].shape[0])
    model = create_model(model_name, in_chans=in_chans, num_classes=ctx.spec.num_outputs)
    loss = loss_function(ctx.spec)

    def loss_fn(outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return loss(outputs, batch["label"])

    return fit_and_save(ctx, model_name, split_path, out_dir, cfg, model, train_ds, val_ds, loss_fn,
                        validation_metric(ctx.spec), in_chans=in_chans, image_size=ctx.tcfg["image_size"])


@torch.no_grad()
def predict(config_path: str | Path, task: str, model_name: str, split_path: str | Path,
            weights: str | Path, out_path: str | Path) -> Path:
    """Score the val and test rows -> predictions.csv (Contract 3)."""
    ctx = load_context(config_path, task, split_path)
    meta = read_sidecar(weights)
    model, device = load_for_inference(ctx, weights, lambda in_chans: _build(ctx, model_name, in_chans, meta))
    dataset = split_dataset(ctx, ["val", "test"], _size(ctx), cache=False)
    loader = DataLoader(dataset, batch_size=ctx.tcfg["train"]["batch_size"], shuffle=False,
                        num_workers=resolve_num_workers(ctx.tcfg["train"]["num_workers"], device))
    scores = [probabilities(ctx.spec, model(batch["image"].to(device))).cpu().numpy() for batch in loader]
    write_predictions(out_path, ctx.rows(["val", "test"]), ctx.spec, np.concatenate(scores))
    return Path(out_path)
