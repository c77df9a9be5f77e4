"""Datasets over manifest rows, with decoded images cached in memory.

Why not ``monai.data.CacheDataset`` as is: its random transforms draw from one RNG per
transform object, so the augmentation a sample receives depends on worker layout and on
how many samples came before it, and a resumed run cannot replay it (MONAI#5153). Here
every sample's random transforms are re-seeded from ``(seed, epoch, index)`` — the same
augmentation for the same sample in the same epoch, whatever the workers and however often
training was interrupted.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset
from tqdm import tqdm


class SampleDataset(Dataset):
    """Samples as dicts (``image``, ``label``, ``patient_id``, ``sample_id``, ...).

    Args:
        records: one dict per sample; passed to ``load`` (must hold what it needs, e.g. ``row``).
        load: deterministic transform (reading, scaling, resizing); its output is cached.
        augment: random transform applied after the cache, re-seeded per (seed, epoch, index).
        seed: base seed of the augmentation.
        cache: keep loaded samples in memory (decoding happens once, on first access or in
            :meth:`warm_cache`). Off where ``load`` reads the task's disk cache
            (:class:`medvit.data.cache.CachedLoadd`, study key ``cache: disk``): every worker and
            job then reads the same files, and the dataset holds nothing.
    """

    def __init__(self, records: Sequence[dict[str, Any]], load: Callable[[dict], dict],
                 augment: Compose | None = None, seed: int = 0, cache: bool = True):
        self.records = list(records)
        self.load = load
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cached: list[dict[str, Any] | None] = [None] * len(self.records)
        # One RandomState shared by every random transform (and their inner array
        # transforms), re-seeded per sample: microseconds, where MONAI's
        # Compose.set_random_state builds new RandomState objects (about 1 ms per sample).
        self._rng = np.random.RandomState()
        if augment is not None:
            # Compose.set_random_state would give each child a fresh seed instead of the state
            for transform in augment.flatten().transforms:
                if isinstance(transform, Randomizable):
                    transform.set_random_state(state=self._rng)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (called by the trainer each epoch)."""
        self.epoch = int(epoch)

    def warm_cache(self, desc: str = "loading", num_workers: int = 0) -> None:
        """Decode every sample not cached yet, with a progress bar.

        The trainer calls it before DataLoader workers start: samples a worker decodes stay in
        that worker and die with it at the end of the epoch, so without this every epoch would
        decode again. ``num_workers`` > 0 decodes in that many threads (image decoders release
        the GIL; MONAI's CacheDataset does the same).
        """
        if not self.cache:
            return
        todo = [i for i, cached in enumerate(self._cached) if cached is None]
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=desc, unit="sample", leave=False, disable=len(todo) < 50)
        if num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(num_workers) as pool:
                for _ in pool.map(self._loaded, todo):
                    bar.update()
        else:
            for i in todo:
                self._loaded(i)
                bar.update()
        bar.close()

    def channel_statistics(self, key: str = "image", max_samples: int = 20000) -> dict[str, list[float]]:
        """Per-channel mean and standard deviation of the loaded (unaugmented) ``key`` arrays,
        over every pixel of the first ``max_samples`` samples (all of them in practice; the cap
        bounds the time on paper-scale splits). Used as a model's input standardisation, so it
        is computed on the training split only.

        Returns:
            ``{"mean": [C floats], "std": [C floats]}``.
        """
        if not len(self):
            raise ValueError("no samples to compute input statistics from")
        self.warm_cache("input statistics")
        total = total_sq = None
        count = 0
        for i in range(min(len(self), max_samples)):
            x = np.asarray(self._loaded(i)[key], dtype=np.float64)
            x = x.reshape(x.shape[0], -1)
            total = x.sum(1) if total is None else total + x.sum(1)
            total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
            count += x.shape[1]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
        return {"mean": [float(v) for v in mean], "std": [float(max(v, 1e-6)) for v in std]}

    def _loaded(self, index: int) -> dict[str, Any]:
        if self.cache and self._cached[index] is not None:
            return self._cached[index]
        sample = self.load(dict(self.records[index]))
        if self.cache:
            self._cached[index] = sample
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self._loaded(index))
        if self.augment is not None:
            self._rng.seed(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            sample = self.augment(sample)
        for key, value in sample.items():
            if isinstance(value, np.ndarray):
                sample[key] = torch.as_tensor(value)
        return sample
