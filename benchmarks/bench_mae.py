"""MAE pretraining speed: training throughput (images/s) and achieved FLOP/s as a fraction of
a matmul peak measured in the same run, in fp32 and bf16 autocast.

    python benchmarks/bench_mae.py [--device cpu|cuda] [--steps 10]

Writes benchmarks/results/mae_<device>.json. FLOPs of one training step (forward + backward)
are counted by medvit.engine.compute.count_flops (attention included); the step is the one
benchmarks/bench_models.py times (fused AdamW, as the Trainer); the peak is the best of a few
square matmuls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from medvit.engine.speed import matmul_peak
from medvit.models.mae import build_mae
from medvit.provenance import hardware, now_iso

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results"
CONFIGS = [  # (name, encoder, image size, patch, batch)
    ("vit_tiny 64px/8", "vit_tiny", 64, 8, 64),
    ("vit_tiny 224px/16", "vit_tiny", 224, 16, 32),
    ("vit_small 224px/16", "vit_small", 224, 16, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    n = 4096 if device.type == "cuda" else 1024
    peaks = matmul_peak(device, n)  # the same yardstick as benchmarks/run_all.py
    print(f"device {device}: matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    rows = []
    for name, encoder, size, patch, batch in CONFIGS:
        torch.manual_seed(0)
        model = build_mae(encoder, in_chans=1, img_size=size, patch_size=patch, mask_ratio=0.9).to(device).train()
        x = torch.randn(batch, 1, size, size, device=device)
        flops = U.train_flops(model, x)  # attention included; autocast does not change the count
        steps = {p: U.train_step_fn(model, x, device, p == "bf16") for p in ("fp32", "bf16")}
        seconds = U.interleaved(steps, device, rounds=args.steps)
        for precision in ("fp32", "bf16"):
            ips = batch / seconds[precision]
            achieved = flops / batch * ips
            rows.append({"config": name, "batch": batch, "precision": precision, "images_per_s": round(ips, 1),
                         "gflop_per_image": round(flops / batch / 1e9, 4), "achieved_gflops": round(achieved / 1e9, 1),
                         "fraction_of_matmul_peak": round(achieved / peaks[precision], 4)})
            print(f"{name:20s} {precision}: {ips:8.1f} img/s, {achieved / 1e9:8.1f} GFLOP/s "
                  f"({100 * achieved / peaks[precision]:.1f}% of matmul peak)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"mae_{device.type}.json"
    out.write_text(json.dumps({"created": now_iso(), "hardware": hardware(), "torch": torch.__version__,
                               "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
                               "mask_ratio": 0.9, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
