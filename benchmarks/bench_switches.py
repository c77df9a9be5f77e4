"""The gain each speed switch brings, measured interleaved against the same model without it:
fused attention (``F.scaled_dot_product_attention``'s fused kernel vs its unfused math path, in
fp32), unfused attention under bf16 autocast on the CPU (what medvit does there, against the fused
kernel), channels-last, bf16 autocast (on / off and what ``bf16: auto`` chose), ``torch.compile``
and, on a glibc CPU, ``train.retain_freed_memory`` (process-wide, so timed in child processes
taken in turn, with the page faults per step).

    python benchmarks/bench_switches.py [--device auto] [--quick] [--compile]

Every ratio is "seconds per training step without the switch / with it" (> 1: the switch
helps), medians of steps taken in turn. ``torch.compile`` is timed with ``--compile`` or
outside ``--quick`` (its first call compiles for a minute or more on a small CPU).
Writes benchmarks/results/switches_<device>.json.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


def math_attention(step):
    def run() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            step()
    return run


def switch_rows(device: torch.device, quick: bool, compile_too: bool) -> tuple[list[dict], dict[str, str]]:
    from medvit.engine.speed import apply_channels_last, channels_last_input

    rows, skipped = [], {}
    rounds = 3 if quick else 10
    size2, size3, b2, b3 = (64, 32, 8, 2) if quick else (64, 32, 32, 4)
    for name, spec in U.ZOO.items():
        size, batch = (size3, b3) if spec["dims"] == 3 else (size2, b2)
        try:
            model = U.build(name, size, device)
            x = U.zoo_input(name, size, batch, device)
            if spec["attention"]:
                fused = U.train_step_fn(model, x, device)
                med = U.interleaved({"math": math_attention(fused), "fused": fused}, device, rounds)
                rows.append({"switch": "sdpa_fused", "model": name, "batch": batch, "input": list(x.shape[1:]),
                             "off_s": round(med["math"], 4), "on_s": round(med["fused"], 4),
                             "speedup": round(med["math"] / med["fused"], 3)})
                if device.type == "cpu":  # under bf16 autocast medvit computes attention unfused on the CPU
                    med = U.interleaved({"fused": U.train_step_fn(model, x, device, True, fused_attention=True),
                                         "unfused": U.train_step_fn(model, x, device, True)}, device, rounds)
                    rows.append({"switch": "bf16_unfused_attention", "model": name, "batch": batch,
                                 "input": list(x.shape[1:]), "off_s": round(med["fused"], 4),
                                 "on_s": round(med["unfused"], 4), "speedup": round(med["fused"] / med["unfused"], 3)})
            if spec["conv"]:
                cl = apply_channels_last(copy.deepcopy(model))
                med = U.interleaved({"off": U.train_step_fn(model, x, device),
                                     "on": U.train_step_fn(cl, channels_last_input(x), device)}, device, rounds)
                rows.append({"switch": "channels_last", "model": name, "batch": batch, "input": list(x.shape[1:]),
                             "off_s": round(med["off"], 4), "on_s": round(med["on"], 4),
                             "speedup": round(med["off"] / med["on"], 3)})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            skipped[name] = f"{type(exc).__name__}: {exc}"
    if compile_too:
        for name in ("vit_tiny", "resnet18"):
            try:
                model = U.build(name, size2, device)
                x = U.zoo_input(name, size2, b2, device)
                compiled = copy.deepcopy(model)
                compiled.compile()
                step_c = U.train_step_fn(compiled, x, device)
                t0 = time.perf_counter()
                step_c()  # compiles forward and backward
                U.sync(device)
                compile_s = time.perf_counter() - t0
                med = U.interleaved({"off": U.train_step_fn(model, x, device), "on": step_c}, device, rounds)
                rows.append({"switch": "compile", "model": name, "batch": b2, "input": list(x.shape[1:]),
                             "off_s": round(med["off"], 4), "on_s": round(med["on"], 4),
                             "speedup": round(med["off"] / med["on"], 3), "compile_seconds": round(compile_s, 1),
                             "break_even_steps": (round(compile_s / (med["off"] - med["on"]))
                                                  if med["off"] > med["on"] else None)})
            except Exception as exc:  # noqa: BLE001  (no compiler, unsupported op: recorded)
                traceback.print_exc()
                skipped[f"compile:{name}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    else:
        skipped["compile"] = ("not timed in --quick mode: the first call compiles for a minute or more on a small "
                              "CPU; run with --compile or without --quick")
    return rows, skipped


RETAIN_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import _util as U
name, size, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = U.device_of("cpu")  # MEDVIT_BENCH_RETAIN_FREED_MEMORY decides the allocator setting
step = U.train_step_fn(U.build(name, size, device), U.zoo_input(name, size, batch, device), device)
for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
median_s = U.interleaved({"step": step}, device, rounds=steps, warmup=0)["step"]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"median_s": median_s, "faults_per_step": faults / steps}))
"""


