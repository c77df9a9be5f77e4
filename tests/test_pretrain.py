"""MAE pretraining stage and ViT fine-tuning on a tiny synthetic X-ray study (32 px,
vit_tiny with patch 8, one epoch): outputs, training rows only, init from the encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from medvit.cli import main
from medvit.config import load_study
from medvit.data.synth import synthesize
from medvit.engine.pretrained import load_pretrained
from medvit.errors import ConfigError, LeakageError
from medvit.models import create_model
from medvit.tasks.common import load_context, split_stage
from medvit.tasks.pretrain import pretrain_stage, pretraining_rows
from medvit.tasks.stages import predict_stage, train_stage


def write_study(path: Path, **xray) -> Path:
    task = {"synthetic": {"patients": 12, "image_size": 32}, "image_size": 32,
            "models": ["vit_tiny", "vit_tiny_mae"], "train": {"epochs": 1, "batch_size": 8},
            "pretrain": {"patch_size": 8, "figures": 2, "train": {"epochs": 1, "batch_size": 8}}}
    task.update(xray)
    path.write_text(yaml.safe_dump({"study": "t", "device": "cpu", "tasks": {"xray": task}}))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("xray")
    config = write_study(root / "study.yaml")
    synthesize("xray", n_patients=12, out_dir=root / "data", seed=0, image_size=32)
    cfg = yaml.safe_load(config.read_text())
    cfg["tasks"]["xray"]["manifest"] = str(root / "data" / "manifest.csv")
    config.write_text(yaml.safe_dump(cfg))
    split = split_stage(config, "xray", root / "xray" / "split.csv")
    return root, config, split


@pytest.fixture(scope="module")
def pretrained(study):
    root, config, split = study
    df = pd.read_csv(split)
    held_out = df[df["split"] != "train"]
    assert len(held_out) > 0
    # Validation and test images are deleted: a pretraining that read any of them would fail.
    hidden = root / "hidden"
    hidden.mkdir()
    for rel in held_out["image"]:
        src = split.parent / rel
        src.rename(hidden / f"{len(list(hidden.iterdir()))}.png")
    try:
        encoder = pretrain_stage(config, "xray", split, root / "xray" / "mae")
    finally:
        for i, rel in enumerate(held_out["image"]):
            (hidden / f"{i}.png").rename(split.parent / rel)
    return encoder


def test_pretrain_writes_encoder_card_and_figure(study, pretrained):
    root, config, split = study
    out = pretrained.parent
    assert pretrained.name == "encoder.safetensors" and pretrained.exists()
    assert (out / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = json.loads((out / "encoder.json").read_text())
    df = pd.read_csv(split)
    train = df[df["split"] == "train"]
    assert card["splits_seen"] == ["train"]
    assert card["train_samples"] == len(train) and card["train_patients"] == train["patient_id"].nunique()
    assert card["pretrain"]["mask_ratio"] == 0.9 and card["pretrain"]["crop_scale"] == [0.5, 1.0]
    assert card["patch_size"] == 8 and card["image_size"] == 32 and len(card["losses"]) == 1
    model = create_model("vit_tiny", in_chans=1, num_classes=3, img_size=32, patch_size=8)
    assert set(load_pretrained(model, pretrained)["missing"]) == {"head.weight", "head.bias"}


def test_pretraining_rows_are_training_patients_only(study):
    root, config, split = study
    ctx = load_context(config, "xray", split)
    rows = pretraining_rows(ctx)
    assert set(rows["split"]) == {"train"}
    held_out = set(ctx.df.loc[ctx.df["split"] != "train", "patient_id"].astype(str))
    assert held_out and not set(rows["patient_id"].astype(str)) & held_out
    # a validation row of a training patient (a leak the guard missed) is refused
    leaked = ctx.df.copy()
    leaked.loc[leaked.index[leaked["split"] == "val"][0], "patient_id"] = rows["patient_id"].iloc[0]
    ctx.manifest.df = leaked
    with pytest.raises(LeakageError, match="pretraining would see validation/test patients"):
        pretraining_rows(ctx)


def test_mae_initialised_finetuning_and_prediction(study, pretrained, tmp_path):
    root, config, split = study
    out = train_stage(config, "xray", "vit_tiny_mae", split, split.parent / "vit_tiny_mae")
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["init"] == "mae" and card["init_weights"] == str(pretrained)
    assert card["finetune"]["layer_decay"] == 0.75 and card["layer_decay_applied"] == 0.75 and card["patch_size"] == 8
    # the fine-tuned ViT standardises its input with the statistics the encoder was pretrained on
    encoder_card = json.loads(pretrained.with_suffix(".json").read_text())
    assert card["input_norm_source"] == "initial weights"
    for key in ("mean", "std"):  # float32 buffers against the float64 statistics
        assert card["input_norm"][key] == pytest.approx(encoder_card["input_norm"][key], rel=1e-6)
    weights = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(out).items()}
    assert weights["pos_embed"].shape == (1, 17, 192)
    preds = predict_stage(config, "xray", "vit_tiny_mae", split, out, tmp_path / "predictions.csv")
    df = pd.read_csv(preds)
    assert set(df["split"]) <= {"val", "test"} and len(df) == (pd.read_csv(split)["split"] != "train").sum()
    scores = df[[c for c in df.columns if c.startswith("score_")]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()


def test_scratch_vit_with_mixup_and_local_init(study, pretrained, tmp_path):
    root, config, split = study
    # init from a local file (here the MAE encoder), with mixup and RandAugment on
    local = write_study(root / "local.yaml", models=["vit_tiny"], manifest=str(root / "data" / "manifest.csv"),
                        finetune={"init": str(pretrained), "mixup": 0.4, "randaug_magnitude": 9})
    out = train_stage(local, "xray", "vit_tiny", split, tmp_path / "vit_tiny")
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["init"] == "file" and card["finetune"]["mixup"] == 0.4
    scratch = train_stage(config, "xray", "vit_tiny", split, tmp_path / "scratch")
    card = json.loads(scratch.with_suffix(".json").read_text())
    assert card["init"] == "scratch" and card["layer_decay_applied"] == 1.0  # nothing pretrained to keep


def test_cli_pretrain_and_errors(study, tmp_path, capsys):
    root, config, split = study
    rc = main(["pretrain", "--config", str(config), "--task", "xray", "--split", str(split),
               "--out", str(tmp_path / "mae")])
    assert rc == 0 and (tmp_path / "mae" / "encoder.safetensors").exists()
    assert (tmp_path / "mae" / "reconstructions.png").exists()
    bad = write_study(root / "bad.yaml", models=["vit_small_mae"])
    with pytest.raises(ConfigError, match=r"tasks\.xray\.models: got 'vit_small_mae'.*allowed: vit_tiny_mae"):
        load_study(bad)
    bad = write_study(root / "bad2.yaml", pretrain={"patch_size": 7})
    with pytest.raises(ConfigError, match=r"pretrain\.patch_size: got 7"):
        load_study(bad)
    bad = write_study(root / "bad3.yaml", finetune={"init": "missing.pt"})
    with pytest.raises(ConfigError, match=r"finetune\.init: file not found: missing\.pt"):
        load_study(bad)
    bad = write_study(root / "bad4.yaml", pretrain={"mask_ratio": 1.0})
    with pytest.raises(ConfigError, match=r"pretrain\.mask_ratio: got 1\.0.*allowed: a number > 0 and < 1"):
        load_study(bad)


def test_random_resized_crop_and_randaugment_are_seeded():
    from medvit.data.datasets import SampleDataset
    from medvit.data.transforms import randaugment_transforms, random_resized_crop

    records = [{"i": i} for i in range(3)]

    def load(rec):
        u = torch.linspace(0, 1, 32)
        return {"image": (u[:, None] * u[None] * (rec["i"] + 1) / 3)[None].numpy()}

    for make in (lambda: random_resized_crop([32, 32], (0.2, 1.0)), lambda: randaugment_transforms(9)):
        a = SampleDataset(records, load, augment=make(), seed=1)
        b = SampleDataset(records, load, augment=make(), seed=1)
        assert torch.equal(torch.as_tensor(a[1]["image"]), torch.as_tensor(b[1]["image"]))
        assert a[1]["image"].shape == (1, 32, 32)
        a.set_epoch(1)
        assert not torch.equal(torch.as_tensor(a[1]["image"]), torch.as_tensor(b[1]["image"]))


def test_recipe_change_starts_over_instead_of_resuming(study, tmp_path):
    from medvit.tasks.pretrain import recipe_unchanged

    assert recipe_unchanged(tmp_path, {"mask_ratio": 0.9})        # first run
    assert recipe_unchanged(tmp_path, {"mask_ratio": 0.9})        # same recipe: resume
    assert not recipe_unchanged(tmp_path, {"mask_ratio": 0.75})   # changed: start over
    assert recipe_unchanged(tmp_path, {"mask_ratio": 0.75})       # ... and it is remembered
    (tmp_path / "recipe.json").write_text("{broken")
    assert not recipe_unchanged(tmp_path, {"mask_ratio": 0.75})

    # a finished ViT run retrained with another recipe trains again (no stale final checkpoint)
    root, config, split = study
    out = tmp_path / "vit"
    train_stage(config, "xray", "vit_tiny", split, out)
    again = write_study(root / "again.yaml", models=["vit_tiny"], manifest=str(root / "data" / "manifest.csv"),
                        finetune={"drop_path": 0.2})
    train_stage(again, "xray", "vit_tiny", split, out)
    log = (out / "train.log").read_text()
    assert log.count(" start: ") == 2 and " resume: " not in log
    assert json.loads((out / "model.json").read_text())["finetune"]["drop_path"] == 0.2


def test_unlabeled_rows_reach_pretraining_only(tmp_path):
    """Rows with split `unlabeled` (empty labels allowed) are read by pretraining, kept out of
    fine-tuning, and their patients can never be validation or test patients."""
    config = write_study(tmp_path / "study.yaml")
    manifest = synthesize("xray", n_patients=14, out_dir=tmp_path / "data", seed=1, image_size=32)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    unlabeled = sorted(df["patient_id"].unique())[:3]
    mark = df["patient_id"].isin(unlabeled)
    df.loc[mark, "split"], df.loc[mark, "labels"] = "unlabeled", ""
    df.loc[~mark, "split"] = ""
    df.to_csv(manifest, index=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["tasks"]["xray"]["manifest"] = str(manifest)
    config.write_text(yaml.safe_dump(cfg))

    split = split_stage(config, "xray", tmp_path / "xray" / "split.csv")
    out = pd.read_csv(split, dtype=str, keep_default_na=False)
    assert set(out.loc[out["patient_id"].isin(unlabeled), "split"]) == {"unlabeled"}
    assert set(out.loc[~out["patient_id"].isin(unlabeled), "split"]) == {"train", "val", "test"}
    assert json.loads(split.with_suffix(".json").read_text())["splits"]["unlabeled"]["patients"] == 3

    ctx = load_context(config, "xray", split)
    rows = pretraining_rows(ctx)
    assert set(rows["split"]) == {"train", "unlabeled"} and set(unlabeled) <= set(rows["patient_id"])
    encoder = pretrain_stage(config, "xray", split, tmp_path / "xray" / "mae")
    card = json.loads(encoder.with_suffix(".json").read_text())
    assert card["splits_seen"] == ["train", "unlabeled"] and card["train_samples"] == len(rows)

    # fine-tuning trains on the labelled training rows only and still predicts val + test
    weights = train_stage(config, "xray", "vit_tiny_mae", split, tmp_path / "xray" / "vit_tiny_mae")
    preds = pd.read_csv(predict_stage(config, "xray", "vit_tiny_mae", split, weights,
                                      tmp_path / "xray" / "vit_tiny_mae" / "predictions.csv"))
    assert set(preds["split"]) == {"val", "test"} and not set(preds["patient_id"]) & set(unlabeled)

    # an unlabeled patient with a test row is a leak, refused before anything runs
    out.loc[out.index[out["patient_id"] == unlabeled[0]][0], "split"] = "test"
    out.to_csv(split, index=False)
    with pytest.raises(LeakageError, match=unlabeled[0]):
        load_context(config, "xray", split)


def test_empty_label_is_allowed_on_unlabeled_rows_only(tmp_path):
    from medvit.data.manifest import validate_manifest

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("patient_id,image,label,split\nP1,a.png,,unlabeled\nP2,a.png,,train\n"
                                    "P3,a.png,tumor,\n")
    report = validate_manifest(tmp_path / "m.csv", check_files=False)
    assert [(p.row, p.column) for p in report.problems] == [(2, "label")]
    assert "mark images without a label with split `unlabeled`" in report.problems[0].reason


def test_extra_manifests_join_pretraining_only(tmp_path):
    """`pretrain.extra_manifests`: another manifest's images (labels dropped, its own val/test
    rows left out) join MAE pretraining as unlabeled images; a patient of this task's
    validation or test split among them is refused."""
    from medvit.tasks.pretrain import with_extra_pretraining_images

    config = write_study(tmp_path / "study.yaml")
    manifest = synthesize("xray", n_patients=12, out_dir=tmp_path / "data", seed=1, image_size=32)
    other = synthesize("xray", n_patients=6, out_dir=tmp_path / "other", seed=2, image_size=32)
    odf = pd.read_csv(other, dtype=str, keep_default_na=False)
    odf["patient_id"] = "X" + odf["patient_id"]
    first = odf["patient_id"] == odf["patient_id"].iloc[0]
    odf["split"] = ["test" if f else "train" for f in first]  # its test patient must stay out
    odf.to_csv(other, index=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["tasks"]["xray"]["manifest"] = str(manifest)
    cfg["tasks"]["xray"]["pretrain"]["extra_manifests"] = [str(other)]
    config.write_text(yaml.safe_dump(cfg))
    split = split_stage(config, "xray", tmp_path / "xray" / "split.csv")

    ctx, extras = with_extra_pretraining_images(load_context(config, "xray", split))
    added = ctx.df[ctx.df["sample_id"].str.startswith("extra0:")]
    assert len(added) == int((~first).sum()) and set(added["split"]) == {"unlabeled"}
    assert not set(added["patient_id"]) & set(odf.loc[first, "patient_id"])
    assert extras[0]["rows"] == len(added) and extras[0]["manifest"] == str(other)
    assert all((split.parent / p).exists() for p in added["image"])  # paths relative to the split
    assert set(added["labels"]) == {""}  # labels never travel

    encoder = pretrain_stage(config, "xray", split, tmp_path / "xray" / "mae")
    card = json.loads(encoder.with_suffix(".json").read_text())
    n_train = int((pd.read_csv(split)["split"] == "train").sum())
    assert card["train_samples"] == n_train + len(added) and card["extra_manifests"][0]["rows"] == len(added)
    assert card["input_norm"]["std"][0] > 0

    # one of this task's test patients inside the extra manifest is a leak
    test_patient = pd.read_csv(split, dtype=str).query("split == 'test'")["patient_id"].iloc[0]
    odf.loc[odf.index[~first][0], "patient_id"] = test_patient
    odf.to_csv(other, index=False)
    with pytest.raises(LeakageError, match=test_patient):
        with_extra_pretraining_images(load_context(config, "xray", split))
