"""Masked autoencoder: shapes, exact per-sample masking, encoder on visible patches only,
loss on masked patches only, it learns, and its encoder initialises a ViT."""

from __future__ import annotations

import pytest
import torch

from medvit.models import create_model
from medvit.models.mae import MaskedAutoencoder, build_mae


def tiny_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return build_mae("vit_tiny", in_chans=1, img_size=32, patch_size=8, **kw)


def test_shapes_and_patchify_roundtrip():
    mae = tiny_mae()
    x = torch.rand(3, 1, 32, 32)
    out = mae(x)
    assert mae.num_patches == 16
    assert out.pred.shape == (3, 16, 64) and out.mask.shape == (3, 16) and out.loss.ndim == 0
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)
    # patch order is the encoder's: patch 1 is the top row, second column
    assert torch.equal(mae.patchify(x)[:, 1], x[:, 0, :8, 8:16].reshape(3, 64))


@pytest.mark.parametrize("ratio,visible", [(0.9, 2), (0.75, 4), (0.5, 8)])
def test_mask_keeps_exactly_the_configured_fraction_per_sample(ratio, visible):
    mae = tiny_mae(mask_ratio=ratio)
    out = mae(torch.rand(6, 1, 32, 32))
    assert mae.num_visible() == visible
    assert torch.all(out.mask.sum(1) == 16 - visible)          # per sample, not on average
    assert len({tuple(m.tolist()) for m in out.mask}) > 1       # a different choice per sample
    assert set(out.mask.unique().tolist()) == {0.0, 1.0}


def test_encoder_sees_visible_patches_only():
    mae = tiny_mae(mask_ratio=0.75)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    mae(torch.rand(2, 1, 32, 32))
    assert seen == [torch.Size([2, 1 + 4, 192])]  # class token + 4 visible of 16 patches


def test_loss_is_computed_on_masked_patches_only():
    mae = tiny_mae(mask_ratio=0.75)
    x = torch.rand(2, 1, 32, 32)
    out = mae(x, generator=torch.Generator().manual_seed(1))
    target = mae.target(x)
    visible = out.mask == 0
    garbage = out.pred.detach().clone()
    garbage[visible] = 1.0e3                                    # wrong predictions where visible
    assert float(mae.loss(x, garbage, out.mask)) == pytest.approx(float(out.loss.detach()), rel=1e-5)
    perfect = out.pred.detach().clone()
    perfect[~visible] = target[~visible]                        # exact where masked
    assert float(mae.loss(x, perfect, out.mask)) == pytest.approx(0.0, abs=1e-8)
    manual = ((out.pred - target) ** 2).mean(-1)[~visible].mean()
    assert float(out.loss.detach()) == pytest.approx(float(manual.detach()), rel=1e-5)


def test_norm_pix_target_is_normalised_per_patch():
    mae = tiny_mae()
    t = mae.target(torch.rand(2, 1, 32, 32) * 100 + 7)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-4)
    assert torch.allclose(t.std(-1), torch.ones(2, 16), atol=1e-3)
    raw = tiny_mae(norm_pix_loss=False)
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(raw.target(x), raw.patchify(x))


def test_loss_decreases_on_a_tiny_batch():
    mae = tiny_mae(mask_ratio=0.75)
    u = torch.linspace(0, 1, 32)
    x = torch.stack([torch.sin(6 * f * u[:, None] + 3 * u[None]) for f in (1, 2, 3, 4)])[:, None]  # smooth images
    opt = torch.optim.AdamW(mae.parameters(), lr=1.0e-3)
    losses = []
    for step in range(25):
        out = mae(x, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def test_reconstruction_keeps_visible_patches():
    mae = tiny_mae()
    x = torch.rand(2, 1, 32, 32)
    masked, recon = mae.reconstruct(x, generator=torch.Generator().manual_seed(0))
    out = mae(x, generator=torch.Generator().manual_seed(0))
    vis = (out.mask == 0)[..., None]
    assert torch.allclose(mae.patchify(recon) * vis, mae.patchify(x) * vis)
    assert torch.all(mae.patchify(masked)[~vis.expand(-1, -1, 64)] == 0)


def test_encoder_state_dict_loads_into_vit_tiny():
    mae = tiny_mae()
    model = create_model("vit_tiny", in_chans=1, num_classes=4, img_size=32, patch_size=8)
    result = model.load_state_dict(mae.encoder.state_dict(), strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys
    assert torch.equal(model.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)


def test_invalid_settings():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
