"""Multi-task self-supervised pretraining of the CSwin-UNet encoder (the CSwin-UNet paper's
pretraining stage, after Tang et al., "Self-Supervised Pre-Training of Swin Transformers for
3D Medical Image Analysis", CVPR 2022).

Each training patch is corrupted twice (two *views*): a random in-plane rotation by
0/90/180/270 degrees, then random cubes blanked out (masked regions). The encoder sees both
views in one batch and three heads learn from its deepest features:

* ``inpaint``: a light transposed-convolution decoder reconstructs the rotated, unmasked
  patch (L1 over all voxels);
* ``rotation``: a linear head classifies the rotation (cross-entropy over 4 classes);
* ``contrastive``: an MLP projection, NT-Xent between the two views of each patch against
  the other patches of the batch (temperature ``temperature``).

Each loss has a weight in ``tasks.prostate.ssl.tasks`` (0 switches it off). The stage reads
only :func:`medvit.tasks.pretrain.pretraining_rows` of the fold's split (training and
``unlabeled`` rows, never validation or test patients) and writes the encoder, which
initialises ``cswin_unet_ssl`` of the same fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medvit.engine import TrainConfig, Trainer, save_weights, seed_everything
from medvit.errors import ConfigError, LeakageError
from medvit.evaluation.figures import save_figure
from medvit.models.cswin import CSwinEncoder, encoder_config
from medvit.tasks.common import StageContext, model_sidecar
from medvit.tasks.pretrain import pretraining_rows, recipe_unchanged
from medvit.tasks.segmentation import fold_context, volume_dataset

SSL_TASKS = ("inpaint", "rotation", "contrastive")
@dataclass
class SSLOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    views: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None


def rotate_inplane(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each (C, D, H, W) volume of ``x`` by ``k[i] * 90`` degrees in the (H, W) plane."""
    return torch.stack([torch.rot90(v, int(r), dims=(2, 3)) for v, r in zip(x, k)])


def cube_mask(shape: tuple[int, ...], size: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(B, 1, D, H, W) 0/1 keep-mask: each ``size``^3 cube is blanked with probability ``ratio``."""
    B, _, D, H, W = shape
    grid = (torch.rand(B, 1, -(-D // size), -(-H // size), -(-W // size), device=device) >= ratio).float()
    full = grid.repeat_interleave(size, 2).repeat_interleave(size, 3).repeat_interleave(size, 4)
    return full[:, :, :D, :H, :W]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of two (B, E) batches of embeddings, view i of z1 paired with z2[i]."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class InpaintDecoder(nn.Sequential):
    """Deepest features (B, C, D/2^s, ...) -> (B, out_chans, D, H, W) by ``s`` transposed convs."""

    def __init__(self, in_dim: int, out_chans: int, stages: int):
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(stages):
            nxt = max(dim // 2, 8)
            layers += [nn.ConvTranspose3d(dim, nxt, 2, stride=2), nn.InstanceNorm3d(nxt, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
            dim = nxt
        layers.append(nn.Conv3d(dim, out_chans, 1))
        super().__init__(*layers)


class MultiTaskSSL(nn.Module):
    """A :class:`CSwinEncoder` with the heads of the enabled SSL tasks.

    Args:
        encoder: the encoder to pretrain.
        in_chans: input channels (reconstruction target).
        weights: loss weight per task of :data:`SSL_TASKS`; 0 disables a task (no head built).
        mask_ratio: fraction of cubes blanked in each view.
        mask_size: cube side in voxels.
        temperature: NT-Xent temperature.
        proj_dim: contrastive embedding size.

    ``forward(x)`` with x (B, C, D, H, W), H == W, returns an :class:`SSLOutput` whose ``loss``
    is the weighted sum of the enabled losses (each in ``parts``).
    """

    def __init__(self, encoder: CSwinEncoder, in_chans: int, weights: dict[str, float], mask_ratio: float = 0.3,
                 mask_size: int = 4, temperature: float = 0.5, proj_dim: int = 64):
        super().__init__()
        unknown = sorted(set(weights) - set(SSL_TASKS))
        if unknown or not any(float(w) > 0 for w in weights.values()):
            raise ConfigError(f"tasks.prostate.ssl.tasks: got {weights}; allowed: weights >= 0 for "
                              f"{', '.join(SSL_TASKS)}, at least one above 0")
        self.encoder = encoder
        self.weights = {k: float(weights.get(k, 0.0)) for k in SSL_TASKS}
        self.mask_ratio, self.mask_size, self.temperature = mask_ratio, mask_size, temperature
        dim = encoder.dims[-1]
        if self.weights["inpaint"] > 0:
            self.decoder = InpaintDecoder(dim, in_chans, stages=len(encoder.dims))
        if self.weights["rotation"] > 0:
            self.rotation_head = nn.Linear(dim, 4)
        if self.weights["contrastive"] > 0:
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))

    def corrupt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotated + masked view, rotation classes (B,), rotated clean target)."""
        k = torch.randint(0, 4, (x.shape[0],), device=x.device)
        rotated = rotate_inplane(x, k)
        keep = cube_mask(tuple(x.shape), self.mask_size, self.mask_ratio, x.device)
        return rotated * keep, k, rotated

    def forward(self, x: torch.Tensor) -> SSLOutput:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"rotation views need square in-plane patches, got {tuple(x.shape[-2:])}")
        v1, k1, t1 = self.corrupt(x)
        v2, k2, t2 = self.corrupt(x)
        views = torch.cat([v1, v2])
        deep = self.encoder(views)[-1]
        pooled = deep.mean(dim=(2, 3, 4))
        parts: dict[str, torch.Tensor] = {}
        recon = None
        if self.weights["inpaint"] > 0:
            recon = self.decoder(deep)
            parts["inpaint"] = F.l1_loss(recon.float(), torch.cat([t1, t2]).float())
        if self.weights["rotation"] > 0:
            parts["rotation"] = F.cross_entropy(self.rotation_head(pooled).float(), torch.cat([k1, k2]))
        if self.weights["contrastive"] > 0:
            z = self.projector(pooled)
            parts["contrastive"] = nt_xent(z[: x.shape[0]], z[x.shape[0]:], self.temperature)
        loss = sum(self.weights[k] * v for k, v in parts.items())
        return SSLOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()}, views=views, reconstruction=recon)


