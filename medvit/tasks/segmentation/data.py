"""The volumes a segmentation model sees: resized to ``image_size``, with their masks, and for
training a random ``roi_size`` patch, flips and intensity jitter."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from monai import transforms as mt

from medvit.data.datasets import SampleDataset
from medvit.data.transforms import augment_transforms
from medvit.errors import ConfigError
from medvit.tasks.common import StageContext, records
from medvit.tasks.preprocess import sample_loading


def _check_sizes(tcfg: dict[str, Any]) -> tuple[list[int], list[int]]:
    size, roi = [int(tcfg["image_size"])] * 3, [int(s) for s in tcfg["roi_size"]]
    if any(r > s for r, s in zip(roi, size)):
        raise ConfigError(f"tasks.prostate.roi_size: got {roi} with image_size {size[0]}; allowed: each at most "
                          "image_size (the patch is cut out of the resized volume)")
    return size, roi


def volume_dataset(ctx: StageContext, rows: pd.DataFrame, augment: bool = False, cache: bool = True,
                   with_mask: bool = True) -> SampleDataset:
    """Volumes of ``rows`` resized to ``image_size`` (and their masks); with ``augment``, a
    random ``roi_size`` patch (when smaller than the volume), flips and intensity jitter."""
    size, roi = _check_sizes(ctx.tcfg)
    load, in_memory = sample_loading(ctx, size, with_mask, cache)
    keys = ["image", "label"] if with_mask else ["image"]
    ops: list[Any] = []
    if augment:
        if roi != size:
            ops.append(mt.RandSpatialCropd(keys, roi_size=roi, random_size=False))
        ops.append(augment_transforms(3, flips=ctx.tcfg["augment"]["flips"], load_mask=with_mask))
    recs = records(ctx, rows) if with_mask else [
        {"row": r, "patient_id": str(r["patient_id"]),
         "sample_id": str(r["sample_id"])} for r in rows.to_dict("records")]

    def to_sample(rec: dict[str, Any]) -> dict[str, Any]:
        sample = load(rec)
        if "target" in rec:
            sample["target"] = torch.as_tensor(rec["target"])
        return sample

    return SampleDataset(recs, to_sample, augment=mt.Compose(ops) if ops else None, seed=ctx.study["seed"],
                         cache=in_memory)
