"""Dictionary transforms keyed on ``image`` / ``label`` / ``patient_id`` (MONAI style).

A sample travels as a dict from the manifest row to the metric::

    {"image": (C, H, W) or (C, D, H, W) float32, "label": target or mask,
     "patient_id": str, "sample_id": str, "target": class target (segmentation only)}

The loading transform (:class:`LoadSampled`) reads the manifest row with
:func:`medvit.data.io.read_sample`; everything after it is MONAI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai import transforms as mt
from monai.data import set_track_meta

from medvit.data.io import read_image, read_sample

# Samples carry their metadata in the dict (patient_id, sample_id), not in MetaTensors;
# tracking MONAI metadata through every random transform costs more than the transform.
set_track_meta(False)


class LoadSampled(mt.MapTransform):
    """Replace ``d["row"]`` (a manifest row) by ``d["image"]`` (and ``d["label"]`` from the
    ``mask`` column when ``load_mask``). Arrays are channel-first float32 in real units.

    Args:
        root: the manifest's folder; paths in the row are relative to it.
        load_mask: also read the row's ``mask`` into ``d["label"]`` as (1, ...) float32 in {0, 1}.
    """

    def __init__(self, root: str | Path, load_mask: bool = False):
        super().__init__(keys=["row"])
        self.root = Path(root)
        self.load_mask = load_mask

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        row = d.pop("row")
        d["image"] = read_sample(row, self.root).array
        if self.load_mask:
            mask = read_image(self.root / row["mask"]).array[:1]
            d["label"] = (mask > 0.5).astype(np.float32)
        return d


def load_transforms(root: str | Path, spatial_size: Sequence[int], load_mask: bool = False) -> mt.Compose:
    """Deterministic part (cached once per sample): read, scale intensities to [0, 1] by
    per-image 0.5/99.5 percentiles per channel (robust to 12/16-bit ranges and outliers),
    resize to ``spatial_size`` (masks with nearest neighbour)."""
    keys = ["image", "label"] if load_mask else ["image"]
    modes = ("area", "nearest") if load_mask else ("area",)
    return mt.Compose([
        LoadSampled(root, load_mask=load_mask),
        mt.ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True,
                                           channel_wise=True),
        mt.Resized(keys, spatial_size=tuple(spatial_size), mode=modes),
        mt.EnsureTyped(keys, dtype=np.float32, track_meta=False),
    ])


def augment_transforms(spatial_dims: int, flips: bool, load_mask: bool = False) -> mt.Compose:
    """Random part, applied after the cache: ``flips`` (the task's ``augment.flips``) flips the
    last two spatial axes with probability 0.5 each; 2D images also get a mild affine, and
    every image intensity scaling and noise."""
    keys = ["image", "label"] if load_mask else ["image"]
    modes = ("bilinear", "nearest") if load_mask else ("bilinear",)
    ops: list[mt.Transform] = []
    if flips:
        ops += [mt.RandFlipd(keys, prob=0.5, spatial_axis=-1), mt.RandFlipd(keys, prob=0.5, spatial_axis=-2)]
    if spatial_dims == 2:
        ops.append(mt.RandAffined(keys, prob=0.5, rotate_range=0.15, scale_range=0.1, translate_range=(2, 2),
                                  mode=modes, padding_mode="border"))
    ops += [mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            mt.RandGaussianNoised("image", prob=0.3, std=0.02),
            mt.EnsureTyped(keys, dtype=np.float32, track_meta=False)]
    return mt.Compose(ops)


class TorchvisionRandd(mt.RandomizableTransform, mt.MapTransform):
    """Apply a random torchvision transform to ``d[keys]``, seeded from this transform's
    RandomState, so the sample's augmentation follows :class:`medvit.data.datasets.SampleDataset`'s
    (seed, epoch, index) stream like the MONAI transforms (torchvision draws from torch's
    global generator, which is forked and seeded around the call).

    Args:
        keys: image keys, (C, H, W) float tensors or arrays.
        transform: a ``torchvision.transforms.v2`` transform.
        uint8: hand the transform uint8 values (``round(x * 255)``, ``x`` in [0, 1]) and map
            the result back to float32 in [0, 1]; for transforms defined on 8-bit images
            (RandAugment's posterize, solarize, equalize). Costs 8-bit quantisation of the
            augmented training image only.
    """

    def __init__(self, keys, transform, uint8: bool = False):
        mt.RandomizableTransform.__init__(self, prob=1.0)
        mt.MapTransform.__init__(self, keys)
        self.transform = transform
        self.uint8 = uint8

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        d = dict(data)
        seed = int(self.R.randint(0, 2**31 - 1))
        for key in self.key_iterator(d):
            x = torch.as_tensor(np.asarray(d[key]) if not isinstance(d[key], torch.Tensor) else d[key]).float()
            if self.uint8:
                x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                y = self.transform(x)
            d[key] = (y.float() / 255.0) if self.uint8 else y.float()
        return d


def random_resized_crop(size: Sequence[int], scale: Sequence[float] = (0.5, 1.0)) -> mt.Compose:
    """MAE pretraining augmentation: a random crop covering ``scale`` of the image area (aspect
    ratio 3/4 to 4/3), resized back to ``size`` (bilinear); no flips (chest anatomy)."""
    from torchvision.transforms import v2

    return mt.Compose([TorchvisionRandd("image", v2.RandomResizedCrop(tuple(size), scale=tuple(scale),
                                                                      antialias=True)),
                       mt.EnsureTyped("image", dtype=np.float32, track_meta=False)])


def randaugment_transforms(magnitude: int, num_ops: int = 2) -> mt.Compose:
    """torchvision RandAugment (``num_ops`` random operations of strength ``magnitude`` out of
    31) on 8-bit values of a [0, 1] image. ``magnitude`` 0 applies nothing."""
    from torchvision.transforms import v2

    ops: list[mt.Transform] = []
    if magnitude > 0:
        ops.append(TorchvisionRandd("image", v2.RandAugment(num_ops=num_ops, magnitude=magnitude), uint8=True))
    ops.append(mt.EnsureTyped("image", dtype=np.float32, track_meta=False))
    return mt.Compose(ops)


def classifier_augmentation(flips: bool, randaug_magnitude: int = 0) -> mt.Compose:
    """Training augmentation of every 2D classifier: RandAugment when ``randaug_magnitude`` > 0
    (off by default), then the mild geometric and intensity augmentation of
    :func:`augment_transforms`.

    Why RandAugment is off by default: on small grayscale radiographs its operations (black
    translation bars, equalize, solarize, brightness) change a 28 px PneumoniaMNIST image by a
    median 0.12 of the intensity range and erase the global lung-brightness cue; a ViT-Tiny
    trained with magnitude 6 reached test AUROC 0.754 after 5 epochs, and 0.945 without it
    (docs/xray_mae.md). It is an ImageNet-scale recipe for large RGB images.
    """
    ops: list[mt.Transform] = []
    if randaug_magnitude > 0:
        ops.append(randaugment_transforms(randaug_magnitude))
    ops.append(augment_transforms(2, flips=flips))
    return mt.Compose(ops)