class SSLTrainer(Trainer):
    """Adds each SSL loss's epoch mean to the epoch record (train.log and the history)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sums: dict[str, float] = {}
        self._count = 0

    def forward(self, batch: dict[str, Any]) -> Any:
        out = self.model(batch["image"])
        for k, v in out.parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1
        return out

    def on_epoch_start(self, epoch: int) -> None:
        self._sums, self._count = {}, 0

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        for k, v in self._sums.items():
            record[f"loss_{k}"] = v / max(self._count, 1)


def ssl_rows(ctx: StageContext) -> pd.DataFrame:
    """The rows SSL may read (:func:`pretraining_rows`), checked once more against the fold's
    validation and test patients.

    Raises:
        LeakageError: a validation or test patient would reach pretraining.
    """
    rows = pretraining_rows(ctx)
    held_out = set(ctx.rows(["val", "test"])["patient_id"].astype(str))
    shared = sorted(set(rows["patient_id"].astype(str)) & held_out)
    if shared:
        raise LeakageError(shared, "self-supervised pretraining would see validation/test patients")
    return rows


def ssl_pretrain_stage(config_path: str | Path, task: str, split_path: str | Path, fold: int,
                       out_dir: str | Path) -> Path:
    """Pretrain the CSwin encoder of fold ``fold`` -> ``out_dir/encoder.safetensors``.

    Writes ``encoder.safetensors`` + ``encoder.json`` (settings, per-task losses per epoch,
    the splits and number of patients seen, provenance), ``inpainting.png`` (views and
    reconstructions when inpainting is on), ``train.log`` and ``checkpoints/`` (resumable).
    """
    ctx = fold_context(config_path, task, split_path, fold)
    scfg = ctx.tcfg["ssl"]
    cfg = TrainConfig.from_study(ctx.study, scfg["train"])
    seed_everything(cfg.seed, cfg.deterministic)
    rows = ssl_rows(ctx)
    dataset = volume_dataset(ctx, rows, augment=True, with_mask=False)
    in_chans = int(dataset[0]["image"].shape[0])
    enc_cfg = encoder_config(ctx.tcfg["cswin"])
    model = MultiTaskSSL(CSwinEncoder(in_chans=in_chans, **enc_cfg), in_chans, scfg["tasks"],
                         mask_ratio=scfg["mask_ratio"], mask_size=scfg["mask_size"],
                         temperature=scfg["temperature"])
    out_dir = Path(out_dir)
    trainer = SSLTrainer(model, dataset, None, cfg, out_dir, loss_fn=lambda out, batch: out.loss)
    recipe = {**{k: v for k, v in scfg.items() if k != "train"}, "cswin": enc_cfg, "in_chans": in_chans,
              "roi_size": ctx.tcfg["roi_size"], "image_size": ctx.tcfg["image_size"], "fold": fold}
    result = trainer.fit(resume=recipe_unchanged(out_dir, recipe))
    figure = ""
    if model.weights["inpaint"] > 0:
        figure = save_inpainting(model.cpu(), volume_dataset(ctx, rows.head(2), with_mask=False, cache=False),
                                 out_dir / "inpainting.png", seed=cfg.seed).name
    history = [{k: v for k, v in h.items() if k.startswith(("epoch", "train_loss", "loss_"))} for h in result.history]
    meta = model_sidecar(ctx, "cswin_unet_ssl", split_path, stage="ssl_pretrain", fold=fold, in_chans=in_chans,
                         cswin=ctx.tcfg["cswin"], encoder=enc_cfg, ssl=scfg, ssl_tasks=[k for k in SSL_TASKS
                                                                                     if model.weights[k] > 0],
                         train_samples=len(rows), train_patients=int(rows["patient_id"].nunique()),
                         splits_seen=sorted(rows["split"].astype(str).unique().tolist()),
                         train_seconds=result.train_seconds, final_loss=result.history[-1]["train_loss"],
                         history=history, figure=figure)
    return save_weights(out_dir / "encoder.safetensors", model.encoder, meta)


@torch.no_grad()
def save_inpainting(model: MultiTaskSSL, dataset, path: str | Path, seed: int = 0) -> Path:
    """PNG: for up to 2 patches, the middle axial slice (first channel) of the clean patch,
    one corrupted view and its reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(2, len(dataset))
    x = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(n)]).float()
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(x)
    model.train(was)
    mid = x.shape[2] // 2
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        for j, (title, img) in enumerate((("patch", x[i]), ("rotated + masked view", out.views[i]),
                                          ("reconstruction", out.reconstruction[i]))):
            axes[i, j].imshow(np.asarray(img[0, mid]), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90, tight=False)
