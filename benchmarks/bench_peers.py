"""Our training against the libraries' own plain loops on the same network and data, timed
interleaved (ours, theirs, bare, ours, ...) so machine load cancels out of the ratios:

* ViT: medvit's ``Trainer`` (a run of a few epochs: loader, bf16 switch, grad clipping,
  warm-up/cosine schedule, checkpoints written atomically after each epoch) vs a plain timm
  loop (DataLoader, AdamW, clip) that saves model and optimizer after each epoch as timm's
  own train.py does.
* 3D segmentation: ``Trainer`` with MONAI's ``DiceFocalLoss`` vs a plain MONAI loop on the
  same MONAI UNet (``unet3d``), same loss, saving the model's state_dict after each epoch as
  the MONAI tutorials do.
* YOLOv8: the detection stage's ``YOLO.train`` call (medvit.tasks.detection, offline setup)
  vs ultralytics' own ``yolo detect train`` CLI, same data and settings, wall time of each
  process.

    python benchmarks/bench_peers.py [--device auto] [--quick] [--skip-yolo]

The recorded overhead is ours / theirs (1.0 = no overhead) against the peer with its own
checkpointing (the same work) and, for the first two, against the bare loop that writes
nothing (``overhead_vs_bare``). Writes benchmarks/results/peers_<device>.json.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Tensors(Dataset):
    """In-memory samples as dicts (what medvit's SampleDataset yields after its cache)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def ours_run(build, data: Dataset, loss_fn, device: torch.device, batch: int, epochs: int, work: Path) -> float:
    """Seconds of ``Trainer.fit``: set-up, ``epochs`` epochs, a checkpoint after each."""
    from medvit.engine import TrainConfig, Trainer

    model = build()
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, warmup_epochs=0, device=str(device), log_every=0,
                      deterministic=False, grad_clip=1.0)
    out = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    Trainer(model, data, None, cfg, out, loss_fn=loss_fn, progress=False).fit(resume=False)
    U.sync(device)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def plain_run(build, data: Dataset, loss_fn, device: torch.device, batch: int, epochs: int, work: Path,
              checkpoint: str | None) -> float:
    """Seconds of a plain loop (DataLoader, AdamW, clipping) over ``epochs`` epochs.

    ``checkpoint`` is what the library's own script writes after each epoch: ``"timm"`` the
    model and optimizer state with ``torch.save`` (timm's train.py, CheckpointSaver's
    ``last.pth.tar``), ``"monai"`` the model's state_dict (the MONAI tutorials'
    ``best_metric_model.pth``), None nothing (the bare loop).
    """
    model = build()
    out = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for epoch in range(epochs):
        model.train()
        for b in DataLoader(data, batch_size=batch, shuffle=True):
            x, y = b["image"].to(device), b["label"].to(device)
            loss = loss_fn(model(x), {"label": y})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if checkpoint == "timm":
            torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
                       out / "last.pth.tar")
        elif checkpoint == "monai":
            torch.save(model.state_dict(), out / "best_metric_model.pth")
    U.sync(device)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def compare_loops(name: str, peer: str, checkpoint: str, build, data, loss_fn, device, batch: int, epochs: int,
                  rounds: int, work: Path) -> dict:
    """Ours against the peer's loop with its own per-epoch checkpoint (the same work) and
    against the bare loop (no checkpoint), interleaved; medians over ``rounds``."""
    runs = {"ours": lambda: ours_run(build, data, loss_fn, device, batch, epochs, work),
            "peer": lambda: plain_run(build, data, loss_fn, device, batch, epochs, work, checkpoint),
            "bare": lambda: plain_run(build, data, loss_fn, device, batch, epochs, work, None)}
    for run in runs.values():
        run()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            times[k].append(run())
    o, t, b = (statistics.median(times[k]) for k in ("ours", "peer", "bare"))
    return {"comparison": name, "peer": peer, "peer_checkpoint": checkpoint, "samples": len(data), "batch": batch,
            "epochs": epochs, "rounds": rounds, "ours_s": round(o, 3), "peer_s": round(t, 3), "bare_s": round(b, 3),
            "overhead_ratio": round(o / t, 3), "overhead_vs_bare": round(o / b, 3),
            "ours_samples_per_s": round(len(data) * epochs / o, 2), "peer_samples_per_s": round(len(data) * epochs / t,
                                                                                                2)}


def vit_comparison(device, quick, work) -> dict:
    import timm

    n, size, batch = (16, 32, 8) if quick else (256, 64, 32)
    g = torch.Generator().manual_seed(0)
    data = Tensors(torch.randn(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g))

    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, in_chans=1,
                                 num_classes=2).to(device)

    loss = lambda out, b: nn.functional.cross_entropy(out, b["label"])  # noqa: E731
    return compare_loops("vit_tiny training run", "plain timm loop", "timm", build, data, loss, device, batch,
                         2 if quick else 3, 2 if quick else 5, work)


