"""CSwin-UNet: a UNet whose encoder stages are cross-shaped-window transformer blocks, for
3D bpMRI lesion segmentation (Li et al., "Cross-Shaped Windows Transformer with
Self-supervised Pretraining for Clinically Significant Prostate Cancer Detection in
Bi-parametric MRI"; CSWin attention from Dong et al., CVPR 2022).

Cross-shaped window attention splits the heads (and their channels) into groups, one per
*stripe axis*. A group attends within stripes that are ``split_size`` voxels wide along its
axis and span the whole volume along every other axis; with the in-plane axes (H, W) this
is CSWin's horizontal/vertical stripes, extended through the slices (D). Each group adds
the locally-enhanced positional encoding (LePE) of CSWin: a depthwise 3x3x3 convolution of
its values inside the stripe. When a stripe is as wide as its axis, the group attends over
the whole volume (plain multi-head self-attention plus LePE).

Simplifications against the paper (documented in docs/prostate.md):

* 3D is handled by extending the 2D stripes through the slice axis (a stripe of the H group
  is ``D x split_size x W``); ``stripe_axes=(0, 1, 2)`` adds a third group along D.
* The stem is one overlapping 3x3x3 convolution of stride 2 (CSWin: 7x7 stride 4) and stages
  are joined by 3x3x3 stride-2 convolutions, so 32^3 volumes keep 4 stages.
* The decoder is SwinUNETR's (MONAI ``UnetrUpBlock`` residual blocks with transposed-conv
  upsampling and skips from every stage) down to half resolution; full resolution gets a
  thin convolutional skip from the input and one fusing convolution.

CPU fast paths of the building blocks live in :mod:`medvit.cpu_ops`, each beside its plain
reference: the stripes' attention (``flash_friendly_attention``, plain SDPA with narrow heads
padded), the full-resolution blocks (``UnetBasicBlockLite``: convolution, instance norm,
LeakyReLU) and the 1x1x1 head (``PointwiseConv3d``).

Shapes: input (B, C_in, D, H, W) with D, H, W divisible by 2 ** len(depths); output
(B, num_classes, D, H, W) lesion logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetResBlock, UnetrUpBlock
from timm.layers import DropPath, Mlp
from torch import nn

from medvit.cpu_ops.attention import flash_friendly_attention
from medvit.cpu_ops.conv import PointwiseConv3d, UnetBasicBlockLite, depthwise_conv
from medvit.models.registry import register_model

AXIS_NAMES = ("D", "H", "W")


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * n_windows, wd * wh * ww, C) for a window (wd, wh, ww) that divides (D, H, W)."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * n_windows, T, C) -> (B, D, H, W, C)."""
    B, D, H, W = shape
    wd, wh, ww = window
    x = windows.view(B, D // wd, H // wh, W // ww, wd, wh, ww, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, D, H, W, -1)


def stripe_window(axis: int, split_size: int, spatial: Sequence[int]) -> tuple[int, int, int]:
    """The window of a stripe along ``axis`` (0=D, 1=H, 2=W): ``split_size`` voxels along it
    (the whole axis when ``split_size`` is larger), the whole extent along the others.

    Raises:
        ValueError: the axis length is not a multiple of the stripe width.
    """
    width = min(int(split_size), int(spatial[axis]))
    if spatial[axis] % width:
        raise ValueError(f"CSwin stripe width {width} does not divide axis {AXIS_NAMES[axis]} of length "
                         f"{spatial[axis]}: choose split_size dividing every stage's feature size")
    return tuple(width if a == axis else int(spatial[a]) for a in range(3))  # type: ignore[return-value]


def locally_enhanced_positions(conv: nn.Conv3d, v: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """CSWin's LePE: the depthwise 3x3x3 convolution ``conv`` of the values inside each window,
    zero-padded at the window border. (n_windows, T, C) tokens of windows (wd, wh, ww) -> same.

    The tokens are read as a channels-last volume (a view, no copy); stripes one voxel thin
    are convolved in 2D (:func:`medvit.cpu_ops.conv.depthwise_conv`), faster on the CPU than
    oneDNN's 3D depthwise kernel.
    """
    n, t, C = v.shape
    x = depthwise_conv(conv, v.view(n, *window, C).movedim(-1, 1))
    return x.movedim(1, -1).reshape(n, t, C)


class CrossShapedWindowAttention(nn.Module):
    """Multi-head self-attention in cross-shaped windows with LePE, on channel-last tokens.

    Args:
        dim: channels C.
        num_heads: heads in all; divided equally among ``stripe_axes`` (as are the channels).
        split_size: stripe width in voxels (clamped to the axis length).
        stripe_axes: spatial axes (0=D, 1=H, 2=W) that get a head group each.
        qkv_bias: bias of the query/key/value projection.
        attn_drop: attention dropout (training only).
        proj_drop: dropout after the output projection.

    Shapes: (B, D, H, W, C) -> (B, D, H, W, C).
    """

    def __init__(self, dim: int, num_heads: int, split_size: int = 2, stripe_axes: Sequence[int] = (1, 2),
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        axes = tuple(int(a) for a in stripe_axes)
        if not axes or len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"stripe_axes must be distinct axes among 0 (D), 1 (H), 2 (W); got {stripe_axes}")
        if num_heads % len(axes) or dim % num_heads:
            raise ValueError(f"CSwin attention with {len(axes)} stripe axes needs num_heads divisible by "
                             f"{len(axes)} and dim divisible by num_heads; got dim {dim}, num_heads {num_heads}")
        self.dim, self.num_heads, self.split_size, self.stripe_axes = dim, num_heads, int(split_size), axes
        self.branch_dim, self.branch_heads = dim // len(axes), num_heads // len(axes)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.ModuleList(nn.Conv3d(self.branch_dim, self.branch_dim, 3, padding=1, groups=self.branch_dim)
                                  for _ in axes)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int, int],
                lepe: nn.Conv3d) -> torch.Tensor:
        B, D, H, W, C = q.shape
        heads, hd = self.branch_heads, C // self.branch_heads
        qw, kw, vw = (window_partition(t, window) for t in (q, k, v))  # (N, T, C)
        n, t = qw.shape[:2]
        pos = locally_enhanced_positions(lepe, vw, window)

        def split(z: torch.Tensor) -> torch.Tensor:  # (N, T, C) -> (N, heads, T, hd)
            return z.view(n, t, heads, hd).transpose(1, 2)

        out = flash_friendly_attention(split(qw), split(kw), split(vw),
                                       dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, t, C) + pos
        return window_reverse(out, window, (B, D, H, W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:4]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        c = self.branch_dim
        outs = [self._branch(q[..., i * c:(i + 1) * c], k[..., i * c:(i + 1) * c], v[..., i * c:(i + 1) * c],
                             stripe_window(axis, self.split_size, spatial), self.lepe[i])
                for i, axis in enumerate(self.stripe_axes)]
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))


class CSwinBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(CSwinAttention(LN(x))), x + DropPath(MLP(LN(x))).
    Shapes: (B, D, H, W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, split_size: int, stripe_axes: Sequence[int] = (1, 2),
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedWindowAttention(dim, num_heads, split_size, stripe_axes, attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvDown(nn.Module):
    """Overlapping 3x3x3 stride-2 convolution + LayerNorm: the stem (channel-first in) and the
    merging between stages (channel-last in). Output (B, D/2, H/2, W/2, C_out) channel-last."""

    def __init__(self, in_dim: int, out_dim: int, channel_last_input: bool):
        super().__init__()
        self.channel_last_input = channel_last_input
        self.conv = nn.Conv3d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last_input:
            x = x.permute(0, 4, 1, 2, 3)
        return self.norm(self.conv(x).permute(0, 2, 3, 4, 1))


class CSwinEncoder(nn.Module):
    """Stem + CSwin stages; the part of CSwin-UNet that self-supervised pretraining trains.

    Args:
        in_chans: input channels (3 for T2w, ADC, HBV).
        embed_dim: channels of the first stage; stage i has ``embed_dim * 2 ** i``.
        depths: CSwin blocks per stage.
        num_heads: heads per stage.
        split_size: stripe width per stage (clamped to the feature size: the last stage of
            CSWin attends globally).
        stripe_axes: axes that get a head group (0=D, 1=H, 2=W).
        mlp_ratio: MLP hidden size / dim.
        drop_path: stochastic depth rate, growing linearly to this value over the blocks.

    Shapes: (B, in_chans, D, H, W) -> list of stage features, stage i (B, embed_dim * 2**i,
    D / 2**(i+1), H / 2**(i+1), W / 2**(i+1)), channel-first.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 12, depths: Sequence[int] = (1, 1, 1, 1),
                 num_heads: Sequence[int] = (2, 2, 4, 4), split_size: Sequence[int] = (1, 2, 4, 8),
                 stripe_axes: Sequence[int] = (1, 2), mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        if not len(depths) == len(num_heads) == len(split_size):
            raise ValueError(f"depths, num_heads and split_size need one value per stage; got {list(depths)}, "
                             f"{list(num_heads)}, {list(split_size)}")
        self.dims = [embed_dim * 2**i for i in range(len(depths))]
        self.stem = ConvDown(in_chans, self.dims[0], channel_last_input=False)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages, self.downs = nn.ModuleList(), nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*(
                CSwinBlock(self.dims[i], num_heads[i], split_size[i], stripe_axes, mlp_ratio, rates[start + j])
                for j in range(depth))))
            start += depth
            if i + 1 < len(depths):
                self.downs.append(ConvDown(self.dims[i], self.dims[i + 1], channel_last_input=True))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in self.dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features.append(self.norms[i](x).permute(0, 4, 1, 2, 3))  # channels_last_3d strides
            if i < len(self.downs):
                x = self.downs[i](x)
        return features


class CSwinUNet(nn.Module):
    """CSwin encoder + SwinUNETR-style convolutional decoder with skips (module docstring).

    ``encoder`` is a :class:`CSwinEncoder` (the pretrained part); everything else trains
    from scratch. Shapes: (B, in_chans, D, H, W) -> (B, num_classes, D, H, W) logits.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1, skip_channels: int = 8, **encoder_kwargs):
        super().__init__()
        self.encoder = CSwinEncoder(in_chans=in_chans, **encoder_kwargs)
        dims = self.encoder.dims
        self.divisor = 2 ** len(dims)
        # one-group GroupNorm: the deepest level of a 16^3 or 32^3 patch can be a single voxel,
        # where instance norm is undefined
        self.bottleneck = UnetResBlock(3, dims[-1], dims[-1], kernel_size=3, stride=1,
                                       norm_name=("group", {"num_groups": 1}))
        self.ups = nn.ModuleList(UnetrUpBlock(3, dims[i + 1], dims[i], kernel_size=3, upsample_kernel_size=2,
                                              norm_name="instance", res_block=True)
                                 for i in reversed(range(len(dims) - 1)))
        # Full resolution is kept light (a thin input skip and one fusing convolution): there
        # the decoder's convolutions would cost more than the whole transformer encoder.
        self.skip0 = UnetBasicBlockLite(in_chans, skip_channels)
        self.up0 = nn.ConvTranspose3d(dims[0], skip_channels, kernel_size=2, stride=2)
        self.fuse = UnetBasicBlockLite(2 * skip_channels, skip_channels)
        self.head = PointwiseConv3d(skip_channels, num_classes)
        # channels_last_3d convolution weights: oneDNN then runs every 3D convolution in that
        # layout (see forward); state dicts are unaffected (checkpoints store contiguous copies)
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"CSwin-UNet input {tuple(x.shape[2:])}: every spatial size must be divisible by "
                             f"{self.divisor} (2 ** stages)")
        # channels_last_3d end to end: the encoder's channel-last tokens permute to it for
        # free, and oneDNN's 3D convolutions run faster in it on the CPU
        x = x.contiguous(memory_format=torch.channels_last_3d)
        feats = self.encoder(x)
        y = self.bottleneck(feats[-1])
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            y = up(y, skip)
        y = torch.cat([self.up0(y), self.skip0(x)], dim=1)
        return self.head(self.fuse(y))


