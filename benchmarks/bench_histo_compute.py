"""Compute of the histopathology models: parameters, FLOPs per image and CPU latency and
throughput at batch 1 and 32, at the paper's input size (224 px; ViT-Tiny with 16 px patches)
and at the demo's (32 px; ViT-Tiny with 4 px patches, as in workflows/studies/demo.yaml),
plus the DCT-HistoTransformer with more or fewer kept DCT frequencies.

    python benchmarks/bench_histo_compute.py [--threads 1] [--repeats 10] [--sizes 224 32]

Writes benchmarks/results/histo_compute.json and .md. FLOPs come from one counter for every
model (medvit.tasks.compare.model_flops: torch.utils.flop_counter, attention included);
latency is the median of ``--repeats`` timed forward passes after 3 warm-up passes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medvit.models import create_model
from medvit.provenance import hardware, now_iso
from medvit.tasks.compare import measure_compute

OUT_DIR = Path(__file__).resolve().parent / "results"
VIT_PATCH = {224: 16, 32: 4}  # the paper's ViT-Tiny; the demo's (an 8x8 token grid)
MODELS = ("dct_histo_tiny", "vit_tiny", "mobilevit_xxs", "resnet18")
KEEP_RATIOS = (1.0, 0.5, 0.25)  # DCT frequencies kept per axis (dct_histo_tiny uses 0.5)


def build(name: str, size: int, keep_ratio: float | None = None) -> torch.nn.Module:
    kwargs: dict = {}
    if name == "vit_tiny":
        kwargs = {"img_size": size, "patch_size": VIT_PATCH.get(size, 16)}
    if keep_ratio is not None:
        kwargs["keep_ratio"] = keep_ratio
    return create_model(name, in_chans=3, num_classes=2, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        for name in MODELS:
            c = measure_compute(build(name, size), (3, size, size), (1, 32), args.repeats, args.threads)
            rows.append({"model": name, "size": size, "keep_ratio": 0.5 if name == "dct_histo_tiny" else None,
                         "patch_size": VIT_PATCH.get(size, 16) if name == "vit_tiny" else None, **c})
            print(f"{size:4d} px {name:16s} {c['params'] / 1e6:6.2f} M params {c['flops'] / 1e6:9.1f} MFLOPs "
                  f"b1 {c['latency']['1']['per_sample_ms']:8.2f} ms  b32 {c['latency']['32']['throughput']:8.0f} img/s",
                  flush=True)
        for ratio in KEEP_RATIOS:
            if ratio == 0.5:
                continue
            c = measure_compute(build("dct_histo_tiny", size, ratio), (3, size, size), (1, 32), args.repeats,
                                args.threads)
            rows.append({"model": "dct_histo_tiny", "size": size, "keep_ratio": ratio, "patch_size": None, **c})
            print(f"{size:4d} px dct_histo_tiny keep {ratio:.2f} {c['flops'] / 1e6:9.1f} MFLOPs", flush=True)
    record = {"created": now_iso(), "hardware": hardware(), "torch": torch.__version__, "threads": args.threads,
              "repeats": args.repeats, "rows": rows,
              "note": "latency on a CPU shared with other jobs: indicative; FLOPs and params are exact"}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "histo_compute.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT_DIR / "histo_compute.md").write_text(markdown(record))
    print(f"wrote {OUT_DIR / 'histo_compute.json'} and .md")


def markdown(record: dict) -> str:
    lines = ["# Histopathology models: compute", "",
             f"CPU, {record['threads']} thread(s), median of {record['repeats']} forward passes; "
             f"{record['hardware'].get('cpu_count')} CPUs ({record['hardware'].get('machine')}, shared with other "
             "jobs); "
             f"torch {record['torch']}; {record['created']}. FLOPs per image (1 multiply-add = 2 "
             "FLOPs) from torch.utils.flop_counter with attention counted; latency on a shared machine is "
             "indicative.", ""]
    for size in dict.fromkeys(r["size"] for r in record["rows"]):
        vit = next((r["flops"] for r in record["rows"] if r["size"] == size and r["model"] == "vit_tiny"), None)
        lines += [f"## {size} x {size} px", "",
                  "| model | DCT keep | params (M) | MFLOPs | vs ViT-Tiny | ms/image (batch 1) | images/s (batch 32) |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in record["rows"] if r["size"] == size):
            name = r["model"] + (f" (patch {r['patch_size']})" if r["patch_size"] else "")
            keep = f"{r['keep_ratio']:.2f}" if r["keep_ratio"] is not None else ""
            ratio = f"{r['flops'] / vit:.2f}x" if vit else ""
            lines.append(f"| {name} | {keep} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e6:.1f} | {ratio} | "
                         f"{r['latency']['1']['per_sample_ms']:.2f} | {r['latency']['32']['throughput']:.0f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
