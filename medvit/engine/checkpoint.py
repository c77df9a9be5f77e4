"""Atomic files, training checkpoints and weights, none of which is ever unpickled.

Formats (all readable without medvit):

* Training checkpoint ``<stem>.safetensors`` + ``<stem>.json``. The safetensors file holds
  every tensor: the model's ``state_dict`` under ``model/<name>`` and the optimizer's,
  scheduler's and trainer's tensors under ``optimizer/...``, ``scheduler/...`` and
  ``state/...``. The JSON sidecar holds everything else (epoch, step, best metric, RNG
  states, scheduler state, history; tensors appear there as ``{"__tensor__": key}``) and
  the SHA-256 and size of the safetensors file. The sidecar is written last, so it is the
  commit record: a file whose hash does not match its sidecar (a crash between the two
  writes, a truncated copy, bit rot) is refused with :class:`CorruptCheckpointError`.
* Weights ``model.safetensors`` + ``model.json`` (:func:`save_weights`): the model's
  ``state_dict`` plus metadata (config, provenance, parameter counts, training time, best
  epoch and metric) and the same SHA-256 record.
* Foreign checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt``) load only through
  ``torch.load(weights_only=True)`` (:func:`load_state_dict_file`), which refuses pickled
  code instead of running it.

Every write goes to a temporary file in the destination folder, is flushed and fsynced and
then renamed over the destination (``os.replace``), so a reader sees the old file or the
new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medvit.errors import CheckpointError
from medvit.fileio import atomic_path, atomic_write_json, sha256_file

CHECKPOINT_FORMAT = "medvit-checkpoint/1"
WEIGHTS_FORMAT = "medvit-weights/1"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
# Keys under which foreign checkpoints commonly nest their state dict (MAE: "model",
# timm/Lightning: "state_dict").
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


class CorruptCheckpointError(CheckpointError):
    """A checkpoint or weights file is truncated, altered or its sidecar is unreadable.

    Raised before anything is loaded into a model, so a caller can fall back to another
    checkpoint with its objects untouched.
    """


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------- tensors <-> JSON + safetensors


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by references, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            key = f"{key}#{len(tensors)}"
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise CheckpointError(f"cannot store a mapping key of type {type(k).__name__} at {key}")
            items.append([k, _encode(v, f"{key}/{k}", tensors)])
        return {_ITEMS: items}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a value of type {type(obj).__name__} at {key} in a checkpoint "
                          "(allowed: tensors, numbers, strings, None, lists, tuples and dicts of them)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            try:
                return tensors[obj[_TENSOR]]
            except KeyError:
                raise CorruptCheckpointError(f"tensor {obj[_TENSOR]!r} named in the sidecar is missing") from None
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses aliasing, e.g. tied
    embeddings): a tensor is cloned only when it shares storage or views part of it."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if (ptr in seen and t.numel() > 0) or t.numel() * t.element_size() != storage.nbytes():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0:
            seen.add(ptr)
        out[name] = t
    return out


def _stem(path: str | Path) -> Path:
    """``out/last``, ``out/last.json`` and ``out/last.safetensors`` all name checkpoint ``out/last``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """(tensor file, sidecar) of the checkpoint named ``path``."""
    stem = _stem(path)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """Write a safetensors file atomically; return its (sha256, size)."""
    with atomic_path(path) as tmp:
        save_file(_storable(tensors), str(tmp), metadata={"format": "pt"})
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return digest, size


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, state: Mapping[str, Any] | None = None) -> Path:
    """Write a training checkpoint ``<stem>.safetensors`` + ``<stem>.json`` atomically.

    Args:
        path: the checkpoint's stem (``out/checkpoints/last``; a ``.safetensors`` or
            ``.json`` suffix is ignored).
        model: its ``state_dict`` is stored (moved to CPU).
        optimizer, scheduler: their ``state_dict()`` is stored when given.
        state: anything else (epoch, step, best metric, RNG states, history): nested dicts,
            lists and tuples of numbers, strings, None and tensors.

    Returns:
        the path of the ``.safetensors`` file.
    """
    tensor_path, sidecar_path = checkpoint_files(path)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    sidecar: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "created": _now_iso(), "torch": torch.__version__,
                               "n_model_tensors": len(tensors)}
    sidecar["optimizer"] = None if optimizer is None else _encode(optimizer.state_dict(), "optimizer", tensors)
    sidecar["scheduler"] = None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", tensors)
    sidecar["state"] = _encode(dict(state or {}), "state", tensors)
    sidecar["sha256"], sidecar["bytes"] = _write_tensors(tensor_path, tensors)
    sidecar["tensors"] = tensor_path.name
    # The sidecar goes last: it is the commit record of the pair.
    atomic_write_json(sidecar_path, sidecar)
    return tensor_path


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read into memory (nothing applied yet).

    Attributes:
        path: the ``.safetensors`` file.
        model_state: the model's ``state_dict`` (CPU tensors).
        optimizer_state, scheduler_state: their ``state_dict`` or None.
        state: the trainer's state (epoch, history, RNG, ...).
        sidecar: the raw JSON sidecar.
    """

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    state: dict[str, Any]
    sidecar: dict[str, Any]


def _read_sidecar(sidecar_path: Path, expected_format: str) -> dict[str, Any]:
    if not sidecar_path.exists():
        raise CorruptCheckpointError(f"{sidecar_path} is missing: the checkpoint was not completely written")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{sidecar_path} is not readable JSON ({exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != expected_format:
        raise CorruptCheckpointError(f"{sidecar_path} is not a {expected_format} sidecar "
                                     f"(format: {sidecar.get('format') if isinstance(sidecar, dict) else None!r})")
    return sidecar


def _verify_hash(tensor_path: Path, sidecar: Mapping[str, Any], sidecar_path: Path) -> None:
    if not tensor_path.exists():
        raise CorruptCheckpointError(f"{tensor_path} is missing (its sidecar {sidecar_path.name} exists)")
    size = tensor_path.stat().st_size
    if "bytes" in sidecar and size != sidecar["bytes"]:
        raise CorruptCheckpointError(f"{tensor_path} has {size} bytes but {sidecar_path.name} records "
                                     f"{sidecar['bytes']}: the file is truncated or was replaced")
    digest = sha256_file(tensor_path)
    if digest != sidecar.get("sha256"):
        raise CorruptCheckpointError(f"{tensor_path} does not match the SHA-256 recorded in {sidecar_path.name} "
                                     f"({digest[:12]}... != {str(sidecar.get('sha256'))[:12]}...): "
                                     "the file is corrupt or belongs to another checkpoint")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read and verify a checkpoint without touching any model.

    Raises:
        CorruptCheckpointError: missing or unreadable sidecar, tensor file missing,
            truncated or not matching the recorded SHA-256.
    """
    tensor_path, sidecar_path = checkpoint_files(path)
    sidecar = _read_sidecar(sidecar_path, CHECKPOINT_FORMAT)
    _verify_hash(tensor_path, sidecar, sidecar_path)
    tensors = _load_tensors(tensor_path)
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        return LoadedCheckpoint(path=tensor_path, model_state=model_state,
                                optimizer_state=_decode(sidecar.get("optimizer"), tensors),
                                scheduler_state=_decode(sidecar.get("scheduler"), tensors),
                                state=_decode(sidecar.get("state") or {}, tensors), sidecar=sidecar)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{sidecar_path} has an unexpected structure ({exc})") from None


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str | Path = "state dict") -> None:
    """``model.load_state_dict`` with a :class:`CheckpointError` that names what differs.

    Raises:
        CheckpointError: missing or unexpected keys (with ``strict``) or mismatched shapes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = []
    if shapes:
        problems.append(f"shape mismatch for {few(shapes)}")
    if strict and missing:
        problems.append(f"missing keys {few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=strict)


def apply_checkpoint(ckpt: LoadedCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None, strict: bool = True) -> dict[str, Any]:
    """Load a verified checkpoint into the model (and optimizer, scheduler); return its state.

    Raises:
        CheckpointError: the checkpoint does not fit the objects (another model or
            parameter grouping), or it has no optimizer/scheduler state while one was given.
    """
    load_model_state(model, ckpt.model_state, strict=strict, source=ckpt.path)
    for obj, saved, what in ((optimizer, ckpt.optimizer_state, "optimizer"),
                             (scheduler, ckpt.scheduler_state, "scheduler")):
        if obj is None:
            continue
        if saved is None:
            raise CheckpointError(f"{ckpt.path} holds no {what} state")
        try:
            obj.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt.path}: the {what} state does not fit ({exc})") from None
    return ckpt.state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, strict: bool = True) -> dict[str, Any]:
    """Verify a checkpoint and load it into ``model`` (and ``optimizer``, ``scheduler``).

    Returns:
        the ``state`` dict given to :func:`save_checkpoint`.

    Raises:
        CorruptCheckpointError: truncated, altered or half-written (nothing was loaded).
        CheckpointError: it does not fit the given objects.
    """
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler, strict=strict)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a copy of checkpoint ``src`` (hard links where the filesystem allows).

    The tensor file is replaced first and the sidecar last, each atomically, so a crash in
    between leaves ``dst`` refused (hash mismatch) while ``src`` stays intact. Files are
    never modified in place, so hard links are safe.
    """
    for s, d in zip(checkpoint_files(src), checkpoint_files(dst)):
        with atomic_path(d) as tmp:
            tmp.unlink()
            try:
                os.link(s, tmp)
            except OSError:
                shutil.copyfile(s, tmp)


