"""A tiny timm-style registry: model names (as written in study configs) -> builders.

Builders take keyword arguments only (``in_chans``, ``num_classes`` and family-specific
ones) and return an ``nn.Module`` that knows nothing of files or configs::

    @register_model
    def resnet18(in_chans: int = 3, num_classes: int = 1, **kwargs) -> nn.Module: ...

    model = create_model("resnet18", in_chans=1, num_classes=2)
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from medvit.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_SPATIAL_DIMS: dict[str, int] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, spatial_dims: int = 2):
    """Register ``fn`` under its function name. Use bare or as ``@register_model(spatial_dims=3)``."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if f.__name__ in _REGISTRY:
            raise ValueError(f"model {f.__name__!r} registered twice")
        _REGISTRY[f.__name__] = f
        _SPATIAL_DIMS[f.__name__] = spatial_dims
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # importing every family module of medvit.models runs its @register_model decorators
    import importlib
    import pkgutil

    import medvit.models as package  # here, not at the top: every model module imports this one

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"medvit.models.{info.name}")


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_spatial_dims(name: str) -> int:
    _ensure_loaded()
    _check(name)
    return _SPATIAL_DIMS[name]


def _check(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (never downloads weights)."""
    _ensure_loaded()
    _check(name)
    return _REGISTRY[name](**kwargs)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
