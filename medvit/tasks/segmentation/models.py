"""The networks of the segmentation stages: a model from the task config, the k fold models as
one ensemble (:class:`FoldEnsemble`), and a saved model (or ensemble) loaded back for inference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvit.config import CSWIN_MODELS
from medvit.engine import load_weights
from medvit.errors import CheckpointError
from medvit.models import create_model
from medvit.tasks.common import read_sidecar


def model_kwargs(tcfg: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Architecture settings of a model from the task config (``cswin`` for CSwin-UNets)."""
    return dict(tcfg.get("cswin", {})) if model_name in CSWIN_MODELS else {}


def build_model(tcfg: dict[str, Any], model_name: str, in_chans: int) -> nn.Module:
    return create_model(model_name, in_chans=in_chans, num_classes=1, **model_kwargs(tcfg, model_name))


class FoldEnsemble(nn.Module):
    """The k fold models of one architecture as one network: the mean of their lesion
    probabilities, returned as logits. Shapes: (B, C, D, H, W) -> (B, 1, D, H, W)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([m(x).float().sigmoid() for m in self.members]).mean(0)
        return torch.logit(prob.clamp(1e-6, 1 - 1e-6))


def _load_model(weights: str | Path, model_name: str, tcfg: dict[str, Any], device: torch.device) -> nn.Module:
    meta = read_sidecar(weights)
    if "in_chans" not in meta:
        raise CheckpointError(f"{weights}: its model.json lacks in_chans; retrain the model")
    members = int(meta.get("members", 0))

    def build() -> nn.Module:
        return create_model(model_name, in_chans=int(meta["in_chans"]), num_classes=1,
                            **meta.get("model_kwargs", model_kwargs(tcfg, model_name)))

    model: nn.Module = FoldEnsemble([build() for _ in range(members)]) if members else build()
    load_weights(weights, model)
    return model.to(device).eval()