def seg_comparison(device, quick, work) -> dict:
    from monai.losses import DiceFocalLoss

    from medvit.models import create_model

    n, size, batch = (4, 32, 2) if quick else (32, 32, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, size, generator=g)
    data = Tensors(x, (x[:, :1] > 1.0).float())
    dice_focal = DiceFocalLoss(sigmoid=True, batch=True)

    def build():
        torch.manual_seed(0)
        return create_model("unet3d", in_chans=3, num_classes=1).to(device)

    loss = lambda out, b: dice_focal(out, b["label"])  # noqa: E731
    return compare_loops("unet3d segmentation run (MONAI UNet, DiceFocal)", "plain MONAI loop", "monai", build, data,
                         loss, device, batch, 2 if quick else 3, 2 if quick else 5, work)


# ------------------------------------------------------------------------------- YOLO

def tiny_yolo_dataset(folder: Path, n_train: int, n_val: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.normal(60, 10, (size, size))).clip(0, 255)
            w, h = rng.integers(size // 8, size // 3, 2)
            cx, cy = rng.integers(w, size - w), rng.integers(h, size - h)
            img[cy - h // 2: cy + h // 2, cx - w // 2: cx + w // 2] += 120
            Image.fromarray(img.clip(0,
                                     255).astype(np.uint8)).convert("RGB").save(folder / "images" / split / f"{i}.png")
            (folder / "labels" / split / f"{i}.txt").write_text(
                f"0 {cx / size:.4f} {cy / size:.4f} {(w // 2 * 2) / size:.4f} {(h // 2 * 2) / size:.4f}\n")
    data = folder / "data.yaml"
    data.write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n  0: tumor\n")
    return data


OURS_YOLO = """
import sys
from medvit.tasks.detection import build_detector, setup_ultralytics
setup_ultralytics(sys.argv[1])
yolo = build_detector("yolov8n", 1, ["tumor"])
yolo.train(data=sys.argv[2], epochs=int(sys.argv[3]), imgsz=int(sys.argv[4]), batch=int(sys.argv[5]),
           device=sys.argv[6], workers=0, project=sys.argv[7], name="ours", exist_ok=True, plots=False, amp=False,
           seed=0, deterministic=True, pretrained=False, verbose=False, val=True)
"""


def yolo_comparison(device, quick, work) -> dict:
    yolo_cli = Path(sys.executable).with_name("yolo")
    if not yolo_cli.exists():  # e.g. ultralytics installed with pip --target: its scripts on PATH
        yolo_cli = Path(shutil.which("yolo") or yolo_cli)
    if not yolo_cli.exists():
        raise FileNotFoundError(f"ultralytics CLI not found beside {sys.executable} or on PATH")
    # Each process pays a fixed start (imports, model build; about 1 s more for ours, which
    # imports medvit's stage module): full mode trains long enough that it does not dominate.
    epochs, size, batch, n_train = (1, 64, 8, 16) if quick else (10, 64, 16, 128)
    data = tiny_yolo_dataset(work / "yolo_data", n_train, n_train // 2, size)
    config = work / "ultralytics_config"
    dev = "cpu" if device.type == "cpu" else str(device.index or 0)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config)}
    ours_cmd = [sys.executable, "-c", OURS_YOLO, str(config), str(data), str(epochs), str(size), str(batch), dev,
                str(work / "runs")]
    cli_cmd = [str(yolo_cli), "detect", "train", f"data={data}", "model=yolov8n.yaml", f"epochs={epochs}",
               f"imgsz={size}", f"batch={batch}", f"device={dev}", "workers=0", f"project={work / 'runs'}",
               "name=cli", "exist_ok=True", "plots=False", "amp=False", "seed=0", "deterministic=True",
               "pretrained=False", "val=True"]

    def run(cmd) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-800:]}")
        return time.perf_counter() - t0

    run(ours_cmd)  # sets the offline config (fonts, settings) up for both
    rounds = 1 if quick else 3
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(run(ours_cmd))
        theirs.append(run(cli_cmd))
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"comparison": "YOLOv8n training (whole process, incl. validation)",
            "peer": "ultralytics `yolo detect train` CLI",
            "samples": n_train, "batch": batch, "epochs": epochs, "image_size": size, "rounds": rounds,
            "ours_s": round(o, 2), "peer_s": round(t, 2), "overhead_ratio": round(o / t, 3)}


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--skip-yolo", action="store_true")
    args = p.parse_args()
    device = U.device_of(args.device)
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="medvit-peers-") as tmp:
        work = Path(tmp)
        jobs = [("vit", vit_comparison), ("segmentation", seg_comparison)]
        if args.skip_yolo:
            skipped["yolo"] = "--skip-yolo"
        else:
            try:
                import medvit.tasks.detection  # noqa: F401
                jobs.append(("yolo", yolo_comparison))
            except ImportError as exc:
                skipped["yolo"] = f"medvit.tasks.detection not importable: {exc}"
        for name, fn in jobs:
            try:
                row = fn(device, args.quick, work)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                skipped[name] = f"{type(exc).__name__}: {str(exc)[:500]}"
                continue
            rows.append(row)
            print(f"{row['comparison']}: ours {row['ours_s']}s vs {row['peer']} {row['peer_s']}s "
                  f"-> overhead x{row['overhead_ratio']}")
    U.write_json(U.out_path(args, "peers", device), {**U.header(device, args.quick), "results": rows,
                                                     "skipped": skipped})


if __name__ == "__main__":
    main()
