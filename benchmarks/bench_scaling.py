"""How training time grows with image size, number of patients and model size for the MAE,
CSwin-UNet and DCT-HistoTransformer models, and the memory a paper-size model needs (ViT-B/16
at 224 px, CSwin-UNet at a paper-scale bpMRI volume) with and without activation checkpointing.

    python benchmarks/bench_scaling.py [--device auto] [--quick] [--cswin-volume 32,128,128]

Times are seconds per training step (batch fixed per family, best of a few) or per epoch
(patients: one image or volume each, in memory). Memory is the peak of a steady-state
training step (see benchmarks/_util.py: train_step_memory). Writes
benchmarks/results/scaling_<device>.json.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


def mae(size: int, width: str = "vit_tiny") -> nn.Module:
    from medvit.models.mae import build_mae

    return build_mae(width, in_chans=1, img_size=size, patch_size=8 if size < 128 else 16, mask_ratio=0.9)


def cswin(size: int, embed: int = 12) -> nn.Module:
    from medvit.models.cswin import CSwinUNet

    return CSwinUNet(in_chans=3, num_classes=1, embed_dim=embed)


def dct(size: int, scale: int = 1) -> nn.Module:
    from medvit.models.dct import DCTHistoTransformer

    return DCTHistoTransformer(3, 2, dims=tuple(d * scale for d in (32, 64, 128, 192)), depths=(1, 2, 3, 1))


FAMILIES = {
    # family: builder, channels, spatial dims, batch, image sizes (quick, full), widths (quick, full)
    "mae": (mae, 1, 2, 8, ([32, 64], [32, 64, 128, 224]), (["vit_tiny", "vit_small"], ["vit_tiny", "vit_small",
                                                                                       "vit_base"])),
    "cswin_unet": (cswin, 3, 3, 4, ([16, 32], [16, 32, 64]), ([12, 24], [12, 24, 48])),
    "dct_histo": (dct, 3, 2, 8, ([32, 64], [32, 64, 128, 224]), ([1, 2], [1, 2, 4])),
}


def step_seconds(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    return min(U.timed(U.train_step_fn(model.to(device), x, device), device, repeats=repeats))


def epoch_seconds(model: nn.Module, x: torch.Tensor, batch: int, device: torch.device) -> float:
    step = U.train_step_fn(model.to(device), x[:batch], device)
    step()  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        opt = step.optimizer  # type: ignore[attr-defined]
        loss = U.output_tensor(model(chunk)).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    U.sync(device)
    return time.perf_counter() - t0


def scaling_rows(device: torch.device, quick: bool) -> tuple[list[dict], dict[str, str]]:
    rows, skipped = [], {}
    k = 0 if quick else 1
    repeats = 2 if quick else 4
    for family, (builder, chans, dims, batch, sizes, widths) in FAMILIES.items():
        try:
            base = sizes[k][0] if family != "cswin_unet" else sizes[k][1]
            for size in sizes[k]:
                x = torch.randn(batch, chans, *([size] * dims), device=device)
                torch.manual_seed(0)
                rows.append({"family": family, "axis": "image_size", "value": size, "batch": batch,
                             "step_s": round(step_seconds(builder(size), x, device, repeats), 4)})
            for width in widths[k]:
                x = torch.randn(batch, chans, *([base] * dims), device=device)
                torch.manual_seed(0)
                model = builder(base, width).to(device)
                flops = U.train_flops(model, x)
                # median step interleaved with the matmul peak: the fraction of peak per width
                # (as many rounds as bench_models.py takes, so the default width's row is as robust)
                med, peaks = U.interleaved_with_peak({"step": U.train_step_fn(model, x, device)}, device,
                                                     3 if quick else 10)
                rows.append({"family": family, "axis": "model_size", "value": width, "image_size": base, "batch": batch,
                             "params": sum(p.numel() for p in model.parameters()),
                             "step_s": round(med["step"], 4), "gflop_per_step": round(flops / 1e9, 3),
                             "fraction_of_peak_fp32": round(flops / med["step"] / peaks["fp32"], 4)})
            for patients in ([4, 8] if quick else [16, 32, 64]):
                x = torch.randn(patients, chans, *([base] * dims), device=device)
                torch.manual_seed(0)
                rows.append({"family": family, "axis": "patients", "value": patients, "image_size": base,
                             "batch": batch, "epoch_s": round(epoch_seconds(builder(base), x, batch, device), 3)})
            for r in rows[-(len(sizes[k]) + len(widths[k]) + (2 if quick else 3)):]:
                print(f"{family:11s} {r['axis']:10s} {r['value']!s:9s} "
                      + (f"step {r['step_s']:.3f}s" if "step_s" in r else f"epoch {r['epoch_s']:.3f}s"))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            skipped[family] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return rows, skipped


def memory_rows(device: torch.device, quick: bool, volume: list[int]) -> tuple[list[dict], dict[str, str]]:
    from medvit.engine.speed import enable_activation_checkpointing
    from medvit.models.vit import build_vit

    rows, skipped = [], {}
    cases = [("vit_base_patch16_224", lambda: build_vit("base", in_chans=1, num_classes=2, img_size=224, patch_size=16),
              [1, 224, 224], 2 if quick else 8),
             ("cswin_unet", lambda: cswin(0), [3, *volume], 1)]
    for name, make, shape, batch in cases:
        for ckpt in (False, True):
            try:
                torch.manual_seed(0)
                model = make().to(device)
                wrapped = enable_activation_checkpointing(model) if ckpt else 0
                x = torch.randn(batch, *shape, device=device)
                t0 = time.perf_counter()
                mem = U.train_step_memory(model, x, device)
                rows.append({"model": name, "input": shape, "batch": batch, "activation_checkpointing": ckpt,
                             "blocks_checkpointed": wrapped, "peak_mib": mem["peak_mib"],
                             "activations_mib": mem["activations_mib"], "method": mem["method"],
                             "params": sum(p.numel() for p in model.parameters()),
                             "seconds_for_two_steps": round(time.perf_counter() - t0, 1)})
                print(f"{name:22s} {shape} x{batch} checkpointing {ckpt!s:5s}: peak {mem['peak_mib']} MiB, "
                      f"activations {mem['activations_mib']} MiB")
                del model, x
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                skipped[f"{name}{' ckpt' if ckpt else ''}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return rows, skipped


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--cswin-volume", default="32,128,128",
                   help="D,H,W of the CSwin-UNet memory case (each divisible by 16); a paper-scale bpMRI crop")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the paper-size memory table")
    args = p.parse_args()
    device = U.device_of(args.device)
    volume = [int(v) for v in args.cswin_volume.split(",")]
    rows, skipped = ([], {"scaling": "--memory-only"}) if args.memory_only else scaling_rows(device, args.quick)
    mem, mem_skipped = ([], {"memory": "--skip-memory"}) if args.skip_memory else memory_rows(device, args.quick,
                                                                                              volume)
    U.write_json(U.out_path(args, "scaling", device), {**U.header(device, args.quick), "scaling": rows,
                                                       "memory": mem, "skipped": {**skipped, **mem_skipped}})


if __name__ == "__main__":
    main()
