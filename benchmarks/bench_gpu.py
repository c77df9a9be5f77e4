"""GPU-only figures, at the sizes a GPU is bought for (the other benchmarks' sizes are set for
the 2-core CPU and leave a GPU bound by kernel launches):

* ``paper``: MAE pretraining at the MAE/Medical MAE setting (ViT-B/16, 224 px, mask 0.75) and
  CSwin-UNet on a bpMRI-scale crop, per precision: fp32 with TF32 off (PyTorch's default for
  matmuls), fp32 with TF32 on, bf16 autocast, and bf16 under ``torch.compile`` (its compile
  seconds too); samples/s and the fraction of the matmul peak of the dtype (TF32 rows: of the
  TF32 peak).
* ``heads``: CSwin-UNet's attention heads are 6 channels wide; CUDA's flash kernel needs a
  multiple of 8. The training step with q, k, v zero-padded to 8 and to 16 (the scale kept,
  the same function) against unpadded, interleaved.
* ``syncs``: does the host waiting on the GPU inside a training step cost time? Steps with no
  wait, with the Trainer's two (the loss's finiteness check before backward, ``float(loss)``
  after it), and with one after backward.

    python benchmarks/bench_gpu.py [--parts heads,paper,syncs] [--mae-batch 128,512] [--quick]

Writes benchmarks/results/gpu_cuda.json. Needs CUDA (``--quick`` also runs on the CPU, as a
smoke test of the script; no compile there).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


@contextlib.contextmanager
def tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def with_tf32(fn, on: bool):
    def run() -> None:
        with tf32(on):
            fn()
    return run


def peaks(device: torch.device, rounds: int) -> dict[str, float]:
    """Matmul peaks (FLOP/s) of fp32 (TF32 off), TF32 and bf16 on 8192^2 matmuls."""
    n = 8192 if device.type == "cuda" else 1024
    a32, b32 = (torch.randn(n, n, device=device) for _ in range(2))
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    med = U.interleaved({"fp32": with_tf32(lambda: a32 @ b32, False), "tf32": with_tf32(lambda: a32 @ b32, True),
                         "bf16": lambda: a16 @ b16}, device, rounds=rounds, warm_calls=1)
    return {k: 2 * n**3 / v for k, v in med.items()}


def paper_rows(device: torch.device, quick: bool, rounds: int, mae_batches: list[int]
               ) -> tuple[list[dict], dict[str, float]]:
    from medvit.models import create_model
    from medvit.models.mae import build_mae

    # (name, builder, input shape, also compiled): compiling CSwin-UNet takes minutes (344 s on the CPU)
    cases = [("cswin_unet", lambda: create_model("cswin_unet", in_chans=3, num_classes=1),
              (1, 3, 32, 64, 64) if quick else (2, 3, 32, 128, 128), False)]
    cases += [("mae_vit_base 224px/16, mask 0.75", lambda: build_mae("vit_base", in_chans=1, img_size=224,
                                                                     patch_size=16,
                                                                     mask_ratio=0.75), (2 if quick else b, 1, 224, 224),
               True)
              for b in mae_batches]
    pk = peaks(device, rounds)
    print("matmul peaks (TFLOP/s): " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in pk.items()))
    rows = []
    for name, build, shape, compile_too in cases:
        torch.manual_seed(0)
        model = build().to(device)
        x = torch.randn(*shape, device=device)
        flops = U.train_flops(model, x)
        steps = {"fp32": with_tf32(U.train_step_fn(model, x, device, False), False),
                 "tf32": with_tf32(U.train_step_fn(model, x, device, False), True),
                 "bf16": U.train_step_fn(model, x, device, True)}
        med = U.interleaved(steps, device, rounds=rounds, warm_calls=1)
        compiled = {}
        if compile_too and device.type == "cuda":
            torch._dynamo.reset()
            model.compile()
            step = U.train_step_fn(model, x, device, True)
            t0 = time.perf_counter()
            step()
            U.sync(device)
            compiled["compile_s"] = round(time.perf_counter() - t0, 1)
            med["bf16_compiled"] = U.interleaved({"c": step}, device, rounds=rounds, warm_calls=1)["c"]
        for precision, seconds in med.items():
            peak = pk["bf16" if precision.startswith("bf16") else precision]
            row = {"case": name, "input": list(shape[1:]), "batch": shape[0], "precision": precision,
                   "samples_per_s": round(shape[0] / seconds, 1), "step_s": round(seconds, 4),
                   "gflop_per_sample": round(flops / shape[0] / 1e9, 2),
                   "fraction_of_matmul_peak": round(flops / seconds / peak, 4),
                   "speedup_vs_fp32": round(med["fp32"] / seconds, 2),
                   **(compiled if precision == "bf16_compiled" else {})}
            rows.append(row)
            print(f"{name:34s} {'x'.join(map(str, shape[2:])):11s} batch {shape[0]:<4d} {precision:14s} "
                  f"{row['samples_per_s']:8.1f}/s  "
                  f"{100 * row['fraction_of_matmul_peak']:5.1f}% of peak  x{row['speedup_vs_fp32']} vs fp32"
                  + (f"  (compiled in {compiled['compile_s']} s)" if precision == "bf16_compiled" else ""))
        del model
        torch.cuda.empty_cache()
    return rows, {k: round(v / 1e9, 1) for k, v in pk.items()}


def padded_to_multiple(multiple: int):
    """CSwin's attention with head dims zero-padded to a multiple of ``multiple``."""
    from medvit.cpu_ops.attention import padded_attention

    def attention(q, k, v, dropout_p: float = 0.0):
        d = q.shape[-1]
        return padded_attention(q, k, v, d + -d % multiple, dropout_p)
    return attention


