"""Model registry and baselines: built by name, right output shapes, no downloads."""

from __future__ import annotations

import pytest
import torch

from medvit.errors import ConfigError
from medvit.models import count_parameters, create_model, list_models, model_spatial_dims


def test_registry_lists_baselines():
    assert {"densenet121", "resnet18", "resnet10t", "unet3d"} <= set(list_models())


@pytest.mark.parametrize("name,in_chans,num_classes,shape", [
    ("densenet121", 1, 3, (2, 1, 32, 32)),
    ("resnet18", 3, 1, (2, 3, 32, 32)),
    ("resnet10t", 1, 4, (2, 1, 32, 32)),
])
def test_2d_classifiers_output_logits(name, in_chans, num_classes, shape):
    model = create_model(name, in_chans=in_chans, num_classes=num_classes).eval()
    assert model_spatial_dims(name) == 2
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (shape[0], num_classes)


def test_unet3d_outputs_a_map_of_the_input_size():
    model = create_model("unet3d", in_chans=3, num_classes=1, channels=(4, 8, 16)).eval()
    assert model_spatial_dims("unet3d") == 3
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ConfigError, match="densenet121"):
        create_model("not_a_model")


def test_parameter_count_respects_requires_grad():
    model = create_model("resnet10t", in_chans=1, num_classes=2)
    total, trainable = count_parameters(model)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == (total, trainable - sum(p.numel() for p in model.fc.parameters()))