def remove_checkpoint(path: str | Path) -> None:
    """Delete both files of a checkpoint (missing files are fine)."""
    for f in checkpoint_files(path):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


# ---------------------------------------------------------------------------------- weights


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), shared parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def save_weights(path: str | Path, model: nn.Module, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (``model.safetensors``) and a JSON sidecar beside it
    (``path`` with suffix ``.json``).

    Args:
        path: the ``.safetensors`` file to write.
        model: its ``state_dict`` is stored (moved to CPU).
        metadata: JSON-serialisable facts to keep with the weights (config, provenance,
            train_seconds, best_epoch, best_metric, ...). ``params`` and
            ``trainable_params`` are filled in from the model unless given.

    Returns:
        ``path``. The sidecar also records ``format``, ``sha256``, ``bytes``, ``tensors``
        and ``created``; :func:`load_weights` checks the hash.
    """
    path = Path(path)
    params, trainable = count_parameters(model)
    sidecar: dict[str, Any] = {"params": params, "trainable_params": trainable, **dict(metadata or {})}
    digest, size = _write_tensors(path, model.state_dict())
    sidecar.update(format=WEIGHTS_FORMAT, weights=path.name, sha256=digest, bytes=size,
                   tensors=len(model.state_dict()), created=_now_iso())
    atomic_write_json(path.with_suffix(".json"), sidecar)
    return path


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    """The sidecar of weights written by :func:`save_weights` (``{}`` if there is none)."""
    sidecar_path = Path(path).with_suffix(".json")
    return _read_sidecar(sidecar_path, WEIGHTS_FORMAT) if sidecar_path.exists() else {}


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> dict[str, Any]:
    """Load weights written by :func:`save_weights` (or any ``.safetensors`` state dict).

    When the JSON sidecar exists the file's SHA-256 is checked against it first; a bare
    ``.safetensors`` file without sidecar loads too (safetensors checks its own structure).

    Returns:
        the sidecar's metadata (``{}`` without sidecar).

    Raises:
        CheckpointError: missing file; :class:`CorruptCheckpointError` for a truncated or
            altered file; a :class:`CheckpointError` naming the keys that do not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: weights must be a .safetensors file "
                              "(foreign .pt/.pth files: use load_state_dict_file)")
    sidecar = read_weights_metadata(path)
    if sidecar:
        _verify_hash(path, sidecar, path.with_suffix(".json"))
    load_model_state(model, _load_tensors(path), strict=strict, source=path)
    return sidecar


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a foreign ``.pt``/``.pth``/``.bin``/``.ckpt``
    checkpoint without executing code from it.

    Pickle-based files go through ``torch.load(weights_only=True)``, whose restricted
    unpickler accepts only tensors and plain containers and refuses anything else (a class
    whose ``__reduce__`` would run a command is refused before it runs). A state dict nested
    under ``state_dict``, ``model``, ``model_state_dict``, ``module`` or ``net`` is unwrapped.

    Returns:
        ``{name: tensor}`` on CPU.

    Raises:
        CheckpointError: missing, unreadable, unsafe, or holding no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refusing to load: the file contains pickled objects other than tensors and plain "
            f"containers, which could run code when unpickled ({reason}). Only weights-only checkpoints "
            "are accepted; convert the file to .safetensors where you trust its origin") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc})") from None
    state = obj
    if isinstance(state, Mapping) and not _all_tensors(state):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping) and _all_tensors(state[key]):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not _all_tensors(state):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} holds no state dict of tensors (top level: {keys})")
    return {str(k): v for k, v in state.items()}


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())

