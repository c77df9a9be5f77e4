"""Data loading against the model's consumption: samples/s of the loader (decode + preprocess
+ augment) on the first epoch (decoding) and later epochs (the decoded-image cache), with and
without the cache and with worker processes, next to the training samples/s of the models
that consume them.

    python benchmarks/bench_data.py [--device auto] [--quick]

Uses a synthetic X-ray study (PNG files, 64 px) written to a temporary folder.
A loader/model ratio above 1 means loading keeps up with training.
Writes benchmarks/results/data_<device>.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


def make_dataset(manifest: Path, size: int, cache: bool):
    from medvit.data.datasets import SampleDataset
    from medvit.data.transforms import augment_transforms, load_transforms

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    load = load_transforms(manifest.parent, (size, size))
    recs = [{"row": row, "patient_id": row["patient_id"], "sample_id": str(i)} for i,
            row in enumerate(df.to_dict("records"))]
    return SampleDataset(recs, lambda r: {"image": load(r)["image"]}, augment=augment_transforms(2, flips=True),
                         seed=0, cache=cache)


def epoch_rate(ds, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = sum(len(b["image"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    args = U.parser(__doc__).parse_args()
    device = U.device_of(args.device)
    from medvit.data.synth import synthesize
    from medvit.engine.speed import auto_num_workers

    patients, size, batch = (12, 64, 16) if args.quick else (60, 64, 32)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="medvit-data-") as tmp:
        manifest = synthesize("xray", patients, Path(tmp) / "xray", seed=0, image_size=size)
        n = len(pd.read_csv(manifest))
        auto = auto_num_workers(device)
        for workers in sorted({0, 2, auto}):
            for cache in (True, False):
                ds = make_dataset(manifest, size, cache)
                if workers and cache:
                    t0 = time.perf_counter()
                    ds.warm_cache(num_workers=workers)  # what the Trainer does before workers start
                    fill = time.perf_counter() - t0
                    warm = n / fill
                    # first epoch = filling the cache + iterating over it
                    first = n / (fill + n / epoch_rate(ds, workers, batch))
                else:
                    first = epoch_rate(ds, workers, batch)
                ds.set_epoch(1)
                later = epoch_rate(ds, workers, batch)
                rows.append({"workers": workers, "cache": cache, "auto_workers": workers == auto,
                             "cache_fill_samples_per_s": round(warm, 1) if workers and cache else None,
                             "first_epoch_samples_per_s": round(first, 1),
                             "later_epoch_samples_per_s": round(later, 1)})
                print(f"workers {workers} cache {cache!s:5s}: first epoch "
                            f"{first:7.1f}/s, later epochs {later:7.1f}/s")
    # the models that consume this data, training samples/s at the same size
    consumers = {}
    for name in ("densenet121", "vit_tiny"):
        model = U.build(name, size, device)
        x = U.zoo_input(name, size, batch, device)
        sec = U.timed(U.train_step_fn(model, x, device), device, repeats=2 if args.quick else 5)
        consumers[name] = round(batch / min(sec), 1)
    best_cached = max(r["later_epoch_samples_per_s"] for r in rows if r["cache"])
    for name, rate in consumers.items():
        print(f"{name}: trains {rate}/s; cached loading {best_cached}/s -> loader/model x{best_cached / rate:.1f}")
    U.write_json(U.out_path(args, "data", device), {
        **U.header(device, args.quick), "dataset": {"modality": "xray (synthetic PNG)", "samples": n,
                                                    "image_size": size, "batch": batch},
        "auto_num_workers": auto, "loading": rows, "model_train_samples_per_s": consumers,
        "loader_over_model": {k: round(best_cached / v, 2) for k, v in consumers.items()}})


if __name__ == "__main__":
    main()
