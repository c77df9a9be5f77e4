"""Adaptation stage: DVPT against the other ways to adapt one frozen ViT to a classification task.

For each method of ``tasks.<task>.adapt.methods`` (``linear`` probe, ``vpt`` deep prompts,
``dvpt``, ``full`` fine-tuning) and each fraction of ``adapt.fractions`` of the training
patients (patient-level, stratified subsampling of the split's train rows; validation and
test stay whole), the same backbone (the task's MAE encoder or a local checkpoint) is adapted
with the same data, augmentation and epochs, then scored on the val and test rows:

    <task>/adapt/<method>_p<percent>/adapter.safetensors  the task's own tensors only
    <task>/adapt/<method>_p<percent>/adapter.json         card: backbone sha256, parameters, bytes, time
    <task>/adapt/<method>_p<percent>/predictions.csv      Contract 3 (from the reloaded adapter)
    <task>/adapt/<method>_p<percent>/metrics.json         patient-level metrics with bootstrap CIs
    <task>/adapt/comparison.json, label_efficiency.png    every run side by side

The backbone file is shared: an adapter stores the tensors that are not the frozen backbone's
(prompts/DVPT and the head; with ``full`` every tensor, which is the whole model) and the
backbone's SHA-256, which :func:`load_adapter` checks before applying the adapter on top of it.
Predictions are made by a model rebuilt from the backbone file plus the saved adapter, so the
stored adapter is what is evaluated.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medvit.config import load_study, percent_label, run_name, study_dir, task_config
from medvit.data.sampling import subsample_patients
from medvit.engine import TrainConfig, Trainer, resolve_device, seed_everything
from medvit.engine.pretrained import load_pretrained
from medvit.errors import CheckpointError, ConfigError
from medvit.evaluation import metrics as M
from medvit.evaluation.adapt_report import METHOD_LABELS
from medvit.evaluation.aggregate import aggregate_patients
from medvit.evaluation.bootstrap import cluster_bootstrap
from medvit.evaluation.evaluate import ci_key, evaluate_predictions, write_json
from medvit.fileio import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file
from medvit.models.dvpt import METHODS, PromptedViT, build_prompted_vit, trainable_summary
from medvit.models.vit import layer_decay_param_groups
from medvit.provenance import provenance
from medvit.tasks.classification import (
    finetune_config,
    loss_function,
    probabilities,
    standardize_input,
    train_augmentation,
    validation_metric,
)
from medvit.tasks.common import StageContext, load_context, write_predictions
from medvit.tasks.pretrain import recipe_unchanged
from medvit.tasks.training import split_dataset

ADAPTER_FORMAT = "medvit-adapter/1"
# Metric used as "AUROC" in the comparison, per task kind (names of medvit.evaluation.evaluate).
_AUROC = {"binary": "auroc", "multiclass": "auroc_macro", "multilabel": "auroc_macro"}
_KAPPA = {"binary": "kappa", "multiclass": "kappa", "multilabel": "kappa_macro"}


class AdapterError(CheckpointError):
    """An adapter file does not fit its backbone (other file, altered file, other architecture)."""


# ------------------------------------------------------------------------------ config
def adapt_config(ctx_or_tcfg: StageContext | dict[str, Any], task: str | None = None) -> dict[str, Any]:
    """The task's ``adapt`` block (schema defaults filled).

    Raises:
        ConfigError: the task has no ``adapt`` block.
    """
    tcfg = ctx_or_tcfg.tcfg if isinstance(ctx_or_tcfg, StageContext) else ctx_or_tcfg
    name = ctx_or_tcfg.task if isinstance(ctx_or_tcfg, StageContext) else task
    cfg = tcfg.get("adapt")
    if not isinstance(cfg, dict):
        raise ConfigError(f"tasks.{name}.adapt: task {name!r} has no adaptation stage; allowed: xray, histo")
    return cfg


def backbone_spec(study: dict[str, Any], task: str, split_path: str | Path | None = None) -> dict[str, Any]:
    """The shared backbone of a task's adaptation: file, ViT size and patch size.

    ``adapt.backbone: mae`` is the task's MAE encoder (``<split folder>/mae/encoder.safetensors``,
    or ``<study>/<task>/mae/`` without a split path) with ``pretrain.model`` and
    ``pretrain.patch_size``; a path is a local checkpoint of ``adapt.model`` (default
    ``pretrain.model``) with ``adapt.patch_size`` (default ``pretrain.patch_size``, else 16).
    """
    tcfg = task_config(study, task)
    cfg = adapt_config(tcfg, task)
    pretrain = tcfg.get("pretrain") or {}
    if cfg["backbone"] == "mae":
        if not pretrain:
            raise ConfigError(f"tasks.{task}.adapt.backbone: got 'mae', but task {task!r} has no MAE pretraining "
                              "stage; allowed: the path of a local ViT checkpoint (.safetensors or weights-only .pt)")
        folder = Path(split_path).parent if split_path is not None else study_dir(study) / task
        path = folder / "mae" / "encoder.safetensors"
        model = cfg.get("model") or pretrain["model"]
        if model != pretrain["model"]:
            raise ConfigError(f"tasks.{task}.adapt.model: got {model!r} with backbone 'mae', whose encoder is "
                              f"pretrain.model {pretrain['model']!r}; allowed: null or {pretrain['model']!r}")
    else:
        path = Path(cfg["backbone"])
        model = cfg.get("model") or pretrain.get("model") or "vit_base"
    patch = cfg.get("patch_size") or pretrain.get("patch_size") or 16
    if tcfg["image_size"] % patch:
        raise ConfigError(f"tasks.{task}.adapt.patch_size: got {patch} with image_size {tcfg['image_size']}; "
                          "allowed: a divisor of image_size")
    return {"path": path, "model": model, "size": model.removeprefix("vit_"), "patch_size": int(patch)}


def _train_config(ctx: StageContext, method: str) -> TrainConfig:
    cfg = adapt_config(ctx)
    train = dict(cfg["train"])
    train["lr"] = float(train["lr"]) * float(cfg["lr_scale"][method])
    train["min_lr"] = min(float(train["min_lr"]), train["lr"])
    return TrainConfig.from_study(ctx.study, train)


# ------------------------------------------------------------------------------ adapters
def build_from_card(card: dict[str, Any]) -> PromptedViT:
    """Rebuild the (randomly initialised) adapted model an adapter card describes."""
    return build_prompted_vit(card["size"], card["method"], in_chans=int(card["in_chans"]),
                              num_classes=int(card["num_classes"]), img_size=int(card["image_size"]),
                              patch_size=int(card["patch_size"]), dvpt=card.get("dvpt"),
                              vpt_prompts=int(card.get("vpt_prompts", 10)))


def save_adapter(path: str | Path, model: PromptedViT, card: dict[str, Any]) -> Path:
    """Write a task's adapter: ``path`` (safetensors, only :meth:`PromptedViT.adapter_state_dict`)
    and ``path`` with suffix ``.json`` (``card`` plus format, tensor names, ``bytes`` and ``sha256``).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT, "method": model.method,
                                                "backbone_sha256": str(card["backbone"]["sha256"])})
        digest, size = sha256_file(tmp), tmp.stat().st_size
    atomic_write_json(path.with_suffix(".json"), {**card, "format": ADAPTER_FORMAT, "adapter": path.name,
                                                  "tensors": sorted(tensors), "bytes": size, "sha256": digest})
    return path


