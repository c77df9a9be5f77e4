"""Convolution layers with CPU fast paths, each with the same parameters and state dict as
the plain layer it replaces and its reference beside it:

* :class:`PointwiseConv3d`: a 1x1x1 ``nn.Conv3d`` computed as a matrix product over the
  channels (:func:`reference_pointwise_conv3d`: the Conv3d itself). oneDNN's 1x1x1 Conv3d with
  few output channels is slow on the CPU, mostly in its backward pass.
* :class:`UnetBasicBlockLite`: 3x3x3 convolution + instance norm + LeakyReLU in
  channels_last_3d, the norm and activation in one pass
  (:func:`medvit.cpu_ops.norm.instance_norm_leaky_relu`); reference
  :func:`reference_unet_basic_block_lite` (the three modules one after the other).

* :func:`depthwise_conv`: a depthwise "same" convolution computed without the spatial axes of
  size 1 (reference: the module itself, ``conv(x)``); oneDNN's depthwise backward is slow on
  thin maps. Used by CSwin's locally-enhanced positions and DCT-HistoTransformer's positions.

Measured gains: docs/performance.md (CSwin-UNet rounds) and docs/prostate.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvit.cpu_ops.norm import instance_norm_leaky_relu


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 convolution computed as a matrix product over the channels (same parameters
    and state dict as ``nn.Conv3d(in, out, 1)``). (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


def reference_pointwise_conv3d(layer: PointwiseConv3d, x: torch.Tensor) -> torch.Tensor:
    """The plain reference of :class:`PointwiseConv3d`: ``nn.Conv3d``'s own forward with the
    same weights."""
    return nn.Conv3d.forward(layer, x)


class UnetBasicBlockLite(nn.Sequential):
    """3x3x3 convolution + instance norm + LeakyReLU (one layer of nnU-Net's basic block).

    Runs in channels_last_3d (oneDNN's 3D convolution is faster there on the CPU); instance
    norm is a GroupNorm with one group per channel (the same function and parameters as an
    affine InstanceNorm3d, which would copy to the standard layout and back), computed with
    the activation by :func:`medvit.cpu_ops.norm.instance_norm_leaky_relu`.
    (B, C_in, D, H, W) -> (B, C_out, D, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.GroupNorm(out_channels, out_channels), nn.LeakyReLU(0.01, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        return instance_norm_leaky_relu(conv(x.contiguous(memory_format=torch.channels_last_3d)), norm, act)


def reference_unet_basic_block_lite(block: UnetBasicBlockLite, x: torch.Tensor) -> torch.Tensor:
    """The plain reference of :class:`UnetBasicBlockLite`: its convolution, GroupNorm and
    LeakyReLU modules one after the other, in the input's layout."""
    return nn.Sequential.forward(block, x)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def depthwise_conv(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise convolution with stride 1, no dilation and "same" zero
    padding (odd kernel, padding ``k // 2``), computed without the spatial axes of size 1.

    Along an axis of size 1 only the kernel's centre tap meets data (the others meet the zero
    padding), so such axes are dropped and the rest convolved with the kernel's centre slice
    (a lower-dimensional convolution; with no axis left, a per-channel scale). Same result and
    gradients as ``conv(x)``, its reference (tests/test_layers.py), and faster on the CPU.

    Shapes: x (B, C, *spatial) with 2 or 3 spatial axes -> same shape.
    """
    nd = x.dim() - 2
    if (conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or set(conv.stride) != {1}
            or set(conv.dilation) != {1} or list(conv.padding) != [k // 2 for k in conv.kernel_size]
            or any(k % 2 == 0 for k in conv.kernel_size) or conv.padding_mode != "zeros"):
        raise ValueError(f"depthwise_conv needs a depthwise, stride-1, 'same'-padded convolution; got {conv}")
    wide = [a for a, size in enumerate(x.shape[2:]) if size != 1]
    if len(wide) == nd:
        return conv(x)
    centre = (slice(None), slice(None), *(slice(None) if a in wide else conv.kernel_size[a] // 2 for a in range(nd)))
    weight = conv.weight[centre]
    squeezed = x.reshape(*x.shape[:2], *(x.shape[2 + a] for a in wide))
    if wide:
        y = _CONV[len(wide)](squeezed, weight, conv.bias, padding=[conv.padding[a] for a in wide], groups=conv.groups)
    else:
        y = squeezed * weight.view(1, -1) + (0 if conv.bias is None else conv.bias)
    return y.reshape(x.shape)