def head_rows(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    from medvit.models import create_model, cswin

    rows = []
    original = cswin.flash_friendly_attention
    for batch, side in ([(1, 32)] if quick else [(4, 32), (2, 64)]):
        torch.manual_seed(0)
        model = create_model("cswin_unet", in_chans=3, num_classes=1).to(device)
        x = torch.randn(batch, 3, side, side, side, device=device)
        for bf16 in (False, True):
            step = U.train_step_fn(model, x, device, bf16)

            def variant(fn):
                def run() -> None:
                    cswin.flash_friendly_attention = fn
                    try:
                        step()
                    finally:
                        cswin.flash_friendly_attention = original
                return run

            med = U.interleaved({"unpadded": variant(original), "pad8": variant(padded_to_multiple(8)),
                                 "pad16": variant(padded_to_multiple(16))}, device, rounds=rounds, warm_calls=1)
            row = {"batch": batch, "side": side, "precision": "bf16" if bf16 else "fp32",
                   **{f"{k}_s": round(v, 5) for k, v in med.items()},
                   "pad8_speedup": round(med["unpadded"] / med["pad8"], 3),
                   "pad16_speedup": round(med["unpadded"] / med["pad16"], 3)}
            rows.append(row)
            print(f"cswin_unet batch {batch} at {side}^3 {row['precision']}: unpadded {med['unpadded'] * 1e3:.1f} ms, "
                  f"pad to 8 x{row['pad8_speedup']}, pad to 16 x{row['pad16_speedup']}")
    return rows


def sync_rows(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    """ms per training step with the host waiting on the GPU never, twice per step (what the
    Trainer does: the loss's finiteness check before backward and ``float(loss)`` after it), or
    once after backward (both values in one transfer). Steps of 10 in a row, interleaved."""
    from medvit.engine.device import autocast_context
    from medvit.models.mae import build_mae

    def vit_base():
        return build_mae("vit_base", in_chans=1, img_size=224, patch_size=16, mask_ratio=0.75)

    cases = [("vit_tiny 64px b32", lambda: U.ZOO["vit_tiny"]["build"](64), (32, 1, 64, 64), False),
             ("mae_vit_tiny 64px b32", lambda: U.ZOO["mae_vit_tiny"]["build"](64), (32, 1, 64, 64), False),
             ("cswin_unet 32^3 b4", lambda: U.ZOO["cswin_unet"]["build"](32), (4, 3, 32, 32, 32), False)]
    if not quick:
        cases += [("mae_vit_base 224 b128 bf16", vit_base, (128, 1, 224, 224), True),
                  ("mae_vit_base 224 b128 tf32", vit_base, (128, 1, 224, 224), False)]
    rows = []
    with tf32(True):
        for name, build, shape, bf16 in cases:
            torch.manual_seed(0)
            model = build().to(device).train()
            x = torch.randn(*shape, device=device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

            def make(mode: str):
                def step() -> None:
                    with autocast_context(device, bf16):
                        loss = U.output_tensor(model(x)).float().mean()
                    if mode == "two" and not torch.isfinite(loss.detach()).all():
                        raise RuntimeError("non-finite loss")
                    finite = torch.isfinite(loss.detach())
                    loss.backward()
                    if mode == "two":
                        float(loss.detach())
                    elif mode == "one":
                        torch.stack([loss.detach(), finite.float()]).tolist()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return step

            def ten(fn):
                def run() -> None:
                    for _ in range(10):
                        fn()
                return run

            med = U.interleaved({m: ten(make(m)) for m in ("none", "two", "one")}, device, rounds=rounds // 2 or 1)
            row = {"case": name, **{f"{k}_ms": round(v / 10 * 1e3, 2) for k, v in med.items()},
                   "two_over_none": round(med["two"] / med["none"], 3), "one_over_none": round(med["one"] / med["none"],
                                                                                               3)}
            rows.append(row)
            print(f"{name:28s} ms/step: no sync {row['none_ms']}, two syncs {row['two_ms']}, one sync {row['one_ms']}")
            model = opt = None  # free this case's memory before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--parts", default="heads,paper,syncs", help="comma-separated: heads, paper, syncs")
    p.add_argument("--mae-batch", default="128", help="comma-separated batch sizes of the MAE paper case (default 128)")
    args = p.parse_args()
    device = U.device_of(args.device)
    if device.type != "cuda" and not args.quick:  # --quick on the CPU: a smoke run of the script
        raise SystemExit("bench_gpu.py needs a CUDA GPU (--device cuda)")
    rounds = 3 if args.quick else 10
    out = U.out_path(args, "gpu", device)
    payload = {**U.header(device, args.quick)}
    for part in args.parts.split(","):
        if part == "paper":
            batches = [int(b) for b in args.mae_batch.split(",")]
            payload["paper"], payload["matmul_peak_gflops"] = paper_rows(device, args.quick, rounds, batches)
        elif part == "heads":
            payload["heads"] = head_rows(device, args.quick, rounds)
        elif part == "syncs":
            payload["syncs"] = sync_rows(device, args.quick, rounds)
        else:
            raise SystemExit(f"unknown part {part!r}; allowed: heads, paper, syncs")
        U.write_json(out, payload)  # after every part, so a time limit keeps what was measured


if __name__ == "__main__":
    main()
