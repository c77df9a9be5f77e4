"""The preprocessing stage: a task's disk cache (:mod:`medvit.data.cache`), built once per
study and preprocessing setting, and how the stages' datasets load their samples through it.

``cache`` (study key) decides where decoded images live between epochs: ``memory`` (the
dataset's own list), ``disk`` (the task's cache folder, read by every job and worker) or
``none``; ``auto`` picks by size (:func:`medvit.config.cache_mode`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from medvit.config import cache_dir, cache_mode, cache_spatial_size
from medvit.data.cache import CachedLoadd, PreprocessedCache, build_cache, load_settings
from medvit.data.transforms import load_transforms
from medvit.tasks.common import StageContext, load_context

_OPENED: dict[tuple[str, int], PreprocessedCache] = {}


def _opened(folder: Path) -> PreprocessedCache | None:
    """The cache in ``folder``, opened once per process and build (a stage's training and
    validation datasets share one index)."""
    try:
        stamp = (str(folder), (folder / "cache.json").stat().st_mtime_ns)
    except OSError:
        return None
    if stamp not in _OPENED:
        _OPENED.clear()
        cache = PreprocessedCache.open(folder)
        if cache is None:
            return None
        _OPENED[stamp] = cache
    return _OPENED[stamp]


def _cache_records(ctx: StageContext) -> list[dict[str, Any]]:
    return [{"row": row, "sample_id": str(row["sample_id"])} for row in ctx.df.to_dict("records")]


def preprocess_stage(config_path: str | Path, task: str, split_path: str | Path, out_dir: str | Path | None = None,
                     workers: int | None = None) -> Path:
    """Build the task's disk cache over every row of ``split.csv`` (all splits, so training,
    validation, prediction and pretraining read the same cache), reusing the samples an earlier
    build of the folder holds.

    Args:
        out_dir: the cache folder (default :func:`medvit.config.cache_dir`).
        workers: decoding threads (default: the machine's cores, up to 8).

    Returns:
        the folder's ``cache.json``.
    """
    ctx = load_context(config_path, task, split_path)
    size, masks = cache_spatial_size(ctx.study, task)
    folder = Path(out_dir) if out_dir is not None else cache_dir(ctx.study, task)
    load = load_transforms(ctx.manifest.root, size, load_mask=masks)
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    cache = build_cache(folder, _cache_records(ctx), load, load_settings(size, masks), ctx.manifest.root,
                        workers=n_workers, desc=f"preprocessing {task}")
    meta = cache.meta
    print(f"{folder}: {meta['count']} samples ({meta['decoded']} decoded, {meta['reused']} reused from the "
          f"previous build), {meta['bytes'] / 2**20:.1f} MiB", flush=True)
    return folder / "cache.json"


def sample_loading(ctx: StageContext, spatial_size: Sequence[int], load_mask: bool,
                   cache: bool) -> tuple[Callable[[dict], dict], bool]:
    """The loading transform of a stage's dataset and whether the dataset keeps samples in memory.

    Args:
        cache: whether the caller wants samples kept between epochs (training data) or read once
            (prediction, figures).

    Returns:
        ``(load, in_memory)``: with the ``disk`` mode ``load`` reads the task's cache (built here
        when the workflow has not built it, e.g. a stage run by hand) and nothing is kept in
        memory; with ``memory`` the dataset keeps what ``load`` decodes when ``cache``;
        with ``none`` nothing is kept.
    """
    load = load_transforms(ctx.manifest.root, spatial_size, load_mask=load_mask)
    mode = cache_mode(ctx.study, ctx.task)
    if mode != "disk":
        return load, cache and mode == "memory"
    settings = load_settings(spatial_size, load_mask)
    task_size, task_masks = cache_spatial_size(ctx.study, ctx.task)
    built = _opened(cache_dir(ctx.study, ctx.task))
    task_settings = load_settings(task_size, task_masks)
    if list(spatial_size) == task_size and (built is None or not built.serves(task_settings)):
        # a stage run outside the workflow (whose preprocess rule runs first): build it here
        build_cache(cache_dir(ctx.study, ctx.task), _cache_records(ctx),
                    load_transforms(ctx.manifest.root, task_size, load_mask=task_masks), task_settings,
                    ctx.manifest.root, workers=min(8, os.cpu_count() or 1))
        built = _opened(cache_dir(ctx.study, ctx.task))
    if built is None or not built.serves(settings):
        # another grid than the task's (a stage with its own image size): decoded on access
        print(f"note: no disk cache at grid {list(spatial_size)}; samples are decoded as they are read", flush=True)
        return load, False
    keys = ["image", "label"] if load_mask else ["image"]
    return CachedLoadd(load, built, ctx.manifest.root, keys=keys), False
