"""DVPT, VPT-deep and the other adaptation methods on a timm ViT: parameter budgets, storage,
frozen backbone, adapter round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from medvit.config import percent_label, run_name
from medvit.engine import Trainer
from medvit.engine.pretrained import load_pretrained
from medvit.fileio import sha256_file
from medvit.models.dvpt import DVPT, PromptedViT, build_prompted_vit, trainable_summary
from medvit.models.vit import build_vit
from medvit.tasks.adapt import AdapterError, load_adapter, save_adapter

TINY = {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 3}


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture(scope="module")
def vit_b16_dvpt():
    torch.manual_seed(0)
    return build_prompted_vit("base", "dvpt", in_chans=3, num_classes=14, img_size=224, patch_size=16)


def test_vit_b16_dvpt_budget(vit_b16_dvpt, tmp_path):
    model = vit_b16_dvpt
    summary = trainable_summary(model)
    assert summary["backbone_params"] == pytest.approx(85.8e6, rel=0.01)  # ViT-B/16 encoder
    assert 0 < summary["trainable_params"] <= 0.01 * summary["backbone_params"]
    # only DVPT and the head train
    trainable = {n.split(".")[0] if not n.startswith("backbone.") else ".".join(n.split(".")[:2])
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dvpt", "backbone.head", "backbone.fc_norm"}
    card = {"backbone": {"sha256": "0" * 64}}
    path = save_adapter(tmp_path / "adapter.safetensors", model, card)
    full = tensor_bytes(model.state_dict())
    assert path.stat().st_size <= 0.02 * full
    assert json.loads(path.with_suffix(".json").read_text())["bytes"] == path.stat().st_size


def test_per_layer_option_and_layer_subset():
    shared = build_prompted_vit("tiny", "dvpt", **TINY)
    some = build_prompted_vit("tiny", "dvpt", dvpt={"shared": False, "layers": [10, 11]}, **TINY)
    n = lambda m: sum(p.numel() for p in m.dvpt.parameters())  # noqa: E731
    assert n(some) == 2 * n(shared) and sorted(some.dvpt.keys()) == ["10", "11"]
    with pytest.raises(ValueError, match="outside"):
        build_prompted_vit("tiny", "dvpt", dvpt={"layers": [12]}, **TINY)


def test_zero_initialised_dvpt_computes_the_frozen_model():
    torch.manual_seed(0)
    dvpt = build_prompted_vit("tiny", "dvpt", **TINY).eval()
    plain = build_vit("tiny", in_chans=1, num_classes=3, img_size=32, patch_size=8).eval()
    plain.load_state_dict({k.removeprefix("backbone."): v for k, v in dvpt.state_dict().items()
                           if k.startswith("backbone.")})
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(dvpt(x), plain(x), atol=1e-6)
    # once the up-projection is non-zero, DVPT changes every layer's output per image
    torch.nn.init.normal_(dvpt.dvpt.up.weight, std=0.1)
    assert not torch.allclose(dvpt(x), plain(x), atol=1e-4)


def test_dvpt_module_shapes_and_prompts_are_sample_specific():
    torch.manual_seed(0)
    m = DVPT(dim=48, bottleneck=16, prompts=4, heads=2)
    x = torch.randn(3, 10, 48)
    assert m(x).shape == (3, 10, 48)
    p = m.dynamic_prompts(torch.randn(3, 10, 16))
    assert p.shape == (3, 4, 16) and not torch.allclose(p[0], p[1])
    with pytest.raises(ValueError, match="multiple"):
        DVPT(dim=48, bottleneck=10, heads=4)


def test_vpt_deep_inserts_and_removes_prompts():
    model = build_prompted_vit("tiny", "vpt", vpt_prompts=5, **TINY).eval()
    lengths = []
    hooks = [b.register_forward_hook(lambda m, a, o: lengths.append(o.shape[1])) for b in model.backbone.blocks]
    feats = []
    model.backbone.norm.register_forward_hook(lambda m, a, o: feats.append(o.shape[1]))
    out = model(torch.randn(2, 1, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 3)
    assert lengths[:-1] == [1 + 5 + 16] * 11  # class token + prompts + 4x4 patches
    assert feats == [1 + 16]                  # prompts dropped before the norm and pooling
    summary = trainable_summary(model)
    assert summary["trainable_params"] == 12 * 5 * 192 + sum(
        p.numel() for n, p in model.backbone.named_parameters() if n.startswith(("head.", "fc_norm.")))


@pytest.mark.parametrize("method", ["vpt", "dvpt"])
def test_a_deep_copy_runs_its_own_adapters(method):
    """EMA copies and copies moved to another device must use their own prompts/DVPT modules,
    not the original's (hooks that closed over the original model did)."""
    torch.manual_seed(0)
    model = build_prompted_vit("tiny", method, **TINY).eval()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(clone(x), model(x))
    adapter = clone.dvpt if method == "dvpt" else clone.prompts
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(clone(x), model(x))
    clone(x).sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    original = model.dvpt if method == "dvpt" else model.prompts
    assert all(p.grad is None for p in original.parameters())


