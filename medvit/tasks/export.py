"""Export a model package to ONNX or TorchScript: ``medvit export``.

The exported graph is the package's network from image to logits, with the input
standardisation of ViTs and DeiTs inside it (their ``input_norm`` buffers). What it does not
contain is the reading and scaling that comes first (percentile scaling to [0, 1], resize to
``image_size``: the package's ``preprocess`` block) and the sigmoid/softmax after it; a
``<name>.export.json`` beside the file says so, with the input shape, the class names and the
thresholds.

Every export is checked against PyTorch on sample inputs (a batch of random images in the
model's input range, and a batch of a different size): the maximum absolute difference of the
logits is printed and recorded, and an export whose difference exceeds ``tolerance`` is
refused. ONNX is run with onnxruntime (the optional ``export`` extra: ``pip install
'medvit[export]'``); TorchScript with ``torch.jit.load``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medvit.errors import MedvitError
from medvit.fileio import atomic_write_json
from medvit.tasks.detection import load_detector, setup_ultralytics
from medvit.tasks.package import build_classifier, read_package

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_OPSET = 17
_ONNX_MISSING = "ONNX export needs the `onnx` and `onnxruntime` packages: pip install 'medvit[export]'"


class ExportError(MedvitError):
    """A model cannot be exported (an unsupported operator, a missing package, a parity failure)."""


def _samples(block: dict[str, Any], seed: int = 0) -> list[np.ndarray]:
    """Two batches (2 and 3 images) in the model's input range [0, 1]."""
    rng = np.random.default_rng(seed)
    c = int(block["architecture"]["kwargs"]["in_chans"])
    h, w = (int(s) for s in block["image_size"])
    return [rng.random((n, c, h, w), dtype=np.float32) for n in (2, 3)]


