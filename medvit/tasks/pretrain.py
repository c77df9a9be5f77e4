"""MAE pretraining stage (Medical MAE, Xiao et al. 2023) for a task's ViT encoder.

``medvit pretrain --config C --task xray --split S --out DIR`` trains a
:class:`medvit.models.mae.MaskedAutoencoder` on the split's **training and unlabeled rows only**
(``split`` ``train`` or ``unlabeled``; validation and test images are never read, so the
encoder cannot have seen the patients it is later evaluated on), with random-resized crops
of ``pretrain.crop_scale`` of the image area. It writes into ``DIR``:

* ``encoder.safetensors`` + ``encoder.json``: the timm ViT encoder's weights (loadable into
  the same ``vit_<size>`` for fine-tuning) and their model card (settings, losses,
  provenance);
* ``reconstructions.png``: a few training images as input / masked input / reconstruction;
* ``train.log`` and ``checkpoints/`` (the run resumes after a crash like ``medvit train``).

The Trainer runs without a validation set (there is no label to select on), so the last
epoch's weights are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medvit.config import pretrain_extra_manifests
from medvit.data.manifest import load_manifest
from medvit.data.transforms import random_resized_crop
from medvit.engine import TrainConfig, Trainer, save_weights, seed_everything
from medvit.errors import ConfigError, LeakageError
from medvit.evaluation.figures import save_figure
from medvit.fileio import atomic_write_json, sha256_file
from medvit.models.mae import MaskedAutoencoder, build_mae
from medvit.tasks.common import StageContext, load_context, model_sidecar
from medvit.tasks.training import split_dataset

PRETRAINING_SPLITS = ["train", "unlabeled"]
"""Splits a self-supervised stage reads: the training images and the manifest's unlabeled ones."""


def pretraining_rows(ctx: StageContext) -> pd.DataFrame:
    """The rows a self-supervised pretraining stage may read: the ``train`` and ``unlabeled``
    splits, and only patients that appear in no validation or test row (guaranteed by the
    leakage guard; checked again here because a leak would silently inflate the fine-tuned
    model's test metrics).

    Raises:
        LeakageError: a training or unlabeled patient also has validation or test rows.
    """
    rows = ctx.rows(PRETRAINING_SPLITS)
    others = set(ctx.df.loc[~ctx.df["split"].isin(PRETRAINING_SPLITS), "patient_id"].astype(str))
    shared = sorted(set(rows["patient_id"].astype(str)) & others)
    if shared:
        raise LeakageError(shared, "pretraining would see validation/test patients")
    return rows


# Columns an extra pretraining manifest contributes (images and ids; never labels).
_EXTRA_COLUMNS = ("patient_id", "sample_id", "image")


def with_extra_pretraining_images(ctx: StageContext) -> tuple[StageContext, list[dict[str, Any]]]:
    """``ctx`` with the images of ``pretrain.extra_manifests`` appended as ``unlabeled`` rows.

    Of each extra manifest, rows are kept unless its own ``split`` is ``val`` or ``test`` (so a
    manifest of another study keeps that study's evaluation images out of this encoder too);
    label columns are dropped, paths are made relative to the split's folder, and sample ids
    get the prefix ``extra<i>:`` so they never collide with this task's.

    Returns:
        the extended context, and one summary per extra manifest (path, SHA-256, rows and
        patients used) for the encoder's card.

    Raises:
        LeakageError: an extra image's patient is one of this task's validation or test patients.
    """
    paths = pretrain_extra_manifests(ctx.study, ctx.task)
    if not paths:
        return ctx, []
    held_out = set(ctx.df.loc[ctx.df["split"].isin(["val", "test"]), "patient_id"].astype(str))
    parts, summaries = [ctx.df], []
    for i, path in enumerate(paths):
        manifest = load_manifest(path, check_files=True)
        df = manifest.df
        if "split" in df.columns:
            df = df[~df["split"].astype(str).isin(["val", "test"])]
        columns = [c for c in df.columns if c in _EXTRA_COLUMNS or c.startswith("image_")]
        df = df[columns].copy()
        shared = sorted(set(df["patient_id"].astype(str)) & held_out)
        if shared:
            raise LeakageError(shared, f"pretrain.extra_manifests {path} holds validation/test patients of task "
                                       f"{ctx.task!r}")
        for col in [c for c in columns if c == "image" or c.startswith("image_")]:
            df[col] = [os.path.relpath(manifest.root / v, ctx.manifest.root) if v else v for v in df[col]]
        df["sample_id"] = f"extra{i}:" + df["sample_id"].astype(str)
        df["split"] = "unlabeled"
        parts.append(df)
        summaries.append({"manifest": str(path), "sha256": sha256_file(path), "rows": int(len(df)),
                          "patients": int(df["patient_id"].nunique()), "quarantined": len(manifest.problems)})
        print(f"extra pretraining images: {len(df)} from {path} ({df['patient_id'].nunique()} patients)", flush=True)
    combined = pd.concat(parts, ignore_index=True)
    for col in combined.columns:
        if combined[col].dtype == object:
            combined[col] = combined[col].where(combined[col].notna(), "")
    return dataclasses.replace(ctx, manifest=dataclasses.replace(ctx.manifest, df=combined)), summaries


