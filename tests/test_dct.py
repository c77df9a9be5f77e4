"""DCT-HistoTransformer: the matmul DCT against scipy, its inverse, the compute saved by
dropping high frequencies (measured by the FLOP counter), and the registered models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from medvit.engine.compute import count_flops as model_flops
from medvit.models import count_parameters, create_model, list_models, model_spatial_dims
from medvit.models.dct import (
    DCTAttention,
    DCTHistoBlock,
    MobileConv,
    dct2,
    dct_attention_flops,
    dct_matrix,
    idct2,
    kept_size,
)


@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (2, 3, 16, 12)])
def test_dct2_matches_scipy_orthonormal_dct_ii(shape):
    x = np.random.default_rng(0).normal(size=shape)
    ours = dct2(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, dctn(x, type=2, norm="ortho", axes=(-2, -1)), atol=1e-10)
    # float32 on the same input: the model's precision
    ours32 = dct2(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(ours32, dctn(x, type=2, norm="ortho", axes=(-2, -1)), atol=1e-4)


def test_idct2_restores_the_input_and_matches_scipy():
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(idct2(dct2(x)), x)
    y = np.random.default_rng(1).normal(size=(4, 5))
    np.testing.assert_allclose(idct2(torch.from_numpy(y)).numpy(), idctn(y, type=2, norm="ortho"), atol=1e-10)


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(11, torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(11, dtype=torch.float64))


def test_truncated_dct_keeps_the_low_frequencies():
    x = torch.randn(3, 8, 10, dtype=torch.float64)
    full = dct2(x)
    torch.testing.assert_close(dct2(x, keep=(3, 4)), full[..., :3, :4])
    # the inverse of the kept corner is the low-pass signal: zero-filled coefficients, inverted
    padded = torch.zeros_like(full)
    padded[..., :3, :4] = full[..., :3, :4]
    torch.testing.assert_close(idct2(full[..., :3, :4], size=(8, 10)), idct2(padded))
    # a smooth (constant) image lives in the DC coefficient alone: nothing is lost
    flat = torch.full((8, 8), 2.5, dtype=torch.float64)
    torch.testing.assert_close(idct2(dct2(flat, keep=1), size=(8, 8)), flat)
    with pytest.raises(ValueError, match="kept frequencies"):
        dct2(x, keep=(9, 4))


def test_kept_size():
    assert kept_size(16, 16, 0.5) == (8, 8)
    assert kept_size(7, 7, 0.5) == (4, 4)
    assert kept_size(1, 1, 0.25) == (1, 1)
    assert kept_size(8, 8, 1.0) == (8, 8)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.25])
def test_counted_flops_of_the_dct_pathway_match_the_analytic_count(keep_ratio):
    attn = DCTAttention(32, num_heads=2, keep_ratio=keep_ratio)
    x = torch.randn(2, 32, 16, 16)
    assert model_flops(attn, x) == dct_attention_flops(32, 16, 16, keep_ratio, batch=2)


def test_keeping_fewer_frequencies_lowers_the_measured_flops():
    x = torch.randn(1, 64, 28, 28)
    counted = {r: model_flops(DCTAttention(64, num_heads=2, keep_ratio=r), x) for r in (1.0, 0.5, 0.25)}
    assert counted[1.0] > counted[0.5] > counted[0.25]
    # attention (quadratic in the N = k^2 kept tokens) dominates at full resolution: halving k per
    # side must cut the pathway's FLOPs by well over the 4x of the token count
    assert counted[1.0] / counted[0.5] > 5
    # and the whole block gets cheaper too
    blocks = {r: model_flops(DCTHistoBlock(64, 2, keep_ratio=r), x) for r in (1.0, 0.5)}
    assert blocks[1.0] - blocks[0.5] == counted[1.0] - counted[0.5]


def test_mobileconv_is_depthwise_separable():
    conv = MobileConv(16)
    assert conv.dw.groups == 16 and conv.pw.kernel_size == (1, 1)
    x = torch.randn(1, 16, 8, 8)
    assert conv(x).shape == x.shape
    # 2 * HW * C * (9 + C): depthwise 3x3 plus pointwise 1x1
    assert model_flops(conv, x) == 2 * 64 * 16 * (9 + 16)


@pytest.mark.parametrize("name", ["dct_histo_tiny", "mobilevit_xxs"])
@pytest.mark.parametrize("size", [32, 48])
def test_registered_models_classify_rgb_patches(name, size):
    assert name in list_models() and model_spatial_dims(name) == 2
    model = create_model(name, in_chans=3, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 4)


def test_dct_model_trains_and_is_lighter_than_vit_tiny():
    model = create_model("dct_histo_tiny", in_chans=3, num_classes=2, drop_path=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    vit = create_model("vit_tiny", in_chans=3, num_classes=2, img_size=64, patch_size=8)
    assert count_parameters(model)[0] < count_parameters(vit)[0]
    probe = torch.randn(1, 3, 64, 64)
    assert model_flops(model, probe) < model_flops(vit, probe)


def test_dct_works_under_inference_mode_then_autograd():
    # the cached DCT matrices must not become inference tensors
    from medvit.models.dct import _dct_matrix_cached

    _dct_matrix_cached.cache_clear()
    attn = DCTAttention(8, keep_ratio=0.5)
    with torch.inference_mode():
        attn(torch.randn(1, 8, 13, 13))
    x = torch.randn(1, 8, 13, 13, requires_grad=True)
    out = attn(x)
    assert not out.is_inference() and out.requires_grad
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("keep", [None, (3, 2), (1, 1)])
def test_dct2_and_idct2_of_channels_last_maps_match_the_standard_layout(keep):
    """The channels-last path (two matmuls on the (B, H, W, C) storage) gives the same values
    and gradients, and keeps the layout."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=layout).requires_grad_()
        f = dct2(xi, keep)
        y = idct2(f, (6, 4))
        (f.square().sum() + y.sin().sum()).backward()
        outs.append((f, y, xi.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want)
    f_cl = outs[1][0]
    assert f_cl.is_contiguous(memory_format=torch.channels_last)


def test_dct_model_runs_channels_last_on_the_cpu():
    model = create_model("dct_histo_tiny", in_chans=3, num_classes=2)
    seen = []
    model.stem.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert seen == [True]
    # the same function as on the standard layout, module by module
    stem_std = model.stem(x)
    torch.testing.assert_close(model.stem(x.contiguous(memory_format=torch.channels_last)), stem_std)
    assert y.shape == (2, 2)
