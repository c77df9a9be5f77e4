"""Convolution layers with CPU fast paths, each with the same parameters and state dict as
the plain layer it replaces and its reference beside it:

* :class:`PointwiseConv3d`: a 1x1x1 ``nn.Conv3d`` computed as a matrix product over the
  channels (:func:`reference_pointwise_conv3d`: the Conv3d itself). oneDNN's 1x1x1 Conv3d with
  few output channels is slow on the CPU, mostly in its backward pass.
* :class:`UnetBasicBlockLite`: 3x3x3 convolution + instance norm + LeakyReLU in
  channels_last_3d, the norm and activation in one pass
  (:func:`medvit.cpu_ops.norm.instance_norm_leaky_relu`); reference
  :func:`reference_unet_basic_block_lite` (the three modules one after the other).

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
