"""Per model: training and inference throughput (samples/s), achieved FLOP/s as a fraction of a
matmul peak measured in the same run (fp32 and bf16 autocast), and peak memory of a training step.

    python benchmarks/bench_models.py [--device auto] [--quick] [--models vit_tiny,cswin_unet]

fp32 and bf16 steps and the peak's matmuls (n x n, n = 1024 on the CPU, 4096 on a GPU) are
timed interleaved, each call after an untimed one of its own (warm caches, as in back-to-back
training steps) and one contender after the other, so machine load biases none of them; each model's
fractions use the median matmul rate of its own rounds (``matmul_peak_gflops`` of its row). FLOPs
of one training step (forward + backward, attention included) come from
medvit.engine.compute.count_flops; the optimizer's elementwise work counts zero, as usual.
Each model runs in a process of its own, as each training job does in the workflow (one model
per process), so no model inherits the allocator's state the earlier ones leave; the 10-20%
lower CSwin-UNet and DCT figures that prompted this came back in separate processes too while
the machine was busy, so they were mostly the machine. ``--in-process`` runs them all in
this process.

On a shared machine a neighbour's memory traffic can slow the memory-bound models (CSwin-UNet,
DCT, 3D UNet) by 15-20% for minutes while the cache-resident matmul peak keeps its rate, so
one run's fraction depends on when it ran. The full run therefore takes ``--passes 3``: every
model runs three times, in fresh processes taken in turn (model after model, then again), and
each row reports the pass with the median fp32 training fraction, with every pass's
fractions (``train_fraction_of_peak_*_passes``). Writes benchmarks/results/models_<device>.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

# model -> (image side, batch) in quick / full mode (2D models: pixels, 3D: voxels per side)
SIZES = {"quick": {"2d": (64, 8), "3d": (32, 2)}, "full": {"2d": (64, 32), "3d": (32, 4)}}


def bench_model(name: str, device: torch.device, quick: bool, rounds: int) -> dict:
    spec = U.ZOO[name]
    size, batch = SIZES["quick" if quick else "full"]["3d" if spec["dims"] == 3 else "2d"]
    model = U.build(name, size, device)
    x = U.zoo_input(name, size, batch, device)
    flops = U.train_flops(model, x)
    fwd_flops = None
    from medvit.engine.compute import count_flops

    try:
        fwd_flops = count_flops(model, x[:1]) * batch if not name.startswith("mae") else None
    except Exception:  # noqa: BLE001  (an output the counter cannot sum; inference FLOPs then unknown)
        fwd_flops = None
    mem = U.train_step_memory(model, x, device)
    steps = {f"train_{p}": U.train_step_fn(model, x, device, p == "bf16") for p in ("fp32", "bf16")}
    steps.update({f"infer_{p}": U.infer_fn(model, x, device, p == "bf16") for p in ("fp32", "bf16")})
    med, peaks = U.interleaved_with_peak(steps, device, rounds)
    row = {"model": name, "input": list(x.shape[1:]), "batch": batch,
           "params": sum(p.numel() for p in model.parameters()),
           "matmul_peak_gflops": {p: round(v / 1e9, 2) for p, v in peaks.items()},
           "train_gflop_per_sample": round(flops / batch / 1e9, 4), "peak_train_memory_mib": mem["peak_mib"],
           "activations_mib": mem["activations_mib"],
           "memory_method": mem["method"]}
    for p in ("fp32", "bf16"):
        tps = batch / med[f"train_{p}"]
        row[f"train_samples_per_s_{p}"] = round(tps, 2)
        row[f"train_fraction_of_peak_{p}"] = round(flops / med[f"train_{p}"] / peaks[p], 4)
        row[f"infer_samples_per_s_{p}"] = round(batch / med[f"infer_{p}"], 2)
        if fwd_flops:
            row[f"infer_fraction_of_peak_{p}"] = round(fwd_flops / med[f"infer_{p}"] / peaks[p], 4)
    row["bf16_train_speedup"] = round(med["train_fp32"] / med["train_bf16"], 3)
    return row


def median_pass(runs: list[dict]) -> dict:
    """The run with the median fp32 training fraction (the lower middle one of an even count),
    with every run's fractions in run order and the number of passes."""
    chosen = sorted(runs, key=lambda r: r["train_fraction_of_peak_fp32"])[(len(runs) - 1) // 2]
    return {**chosen, "passes": len(runs),
            **{f"train_fraction_of_peak_{p}_passes": [r[f"train_fraction_of_peak_{p}"] for r in runs]
               for p in ("fp32", "bf16")}}


def bench_in_child(name: str, args) -> dict:
    """:func:`bench_model` in a fresh process (this script with ``--models name``): its row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--device", args.device, "--models", name, "--passes", "1", "--out", str(out)]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name}: child exited {proc.returncode}: {proc.stderr[-800:]}")
        data = json.loads(out.read_text())
    if not data["results"]:
        raise RuntimeError(f"{name}: " + "; ".join(data["skipped"].values()))
    return data["results"][0]


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--models", default=",".join(U.ZOO), help="comma-separated subset of " + ", ".join(U.ZOO))
    p.add_argument("--in-process", action="store_true", help="all models in this process (default: one child each)")
    p.add_argument("--passes", type=int, default=None,
                   help="runs of each model, in fresh processes taken in turn; rows report the median pass "
                        "(default 3; 1 with --quick or --in-process)")
    args = p.parse_args()
    device = U.device_of(args.device)
    from medvit.engine.speed import matmul_peak

    peaks = matmul_peak(device)
    print(f"{device}: matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    rows, skipped = [], {}
    out = U.out_path(args, "models", device)

    def save() -> None:  # after every model, so a time limit keeps what was measured
        U.write_json(out, {**U.header(device, args.quick),
                           "matmul_peak_gflops": {k: round(v / 1e9, 2) for k, v in peaks.items()},
                           "results": rows, "skipped": skipped})

    names = args.models.split(",")
    passes = args.passes or (1 if args.quick or args.in_process else 3)
    runs: dict[str, list[dict]] = {}
    for k in range(passes):
        for name in names:
            if name in skipped:
                continue
            try:
                if args.in_process or (len(names) == 1 and passes == 1):
                    row = bench_model(name, device, args.quick, rounds=3 if args.quick else 10)
                else:
                    row = bench_in_child(name, args)
            except Exception as exc:  # noqa: BLE001  (record and go on: one broken model must not stop the suite)
                traceback.print_exc()
                skipped[name] = f"{type(exc).__name__}: {exc}"
                continue
            runs.setdefault(name, []).append(row)
            print(f"{name:16s} train {row['train_samples_per_s_fp32']:8.1f}/s fp32 "
                  f"{row['train_samples_per_s_bf16']:8.1f}/s bf16"
                  f"  ({100 * row['train_fraction_of_peak_fp32']:.1f}% / "
                  f"{100 * row['train_fraction_of_peak_bf16']:.1f}% of peak)"
                  f"  infer {row['infer_samples_per_s_fp32']:8.1f}/s  mem {row['peak_train_memory_mib']} MiB"
                  + (f"  [pass {k + 1}/{passes}]" if passes > 1 else ""))
            rows[:] = [median_pass(r) for r in runs.values()]
            save()
    save()


if __name__ == "__main__":
    main()