def recipe_unchanged(out_dir: str | Path, recipe: dict[str, Any], name: str = "recipe.json") -> bool:
    """Whether checkpoints in ``out_dir`` may be resumed: True when ``out_dir/name`` holds the
    same recipe (or does not exist yet). The Trainer refuses a checkpoint whose ``train``
    settings differ, but settings outside ``train`` (mask ratio, crop scale, fine-tuning
    recipe, initial weights) are this stage's: a changed one must start over, or a rerun
    would resume the old run's final checkpoint and return stale weights. Writes ``recipe``.
    """
    path = Path(out_dir) / name
    text = json.dumps(recipe, sort_keys=True, default=str)
    try:
        same = not path.exists() or json.dumps(json.loads(path.read_text()), sort_keys=True) == text
    except (OSError, ValueError):
        same = False  # unreadable: do not trust the checkpoints beside it
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(text))
    return same


def _pretrain_config(ctx: StageContext) -> dict[str, Any]:
    pcfg = ctx.tcfg.get("pretrain")
    if not isinstance(pcfg, dict):
        raise ConfigError(f"tasks.{ctx.task}.pretrain: task {ctx.task!r} has no MAE pretraining stage; allowed: "
                          "the tasks whose schema has a `pretrain` block (xray)")
    size = ctx.tcfg["image_size"]
    if size % pcfg["patch_size"]:
        raise ConfigError(f"tasks.{ctx.task}.pretrain.patch_size: got {pcfg['patch_size']} with image_size {size}; "
                          "allowed: a divisor of image_size")
    return pcfg