def _encoder_kwargs(kwargs: dict) -> dict:
    """The architecture settings given (None: the default); an unknown name is an error, so a
    misspelt key in a study's ``cswin`` block cannot pass unnoticed."""
    unknown = sorted(set(kwargs) - {*ENCODER_KEYS, "skip_channels"})
    if unknown:
        raise TypeError(f"CSwin-UNet got unexpected argument(s): {', '.join(unknown)}")
    return {k: v for k, v in kwargs.items() if v is not None}


@register_model(spatial_dims=3)
def cswin_unet(in_chans: int = 3, num_classes: int = 1, **kwargs) -> nn.Module:
    """CSwin-UNet (random init). Keyword arguments of :class:`CSwinEncoder` (``embed_dim``,
    ``depths``, ``num_heads``, ``split_size``, ``stripe_axes``, ``mlp_ratio``, ``drop_path``)
    set the encoder, ``skip_channels`` the decoder; any other name is a ``TypeError``."""
    return CSwinUNet(in_chans=in_chans, num_classes=num_classes, **_encoder_kwargs(kwargs))


@register_model(spatial_dims=3)
def cswin_unet_ssl(in_chans: int = 3, num_classes: int = 1, **kwargs) -> nn.Module:
    """The same CSwin-UNet; as a study model name it means "encoder initialised from the
    task's multi-task self-supervised pretraining" (done by the training stage)."""
    return CSwinUNet(in_chans=in_chans, num_classes=num_classes, **_encoder_kwargs(kwargs))


ENCODER_KEYS = ("embed_dim", "depths", "num_heads", "split_size", "stripe_axes", "mlp_ratio", "drop_path")


def encoder_config(cswin: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of a CSwin-UNet config (``tasks.prostate.cswin``): what must match
    between an SSL-pretrained encoder and the network it initialises."""
    return {k: cswin[k] for k in ENCODER_KEYS if k in cswin}
