"""Models: one file per family, chosen by name through the registry."""

from medvit.models.registry import count_parameters, create_model, list_models, model_spatial_dims, register_model

__all__ = ["count_parameters", "create_model", "list_models", "model_spatial_dims", "register_model"]
