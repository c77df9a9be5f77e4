"""The CPU fast depthwise convolution (without size-1 axes) against the plain module, its reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvit.cpu_ops.conv import depthwise_conv


@pytest.mark.parametrize("spatial", [(1, 7), (6, 1), (1, 1), (5, 4), (1, 6, 5), (6, 1, 1), (1, 1, 1), (3, 4, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_equals_the_module_with_gradients(spatial, bias):
    torch.manual_seed(0)
    conv_cls = nn.Conv2d if len(spatial) == 2 else nn.Conv3d
    conv = conv_cls(4, 4, 3, padding=1, groups=4, bias=bias).double()
    x = torch.randn(3, 4, *spatial, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (conv, lambda t: depthwise_conv(conv, t)):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), conv.weight.grad.clone(),
                        None if conv.bias is None else conv.bias.grad.clone()))
    for got, want in zip(results[1], results[0]):
        if want is not None:
            torch.testing.assert_close(got, want)


def test_depthwise_conv_channels_last_input_keeps_its_values():
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 1, 9).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(depthwise_conv(conv, x), conv(x))


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
                                  nn.Conv2d(4, 4, 3, padding=0, groups=4)])
def test_depthwise_conv_refuses_other_convolutions(conv):
    with pytest.raises(ValueError, match="depthwise"):
        depthwise_conv(conv, torch.randn(1, 4, 1, 5))
