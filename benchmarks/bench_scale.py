"""Study scale: wall time, peak memory and disk of each stage at 5,000 and 50,000 X-rays,
and the disk cache's loader throughput per worker at 224 px.

    python benchmarks/bench_scale.py [--sizes 5000 50000] [--image-size 64] [--model resnet18]
                                     [--work DIR] [--loader-images 2000] [--quick]
    python benchmarks/bench_scale.py --merge a.json b.json     # runs made separately, one table

For each size it writes a synthetic X-ray study (8-bit PNGs of ``--source-size`` px, two per
patient, normal/pneumonia) and runs the stages a study runs, each as its own ``medvit``
process, as the workflow's jobs do: ``split``, ``preprocess`` (the disk cache), one epoch of
``train`` (with its validation pass) and ``predict`` (validation and test), with ``cache:
disk``; then the same training with ``cache: memory`` (every sample decoded into the job's
memory first: what each job did before the disk cache). Per stage: wall time, the process's
peak RSS (``ru_maxrss``, with its loader workers' largest beside it) and the disk it used.

The loader part builds a 224 px cache of ``--loader-images`` images and times a training
epoch's loading (cache read + the X-ray training augmentation, batches of 64) with 0, 1, 2, ...
workers: samples/s in all and per worker. Writes benchmarks/results/scale_cpu.json and the
``Study scale`` section of benchmarks/RESULTS.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _util as U  # noqa: E402

SECTION_START = "<!-- bench_scale: start -->"
SECTION_END = "<!-- bench_scale: end -->"


# ------------------------------------------------------------------------ synthetic study


def write_xrays(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` 8-bit PNG radiograph-like images (smooth anatomy-scale background, noise; a bright
    opacity on pneumonia images), two per patient; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    if manifest.is_file() and sum(1 for _ in open(manifest)) == n + 1:
        return manifest  # written by an earlier run
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = ["patient_id,image,label"]
    (folder / "images").mkdir(exist_ok=True)
    for i in range(n):
        coarse = rng.random((8, 8))
        background = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
        img = 0.5 * background + 0.2 * rng.random((size, size))
        label = "pneumonia" if i % 3 == 0 else "normal"
        if label == "pneumonia":
            cy, cx = rng.uniform(0.3, 0.7, 2)
            img += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
        name = f"images/{i:06d}.png"
        Image.fromarray(np.clip(img * 200, 0, 255).astype(np.uint8)).save(folder / name, compress_level=1)
        lines.append(f"pat{i // 2},{name},{label}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def study_file(path: Path, name: str, manifest: Path, results: Path, cache: str, args: argparse.Namespace) -> Path:
    study = {"study": name, "seed": 0, "device": "cpu", "cache": cache, "results_dir": str(results),
             "tasks": {"xray": {"manifest": str(manifest), "label_column": "label", "positive_class": "pneumonia",
                                "image_size": args.image_size, "models": [args.model],
                                "train": {"epochs": 1, "batch_size": args.batch, "warmup_epochs": 0,
                                          "num_workers": args.workers}}}}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# ------------------------------------------------------------------------------- stages


def run_stage(argv: list[str], log: Path) -> dict[str, Any]:
    """One ``medvit`` command in a fresh process: wall seconds and peak RSS (MiB) of the process
    and of its largest child (loader workers)."""
    usage = log.with_suffix(".usage.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage-usage", str(usage), "--", *argv]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"medvit {' '.join(argv)} failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-2000:])
    return {"wall_s": round(wall, 1), **json.loads(usage.read_text())}


def _stage_usage_main(out: str, argv: list[str]) -> None:
    from medvit.cli import main

    rc = main(argv)
    kib = 1024  # ru_maxrss is in KiB on Linux
    Path(out).write_text(json.dumps({
        "rc": rc, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
        "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 1)}))
    sys.exit(rc or 0)


def du_mib(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return round(total / 2**20, 1)


def scale_run(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = work / f"xray{n}"
    t0 = time.perf_counter()
    manifest = write_xrays(data, n, args.source_size)
    generate_s = time.perf_counter() - t0
    results = work / "results"
    disk_study = study_file(work / f"scale{n}_disk.yaml", f"scale{n}_disk", manifest, results, "disk", args)
    memory_study = study_file(work / f"scale{n}_memory.yaml", f"scale{n}_memory", manifest, results, "memory", args)
    out = results / f"scale{n}_disk" / "xray"
    shutil.rmtree(results / f"scale{n}_disk", ignore_errors=True)
    shutil.rmtree(results / f"scale{n}_memory", ignore_errors=True)
    out.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    split = out / "split.csv"
    from medvit.config import cache_dir, load_study

    cache = cache_dir(load_study(disk_study), "xray")
    model = out / args.model
    stages: dict[str, Any] = {}
    common = ["--task", "xray"]
    stages["split"] = run_stage(["split", "--config", str(disk_study), *common, "--out", str(split)],
                                logs / f"{n}_split.log")
    stages["preprocess"] = run_stage(["preprocess", "--config", str(disk_study), *common, "--split", str(split),
                                      "--workers", str(args.cache_workers)], logs / f"{n}_preprocess.log")
    stages["preprocess"]["disk_mib"] = du_mib(cache)
    stages["train (disk)"] = run_stage(["train", "--config", str(disk_study), *common, "--model", args.model,
                                        "--split", str(split), "--out", str(model)], logs / f"{n}_train_disk.log")
    stages["predict (disk)"] = run_stage(
        ["predict", "--config", str(disk_study), *common, "--model", args.model, "--split", str(split),
         "--weights", str(model / "model.safetensors"), "--out", str(model / "predictions.csv")],
        logs / f"{n}_predict_disk.log")
    if not args.skip_memory:
        mem_model = results / f"scale{n}_memory" / "xray" / args.model
        stages["train (memory)"] = run_stage(["train", "--config", str(memory_study), *common, "--model", args.model,
                                              "--split", str(split), "--out", str(mem_model)],
                                             logs / f"{n}_train_memory.log")
    import pandas as pd

    df = pd.read_csv(split)
    counts = df["split"].value_counts().to_dict()
    return {"images": n, "patients": int(df["patient_id"].nunique()), "splits": counts,
            "generate_s": round(generate_s, 1), "source_mib": du_mib(data), "stages": stages}


def volume_run(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``n`` synthetic bpMRI patients (3 sequences + lesion mask, NIfTI) through split and the
    disk cache, then one epoch of the training loader (patches, flips, intensity) over it."""
    import torch
    from torch.utils.data import DataLoader

    from medvit.data.synth import synthesize
    from medvit.tasks.segmentation import fold_context, volume_dataset

    data = work / f"prostate{n}"
    t0 = time.perf_counter()
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        synthesize("prostate", n, data, seed=0, image_size=args.volume_source_size)
    generate_s = time.perf_counter() - t0
    results = work / "results"
    study = work / f"volumes{n}.yaml"
    study.write_text(yaml.safe_dump({
        "study": f"volumes{n}", "seed": 0, "device": "cpu", "cache": "disk", "results_dir": str(results),
        "tasks": {"prostate": {"manifest": str(manifest), "image_size": args.volume_size, "folds": 5,
                               "roi_size": [args.volume_size // 2] * 3, "models": ["unet3d"]}}}, sort_keys=False))
    out = results / f"volumes{n}" / "prostate"
    shutil.rmtree(results / f"volumes{n}", ignore_errors=True)
    out.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    split = out / "split.csv"
    common = ["--config", str(study), "--task", "prostate"]
    stages = {"split": run_stage(["split", *common, "--out", str(split)], logs / f"vol{n}_split.log"),
              "preprocess": run_stage(["preprocess", *common, "--split", str(split), "--workers",
                                       str(args.cache_workers)], logs / f"vol{n}_preprocess.log")}
    cache = next((out / "cache").glob("*/cache.json")).parent
    stages["preprocess"]["disk_mib"] = du_mib(cache)
    ctx = fold_context(study, "prostate", split, 0)
    train = volume_dataset(ctx, ctx.rows("train"), augment=True)
    loader = DataLoader(train, batch_size=2, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    seen = sum(len(b["image"]) for b in loader)
    rate = seen / (time.perf_counter() - t0)
    return {"volumes": n, "source_size": args.volume_source_size, "image_size": args.volume_size,
            "generate_s": round(generate_s, 1), "source_mib": du_mib(data), "stages": stages,
            "loader_samples_per_s": round(rate, 1), "loader_samples": seen}


STAGE_LOGS = {"split": "split", "preprocess": "preprocess", "train (disk)": "train_disk",
              "predict (disk)": "predict_disk", "train (memory)": "train_memory"}


def collect(n: int, work: Path) -> dict[str, Any]:
    """A run stopped part-way, from its files: each finished stage's usage file, its wall time
    from file times (from the end of the stage before, or of the manifest, to its own end)."""
    import pandas as pd

    logs, data = work / "logs", work / f"xray{n}"
    previous = (data / "manifest.csv").stat().st_mtime
    stages: dict[str, Any] = {}
    for stage, name in STAGE_LOGS.items():
        usage = logs / f"{n}_{name}.usage.json"
        if not usage.is_file():
            break
        end = usage.stat().st_mtime
        stages[stage] = {"wall_s": round(end - previous, 1), **json.loads(usage.read_text())}
        previous = end
    caches = list((work / "results" / f"scale{n}_disk" / "xray" / "cache").glob("*/cache.json"))
    if "preprocess" in stages and caches:
        stages["preprocess"]["disk_mib"] = du_mib(caches[0].parent)
    df = pd.read_csv(work / "results" / f"scale{n}_disk" / "xray" / "split.csv")
    return {"images": n, "patients": int(df["patient_id"].nunique()), "splits": df["split"].value_counts().to_dict(),
            "generate_s": None, "source_mib": du_mib(data), "stages": stages, "collected_from_logs": True}


# ------------------------------------------------------------------------------- loader


def loader_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from medvit.data.cache import CachedLoadd, build_cache, load_settings
    from medvit.data.datasets import SampleDataset
    from medvit.data.transforms import load_transforms
    from medvit.tasks.classification import train_augmentation

    size = args.loader_size
    data = work / f"loader{args.loader_images}"
    manifest = write_xrays(data, args.loader_images, args.loader_source_size, seed=1)
    import pandas as pd

    rows = pd.read_csv(manifest, dtype=str).to_dict("records")
    records = [{"row": r, "patient_id": r["patient_id"], "sample_id": str(i), "label": 0}
               for i, r in enumerate(rows)]
    load = load_transforms(data, [size, size])
    t0 = time.perf_counter()
    cache = build_cache(work / f"loader_cache{size}", records, load, load_settings([size, size], False), data,
                        workers=args.cache_workers)
    build_s = time.perf_counter() - t0
    ds = SampleDataset(records, CachedLoadd(load, cache, data), augment=train_augmentation("xray"), seed=0,
                       cache=False)
    results = []
    for workers in args.loader_workers:
        loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers, drop_last=False,
                            generator=torch.Generator().manual_seed(0))
        rates = []
        for _ in range(args.loader_epochs):
            t0 = time.perf_counter()
            n = sum(len(b["image"]) for b in loader)
            rates.append(n / (time.perf_counter() - t0))
        rate = float(np.median(rates))
        results.append({"workers": workers, "samples_per_s": round(rate, 1),
                        "per_worker": round(rate / max(1, workers), 1)})
        print(f"loader, {workers} worker(s): {rate:.0f} samples/s", flush=True)
    decode = SampleDataset(records[:200], load, augment=train_augmentation("xray"), seed=0, cache=False)
    t0 = time.perf_counter()
    for i in range(len(decode)):
        decode[i]
    decode_rate = len(decode) / (time.perf_counter() - t0)
    return {"images": args.loader_images, "image_size": size, "source_size": args.loader_source_size,
            "batch": 64, "cache_build_s": round(build_s, 1), "cache_mib": du_mib(work / f"loader_cache{size}"),
            "results": results, "decode_and_augment_per_s": round(decode_rate, 1)}


# ------------------------------------------------------------------------------- report


def markdown(d: dict[str, Any]) -> str:
    m = d["machine"]
    a = d["settings"]
    lines = [SECTION_START, "## Study scale: memory, time and disk per stage (`bench_scale.py`)", "",
             f"Run on {d['created']}: {m.get('cpu')} ({m.get('cores')} cores, shared; 1-minute load average at "
             f"start {m.get('load_average_1min')}). Synthetic X-ray studies (8-bit PNGs of {a['source_size']} px, "
             f"two per patient), `{a['model']}` at {a['image_size']} px, batch {a['batch']}, one epoch, "
             f"`num_workers: {a['workers']}`; each stage a `medvit` process of its own. Peak RSS: the process's "
             "`ru_maxrss`. `train (memory)` is the same training with `cache: memory` (every sample decoded "
             "into the job first)."
             + (" The sizes ran side by side, each in its own benchmark process (`--merge`)."
                if d.get("merged_from") else ""), "",
             *([f"> {d['note']}", ""] if d.get("note") else []),
             "| images | stage | wall s | peak RSS MiB | disk MiB |", "|---|---|---|---|---|"]
    for run in d["runs"]:
        lines.append(f"| {run['images']} | generate (PNG sources) | {run['generate_s'] or ''} |  | "
                     f"{run['source_mib']} |")
        for stage, s in run["stages"].items():
            label = stage + (f" ({s['note']})" if s.get("note") else "")
            lines.append(f"| {run['images']} | {label} | {s['wall_s'] if s['wall_s'] is not None else ''} | "
                         f"{s['peak_rss_mib']} | {s.get('disk_mib', '')} |")
    ratios = d.get("rss_ratios") or {}
    if ratios:
        lines += ["", "Peak RSS of the largest study over the smallest (target for the disk cache: at most 1.3):", ""]
        for stage, r in ratios.items():
            lines.append(f"- {stage}: {r['ratio']} ({r['small']} MiB at {r['small_n']} images, "
                         f"{r['large']} MiB at {r['large_n']}" + (f"; {r['note']}" if r.get("note") else "") + ")")
    if d.get("volumes"):
        v0 = d["volumes"][0]
        lines += ["", f"Volumes: synthetic bpMRI patients (T2w, ADC, HBV and a lesion mask as NIfTI, "
                      f"{v0['source_size']}^3 voxels) cached at {v0['image_size']}^3 with masks; the loader column is "
                      "one epoch of fold 0's training patches (flips, intensity) read from the cache in one process.",
                  "", "| volumes | stage | wall s | peak RSS MiB | disk MiB |", "|---|---|---|---|---|"]
        for v in d["volumes"]:
            lines.append(f"| {v['volumes']} | generate (NIfTI sources) | {v['generate_s']} |  | {v['source_mib']} |")
            for stage, s in v["stages"].items():
                lines.append(f"| {v['volumes']} | {stage} | {s['wall_s']} | {s['peak_rss_mib']} | "
                             f"{s.get('disk_mib', '')} |")
            lines.append(f"| {v['volumes']} | loader epoch ({v['loader_samples']} patches) | | | "
                         f"{v['loader_samples_per_s']} samples/s |")
    ld = d.get("loader")
    if ld:
        lines += ["", f"Loader from the disk cache at {ld['image_size']} px ({ld['images']} images, batch "
                      f"{ld['batch']}, X-ray training augmentation; cache built in {ld['cache_build_s']} s, "
                      f"{ld['cache_mib']} MiB). Decoding the {ld['source_size']} px PNG instead (cache `none`, one "
                      f"process): {ld['decode_and_augment_per_s']} samples/s.", "",
                  "| workers | samples/s | per worker |", "|---|---|---|"]
        lines += [f"| {r['workers']} | {r['samples_per_s']} | {r['per_worker']} |" for r in ld["results"]]
        lines += ["", "GPU comparison pending (no GPU lent for this run): on a 16-core GPU node `num_workers: auto` "
                      "starts 8 workers, and the H100 rates recorded in RESULTS_cuda.md at 224 px (MAE ViT-B/16 "
                      "pretraining: 2715 samples/s tf32 at batch 128, 6533 bf16 at batch 512) need "
                      "340-820 samples/s from each of them."]
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"


def rss_ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS of each stage in the largest study over the smallest."""
    if len(runs) < 2:
        return {}
    small, large = min(runs, key=lambda r: r["images"]), max(runs, key=lambda r: r["images"])
    return {stage: {"small_n": small["images"], "large_n": large["images"], "small": s["peak_rss_mib"],
                    "large": large["stages"][stage]["peak_rss_mib"],
                    "ratio": round(large["stages"][stage]["peak_rss_mib"] / s["peak_rss_mib"], 2),
                    "note": large["stages"][stage].get("note")}
            for stage, s in small["stages"].items() if stage in large["stages"]}


def merge(paths: list[Path]) -> dict[str, Any]:
    """One payload from runs made separately (e.g. one size each, side by side)."""
    parts = [json.loads(p.read_text()) for p in paths]
    payload = {**parts[0], "runs": sorted((r for p in parts for r in p["runs"]), key=lambda r: r["images"]),
               "merged_from": [str(p) for p in paths]}
    payload.pop("loader", None)
    for part in parts:
        if part.get("loader"):
            payload["loader"] = part["loader"]

    payload["volumes"] = sorted((v for part in parts for v in part.get("volumes", [])), key=lambda v: v["volumes"])
    payload["rss_ratios"] = rss_ratios(payload["runs"])
    return payload


def write_section(report: Path, text: str) -> None:
    body = report.read_text() if report.exists() else ""
    if SECTION_START in body and SECTION_END in body:
        head, rest = body.split(SECTION_START, 1)
        body = head + text.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + text
    report.write_text(body)


def main() -> None:
    if "--stage-usage" in sys.argv:
        i = sys.argv.index("--stage-usage")
        _stage_usage_main(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
        return
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[5000, 50000], help="images per study (none: skip)")
    p.add_argument("--image-size", type=int, default=64, help="the model's input size (px)")
    p.add_argument("--source-size", type=int, default=128, help="side of the generated PNGs (px)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", default=0, help="train.num_workers of the studies")
    p.add_argument("--cache-workers", type=int, default=2, help="decoding threads of the cache build")
    p.add_argument("--skip-memory", action="store_true", help="leave out the cache: memory training")
    p.add_argument("--loader-images", type=int, default=2000, help="images of the loader benchmark (0: skip it)")
    p.add_argument("--loader-size", type=int, default=224)
    p.add_argument("--loader-source-size", type=int, default=256)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loader-epochs", type=int, default=2)
    p.add_argument("--volumes", type=int, nargs="*", default=[], help="bpMRI patients per volume study (e.g. 100 1000)")
    p.add_argument("--volume-size", type=int, default=32, help="grid of the cached volumes (voxels per side)")
    p.add_argument("--volume-source-size", type=int, default=64, help="side of the generated volumes (voxels)")
    p.add_argument("--work", type=Path, default=Path("/tmp/medvit-scale"), help="folder for the studies")
    p.add_argument("--keep", action="store_true", help="keep the generated studies")
    p.add_argument("--quick", action="store_true", help="200 and 2000 images, a 200-image loader run")
    p.add_argument("--out", type=Path, default=U.RESULTS / "scale_cpu.json")
    p.add_argument("--report", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--note", default=None, help="a sentence on how the run went, printed with its table")
    p.add_argument("--collect", action="store_true",
                   help="only gather a run stopped part-way from the logs under --work (for --merge)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only combine the JSON files of separate runs (e.g. one size each) into --out and --report")
    args = p.parse_args()
    if args.collect:
        import torch

        payload = {**U.header(torch.device("cpu"), False), "settings": vars(args) | {"work": str(args.work)},
                   "runs": [collect(n, args.work) for n in sorted(args.sizes)]}
        payload["settings"] = {k: payload["settings"][k.replace("-", "_")] for k in
                               ("image_size", "source_size", "model", "batch", "workers")}
        payload["rss_ratios"] = rss_ratios(payload["runs"])
        U.write_json(args.out, payload)
        return
    if args.merge:
        payload = merge(args.merge)
        if args.note:
            payload["note"] = args.note
        U.write_json(args.out, payload)
        write_section(args.report, markdown(payload))
        print(f"wrote the scale section of {args.report}")
        return
    if args.quick:
        args.sizes, args.loader_images, args.loader_epochs = [200, 2000], 200, 1
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    payload: dict[str, Any] = {**U.header(torch.device("cpu"), args.quick),
                               "settings": {"image_size": args.image_size, "source_size": args.source_size,
                                            "model": args.model, "batch": args.batch, "workers": args.workers},
                               "runs": []}
    for n in sorted(args.sizes):
        print(f"== {n} images", flush=True)
        payload["runs"].append(scale_run(n, args, args.work))
        U.write_json(args.out, payload)
    payload["rss_ratios"] = rss_ratios(payload["runs"])
    if args.loader_images:
        payload["loader"] = loader_run(args, args.work)
    for n in sorted(args.volumes):
        print(f"== {n} volumes", flush=True)
        payload.setdefault("volumes", []).append(volume_run(n, args, args.work))
        U.write_json(args.out, payload)
    U.write_json(args.out, payload)
    write_section(args.report, markdown(payload))
    print(f"wrote the scale section of {args.report}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
