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
    flash_friendly_attention,
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


def test_attention_flops_are_counted_on_cpu():
    q = torch.randn(1, 2, 64, 8)
    flops = count_flops(lambda t: F.scaled_dot_product_attention(t, t, t), q)
    assert flops == 2 * (2 * 64 * 64 * 8) * 2  # Q K^T and A V, 2 FLOPs per multiply-add, 2 heads


@pytest.mark.parametrize("head_dim", [6, 16, 24])
def test_padded_flash_attention_is_plain_attention_and_counts_useful_flops(head_dim):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(3, 2, 40, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = flash_friendly_attention(q, k, v)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):  # the reference: no padding, the math kernel
        ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # FLOPs counted are those of the unpadded head dim (count_flops disables the flash kernel)
    flops = count_flops(lambda t: flash_friendly_attention(t, t, t), q.detach())
    assert flops == 2 * (2 * 40 * 40 * head_dim) * 2 * 3


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


def test_full_resolution_layers_compute_what_they_replace():
    """UnetBasicBlockLite is conv -> InstanceNorm3d(affine) -> LeakyReLU, and PointwiseConv3d is
    a 1x1x1 Conv3d (same state dict keys), in either memory layout."""
    from medvit.models.cswin import PointwiseConv3d, UnetBasicBlockLite

    torch.manual_seed(0)
    block = UnetBasicBlockLite(5, 4)
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.5, 0.5)
    norm = torch.nn.InstanceNorm3d(4, affine=True)
    norm.load_state_dict(block[1].state_dict())
    head = PointwiseConv3d(4, 2)
    conv = torch.nn.Conv3d(4, 2, 1)
    conv.load_state_dict(head.state_dict())
    x = torch.randn(2, 5, 8, 8, 8)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        xi = x.contiguous(memory_format=layout)
        want = F.leaky_relu(norm(F.conv3d(xi, block[0].weight, padding=1)), 0.01)
        torch.testing.assert_close(block(xi), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head(want.contiguous(memory_format=layout)), conv(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels,side,layout", [(8, 8, torch.channels_last_3d), (5, 8, torch.channels_last_3d),
                                                  (4, 3, torch.channels_last_3d), (8, 4, torch.contiguous_format)])
def test_instance_norm_leaky_relu_equals_the_modules_with_gradients(channels, side, layout):
    """The CPU path of instance_norm_leaky_relu (rows of 128 floats when C divides 128, else of
    C) gives GroupNorm(C, C) + LeakyReLU's output and gradients, also when the incoming gradient
    is a channel slice of a concatenation (as in CSwinUNet's skip branch)."""
    from medvit.models.cswin import instance_norm_leaky_relu

    torch.manual_seed(0)
    norm, act = torch.nn.GroupNorm(channels, channels), torch.nn.LeakyReLU(0.01)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, channels, side, side, side) * 2 + 1).contiguous(memory_format=layout)
    upstream = torch.randn(3, 2 * channels, side, side, side).contiguous(memory_format=torch.channels_last_3d)
    results = []
    for fn in (lambda t: act(norm(t)), lambda t: instance_norm_leaky_relu(t, norm, act)):
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        out = fn(xi)
        torch.cat([out, out * 0.5], dim=1).backward(upstream)  # out's gradient: a channel slice
        results.append((out.detach(), xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    for name, got, want in zip(("output", "input grad", "weight grad", "bias grad"), results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=name)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last_3d)


def test_instance_norm_leaky_relu_under_bf16_autocast_is_computed_in_fp32():
    """As autocast runs GroupNorm in fp32: a bf16 convolution output is normalised in fp32, and
    the gradient reaching the bf16 input is bf16."""
    from medvit.models.cswin import instance_norm_leaky_relu

    torch.manual_seed(0)
    norm, act = torch.nn.GroupNorm(8, 8), torch.nn.LeakyReLU(0.01)
    x = torch.randn(2, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = instance_norm_leaky_relu(xb, norm, act)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, act(norm(xb.detach().float())))
    out.sum().backward()
    assert xb.grad.dtype == torch.bfloat16
