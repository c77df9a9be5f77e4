"""MAE pretraining speed: training throughput (images/s) and achieved FLOP/s as a fraction of
a matmul peak measured in the same run, in fp32 and bf16 autocast.

    python benchmarks/bench_mae.py [--device auto] [--quick] [--steps 10]

Writes benchmarks/results/mae_<device>.json (part of benchmarks/run_all.py). FLOPs of one
training step (forward + backward) are counted by medvit.engine.compute.count_flops (attention
included); the step is the one benchmarks/bench_models.py times (fused AdamW, as the Trainer),
and the matmul peak is timed in the same interleaved rounds (:func:`_util.interleaved_with_peak`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from medvit.engine.speed import matmul_peak
from medvit.models.mae import build_mae

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

CONFIGS = [  # (name, encoder, image size, patch, batch)
    ("vit_tiny 64px/8", "vit_tiny", 64, 8, 64),
    ("vit_tiny 224px/16", "vit_tiny", 224, 16, 32),
    ("vit_small 224px/16", "vit_small", 224, 16, 32),
]


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed rounds per config (default 3 with --quick, else 10)")
    args = p.parse_args()
    device = U.device_of(args.device)
    rounds = args.steps or (3 if args.quick else 10)
    start_peaks = matmul_peak(device)
    print(f"device {device}: matmul peak fp32 {start_peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{start_peaks['bf16'] / 1e9:.0f} GFLOP/s")
    rows = []
    for name, encoder, size, patch, batch in CONFIGS[:1] if args.quick else CONFIGS:
        torch.manual_seed(0)
        model = build_mae(encoder, in_chans=1, img_size=size, patch_size=patch, mask_ratio=0.9).to(device).train()
        x = torch.randn(batch if not args.quick else 8, 1, size, size, device=device)
        flops = U.train_flops(model, x)  # attention included; autocast does not change the count
        steps = {p: U.train_step_fn(model, x, device, p == "bf16") for p in ("fp32", "bf16")}
        seconds, peaks = U.interleaved_with_peak(steps, device, rounds)
        for precision in ("fp32", "bf16"):
            ips = x.shape[0] / seconds[precision]
            achieved = flops / x.shape[0] * ips
            rows.append({"config": name, "batch": x.shape[0], "precision": precision, "images_per_s": round(ips, 1),
                         "gflop_per_image": round(flops / x.shape[0] / 1e9, 4),
                         "achieved_gflops": round(achieved / 1e9, 1),
                         "fraction_of_matmul_peak": round(achieved / peaks[precision], 4),
                         "matmul_peak_gflops": round(peaks[precision] / 1e9, 1),
                         "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 3)})
            print(f"{name:20s} {precision}: {ips:8.1f} img/s, {achieved / 1e9:8.1f} GFLOP/s "
                  f"({100 * achieved / peaks[precision]:.1f}% of matmul peak)")
    U.write_json(U.out_path(args, "mae", device), {
        **U.header(device, args.quick), "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in start_peaks.items()},
        "mask_ratio": 0.9, "results": rows})


if __name__ == "__main__":
    main()