def pretrain_stage(config_path: str | Path, task: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """Pretrain the task's MAE on its training split -> ``out_dir/encoder.safetensors``.

    Args:
        config_path: the study YAML (``tasks.<task>.pretrain`` holds the settings).
        task: the task (``xray``).
        split_path: ``split.csv`` from ``medvit split``.
        out_dir: folder for the encoder, its card, the figure, ``train.log``, ``checkpoints/``.

    Returns:
        the path of ``encoder.safetensors``.
    """
    ctx = load_context(config_path, task, split_path)
    pcfg = _pretrain_config(ctx)
    cfg = TrainConfig.from_study(ctx.study, {**pcfg["train"], "lr": pretrain_lr(pcfg)})
    seed_everything(cfg.seed, cfg.deterministic)
    out_dir = Path(out_dir)
    size = [ctx.tcfg["image_size"]] * 2
    ctx, extras = with_extra_pretraining_images(ctx)
    rows = pretraining_rows(ctx)
    dataset = split_dataset(ctx, PRETRAINING_SPLITS, size, augment=random_resized_crop(size, pcfg["crop_scale"]))
    assert len(dataset) == len(rows)  # split_dataset reads exactly these rows
    in_chans = int(dataset[0]["image"].shape[0])
    mae = build_mae(pcfg["model"], in_chans=in_chans, img_size=size[0], patch_size=pcfg["patch_size"],
                    mask_ratio=pcfg["mask_ratio"], decoder_dim=pcfg["decoder_dim"],
                    decoder_depth=pcfg["decoder_depth"], norm_pix_loss=pcfg["norm_pix_loss"])
    # the encoder standardises its input with the pretraining images' statistics and keeps
    # them: every ViT fine-tuned or adapted from it inherits the same preprocessing
    stats = dataset.channel_statistics()
    mae.encoder.input_norm.set_statistics(stats["mean"], stats["std"])

    def loss_fn(outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.loss

    trainer = Trainer(mae, dataset, None, cfg, out_dir, loss_fn=loss_fn)
    recipe = {k: v for k, v in pcfg.items() if k not in ("train", "figures")}
    result = trainer.fit(resume=recipe_unchanged(out_dir, {**recipe, "image_size": size[0], "in_chans": in_chans,
                                                           "input_norm": stats, "extras": extras}))
    plain = split_dataset(ctx, PRETRAINING_SPLITS, size, cache=False)  # unaugmented, read on demand
    baseline = patch_mean_baseline_loss(mae, plain, seed=cfg.seed)
    print(f"MAE reconstruction loss {result.history[-1]['train_loss']:.4f} (predicting each masked patch's own "
          f"mean scores {baseline:.4f})", flush=True)
    seed_everything(cfg.seed, cfg.deterministic)
    random_encoder = build_mae(pcfg["model"], in_chans=in_chans, img_size=size[0],
                               patch_size=pcfg["patch_size"]).encoder.to(next(mae.parameters()).device)
    random_encoder.input_norm.set_statistics(stats["mean"], stats["std"])
    probe = linear_probe_check(ctx, mae.encoder, random_encoder, size)
    if probe:
        print(f"linear probe, validation AUROC: MAE encoder {probe['mae_encoder']:.3f}, random encoder "
              f"{probe['random_encoder']:.3f}", flush=True)
    figure = save_reconstructions(mae.cpu(), plain,
                                  out_dir / "reconstructions.png", n=pcfg["figures"], seed=cfg.seed)
    meta = model_sidecar(ctx, pcfg["model"], split_path, stage="mae_pretrain", in_chans=in_chans,
                         image_size=size[0], patch_size=pcfg["patch_size"], pretrain=pcfg,
                         train_samples=len(rows), train_patients=int(rows["patient_id"].nunique()),
                         splits_seen=sorted(rows["split"].unique().tolist()),
                         train_seconds=result.train_seconds, final_loss=result.history[-1]["train_loss"],
                         patch_mean_baseline_loss=baseline, lr=cfg.lr,
                         losses=[h["train_loss"] for h in result.history], figure=figure.name,
                         input_norm=stats, extra_manifests=extras, linear_probe=probe)
    return save_weights(out_dir / "encoder.safetensors", mae.encoder, meta)


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, dataset, batch_size: int = 256) -> np.ndarray:
    """(N, D) pooled features of a frozen ViT encoder (``num_classes=0``) over ``dataset``."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats = [encoder(b["image"].float().to(device)).float().cpu().numpy()
             for b in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    encoder.train(was_training)
    return np.concatenate(feats)


def linear_probe_check(ctx: StageContext, encoder: torch.nn.Module, random_encoder: torch.nn.Module,
                       size: list[int]) -> dict[str, Any] | None:
    """Did pretraining learn anything? A logistic-regression probe (scikit-learn, standardised
    features) on the frozen encoder's pooled features of the labelled training rows, scored
    on the validation rows (macro AUROC over the classes with both values there), against the
    same probe on ``random_encoder``, a randomly initialised encoder of the same architecture
    and input standardisation. Validation only: the test split is never read. None when the split has
    no labelled training or validation rows.

    Returns:
        ``{"mae_encoder": auroc, "random_encoder": auroc, "train_samples": n, "val_samples": m}``.
    """
    # scikit-learn is imported where it is used, as in medvit.data.splits: it adds seconds to
    # every stage's start-up and only this check needs it
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not len(ctx.rows("train")) or not len(ctx.rows("val")):
        return None
    train_ds = split_dataset(ctx, "train", size, cache=False)
    val_ds = split_dataset(ctx, "val", size, cache=False)
    y_train = np.stack([np.atleast_1d(r["target"]) for r in train_ds.records])
    y_val = np.stack([np.atleast_1d(r["target"]) for r in val_ds.records])
    if ctx.spec.kind == "multiclass":
        y_train = np.eye(len(ctx.spec.classes))[y_train[:, 0].astype(int)]
        y_val = np.eye(len(ctx.spec.classes))[y_val[:, 0].astype(int)]
    result: dict[str, Any] = {"train_samples": len(train_ds), "val_samples": len(val_ds)}
    for name, enc in (("mae_encoder", encoder), ("random_encoder", random_encoder)):
        f_train, f_val = encoder_features(enc, train_ds), encoder_features(enc, val_ds)
        aucs = []
        for j in range(y_train.shape[1]):
            if len(np.unique(y_train[:, j])) < 2 or len(np.unique(y_val[:, j])) < 2:
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
            probe.fit(f_train, y_train[:, j])
            aucs.append(roc_auc_score(y_val[:, j], probe.predict_proba(f_val)[:, 1]))
        result[name] = float(np.mean(aucs)) if aucs else float("nan")
    return result


def pretrain_lr(pcfg: dict[str, Any]) -> float:
    """The MAE learning rate. With ``base_lr`` set (default 1.5e-4, the MAE paper's), the MAE
    paper's linear scaling rule: ``base_lr * effective batch / 256``, the effective batch being
    ``batch_size * accumulate``; with ``base_lr: null``, ``train.lr`` as given."""
    if pcfg.get("base_lr") is None:
        return float(pcfg["train"]["lr"])
    train = pcfg["train"]
    return float(pcfg["base_lr"]) * int(train["batch_size"]) * int(train.get("accumulate", 1)) / 256.0


@torch.no_grad()
def patch_mean_baseline_loss(mae: MaskedAutoencoder, dataset, seed: int = 0, max_samples: int = 512,
                             batch_size: int = 64) -> float:
    """The reconstruction loss of a trivial predictor that fills every masked patch with that
    patch's own mean intensity (an oracle of each patch's brightness): ``(n - 1) / n`` for patches of ``n``
    values with ``norm_pix_loss`` (the target is normalised with the unbiased variance), the
    patches' variance without it. An
    MAE whose loss does not fall clearly below it has learned no structure. Same masking rule
    and a fixed generator, on up to ``max_samples`` samples of ``dataset``."""
    generator = torch.Generator().manual_seed(seed)
    device = next(mae.parameters()).device
    total, count = 0.0, 0
    n = min(len(dataset), max_samples)
    for start in range(0, n, batch_size):
        imgs = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(start, min(n, start + batch_size))])
        imgs = mae.standardize(imgs.float().to(device))
        _, mask, _ = mae.random_masking(imgs.shape[0], torch.device("cpu"), generator=generator)
        target = mae.target(imgs)
        pred = target.mean(dim=-1, keepdim=True).expand_as(target)
        total += float(mae.loss(imgs, pred, mask.to(device))) * float(mask.sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


@torch.no_grad()
def save_reconstructions(mae: MaskedAutoencoder, dataset, path: str | Path, n: int = 4, seed: int = 0) -> Path:
    """A PNG grid of ``n`` samples of ``dataset``: input, masked input, reconstruction (one row
    each; grey scale of the first channel, each panel on the input's intensity range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(dataset))
    imgs = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(n)]).float()
    was_training = mae.training
    mae.eval()
    masked, recon = mae.reconstruct(imgs, generator=torch.Generator().manual_seed(seed))
    mae.train(was_training)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        lo, hi = float(imgs[i, 0].min()), float(imgs[i, 0].max())
        for j, (title, img) in enumerate((("input", imgs[i]), (f"masked {mae.mask_ratio:.0%}", masked[i]),
                                          ("reconstruction", recon[i]))):
            ax = axes[i, j]
            ax.imshow(np.asarray(img[0]), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100, tight=False)
