"""The disk-backed preprocessed cache: built once, read without stale pixels, the same
augmentation per (seed, epoch, sample) as the in-memory path, bit-identical resume."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from medvit.config import MEMORY_CACHE_BYTES, cache_dir, cache_mode, load_study
from medvit.data.cache import (
    UNIT16_LEVELS,
    CachedLoadd,
    CacheError,
    PreprocessedCache,
    build_cache,
    encode,
    load_settings,
)
from medvit.data.datasets import SampleDataset
from medvit.data.transforms import augment_transforms, load_transforms
from medvit.engine import TrainConfig, Trainer, seed_everything

HALF_STEP = 0.5 / UNIT16_LEVELS + 1e-7  # largest difference of a cached value from the float32 one


def _images(root: Path, n: int, masks: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        Image.fromarray((rng.random((20, 24)) * 4095).astype(np.uint16)).save(root / f"img{i}.png")
        row = {"image": f"img{i}.png", "patient_id": f"p{i}", "sample_id": f"s{i}"}
        if masks:
            Image.fromarray((rng.random((20, 24)) > 0.7).astype(np.uint8) * 255).save(root / f"mask{i}.png")
            row["mask"] = f"mask{i}.png"
        records.append({"row": row, "patient_id": f"p{i}", "sample_id": f"s{i}", "target": i % 2})
    return records


def _build(tmp_path: Path, records: list[dict], size=(16, 16), masks: bool = False) -> PreprocessedCache:
    load = load_transforms(tmp_path, size, load_mask=masks)
    return build_cache(tmp_path / "cache", records, load, load_settings(size, masks), tmp_path)


def test_cached_samples_equal_decoded_ones_to_16_bits(tmp_path):
    records = _images(tmp_path, 5, masks=True)
    cache = _build(tmp_path, records, masks=True)
    assert np.load(tmp_path / "cache" / "image.npy", mmap_mode="r").dtype == np.uint16
    assert np.load(tmp_path / "cache" / "label.npy", mmap_mode="r").shape == (5, 1, 16, 16)
    load = load_transforms(tmp_path, [16, 16], load_mask=True)
    cached = CachedLoadd(load, cache, tmp_path, keys=["image", "label"])
    for rec in records:
        a, b = load(dict(rec)), cached(dict(rec))
        assert set(a) == set(b) and b["patient_id"] == rec["patient_id"] and b["target"] == rec["target"]
        assert b["image"].dtype == torch.float32 and b["image"].shape == (1, 16, 16)
        assert float((a["image"] - b["image"]).abs().max()) <= HALF_STEP
        assert torch.equal(a["label"], b["label"])  # masks exact
    assert cached.decoded == 0


def test_changed_or_unknown_files_are_decoded_not_served_stale(tmp_path):
    records = _images(tmp_path, 3)
    cache = _build(tmp_path, records)
    load = load_transforms(tmp_path, [16, 16])
    cached = CachedLoadd(load, cache, tmp_path)
    Image.fromarray(np.full((20, 24), 7, np.uint16)).save(tmp_path / "img1.png")
    os.utime(tmp_path / "img1.png", ns=(1, 1))
    new = {"row": {"image": "img0.png", "sample_id": "s9"}, "sample_id": "s9"}  # not in the cache
    assert torch.equal(cached(dict(records[1]))["image"], load(dict(records[1]))["image"])
    assert torch.equal(cached(dict(new))["image"], load(dict(new))["image"])
    assert cached.decoded == 2
    cached(dict(records[0]))
    assert cached.decoded == 2


def test_rebuild_reuses_samples_it_holds_and_readers_keep_their_build(tmp_path):
    records = _images(tmp_path, 4)
    first = _build(tmp_path, records[:3])
    before = first.read(0)["image"]
    assert first.meta["decoded"] == 3 and first.meta["reused"] == 0
    second = _build(tmp_path, [records[3], *records[:3]])
    assert second.meta["decoded"] == 1 and second.meta["reused"] == 3
    assert torch.equal(second.read(1)["image"], before)  # s0, now at row 1
    assert torch.equal(first.read(0)["image"], before)  # the old build's open files still read
    settings_changed = _build(tmp_path, records, size=(8, 8))
    assert settings_changed.meta["decoded"] == 4  # the key holds the settings


def test_cache_pickles_for_spawned_workers_and_refuses_a_rebuilt_one(tmp_path):
    records = _images(tmp_path, 2)
    cache = _build(tmp_path, records)
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.read(1)["image"], cache.read(1)["image"])
    state = pickle.dumps(cache)
    _build(tmp_path, records, size=(8, 8))
    with pytest.raises(CacheError, match="rebuilt"):
        pickle.loads(state)


def test_encodings_refuse_values_they_cannot_hold():
    assert encode(np.array([0.0, 0.5, 1.0]), "unit16", "x").tolist() == [0, 32768, 65535]
    with pytest.raises(CacheError, match=r"\[0, 1\]"):
        encode(np.array([1.5]), "unit16", "x")
    with pytest.raises(CacheError, match="non-finite"):
        encode(np.array([np.nan]), "unit16", "x")
    with pytest.raises(CacheError, match="integers"):
        encode(np.array([0.5]), "uint8", "x")


def test_different_shapes_are_refused(tmp_path):
    records = _images(tmp_path, 2)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "img1.png")  # RGB among grey
    with pytest.raises(CacheError, match="one shape"):
        _build(tmp_path, records)
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache.build-*"))


def test_augmentation_replays_the_memory_path_on_disk(tmp_path):
    records = _images(tmp_path, 4)
    cache = _build(tmp_path, records)
    load = load_transforms(tmp_path, [16, 16])
    memory = SampleDataset(records, load, augment=augment_transforms(2, flips=True), seed=5)
    disk = SampleDataset(records, CachedLoadd(load, cache, tmp_path), augment=augment_transforms(2, flips=True),
                         seed=5, cache=False)
    for epoch in (0, 3):
        memory.set_epoch(epoch)
        disk.set_epoch(epoch)
        for i in (2, 0, 3, 1):
            a, b = memory[i]["image"], disk[i]["image"]
            # same random draws: the difference stays at the cache's rounding, far below the augmentation's
            assert float((a - b).abs().max()) < 1e-4
            assert torch.equal(b, disk[i]["image"])
    unaugmented = load(dict(records[0]))["image"]
    assert float((memory[0]["image"] - unaugmented).abs().max()) > 1e-2  # it did augment


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _trainer(tmp_path: Path, out: str, records, cache, workers: int) -> Trainer:
    seed_everything(0)
    load = CachedLoadd(load_transforms(tmp_path, [16, 16]), cache, tmp_path)

    def to_sample(rec):
        sample = load(rec)
        sample["label"] = torch.as_tensor(rec["target"])
        return sample

    train = SampleDataset(records, to_sample, augment=augment_transforms(2, flips=True), seed=0, cache=False)
    config = TrainConfig(epochs=2, seed=0, device="cpu", batch_size=4, lr=1e-2, warmup_epochs=0, log_every=0,
                         num_workers=workers)
    return Trainer(_TinyCNN(), train, None, config, tmp_path / out,
                   loss_fn=lambda out, batch: nn.functional.cross_entropy(out, batch["label"]), progress=False)


def test_resume_from_disk_cache_gives_identical_weights(tmp_path):
    records = _images(tmp_path, 8)
    cache = _build(tmp_path, records)
    whole = _trainer(tmp_path, "whole", records, cache, workers=2)
    whole.fit()
    _trainer(tmp_path, "split", records, cache, workers=2).fit(max_epochs_this_run=1)
    resumed = _trainer(tmp_path, "split", records, cache, workers=2)
    assert resumed.fit().resumed_from == 1
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the `cache` study key


def _study(tmp_path: Path, rows: int, image_size: int, cache: str = "auto", task: str = "xray") -> dict:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,image\n" + "".join(f"p{i},img{i}.png\n" for i in range(rows)))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "cache": cache, "results_dir": str(tmp_path / "results"),
                                    "tasks": {task: {"manifest": str(manifest), "image_size": image_size}}}))
    return load_study(path)


def test_auto_picks_disk_above_the_memory_budget(tmp_path):
    per_image = 224 * 224 * 4
    small = MEMORY_CACHE_BYTES // per_image
    assert cache_mode(_study(tmp_path, small, 224), "xray") == "memory"
    assert cache_mode(_study(tmp_path, small + 1, 224), "xray") == "disk"
    assert cache_mode(_study(tmp_path, small + 1, 224, cache="memory"), "xray") == "memory"
    assert cache_mode(_study(tmp_path, small // 3 + 1, 224, task="histo"), "histo") == "disk"  # colour
    assert cache_dir(_study(tmp_path, 3, 224), "xray").parts[-3:] == ("xray", "cache", "224x224")
    generated = load_study(_write(tmp_path / "gen.yaml", {"study": "g", "tasks": {"xray": {}}}))
    assert cache_mode(generated, "xray") == "memory"


def _write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


def test_cache_info_is_json(tmp_path):
    records = _images(tmp_path, 2)
    _build(tmp_path, records)
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert meta["count"] == 2 and meta["arrays"]["image"]["encoding"] == "unit16"
    assert meta["bytes"] == os.path.getsize(tmp_path / "cache" / "image.npy")


# ------------------------------------------------------------------ the stages' datasets


def _histo_study(tmp_path: Path, cache: str) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    rows = ["patient_id,image,label,split"]
    for i in range(8):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / f"tile{i}.png")
        rows.append(f"p{i},tile{i}.png,{'malignant' if i % 2 else 'benign'},{['train', 'val', 'test', 'train'][i % 4]}")
    split = tmp_path / "split.csv"
    split.write_text("\n".join(rows) + "\n")
    study = _write(tmp_path / f"{cache}.yaml", {"study": "c", "cache": cache, "results_dir": str(tmp_path / "results"),
                                                 "tasks": {"histo": {"manifest": str(split), "image_size": 16}}})
    return study, split


def test_stages_read_the_disk_cache_built_once(tmp_path):
    from medvit.tasks.common import load_context
    from medvit.tasks.preprocess import sample_loading
    from medvit.tasks.training import split_dataset

    study, split = _histo_study(tmp_path, "disk")
    ctx = load_context(study, "histo", split)
    load, in_memory = sample_loading(ctx, [16, 16], False, cache=True)
    assert isinstance(load, CachedLoadd) and not in_memory  # built here: no workflow rule ran
    built = cache_dir(ctx.study, "histo") / "cache.json"
    stamp = built.stat().st_mtime_ns
    again, _ = sample_loading(ctx, [16, 16], False, cache=True)
    assert again.cache is load.cache and built.stat().st_mtime_ns == stamp  # opened, not rebuilt
    train = split_dataset(ctx, "train", [16, 16])
    decoded = load_transforms(ctx.manifest.root, [16, 16])(dict(train.records[0]))["image"]
    assert float((train[0]["image"] - decoded).abs().max()) <= HALF_STEP
    assert train.cache is False and train._cached == [None] * len(train)  # nothing held in memory
    plain, _ = sample_loading(ctx, [12, 12], False, cache=True)  # another grid: decoded as read
    assert not isinstance(plain, CachedLoadd)

    memory_study, _ = _histo_study(tmp_path, "memory")
    load, in_memory = sample_loading(load_context(memory_study, "histo", split), [16, 16], False, cache=True)
    assert in_memory and not isinstance(load, CachedLoadd)
