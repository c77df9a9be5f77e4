"""The ViT recipe on real images: input standardisation inside the model, the classifier
augmentation, the MAE learning-rate rule and reconstruction baseline, and a tiny real-data
fine-tune (PneumoniaMNIST) that must clearly beat chance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import monai.transforms as mt
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medvit.config import validate_study
from medvit.data.realdata import import_dataset
from medvit.engine import load_weights, save_weights
from medvit.engine.pretrained import load_pretrained
from medvit.models import create_model
from medvit.models.dvpt import build_prompted_vit
from medvit.models.layers import InputStandardize, input_statistics
from medvit.models.mae import build_mae
from medvit.tasks.classification import train_augmentation

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO / "data_manifests" / "pneumoniamnist" / "pneumoniamnist.npz"


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_mae", "deit_tiny_distilled"])
def test_vit_family_standardises_its_input_and_saves_the_statistics(name, tmp_path):
    model = create_model(name, in_chans=2, num_classes=1, img_size=16, patch_size=8).eval()
    assert isinstance(model.input_norm, InputStandardize)
    x = torch.rand(3, 2, 16, 16)
    before = model(x)
    model.input_norm.set_statistics([0.5, 0.25], [0.1, 2.0])
    after = model(x)
    assert not torch.allclose(before, after)
    # the hook standardises exactly once: the same as an identity-normalised model given x'
    plain = copy.deepcopy(model)
    plain.input_norm.set_statistics([0.0, 0.0], [1.0, 1.0])
    x_std = (x - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.1, 2.0]).view(1, 2, 1, 1)
    assert torch.allclose(plain(x_std), after, atol=1e-5)
    # a deepcopy (EMA, device moves) uses its own buffers
    assert torch.allclose(copy.deepcopy(model)(x), after, atol=1e-6)
    path = save_weights(tmp_path / "m.safetensors", model, {"model": name})
    again = create_model(name, in_chans=2, num_classes=1, img_size=16, patch_size=8).eval()
    load_weights(path, again)
    stats = input_statistics(again)
    assert stats["mean"] == pytest.approx([0.5, 0.25]) and stats["std"] == pytest.approx([0.1, 2.0])
    assert torch.allclose(again(x), after, atol=1e-6)


def test_standardise_refuses_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        InputStandardize(1).set_statistics([0.1, 0.2], [1.0, 1.0])


def test_mae_encoder_statistics_carry_into_finetuning_with_fresh_final_norm(tmp_path):
    mae = build_mae("vit_tiny", in_chans=1, img_size=16, patch_size=8)
    mae.encoder.input_norm.set_statistics([0.3], [0.2])
    with torch.no_grad():
        mae.encoder.fc_norm.weight.fill_(3.0)
    path = save_weights(tmp_path / "encoder.safetensors", mae.encoder, {})
    vit = create_model("vit_tiny_mae", in_chans=1, num_classes=2, img_size=16, patch_size=8)
    info = load_pretrained(vit, path, fresh_final_norm=True)
    assert info["input_norm"] is True
    stats = input_statistics(vit)
    assert stats["mean"] == pytest.approx([0.3]) and stats["std"] == pytest.approx([0.2])
    assert torch.all(vit.fc_norm.weight == 1.0)  # MAE fine-tuning starts the pooled norm fresh
    load_pretrained(vit, path)
    assert torch.all(vit.fc_norm.weight == 3.0)
    # a checkpoint trained elsewhere has no statistics: reported, and the model keeps identity
    foreign = {k: v for k, v in mae.encoder.state_dict().items() if not k.startswith("input_norm.")}
    torch.save(foreign, tmp_path / "foreign.pth")
    other = create_model("vit_tiny", in_chans=1, num_classes=2, img_size=16, patch_size=8)
    assert load_pretrained(other, tmp_path / "foreign.pth")["input_norm"] is False
    assert input_statistics(other) == {"mean": [0.0], "std": [1.0]}


def test_mae_sees_standardised_input_and_reconstructs_in_input_units():
    torch.manual_seed(0)
    mae = build_mae("vit_tiny", in_chans=1, img_size=16, patch_size=4, mask_ratio=0.75, norm_pix_loss=False)
    imgs = torch.rand(2, 1, 16, 16) * 0.1 + 0.6
    g = torch.Generator().manual_seed(1)
    loss_identity = float(mae(imgs, generator=g).loss)
    mae.encoder.input_norm.set_statistics([0.65], [0.03])
    g = torch.Generator().manual_seed(1)
    assert float(mae(imgs, generator=g).loss) != pytest.approx(loss_identity)
    masked, recon = mae.reconstruct(imgs, generator=torch.Generator().manual_seed(1))
    visible = masked != 0
    assert torch.allclose(recon[visible], imgs[visible], atol=1e-6)  # visible patches in input units


def test_adapter_carries_the_input_statistics():
    model = build_prompted_vit("tiny", "dvpt", in_chans=1, num_classes=1, img_size=16, patch_size=8)
    keys = model.adapter_keys()
    assert "backbone.input_norm.mean" in keys and "backbone.input_norm.std" in keys
    assert not any(k.startswith("backbone.blocks.") for k in keys)


def test_mae_learning_rate_follows_the_linear_scaling_rule():
    from medvit.tasks.pretrain import pretrain_lr

    train = {"batch_size": 128, "accumulate": 2, "lr": 0.01}
    assert pretrain_lr({"base_lr": 1.5e-4, "train": train}) == pytest.approx(1.5e-4 * 256 / 256)
    assert pretrain_lr({"base_lr": 1e-3, "train": {**train, "accumulate": 1}}) == pytest.approx(1e-3 * 128 / 256)
    assert pretrain_lr({"base_lr": None, "train": train}) == 0.01


def test_patch_mean_baseline_with_normalised_targets():
    from medvit.tasks.pretrain import patch_mean_baseline_loss

    mae = build_mae("vit_tiny", in_chans=1, img_size=16, patch_size=4)
    data = [{"image": torch.rand(1, 16, 16)} for _ in range(10)]
    # the target is normalised with the unbiased variance: its mean square is (n - 1) / n
    assert patch_mean_baseline_loss(mae, data, batch_size=4) == pytest.approx(15 / 16, abs=1e-3)
    raw = build_mae("vit_tiny", in_chans=1, img_size=16, patch_size=4, norm_pix_loss=False)
    # without normalisation the baseline is the masked patches' mean variance
    expected = float(np.mean([raw.patchify(d["image"][None]).var(-1, unbiased=False).mean() for d in data]))
    assert patch_mean_baseline_loss(raw, data, batch_size=4) == pytest.approx(expected, rel=0.05)


def test_classifier_augmentation_has_randaugment_only_on_request():
    from medvit.data.transforms import TorchvisionRandd, classifier_augmentation

    def has_randaugment(compose) -> bool:
        return any(isinstance(t, TorchvisionRandd) for t in compose.flatten().transforms)

    assert not has_randaugment(classifier_augmentation(flips=False))
    assert has_randaugment(classifier_augmentation(flips=False, randaug_magnitude=6))


def test_flips_are_a_schema_key_with_task_defaults():
    """Flips are a study setting: off by default for chest radiographs (left and right are
    anatomy), on for the other tasks, and a study may turn them either way."""
    def flips(compose) -> bool:
        return any(isinstance(t, mt.RandFlipd) for t in compose.flatten().transforms)

    study = validate_study({"study": "s", "tasks": {t: {} for t in ("xray", "brain", "prostate", "histo")}})
    assert {t: c["augment"]["flips"] for t, c in study["tasks"].items()} == {
        "xray": False, "brain": True, "prostate": True, "histo": True}
    assert not flips(train_augmentation(study["tasks"]["xray"]))
    assert flips(train_augmentation(study["tasks"]["histo"]))
    custom = validate_study({"study": "s", "tasks": {"xray": {"augment": {"flips": True}},
                                                     "histo": {"augment": {"flips": False}}}})
    assert flips(train_augmentation(custom["tasks"]["xray"]))
    assert not flips(train_augmentation(custom["tasks"]["histo"]))


def test_channel_statistics_of_a_dataset():
    from medvit.data.datasets import SampleDataset

    rng = np.random.default_rng(0)
    images = [rng.normal([[[2.0]], [[-1.0]]], [[[0.5]], [[3.0]]], size=(2, 8, 8)).astype(np.float32)
              for _ in range(50)]
    ds = SampleDataset([{"i": i} for i in range(50)], lambda r: {"image": images[r["i"]]})
    stats = ds.channel_statistics()
    allpix = np.stack(images).transpose(1, 0, 2, 3).reshape(2, -1)
    assert stats["mean"] == pytest.approx(allpix.mean(1).tolist(), rel=1e-6)
    assert stats["std"] == pytest.approx(allpix.std(1).tolist(), rel=1e-6)


@pytest.fixture(scope="module")
def pneumonia_subset(tmp_path_factory):
    """A class-balanced real subset of the shipped PneumoniaMNIST: 300 training images and 120
    validation images, half of each class (the file lists each split's classes in blocks)."""
    root = tmp_path_factory.mktemp("pmn")
    full = import_dataset("pneumoniamnist", NPZ, root / "data")
    df = pd.read_csv(full, dtype=str, keep_default_na=False)
    parts = [df[df["split"] == split].groupby("label").sample(n=n, random_state=0)
             for split, n in (("train", 150), ("val", 60))]
    manifest = full.with_name("subset.csv")
    pd.concat(parts).sort_index().to_csv(manifest, index=False)
    return root, manifest


@pytest.mark.slow
def test_scratch_vit_learns_real_xrays(pneumonia_subset):
    """The default ViT recipe on 300 real PneumoniaMNIST images (ViT-Tiny, 28 px, patch 4,
    3 epochs of 10 steps): validation AUROC clearly above chance (0.789 measured on a 2-core
    CPU). The old recipe (RandAugment magnitude 6, no input standardisation) scored 0.320 on
    the same run, so this test fails on it."""
    from medvit.tasks import classification
    from medvit.tasks.common import split_stage

    root, manifest = pneumonia_subset
    study = {"study": "pmn_small", "seed": 0, "device": "cpu",
             "tasks": {"xray": {"manifest": str(manifest), "label_column": "label", "positive_class": "pneumonia",
                                "image_size": 28, "models": ["vit_tiny"],
                                "pretrain": {"patch_size": 4},
                                "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0,
                                          "num_workers": 0}}}}
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    split = split_stage(config, "xray", root / "xray" / "split.csv")
    weights = classification.train(config, "xray", "vit_tiny", split, root / "xray" / "vit_tiny")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["input_norm_source"] == "training split"
    assert 0.2 < card["input_norm"]["mean"][0] < 0.8 and 0.05 < card["input_norm"]["std"][0] < 0.5
    preds = classification.predict(config, "xray", "vit_tiny", split, weights, root / "xray" / "p.csv")
    df = pd.read_csv(preds)
    val = df[df["split"] == "val"]
    auroc = roc_auc_score(val["true_pneumonia"], val["score_pneumonia"])
    assert auroc > 0.7, f"validation AUROC {auroc:.3f}: the ViT recipe does not learn real X-rays"