def read_adapter_card(path: str | Path) -> dict[str, Any]:
    """The JSON card beside an adapter file.

    Raises:
        AdapterError: missing or not an adapter card.
    """
    card_path = Path(path).with_suffix(".json")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"adapter card {card_path} not found (written beside the adapter by medvit adapt)") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter card {card_path} is unreadable ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{card_path} is not a medvit adapter card (format {ADAPTER_FORMAT})")
    return card


def load_adapter(path: str | Path, backbone: str | Path | None = None) -> tuple[PromptedViT, dict[str, Any]]:
    """Apply a saved task adapter on top of the shared backbone file.

    Args:
        path: ``adapter.safetensors`` written by :func:`save_adapter`.
        backbone: the backbone file (default: the path recorded in the card). Its SHA-256 must
            be the one the adapter was trained on (a ``full`` adapter holds every tensor and
            needs no backbone).

    Returns:
        ``(model, card)``: the adapted model on the CPU in eval mode, and the adapter's card.

    Raises:
        AdapterError: altered adapter file, other backbone, or tensors that do not fit.
    """
    from safetensors.torch import load_file

    path = Path(path)
    card = read_adapter_card(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} not found")
    if sha256_file(path) != card["sha256"]:
        raise AdapterError(f"{path}: SHA-256 differs from its card {path.with_suffix('.json')}: the file was "
                           "altered or truncated")
    model = build_from_card(card)
    if card["method"] != "full":
        backbone = Path(backbone if backbone is not None else card["backbone"]["path"])
        if not backbone.is_file():
            raise AdapterError(f"backbone file {backbone} not found (the adapter {path} is applied on top of it)")
        digest = sha256_file(backbone)
        if digest != card["backbone"]["sha256"]:
            raise AdapterError(f"{path} was trained on a backbone with SHA-256 {card['backbone']['sha256'][:16]}..., "
                               f"but {backbone} has {digest[:16]}...: not the same weights")
        load_pretrained(model.backbone, backbone)
    tensors = load_file(str(path))
    own = model.state_dict()
    needed = set(model.adapter_keys())
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
             if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(needed - set(tensors))
    if wrong or unexpected or missing:
        raise AdapterError(f"{path} does not fit a {card['method']} {card['model']}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}, other shapes {wrong[:3]}")
    model.load_state_dict(tensors, strict=False)
    return model.eval(), card