def retain_rows(quick: bool) -> list[dict]:
    """``train.retain_freed_memory`` off / on for a few models: one child process per setting,
    taken in turn ``pairs`` times (the setting is process-wide and cannot be undone)."""
    from medvit.cpu_ops.process import glibc_malloc

    if not glibc_malloc():
        return []
    pairs, steps = (1, 3) if quick else (3, 15)
    rows = []
    for name, size, batch in (("vit_tiny", 64, 32), ("mae_vit_tiny", 64, 32), ("dct_histo_tiny", 64, 32),
                              ("cswin_unet", 32, 4)):
        if quick:
            batch = max(2, batch // 4)
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(pairs):
            for setting in ("off", "on"):
                env = {**os.environ, "MEDVIT_BENCH_RETAIN_FREED_MEMORY": "1" if setting == "on" else "0"}
                out = subprocess.run([sys.executable, "-c", RETAIN_CHILD, str(Path(__file__).resolve().parent), name,
                                      str(size), str(batch), str(steps)], env=env, capture_output=True, text=True,
                                     check=True)
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r["median_s"] for r in v) for k, v in runs.items()}
        rows.append({"switch": "retain_freed_memory", "model": name, "batch": batch,
                     "input": [U.ZOO[name]["chans"], *[size] * U.ZOO[name]["dims"]],
                     "off_s": round(med["off"], 4), "on_s": round(med["on"], 4),
                     "speedup": round(med["off"] / med["on"], 3), "processes_per_setting": pairs,
                     "page_faults_per_step_off": round(statistics.median(r["faults_per_step"] for r in runs["off"])),
                     "page_faults_per_step_on": round(statistics.median(r["faults_per_step"] for r in runs["on"]))})
    return rows


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--compile", action="store_true", help="also time torch.compile in --quick mode")
    args = p.parse_args()
    device = U.device_of(args.device)
    from medvit.engine.speed import probe_bf16

    probe = probe_bf16(device, use_cache=False)
    print(f"bf16 probe on {device}: fp32 {probe.fp32_gflops} GFLOP/s, bf16 {probe.bf16_gflops} GFLOP/s "
          f"-> bf16: auto chooses {'bf16' if probe.use_bf16 else 'fp32'}")
    rows, skipped = switch_rows(device, args.quick, args.compile or not args.quick)
    if device.type == "cpu":
        try:
            rows += retain_rows(args.quick)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            skipped["retain_freed_memory"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for r in rows:
        print(f"{r['switch']:14s} {r['model']:16s} off {r['off_s']:.4f}s on {r['on_s']:.4f}s -> x{r['speedup']}")
    U.write_json(U.out_path(args, "switches", device), {
        **U.header(device, args.quick),
        "bf16_probe": {"fp32_gflops": probe.fp32_gflops, "bf16_gflops": probe.bf16_gflops,
                       "speedup": probe.speedup, "auto_chooses_bf16": probe.use_bf16},
        "results": rows, "skipped": skipped})


if __name__ == "__main__":
    main()