def _op_name(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"(aten::\w+|prim::\w+)", text)
    return match.group(1) if match else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _export_onnx(model, example, path: Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  the exporter's model format
    except ImportError:
        raise ExportError(_ONNX_MISSING) from None
    try:  # the exporter prints its whole graph on a failure: the message below names the operator
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["image"],
                              output_names=["logits"], opset_version=ONNX_OPSET,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - the exporter's errors name the operator it cannot convert
        path.unlink(missing_ok=True)
        raise ExportError(f"cannot export to ONNX (opset {ONNX_OPSET}): operator {_op_name(exc)} is not supported"
                          f" ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("the ONNX parity check needs onnxruntime: pip install 'medvit[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def _export_torchscript(model, example, path: Path) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False)
        traced.save(str(path))
    except Exception as exc:  # noqa: BLE001
        path.unlink(missing_ok=True)
        raise ExportError(f"cannot export to TorchScript: operator {_op_name(exc)} could not be traced") from None


def _run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    with warnings.catch_warnings():  # TorchScript is deprecated upstream in favour of torch.export; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def export_model(model_dir: str | Path, fmt: str, out: str | Path | None = None,
                 tolerance: float = 1e-4) -> dict[str, Any]:
    """Export a classifier package and check parity with PyTorch.

    Args:
        model_dir: the model folder (a complete package, :func:`medvit.tasks.package.read_package`).
        fmt: ``onnx`` or ``torchscript``.
        out: the file to write (default ``model_dir/model.onnx`` or ``model_dir/model.pt``).
        tolerance: largest accepted max abs difference of the logits.

    Returns:
        ``{"path", "format", "max_abs_diff", "batches", ...}`` (also written to ``<out>.export.json``).

    Raises:
        ExportError: unknown format, an operator the format cannot express (named), or
            outputs that differ from PyTorch by more than ``tolerance`` (the file is removed).
    """
    import torch

    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
    block, meta = read_package(model_dir)
    folder = Path(model_dir)
    if block["kind"] == "detection":
        return export_detector(folder, block, meta, fmt, out, tolerance)
    if block["kind"] != "classification":
        raise ExportError(f"{folder} is a {block['kind']} package; export serves classifiers and the YOLO detector "
                          "(apply segmentation models with `medvit infer`)")
    path = Path(out) if out is not None else folder / f"model{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_classifier(block, folder / "model.safetensors")
    samples = _samples(block)
    example = torch.from_numpy(samples[0])
    if fmt == "onnx":
        _export_onnx(model, example, path)
        run = _run_onnx
    else:
        _export_torchscript(model, example, path)
        run = _run_torchscript
    diffs = []
    with torch.no_grad():
        for x in samples:
            reference = model(torch.from_numpy(x)).numpy()
            diffs.append(float(np.abs(run(path, x) - reference).max()))
    worst = max(diffs)
    if not worst <= tolerance:
        path.unlink(missing_ok=True)
        raise ExportError(f"{fmt} export of {block['architecture']['name']} differs from PyTorch by {worst:.3g} "
                          f"(max abs, logits) > tolerance {tolerance:g}; not written")
    record = {"path": str(path), "format": fmt, "model": block["architecture"]["name"], "task": meta.get("task"),
              "max_abs_diff": worst, "batches": [len(x) for x in samples], "tolerance": tolerance,
              "opset": ONNX_OPSET if fmt == "onnx" else None, "torch": torch.__version__,
              "input": {"name": "image", "shape": ["batch", int(block["architecture"]["kwargs"]["in_chans"]),
                                                   *[int(s) for s in block["image_size"]]],
                        "dtype": "float32", "preprocess": block["preprocess"]},
              "output": {"name": "logits", "activation": "softmax" if block["task"]["kind"] == "multiclass"
                         else "sigmoid", "classes": block["task"]["classes"]},
              "threshold": block["threshold"], "weights_sha256": meta.get("sha256")}
    atomic_write_json(path.with_name(path.name + ".export.json"), record)
    return record


def export_detector(folder: Path, block: dict[str, Any], meta: dict[str, Any], fmt: str, out: str | Path | None,
                    tolerance: float) -> dict[str, Any]:
    """Export the YOLO detector through ultralytics' own exporter (``format=onnx``; NMS stays
    outside the graph, as in ultralytics' default ONNX export) and check the raw head output
    ``(batch, 4 + classes, anchors)`` against PyTorch with onnxruntime.

    Raises:
        ExportError: a format other than ONNX, a missing package, or a parity failure.
    """
    import torch

    if fmt != "onnx":
        raise ExportError(f"the YOLO detector exports to ONNX only (through ultralytics' exporter); got {fmt!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError(_ONNX_MISSING) from None
    path = Path(out) if out is not None else folder / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    setup_ultralytics(folder / "ultralytics_config")
    imgsz = int(block["image_size"])
    yolo = load_detector(folder / "model.safetensors")
    yolo.model.pt_path = str(folder / "model.pt")  # ultralytics names its output after this: folder/model.onnx
    yolo.model.args = {"imgsz": imgsz, "data": ""}  # what a checkpoint loaded by ultralytics would carry
    yolo.model.task = "detect"
    try:
        written = Path(yolo.export(format="onnx", imgsz=imgsz, opset=ONNX_OPSET, simplify=False, dynamic=True,
                                   nms=False, device="cpu", verbose=False))
    except Exception as exc:  # noqa: BLE001 - the exporter's own errors, named
        raise ExportError(f"ultralytics could not export {block['detector']} to ONNX: {_op_name(exc)}") from None
    if written.resolve() != path.resolve():
        shutil.move(str(written), path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = load_detector(folder / "model.safetensors").model.eval()
    rng = np.random.default_rng(0)
    samples = [rng.random((n, 3, imgsz, imgsz), dtype=np.float32) for n in (1, 2)]
    diffs, scale = [], 1.0
    with torch.no_grad():
        for x in samples:
            expected = reference(torch.from_numpy(x))
            expected = (expected[0] if isinstance(expected, (list, tuple)) else expected).numpy()
            diffs.append(float(np.abs(session.run(None, {name: x})[0] - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
    worst = max(diffs)
    # box coordinates are in input pixels (up to image_size): the tolerance is relative to the largest output
    if not worst <= tolerance * scale:
        path.unlink(missing_ok=True)
        raise ExportError(f"onnx export of {block['detector']} differs from PyTorch by {worst:.3g} (max abs, raw "
                          f"head output of magnitude {scale:.3g}) > tolerance {tolerance:g} x {scale:.3g}; not "
                          "written")
    import ultralytics

    record = {"path": str(path), "format": "onnx", "model": block["detector"], "task": meta.get("task"),
              "exporter": f"ultralytics {ultralytics.__version__}", "max_abs_diff": worst,
              "max_abs_output": scale, "batches": [len(x) for x in samples], "tolerance": tolerance,
              "tolerance_rule": "max_abs_diff <= tolerance x max(1, max_abs_output)", "opset": ONNX_OPSET,
              "torch": torch.__version__,
              "input": {"name": name, "shape": ["batch", 3, imgsz, imgsz], "dtype": "float32",
                        "preprocess": {"window": block["window"], "scale": "u8 / 255, RGB, letterboxed to "
                                                                             f"{imgsz}x{imgsz}"}},
              "output": {"shape": ["batch", 4 + len(block["names"]), "anchors"],
                         "meaning": "cx, cy, w, h in input pixels, then one sigmoid score per class; NMS is not "
                                    "in the graph", "classes": block["names"]},
              "conf": block["conf"], "nms": block["nms"], "weights_sha256": meta.get("sha256")}
    atomic_write_json(path.with_name(path.name + ".export.json"), record)
    return record