@pytest.mark.parametrize("method", ["linear", "vpt", "dvpt"])
def test_prompt_tuning_leaves_backbone_unchanged(method, tmp_path):
    torch.manual_seed(0)
    model = build_prompted_vit("tiny", method, **TINY)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    learned = {k: v.clone() for k, v in model.state_dict().items() if k in model.adapter_keys()}
    data = [{"image": torch.randn(1, 32, 32), "label": torch.tensor(i % 3)} for i in range(8)]
    cfg = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_epochs": 0, "device": "cpu", "log_every": 0}
    Trainer(model, data, None, cfg, tmp_path, loss_fn=lambda out, b: torch.nn.functional.cross_entropy(out, b["label"]),
            progress=False).fit(resume=False)
    after = model.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    changed = [k for k, v in model.state_dict().items() if k in learned and not torch.equal(learned[k], v)]
    assert any(k.startswith(("dvpt.", "prompts.")) for k in changed) or method == "linear"
    assert any(k.startswith("backbone.head.") for k in changed)


def _backbone_file(tmp_path, seed=0):
    torch.manual_seed(seed)
    enc = build_vit("tiny", in_chans=1, num_classes=0, img_size=32, patch_size=8)
    path = tmp_path / f"encoder{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return path


def _card(backbone, method, sha):
    return {"method": method, "model": "vit_tiny", "size": "tiny", "patch_size": 8, "image_size": 32,
            "in_chans": 1, "num_classes": 3, "dvpt": {"bottleneck": 16, "prompts": 4, "heads": 2},
            "vpt_prompts": 3, "backbone": {"path": str(backbone), "sha256": sha}}


@pytest.mark.parametrize("method", ["linear", "vpt", "dvpt", "full"])
def test_adapter_round_trip_on_shared_backbone(method, tmp_path):
    backbone = _backbone_file(tmp_path)
    card = _card(backbone, method, sha256_file(backbone))
    model = build_prompted_vit("tiny", method, in_chans=1, num_classes=3, img_size=32, patch_size=8,
                               dvpt=card["dvpt"], vpt_prompts=3)
    load_pretrained(model.backbone, backbone)
    for p in model.parameters():  # pretend training moved every trainable tensor
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    path = save_adapter(tmp_path / "adapter.safetensors", model, card)
    if method != "full":
        assert path.stat().st_size < 0.25 * backbone.stat().st_size
    reloaded, _ = load_adapter(path, backbone)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-6)


def test_adapter_refuses_other_backbone_and_altered_file(tmp_path):
    backbone, other = _backbone_file(tmp_path, 0), _backbone_file(tmp_path, 1)
    model = build_prompted_vit("tiny", "dvpt", in_chans=1, num_classes=3, img_size=32, patch_size=8,
                               dvpt={"bottleneck": 16, "prompts": 4, "heads": 2})
    path = save_adapter(tmp_path / "adapter.safetensors", model, _card(backbone, "dvpt", sha256_file(backbone)))
    with pytest.raises(AdapterError, match="not the same weights"):
        load_adapter(path, other)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="altered"):
        load_adapter(path, backbone)


def test_run_names():
    assert [run_name("dvpt", f) for f in (0.1, 0.25, 0.5, 1.0)] == ["dvpt_p10", "dvpt_p25", "dvpt_p50", "dvpt_p100"]
    assert percent_label(0.125) == "12.5"


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="allowed"):
        PromptedViT(build_vit("tiny", img_size=32, patch_size=8), "lora")