# ------------------------------------------------------------------------------ stage
def _subsampled(ctx: StageContext, fraction: float) -> StageContext:
    """``ctx`` whose train rows are a stratified ``fraction`` of the training patients."""
    df = ctx.df
    train = df[df["split"] == "train"]
    kept = subsample_patients(train, fraction, seed=ctx.study["seed"], label_column=ctx.spec.column)
    keep = (df["split"] != "train") | df.index.isin(kept.index)
    manifest = dataclasses.replace(ctx.manifest, df=df[keep].reset_index(drop=True))
    return dataclasses.replace(ctx, manifest=manifest)


def _predict(ctx: StageContext, model: PromptedViT, size: list[int], batch_size: int) -> np.ndarray:
    device = resolve_device(ctx.study["device"])
    model = model.to(device).eval()
    dataset = split_dataset(ctx, ["val", "test"], size, cache=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        scores = [probabilities(ctx.spec, model(b["image"].to(device))).cpu().numpy() for b in loader]
    return np.concatenate(scores)


def _multilabel_kappa(df: pd.DataFrame, result: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """Macro Cohen's kappa over findings (:func:`medvit.evaluation.metrics.macro_kappa`) at the
    patient level (thresholds chosen on val by the evaluation), with the same cluster bootstrap
    as every other metric."""
    ev = study["evaluation"]
    classes = result["classes"]
    patients = aggregate_patients(df, result["aggregate"]["method"], ev["top_k"], "multilabel")
    test = patients[patients["split"] == "test"].reset_index(drop=True)
    truth = test[[f"true_{c}" for c in classes]].to_numpy(np.int64)
    thr = np.array([result["threshold"]["patient"][c] for c in classes], dtype=float)
    pred = M.binarize(test[[f"score_{c}" for c in classes]].to_numpy(float), thr)
    value = M.macro_kappa(truth, pred)
    boot = cluster_bootstrap({"kappa": lambda W: M.weighted_macro_kappa(truth, pred, W)}, np.arange(len(test)),
                             ev["bootstrap"], ev["ci"], study["seed"])
    return {"value": value, ci_key(ev["ci"]): [boot["kappa"].lo, boot["kappa"].hi], "n_boot": boot["kappa"].n_used}


def _evaluate(ctx: StageContext, predictions: pd.DataFrame) -> dict[str, Any]:
    ev = ctx.study["evaluation"]
    result = evaluate_predictions(predictions, kind=ctx.spec.kind, aggregate=ev["aggregate"], top_k=ev["top_k"],
                                  threshold=ev["threshold"], n_bootstrap=ev["bootstrap"], ci=ev["ci"],
                                  seed=ctx.study["seed"])
    if ctx.spec.kind == "multilabel":
        with np.errstate(all="ignore"):
            result["metrics"]["kappa_macro"] = _multilabel_kappa(predictions, result, ctx.study)
    return result


def _fit(ctx: StageContext, method: str, fraction: float, bb: dict[str, Any], split_path: str | Path,
         run_dir: Path) -> tuple[PromptedViT, dict[str, Any]]:
    """Adapt the backbone with ``method`` on ``fraction`` of the training patients."""
    cfg = adapt_config(ctx)
    train_cfg = _train_config(ctx, method)
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    sub = _subsampled(ctx, fraction)
    size = [ctx.tcfg["image_size"]] * 2
    # Same augmentation for every method: the task's classifier augmentation.
    train_ds = split_dataset(sub, "train", size, augment=train_augmentation(ctx.tcfg))
    val_ds = split_dataset(sub, "val", size)
    in_chans = int(train_ds[0]["image"].shape[0])
    model = build_prompted_vit(bb["size"], method, in_chans=in_chans, num_classes=ctx.spec.num_outputs,
                               img_size=ctx.tcfg["image_size"], patch_size=bb["patch_size"], dvpt=cfg["dvpt"],
                               vpt_prompts=cfg["vpt"]["prompts"])
    loaded_norm = load_pretrained(model.backbone, bb["path"])["input_norm"]
    # the backbone's own input standardisation (an MAE encoder's), else the training split's;
    # either way it is stored in the adapter
    norm = standardize_input(model.backbone, train_ds, loaded_with_weights=loaded_norm)
    groups = None
    if method == "full":
        # full fine-tuning is the task's own ViT recipe: layer-wise learning-rate decay
        layer_decay = finetune_config(ctx)["layer_decay"]
        groups = layer_decay_param_groups(model.backbone, layer_decay, train_cfg.weight_decay)
    loss = loss_function(ctx.spec)

    def loss_fn(outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return loss(outputs, batch["label"])

    recipe = {"method": method, "fraction": fraction, "backbone_sha256": bb["sha256"], "adapt": cfg,
              "image_size": ctx.tcfg["image_size"]}
    trainer = Trainer(model, train_ds, val_ds, train_cfg, run_dir, loss_fn=loss_fn,
                      val_metric_fn=validation_metric(ctx.spec), param_groups=groups)
    result = trainer.fit(resume=recipe_unchanged(run_dir, recipe))
    train_rows = sub.rows("train")
    info = {"in_chans": in_chans, "train_seconds": result.train_seconds, "best_epoch": result.best_epoch,
            "best_val_metric": result.best_metric, "epochs": train_cfg.epochs, "lr": train_cfg.lr,
            "train_patients": int(train_rows["patient_id"].nunique()), "train_samples": int(len(train_rows)),
            "all_train_patients": int(ctx.rows("train")["patient_id"].nunique()), **norm}
    return model, info


def adapt_run(ctx: StageContext, method: str, fraction: float, split_path: str | Path, out_dir: str | Path,
              bb: dict[str, Any] | None = None) -> Path:
    """One (method, fraction) run -> ``<out_dir>/<method>_p<percent>/metrics.json`` (and the adapter,
    its card and predictions.csv beside it)."""
    if method not in METHODS:
        raise ConfigError(f"tasks.{ctx.task}.adapt.methods: got {method!r}; allowed: {', '.join(METHODS)}")
    if bb is None:
        bb = backbone_spec(ctx.study, ctx.task, split_path)
        bb["sha256"] = _backbone_sha(bb["path"])
    run_dir = Path(out_dir) / run_name(method, fraction)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, info = _fit(ctx, method, fraction, bb, split_path, run_dir)
    summary = trainable_summary(model)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cfg = adapt_config(ctx)
    card = {"task": ctx.task, "method": method, "fraction": fraction, "model": bb["model"], "size": bb["size"],
            "patch_size": bb["patch_size"], "image_size": ctx.tcfg["image_size"], "in_chans": info["in_chans"],
            "num_classes": ctx.spec.num_outputs, "spec": dataclasses.asdict(ctx.spec),
            "dvpt": cfg["dvpt"] if method == "dvpt" else None, "vpt_prompts": cfg["vpt"]["prompts"],
            "backbone": {"path": str(bb["path"]), "sha256": bb["sha256"], "bytes": Path(bb["path"]).stat().st_size},
            **summary, "full_model_tensor_bytes": full_bytes, **info, "split_manifest": str(split_path),
            "provenance": provenance(config=ctx.study, config_path=ctx.config_path, manifest_path=split_path)}
    adapter = save_adapter(run_dir / "adapter.safetensors", model, card)
    del model
    # Score with the model rebuilt from the shared backbone + the stored adapter: what a user gets.
    reloaded, card = load_adapter(adapter, bb["path"])
    scores = _predict(ctx, reloaded, [ctx.tcfg["image_size"]] * 2, cfg["train"]["batch_size"])
    rows = ctx.rows(["val", "test"])
    predictions = write_predictions(run_dir / "predictions.csv", rows, ctx.spec, scores)
    result = _evaluate(ctx, predictions)
    notes = result.pop("notes")
    record = {"study": ctx.study["study"], "task": ctx.task, "model": f"adapt/{run_name(method, fraction)}",
              "method": method, "fraction": fraction, **result,
              "params": card["params"], "trainable_params": card["trainable_params"],
              "backbone_params": card["backbone_params"], "trainable_percent": card["trainable_percent"],
              "adapter_bytes": card["bytes"], "full_model_tensor_bytes": full_bytes,
              "train_seconds": card["train_seconds"], "train_patients": card["train_patients"],
              "train_samples": card["train_samples"], "notes": notes,
              "provenance": {**card["provenance"], "adapter_sha256": card["sha256"],
                             "backbone_sha256": bb["sha256"],
                             "predictions_sha256": sha256_file(run_dir / "predictions.csv")}}
    # The epoch checkpoints hold the whole model (frozen backbone included): the adapter replaces them.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return write_json(run_dir / "metrics.json", record)


def _backbone_sha(path: Path) -> str:
    if not Path(path).is_file():
        raise CheckpointError(f"backbone file {path} not found (adapt.backbone: the task's MAE encoder, made by "
                              "`medvit pretrain`, or a local checkpoint)")
    return sha256_file(path)


def adapt_stage(config_path: str | Path, task: str, method: str, split_path: str | Path, out_dir: str | Path,
                fractions: Sequence[float] | None = None) -> list[Path]:
    """Adapt the task's backbone with ``method`` at every fraction of ``adapt.fractions`` (or
    ``fractions``) of the training patients.

    Returns:
        the ``metrics.json`` of each run, under ``<out_dir>/<method>_p<percent>/``.
    """
    ctx = load_context(config_path, task, split_path)
    cfg = adapt_config(ctx)
    bb = backbone_spec(ctx.study, task, split_path)
    bb["sha256"] = _backbone_sha(bb["path"])
    return [adapt_run(ctx, method, float(f), split_path, out_dir, bb) for f in (fractions or cfg["fractions"])]


# ------------------------------------------------------------------------------ comparison
def adapt_compare_stage(config_path: str | Path, task: str, adapt_dir: str | Path, out_path: str | Path) -> Path:
    """Gather every run of ``adapt.methods`` x ``adapt.fractions`` -> ``comparison.json`` and
    ``label_efficiency.png`` beside it."""
    study = load_study(config_path)
    cfg = adapt_config(task_config(study, task), task)
    rows = []
    for method in cfg["methods"]:
        for fraction in cfg["fractions"]:
            path = Path(adapt_dir) / run_name(method, fraction) / "metrics.json"
            if not path.is_file():
                raise ConfigError(f"{path} not found: run `medvit adapt run --method {method}` first")
            rec = json.loads(path.read_text(encoding="utf-8"))
            kind = rec["kind"]
            full = rec["full_model_tensor_bytes"]
            rows.append({"method": method, "fraction": fraction, "percent": percent_label(fraction),
                         "train_patients": rec["train_patients"], "train_samples": rec["train_samples"],
                         "auroc": rec["metrics"].get(_AUROC[kind]), "kappa": rec["metrics"].get(_KAPPA[kind]),
                         "auroc_metric": _AUROC[kind], "kappa_metric": _KAPPA[kind],
                         "trainable_params": rec["trainable_params"], "backbone_params": rec["backbone_params"],
                         "trainable_percent": rec["trainable_percent"], "adapter_bytes": rec["adapter_bytes"],
                         "storage_percent": 100.0 * rec["adapter_bytes"] / full,
                         "train_seconds": rec["train_seconds"], "n_test_patients": rec["n_patients"]})
    out_path = Path(out_path)
    figure = out_path.parent / "label_efficiency.png"
    plot_label_efficiency(rows, figure, task)
    bb = backbone_spec(study, task)
    return write_json(out_path, {"study": study["study"], "task": task, "backbone": {**bb, "path": str(bb["path"])},
                                 "methods": cfg["methods"], "fractions": cfg["fractions"],
                                 "train": cfg["train"], "lr_scale": cfg["lr_scale"], "rows": rows,
                                 "figure": figure.name})


def plot_label_efficiency(rows: Sequence[dict[str, Any]], path: str | Path, task: str) -> Path:
    """Test AUROC and kappa (patient level, 95% CI bars) against the % of training patients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("auroc", "kappa")):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["fraction"])
            x = [100 * r["fraction"] for r in mine]
            y = np.array([np.nan if not r[key] or r[key]["value"] is None else r[key]["value"] for r in mine], float)
            ci = [next((v for k, v in (r[key] or {}).items() if k.startswith("ci")), None) for r in mine]
            lo = np.array([np.nan if not c or c[0] is None else c[0] for c in ci], float)
            hi = np.array([np.nan if not c or c[1] is None else c[1] for c in ci], float)
            err = np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0).clip(min=0)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=METHOD_LABELS.get(method, method))
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in sorted({r["fraction"] for r in rows})])
        ax.set_xticklabels([percent_label(f) for f in sorted({r["fraction"] for r in rows})])
        ax.set_xlabel("training patients (%)")
        ax.set_ylabel(f"test {rows[0][key + '_metric'] if rows else key} (patient level)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: label efficiency of the adaptation methods (95% bootstrap CIs)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
