"""ViT builders, loading foreign/MAE checkpoints (pos-embed resampling, safe loading) and
layer-wise learning-rate decay groups."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from medvit.engine import Trainer
from medvit.engine.pretrained import load_pretrained
from medvit.errors import CheckpointError
from medvit.models import create_model, list_models, model_spatial_dims
from medvit.models.mae import build_mae
from medvit.models.vit import checkpoint_filter_fn, layer_decay_param_groups


def tiny(img_size: int = 32, num_classes: int = 3, **kw):
    return create_model("vit_tiny", in_chans=1, num_classes=num_classes, img_size=img_size, patch_size=8, **kw)


@pytest.mark.parametrize("name,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768),
                                      ("vit_tiny_mae", 192)])
def test_builders(name, dim):
    assert name in list_models() and model_spatial_dims(name) == 2
    model = create_model(name, in_chans=1, num_classes=2, img_size=32, patch_size=16)
    assert model.embed_dim == dim and len(model.blocks) == 12
    assert model.patch_embed.proj.in_channels == 1
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_builder_defaults_and_drop_path():
    model = create_model("vit_tiny", img_size=32, patch_size=8, drop_path=0.2)
    assert model.patch_embed.proj.in_channels == 1 and model.head.out_features == 1
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("vit_tiny", img_size=30, patch_size=8)


def test_pos_embed_is_interpolated_to_another_resolution(tmp_path):
    small = tiny(32)
    path = tmp_path / "vit32.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    big = tiny(64)
    assert small.pos_embed.shape == (1, 1 + 16, 192) and big.pos_embed.shape == (1, 1 + 64, 192)
    load_pretrained(big, path)
    assert torch.equal(big.cls_token, small.cls_token)
    assert torch.equal(big.blocks[5].attn.qkv.weight, small.blocks[5].attn.qkv.weight)
    # the class token's position is kept, the 4x4 grid is resampled to 8x8 (bicubic)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])
    grid = big.pos_embed[0, 1:].reshape(8, 8, 192).permute(2, 0, 1)
    pooled = torch.nn.functional.avg_pool2d(grid[None], 2)[0].permute(1, 2, 0).reshape(16, 192)
    assert torch.corrcoef(torch.stack([pooled.flatten(), small.pos_embed[0, 1:].flatten()]))[0, 1] > 0.9
    assert big(torch.rand(1, 1, 64, 64)).shape == (1, 3)


def test_filter_maps_mae_keys_and_rgb_patch_embed():
    mae = build_mae("vit_tiny", in_chans=3, img_size=32, patch_size=8)
    model = tiny(32)
    state = checkpoint_filter_fn(mae.state_dict(), model)
    assert not any(k.startswith(("encoder.", "decoder", "mask_token")) for k in state)
    assert state["patch_embed.proj.weight"].shape == model.patch_embed.proj.weight.shape  # RGB -> grey
    missing = set(model.state_dict()) - set(state)
    assert missing == {"head.weight", "head.bias"}


def test_mae_encoder_initialises_finetuning(tmp_path):
    mae = build_mae("vit_tiny", in_chans=1, img_size=32, patch_size=8)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in mae.encoder.state_dict().items()}, str(path))
    model = tiny(32, num_classes=5)
    head = model.head.weight.clone()
    result = load_pretrained(model, path)
    assert set(result["missing"]) == {"head.weight", "head.bias"} and not result["unexpected"]
    assert torch.equal(model.blocks[11].mlp.fc2.weight, mae.encoder.blocks[11].mlp.fc2.weight)
    assert torch.equal(model.head.weight, head)  # the new task's head stays fresh


def test_foreign_pt_checkpoint_loads_safely(tmp_path):
    source = tiny(32)
    good = tmp_path / "timm_vit.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, good)  # MAE authors' layout
    target = tiny(32)
    load_pretrained(target, good)
    assert torch.equal(target.pos_embed, source.pos_embed)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": source.state_dict(), "payload": Exploit()}, bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(target, bad)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = create_model("vit_small", num_classes=0, img_size=32, patch_size=8)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pretrained(tiny(32), path)
    resnet = create_model("resnet18", in_chans=1, num_classes=2)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="not a ViT encoder"):
        load_pretrained(tiny(32), path)


def test_layer_decay_rates_per_block():
    model = tiny(32)
    groups = layer_decay_param_groups(model, layer_decay=0.5, weight_decay=0.05)
    depth = len(model.blocks)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
    # every trainable parameter exactly once
    assert sorted(scale) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == len(scale)
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    for i in range(depth):  # the documented rate: block i trains at layer_decay ** (depth - i)
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - i))
        assert scale[f"blocks.{i}.norm1.weight"] == scale[f"blocks.{i}.attn.qkv.weight"]
    # deeper blocks learn faster
    assert [scale[f"blocks.{i}.mlp.fc1.weight"] for i in range(depth)] == sorted(
        scale[f"blocks.{i}.mlp.fc1.weight"] for i in range(depth))
    wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["blocks.0.attn.qkv.bias"] == 0.0
    assert wd["pos_embed"] == 0.0 and wd["cls_token"] == 0.0


def test_trainer_applies_layer_decay_groups(tmp_path):
    model = tiny(32)
    groups = layer_decay_param_groups(model, layer_decay=0.75, weight_decay=0.05)
    data = [{"image": torch.rand(1, 32, 32), "label": torch.zeros(3)} for _ in range(4)]
    trainer = Trainer(model, data, None, {"epochs": 1, "batch_size": 2, "lr": 1.0e-3, "device": "cpu"}, tmp_path,
                      loss_fn=lambda out, b: out.float().pow(2).mean(), param_groups=groups, progress=False)
    trainer.initialize()
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # peak lr before warm-up
    assert lrs["layer13"] == lrs["layer13_no_decay"] == pytest.approx(1.0e-3)
    assert lrs["layer1"] == pytest.approx(1.0e-3 * 0.75 ** 12)
