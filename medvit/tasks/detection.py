"""Brain tumour detection with ultralytics YOLOv8, fully offline.

One stage, :func:`detect_stage`: build the YOLO dataset of the split (windowed 8-bit
slices, linked box files, :mod:`medvit.data.yolo`), train a YOLOv8 built from its model
YAML (random initialisation, no weights download), measure the common detection metrics
(mAP50, mAP50-95, precision, recall) on the val and test splits, and run the detector on
every val and test slice. Outputs in ``out_dir``::

    model.safetensors, model.json   the detector's state dict (safetensors) + its card and package
                                    (``inference``: classes, size, window, confidence and NMS)
    predictions.csv                 one row per slice: highest box confidence as score_<c> (Contract 3)
    boxes.csv                       every predicted box (sample_id, conf, cx, cy, w, h, normalised)
    detection_metrics.json          mAP50, mAP50-95, precision, recall on val and test
    examples.png                    test slices with true (green) and predicted (red) boxes
    dataset/, ultralytics/          the derived dataset and ultralytics' run folder (results.csv)

What ultralytics would fetch from the network, and how it is kept offline:

* its online check and telemetry: ``YOLO_OFFLINE=1`` (set before ultralytics is imported)
  and the settings ``sync``/integrations off;
* the Arial font, checked by every dataset check (``check_det_dataset``) and by plotting:
  matplotlib's own DejaVuSans is installed as ``Arial.ttf`` in ultralytics' config folder
  (``YOLO_CONFIG_DIR``, set to ``<out_dir>/ultralytics_config`` when ultralytics was not
  imported yet), and ``plots=False``;
* the AMP check, which downloads YOLO weights on CUDA: never run, because ``amp`` is
  ``False`` or ``"bf16"`` (bf16 autocast needs no check; used on CUDA when the brain
  task's ``train.bf16`` allows);
* pretrained weights: the model is built from ``yolov8<size>.yaml`` (shipped with
  ultralytics) with ``pretrained=False``.

tests/test_detection.py trains one epoch with every socket call raising.

Ultralytics saves its checkpoints as pickles (``*.pt``); the stage converts the best one to
safetensors and deletes the pickles, so only safetensors weights are ever loaded back; the
run's ``weights/`` folder keeps ``best.safetensors`` (the same file) and a README.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit.config import block_defaults
from medvit.data.yolo import build_yolo_dataset, read_boxes
from medvit.engine import load_weights, resolve_device, save_weights, seed_everything
from medvit.engine.device import resolve_bf16
from medvit.engine.speed import resolve_num_workers
from medvit.errors import ConfigError
from medvit.evaluation.evaluate import write_json
from medvit.fileio import atomic_write_bytes, atomic_write_text
from medvit.models import count_parameters
from medvit.tasks.common import load_context, model_sidecar, read_sidecar, write_predictions
from medvit.tasks.package import detection_package

# Before any `import ultralytics`: its module import runs a DNS "online" check otherwise.
os.environ.setdefault("YOLO_OFFLINE", "1")

PREDICT_FLOOR = 0.001
"""Lowest box confidence kept by prediction (ultralytics' own validation floor); the PTP
threshold ``conf`` is applied later, so it can change without rerunning the detector."""
NMS_IOU = 0.7
"""IoU above which non-maximum suppression drops the less confident box (ultralytics' default)."""
MAX_DET = 20
"""Boxes kept per slice after NMS."""
_INTEGRATIONS_OFF = {"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False, "vscode_msg": False,
                     "openvino_msg": False}


def detection_config(tcfg: dict[str, Any]) -> dict[str, Any]:
    """The task's ``detection`` block over the schema's defaults."""
    return {**block_defaults("detection"), **(tcfg.get("detection") or {})}


def setup_ultralytics(config_dir: str | Path) -> Path:
    """Make ultralytics work offline (see the module docstring); returns its config folder."""
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(Path(config_dir).resolve())
    import matplotlib
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    SETTINGS.update({k: v for k, v in _INTEGRATIONS_OFF.items() if k in SETTINGS})
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (USER_CONFIG_DIR / name).exists():
            atomic_write_bytes(USER_CONFIG_DIR / name, font.read_bytes())
    return Path(USER_CONFIG_DIR)


def ultralytics_device(device: str) -> str:
    """The study's device name as ultralytics wants it (``cpu`` or a CUDA index)."""
    d = resolve_device(device)
    return "cpu" if d.type == "cpu" else str(d.index or 0)


def build_detector(model: str, n_classes: int, names: list[str]):
    """A randomly initialised ultralytics ``YOLO`` of ``model`` (e.g. ``yolov8n``) with ``n_classes``."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    yolo = YOLO(f"{model}.yaml", task="detect")
    yolo.model = DetectionModel(f"{model}.yaml", nc=n_classes, verbose=False)
    yolo.model.names = dict(enumerate(names))
    return yolo


def load_detector(weights: str | Path):
    """Rebuild a detector written by :func:`detect_stage` from its safetensors and card."""
    meta = read_sidecar(weights)
    yolo = build_detector(meta["detector"], len(meta["names"]), list(meta["names"]))
    load_weights(weights, yolo.model)
    return yolo


def _box_metrics(result: Any) -> dict[str, float]:
    box = result.box
    return {"map50": float(box.map50), "map50_95": float(box.map), "precision": float(box.mp),
            "recall": float(box.mr)}


def _predict(yolo: Any, images: list[Path], imgsz: int, device: str, batch: int) -> list[np.ndarray]:
    """Boxes per image: (N, 5) arrays ``conf cx cy w h`` (normalised), confidence >= PREDICT_FLOOR."""
    out = []
    for start in range(0, len(images), batch):
        results = yolo.predict([str(p) for p in images[start:start + batch]], imgsz=imgsz, conf=PREDICT_FLOOR,
                               iou=NMS_IOU, device=device, verbose=False, max_det=MAX_DET)
        for r in results:
            b = r.boxes
            out.append(np.concatenate([b.conf.cpu().numpy()[:, None], b.xywhn.cpu().numpy()], 1).reshape(-1, 5))
    return out


def _example_figure(path: Path, rows: pd.DataFrame, images: dict[str, Path], truth: dict[str, np.ndarray],
                    boxes: dict[str, np.ndarray], conf: float, n: int) -> None:
    """Test slices with true boxes (green) and predicted boxes >= conf (red, with confidence):
    the highest-scoring tumour slices, missed tumour slices and the strongest false alarms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    pos = rows[rows["tumour"]].sort_values("score", ascending=False)
    neg = rows[~rows["tumour"]].sort_values("score", ascending=False)
    half = max(1, n // 2)
    pick = pd.concat([pos.head(half - half // 2), pos.tail(half // 2), neg.head(n - half)]).drop_duplicates("sample_id")
    cols = min(4, max(1, len(pick)))
    nrows = max(1, int(np.ceil(len(pick) / cols)))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), pick.to_dict("records")):
        sid = row["sample_id"]
        img = np.asarray(Image.open(images[sid]))
        h, w = img.shape[:2]
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        for _, cx, cy, bw, bh in truth.get(sid, np.empty((0, 5))):
            ax.add_patch(Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h, fill=False, ec="lime",
                                   lw=1.2))
        for c, cx, cy, bw, bh in boxes.get(sid, np.empty((0, 5))):
            if c >= conf:
                ax.add_patch(Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h, fill=False, ec="red",
                                       lw=1.2, ls="--"))
                ax.text((cx - bw / 2) * w, (cy - bh / 2) * h - 1, f"{c:.2f}", color="red", fontsize=7)
        ax.set_title(f"{'tumour' if row['tumour'] else 'normal'} | max conf {row['score']:.2f}", fontsize=8)
    fig.suptitle(f"test slices: true boxes green, predicted boxes red (conf >= {conf})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fill_weights_folder(folder: Path, weights: Path) -> None:
    """Replace ultralytics' pickled checkpoints in its run's ``weights/`` folder by the best
    weights as safetensors (a hard link to the stage's ``model.safetensors``, else a copy) and a
    README saying how to use and export them."""
    for pickle in folder.glob("*.pt"):
        pickle.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    best = folder / "best.safetensors"
    best.unlink(missing_ok=True)
    try:
        os.link(weights, best)
    except OSError:
        shutil.copyfile(weights, best)
    atomic_write_text(folder / "README.md", (
        "# Detector weights\n\n"
        "`best.safetensors` holds the best epoch's weights (on validation mAP); it is the stage's "
        "`model.safetensors`, whose `model.json` is the model package (classes, image size, intensity window, "
        "confidence and NMS settings). Ultralytics' pickled `best.pt`/`last.pt` are not kept: loading a pickle "
        "can run code.\n\n"
        "    medvit infer --model DETECTOR_FOLDER --input DIR_OR_MANIFEST --out OUT\n"
        "    medvit export --model DETECTOR_FOLDER --format onnx   # through ultralytics' exporter\n"))


def detect_stage(config_path: str | Path, task: str, split_path: str | Path, out_dir: str | Path) -> Path:
    """Train, validate and run the YOLO detector of a task (see the module docstring).

    Returns:
        the path of ``predictions.csv``.

    Raises:
        ConfigError: a binary task is needed (one tumour class).
        ManifestError: no ``boxes`` column, or a split without rows.
    """
    ctx = load_context(config_path, task, split_path)
    if ctx.spec.kind != "binary":
        raise ConfigError(f"tasks.{task}.detection needs a binary task (one tumour class); {task} is {ctx.spec.kind}")
    det = detection_config(ctx.tcfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [ctx.spec.classes[0]]
    dataset = build_yolo_dataset(ctx.df, ctx.manifest.root, out_dir / "dataset", names=names,
                                 percentiles=tuple(det["window_percentiles"]), label_column=ctx.spec.column,
                                 positive_class=ctx.spec.classes[0])
    setup_ultralytics(out_dir / "ultralytics_config")
    torch_device = resolve_device(ctx.study["device"])
    device = ultralytics_device(ctx.study["device"])
    bf16 = device != "cpu" and resolve_bf16(ctx.tcfg["train"].get("bf16", False), torch_device)
    seed_everything(ctx.study["seed"], ctx.study["deterministic"])
    yolo = build_detector(det["model"], len(names), names)
    run_dir = out_dir / "ultralytics"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    yolo.train(data=str(dataset.data_yaml), epochs=det["epochs"], imgsz=det["image_size"], batch=det["batch_size"],
               device=device, workers=resolve_num_workers(ctx.tcfg["train"]["num_workers"], torch_device),
               project=str(out_dir.resolve()),  # a relative project would land under ./runs/detect/
               name="ultralytics", exist_ok=True, plots=False, amp="bf16" if bf16 else False, seed=ctx.study["seed"],
               deterministic=ctx.study["deterministic"], pretrained=False, verbose=False, val=True,
               mosaic=float(det["mosaic"]))
    train_seconds = time.perf_counter() - t0
    # The best epoch (on val mAP) is what ultralytics leaves in yolo.model; keep it as safetensors.
    params, _ = count_parameters(yolo.model)
    window = dataset.summary["window"]
    meta = model_sidecar(ctx, "detector", split_path, detector=det["model"], names=names, in_chans=3,
                         image_size=det["image_size"], detection=det, params=params, trainable_params=params,
                         train_seconds=train_seconds, dataset=dataset.summary["splits"],
                         window=window["percentiles"],
                         inference=detection_package(det, names, window, NMS_IOU, PREDICT_FLOOR, MAX_DET))
    weights = save_weights(out_dir / "model.safetensors", yolo.model, meta)
    _fill_weights_folder(run_dir / "weights", weights)
    yolo = load_detector(weights)

    common = {"imgsz": det["image_size"], "batch": det["batch_size"], "device": device, "plots": False,
              "project": str(out_dir.resolve()), "exist_ok": True, "verbose": False}
    metrics = {split: _box_metrics(yolo.val(data=str(dataset.data_yaml), split=split, name=f"val_{split}", **common))
               for split in ("val", "test")}
    write_json(out_dir / "detection_metrics.json", {
        "study": ctx.study["study"], "task": task, "model": det["model"], "image_size": det["image_size"],
        "epochs": det["epochs"], "splits": metrics, "iou_nms": NMS_IOU, "conf_floor": PREDICT_FLOOR,
        "definition": "ultralytics validation: mAP50 / mAP50-95 = mean average precision at IoU 0.5 / "
                      "averaged over IoU 0.5:0.95; precision and recall at the confidence maximising F1",
        "dataset": dataset.summary, "train_seconds": train_seconds})

    rows = ctx.rows(["val", "test"])
    sids = rows["sample_id"].astype(str).tolist()
    predicted = _predict(yolo, [dataset.images[s] for s in sids], det["image_size"], device, det["batch_size"])
    boxes = dict(zip(sids, predicted))
    scores = np.array([b[:, 0].max() if len(b) else 0.0 for b in predicted], dtype=float)
    conf = float(det["conf"])
    extra = {"n_boxes": np.array([int((b[:, 0] >= conf).sum()) for b in predicted])}
    if "slice_index" in rows.columns:
        extra = {"slice_index": rows["slice_index"].to_numpy(), **extra}
    preds = write_predictions(out_dir / "predictions.csv", rows, ctx.spec, scores[:, None], extra)
    box_rows = [{"sample_id": s, "conf": b[0], "cx": b[1], "cy": b[2], "w": b[3], "h": b[4]}
                for s, bs in boxes.items() for b in bs]
    atomic_write_text(out_dir / "boxes.csv", pd.DataFrame(box_rows, columns=["sample_id", "conf", "cx", "cy", "w", "h"])
                      .to_csv(index=False, float_format="%.5g"))

    truth = {}
    for row in rows.to_dict("records"):
        b = row.get("boxes")
        if isinstance(b, str) and b:
            truth[str(row["sample_id"])] = read_boxes(ctx.manifest.root / b, len(names))
    test = pd.DataFrame({"sample_id": preds["sample_id"], "score": preds[f"score_{names[0]}"],
                         "tumour": preds[f"true_{names[0]}"] > 0})[preds["split"] == "test"]
    _example_figure(out_dir / "examples.png", test, dataset.images, truth, boxes, conf, int(det["examples"]))
    return out_dir / "predictions.csv"


__all__ = ["PREDICT_FLOOR", "build_detector", "detect_stage", "detection_config",
           "load_detector", "setup_ultralytics", "ultralytics_device"]
