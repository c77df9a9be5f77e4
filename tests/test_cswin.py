"""CSwin-UNet: cross-shaped window attention against a direct reference, the UNet's shapes,
and the MONAI baselines building and running."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvit.engine.compute import count_flops
from medvit.models import create_model, model_spatial_dims
from medvit.models.cswin import (
    CrossShapedWindowAttention,
    CSwinUNet,
    window_partition,
    window_reverse,
)


def reference_attention(attn: CrossShapedWindowAttention, x: torch.Tensor, allowed: list[torch.Tensor]) -> torch.Tensor:
    """Plain softmax attention over all D*H*W tokens with an explicit (T, T) mask per head
    group (``allowed[i]``), plus the group's LePE, written without window partitioning."""
    B, D, H, W, C = x.shape
    T = D * H * W
    q, k, v = attn.qkv(x).reshape(B, T, 3 * C).chunk(3, dim=-1)
    c, heads = attn.branch_dim, attn.branch_heads
    hd = c // heads
    outs = []
    for i, mask in enumerate(allowed):
        sl = slice(i * c, (i + 1) * c)
        qi, ki, vi = (t[..., sl].reshape(B, T, heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = (qi @ ki.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ vi).transpose(1, 2).reshape(B, T, c)
        outs.append(out)
    return torch.cat(outs, -1)


def lepe_full(attn: CrossShapedWindowAttention, x: torch.Tensor, i: int) -> torch.Tensor:
    B, D, H, W, C = x.shape
    c = attn.branch_dim
    v = attn.qkv(x)[..., 2 * C:][..., i * c:(i + 1) * c]
    return attn.lepe[i](v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).reshape(B, D * H * W, c)


@pytest.mark.parametrize("axes", [(1, 2), (0, 1, 2), (2,)])
def test_stripe_as_wide_as_the_axis_is_full_attention(axes):
    torch.manual_seed(0)
    D, H, W = 2, 4, 4
    attn = CrossShapedWindowAttention(dim=12, num_heads=len(axes) * 2, split_size=4, stripe_axes=axes).eval()
    x = torch.randn(2, D, H, W, 12)
    T = D * H * W
    everything = torch.ones(T, T, dtype=torch.bool)
    ref = reference_attention(attn, x, [everything] * len(axes))
    ref = ref + torch.cat([lepe_full(attn, x, i) for i in range(len(axes))], -1)
    expected = attn.proj(ref).reshape(2, D, H, W, 12)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


def test_narrow_stripes_restrict_attention_to_the_stripe():
    torch.manual_seed(1)
    D, H, W, sw = 2, 4, 6, 2
    attn = CrossShapedWindowAttention(dim=8, num_heads=2, split_size=sw, stripe_axes=(1, 2)).eval()
    # LePE off: compare the attention part alone
    for conv in attn.lepe:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(1, D, H, W, 8)
    _, h, w = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij")
    h, w = h.reshape(-1), w.reshape(-1)
    same_h_stripe = (h[:, None] // sw) == (h[None, :] // sw)
    same_w_stripe = (w[:, None] // sw) == (w[None, :] // sw)
    expected = attn.proj(reference_attention(attn, x, [same_h_stripe, same_w_stripe])).reshape(1, D, H, W, 8)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)
    # and it differs from full attention (the stripes do restrict)
    full = attn.proj(reference_attention(attn, x, [torch.ones_like(same_h_stripe)] * 2)).reshape(1, D, H, W, 8)
    assert not torch.allclose(attn(x), full, atol=1e-3)


def test_window_partition_round_trip():
    x = torch.randn(2, 4, 6, 8, 3)
    for win in [(4, 2, 8), (1, 6, 2), (4, 6, 8)]:
        torch.testing.assert_close(window_reverse(window_partition(x, win), win, (2, 4, 6, 8)), x)


def test_stripe_width_must_divide_the_axis():
    attn = CrossShapedWindowAttention(dim=8, num_heads=2, split_size=3)
    with pytest.raises(ValueError, match="does not divide"):
        attn(torch.randn(1, 2, 4, 4, 8))


def test_cswin_unet_shapes_and_encoder():
    model = create_model("cswin_unet", in_chans=3, num_classes=1, embed_dim=8, num_heads=[2, 2, 2, 2])
    assert isinstance(model, CSwinUNet) and model_spatial_dims("cswin_unet") == 3
    x = torch.randn(1, 3, 16, 32, 32)
    y = model(x)
    assert y.shape == (1, 1, 16, 32, 32)
    feats = model.encoder(x)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64] and feats[-1].shape[2:] == (1, 2, 2)
    y.mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    # a 16^3 patch leaves one voxel at the bottleneck: still trains (no instance norm there)
    assert model.train()(torch.randn(2, 3, 16, 16, 16)).shape == (2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 3, 8, 32, 32))


def test_full_resolution_layers_keep_the_plain_layers_state_dict():
    """The CPU fast paths of the full-resolution blocks and the head (medvit.cpu_ops, checked
    against their references in tests/test_cpu_ops.py) store what nn.Conv3d, nn.GroupNorm and
    a 1x1x1 nn.Conv3d store: weights files stay interchangeable."""
    model = CSwinUNet(in_chans=3, num_classes=2, skip_channels=8)
    state = model.state_dict()
    keys = {k for k in state if k.startswith(("skip0.", "fuse.", "head."))}
    assert keys == {"skip0.0.weight", "skip0.1.weight", "skip0.1.bias", "fuse.0.weight", "fuse.1.weight",
                    "fuse.1.bias", "head.weight", "head.bias"}
    assert state["head.weight"].shape == (2, 8, 1, 1, 1) and state["skip0.0.weight"].shape == (8, 3, 3, 3, 3)


def test_attention_flops_are_counted_on_cpu():
    q = torch.randn(1, 2, 64, 8)
    flops = count_flops(lambda t: F.scaled_dot_product_attention(t, t, t), q)
    assert flops == 2 * (2 * 64 * 64 * 8) * 2  # Q K^T and A V, 2 FLOPs per multiply-add, 2 heads


@pytest.mark.parametrize("name", ["swin_unetr", "dynunet", "attention_unet", "unet3d", "cswin_unet_ssl"])
def test_baselines_segment_a_patch(name):
    model = create_model(name, in_chans=3, num_classes=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


def test_lepe_of_thin_windows_equals_the_plain_depthwise_convolution():
    """The thin-axis shortcut of LePE gives the zero-padded 3x3x3 depthwise convolution, and
    the same gradients for the values and the kernel."""
    from medvit.models.cswin import locally_enhanced_positions

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 4, 3, padding=1, groups=4)
    for window in ((6, 5, 1), (6, 1, 5), (1, 6, 5), (1, 1, 5), (5, 1, 1), (1, 1, 1), (4, 3, 2)):
        t = window[0] * window[1] * window[2]
        v = torch.randn(3, t, 4, requires_grad=True)
        grads = []
        for plain in (False, True):
            conv.zero_grad(set_to_none=True)
            v.grad = None
            out = (conv(v.transpose(1, 2).reshape(3, 4, *window)).reshape(3, 4, t).transpose(1, 2) if plain
                   else locally_enhanced_positions(conv, v, window))
            out.square().sum().backward()
            grads.append((out.detach(), v.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)
