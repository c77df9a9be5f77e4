"""The steps every training and prediction stage shares: seeding, datasets over the split,
fitting with the engine, saving weights with their model card, loading them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.transforms import Compose
from torch import nn

from medvit.data.datasets import SampleDataset
from medvit.engine import TrainConfig, Trainer, load_weights, resolve_device, save_weights, seed_everything
from medvit.engine.compute import count_flops, measure_latency
from medvit.engine.distributed import is_main_process
from medvit.models import count_parameters
from medvit.tasks.common import StageContext, model_sidecar, read_sidecar, records
from medvit.tasks.preprocess import sample_loading


def seeded_train_config(ctx: StageContext) -> TrainConfig:
    """The task's training settings; seeds everything (call before building data and model)."""
    cfg = TrainConfig.from_study(ctx.study, ctx.tcfg["train"])
    seed_everything(cfg.seed, cfg.deterministic)
    return cfg


def split_dataset(ctx: StageContext, splits: str | list[str], spatial_size: Sequence[int],
                  augment: Compose | None = None, segmentation: bool = False, cache: bool = True) -> SampleDataset:
    """Samples of the given split(s). ``label`` is the class target, or with ``segmentation``
    the lesion mask (and ``target`` the patient-level class)."""
    load, in_memory = sample_loading(ctx, spatial_size, segmentation, cache)

    def to_sample(rec: dict[str, Any]) -> dict[str, Any]:
        sample = load(rec)
        sample["target" if segmentation else "label"] = torch.as_tensor(rec["target"])
        return sample

    return SampleDataset(records(ctx, ctx.rows(splits)), to_sample, augment=augment, seed=ctx.study["seed"],
                         cache=in_memory)


def fit_and_save(ctx: StageContext, model_name: str, split_path: str | Path, out_dir: str | Path,
                 cfg: TrainConfig, model: nn.Module, train_ds: SampleDataset, val_ds: SampleDataset,
                 loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor],
                 val_metric_fn: Callable[[Any, Any], float], trainer_cls: type[Trainer] = Trainer,
                 trainer_kwargs: dict[str, Any] | None = None, resume: bool = True, **card: Any) -> Path:
    """Train (resuming from ``out_dir/checkpoints`` when present and ``resume``), keep the best
    epoch on validation, write ``model.safetensors`` + ``model.json`` (``card`` adds fields to
    it). ``trainer_cls``/``trainer_kwargs`` select a Trainer subclass and its extra arguments
    (e.g. optimizer ``param_groups``)."""
    trainer = trainer_cls(model, train_ds, val_ds, cfg, out_dir, loss_fn=loss_fn, val_metric_fn=val_metric_fn,
                          **(trainer_kwargs or {}))
    result = trainer.fit(resume=resume)
    out_path = Path(out_dir) / "model.safetensors"
    if not is_main_process():  # under torchrun every rank holds the same weights: rank 0 writes them
        return out_path
    params, trainable = count_parameters(model)
    meta = model_sidecar(ctx, model_name, split_path, params=params, trainable_params=trainable,
                         train_seconds=result.train_seconds, best_epoch=result.best_epoch,
                         best_val_metric=result.best_metric, train=ctx.tcfg["train"],
                         **inference_cost(model, (val_ds if len(val_ds) else train_ds)[0]["image"], cfg.device),
                         **card)
    return save_weights(out_path, model, meta)


def inference_cost(model: nn.Module, image: torch.Tensor, device: str = "auto") -> dict[str, Any]:
    """FLOPs and latency of one sample (batch 1) through ``model``, measured the same way for
    every model (:mod:`medvit.engine.compute`), for the report's metric-vs-cost charts.

    Args:
        model: the trained network (left on its device, restored to its mode).
        image: one sample without batch axis, (C, H, W) or (C, D, H, W).
        device: the study's device setting.

    Returns:
        ``flops`` (per sample), ``latency_ms`` (median of a few calls) and ``latency_device``.
    """
    dev = resolve_device(device)
    model = model.to(dev)
    example = image[None].to(dev)
    timing = measure_latency(model, example, warmup=2, repeats=5)
    return {"flops": count_flops(model, example), "latency_ms": timing["per_sample_ms"], "latency_device": dev.type}


def load_for_inference(ctx: StageContext, weights: str | Path,
                       build: Callable[[int], nn.Module]) -> tuple[nn.Module, torch.device]:
    """Rebuild the model with ``build(in_chans)`` from its model card, load the weights, move it
    to the study's device in eval mode."""
    device = resolve_device(ctx.study["device"])
    meta = read_sidecar(weights)
    model = build(int(meta["in_chans"]))
    load_weights(weights, model)
    return model.to(device).eval(), device
