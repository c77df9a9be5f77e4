"""Small layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


class InputStandardize(nn.Module):
    """Per-channel standardisation of a model's input, ``(x - mean) / std``, as part of the
    model: the statistics are buffers, so they travel in the weights file and every consumer
    of the model (evaluation, inference, export) applies the preprocessing it was trained with.

    Starts as the identity (mean 0, std 1); :meth:`set_statistics` stores the training
    split's values. Shapes: x (B, C, *spatial) -> same shape; ``mean``/``std`` (C,).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def set_statistics(self, mean, std) -> None:
        """Store per-channel ``mean`` and ``std`` (sequences of C floats; std floored at 1e-6)."""
        mean = torch.as_tensor(mean, dtype=self.mean.dtype).reshape(-1)
        std = torch.as_tensor(std, dtype=self.std.dtype).reshape(-1).clamp_min(1e-6)
        if mean.numel() != self.mean.numel() or std.numel() != self.std.numel():
            raise ValueError(f"statistics for {mean.numel()}/{std.numel()} channels, the model has {self.mean.numel()}")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def statistics(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}`` as plain floats (for model cards)."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward`: standardised values back to the input's units."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.std.view(shape).to(x.dtype) + self.mean.view(shape).to(x.dtype)


def _standardize_input(module: nn.Module, args: tuple) -> tuple:
    # a module-level function, not a closure: deepcopies of the model (EMA, device moves)
    # then standardise with their own buffers
    return (module.input_norm(args[0]), *args[1:])


def add_input_standardization(model: nn.Module, channels: int) -> nn.Module:
    """Give ``model`` an ``input_norm`` (:class:`InputStandardize`, identity until set) applied
    to its input by a forward pre-hook; the state dict gains ``input_norm.mean``/``.std``.
    Returns ``model``."""
    model.input_norm = InputStandardize(channels)
    model.register_forward_pre_hook(_standardize_input)
    return model


def input_statistics(model: nn.Module) -> dict[str, list[float]] | None:
    """The model's stored input standardisation, or None when it has none."""
    norm = getattr(model, "input_norm", None)
    return norm.statistics() if isinstance(norm, InputStandardize) else None
