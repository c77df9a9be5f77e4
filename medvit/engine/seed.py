"""Seeding, derived seeds and random-number-generator state that survives a checkpoint.

Determinism here means: the same seed, code, data and machine (device, thread count,
library versions) give bit-identical weights, and a run that was killed and resumed from a
checkpoint gives the same weights as one that was not. Three things make that hold:

* :func:`seed_everything` seeds Python, NumPy and torch (CPU and CUDA) and switches torch to
  deterministic algorithms;
* every data order comes from a :class:`torch.Generator` seeded by :func:`derive_seed`
  from ``(seed, purpose, epoch)``, never from the global state, so epoch ``e`` of a resumed
  run shuffles exactly like epoch ``e`` of an uninterrupted one;
* :func:`get_rng_state` / :func:`set_rng_state` carry the global generators (used by
  dropout, DropPath, random masking, augmentations drawn from the global RNGs) through a
  checkpoint as plain JSON.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from typing import Any, Mapping

import numpy as np
import torch

# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); it reads this variable
# when its handle is created, so it must be set before the first CUDA matmul.
_CUBLAS_WORKSPACE = ":4096:8"
_NUMPY_SEED_MODULUS = 2**32          # np.random.seed accepts [0, 2**32)
_SEED_MODULUS = 2**63                # torch.Generator.manual_seed accepts a signed 64-bit value


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every global generator and choose deterministic or fast kernels.

    Args:
        seed: any integer; Python and torch take it as is, NumPy takes it modulo 2**32.
        deterministic: ``True`` makes torch use deterministic algorithms
            (``torch.use_deterministic_algorithms(True, warn_only=True)``: an operation with no
            deterministic implementation warns instead of failing), cuDNN deterministic with
            benchmarking off, and cuBLAS a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set
            only when the environment does not already set it). ``False`` lets cuDNN
            benchmark and pick the fastest kernels, which may differ from run to run.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % _NUMPY_SEED_MODULUS)
    torch.manual_seed(seed)            # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def derive_seed(seed: int, *keys: int | str) -> int:
    """A seed for one purpose, e.g. ``derive_seed(seed, "train-loader", epoch)``.

    Stable across processes, platforms and Python versions (SHA-256 of the keys, not
    ``hash()``, which is salted per process). Distinct keys give independent streams.

    Returns:
        an integer in [0, 2**63).
    """
    text = "\x1f".join(str(k) for k in (int(seed), *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % _SEED_MODULUS


def make_generator(seed: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with ``seed`` (for DataLoader shuffling)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed) % _SEED_MODULUS)
    return generator


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy in each worker.

    PyTorch already seeds torch in worker ``i`` with ``base_seed + i``, where ``base_seed`` is
    drawn from the loader's generator; Python's ``random`` and NumPy's global state are
    otherwise copies of the parent's (forked workers would all draw the same numbers).
    This seeds both from the worker's torch seed, so with a seeded loader generator the
    workers' augmentations depend only on (seed, epoch, worker id).
    """
    del worker_id  # already folded into torch.initial_seed()
    worker_seed = torch.initial_seed()
    random.seed(worker_seed)
    np.random.seed(worker_seed % _NUMPY_SEED_MODULUS)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def get_rng_state() -> dict[str, Any]:
    """Capture the global generators as a JSON-serialisable dict.

    Keys: ``python`` (``random.getstate()`` as lists), ``numpy`` (the legacy global
    ``RandomState``, MT19937 key as a list), ``torch`` (CPU generator, base64 bytes) and
    ``cuda`` (one base64 string per visible device; empty unless CUDA is already
    initialised, so capturing never starts a CUDA context on a CPU run).
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    cuda: list[str] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": [int(k) for k in np_state["state"]["key"]],
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": _b64(torch.get_rng_state()),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured.

    CUDA states are restored only when the same number of CUDA devices is visible (a run
    resumed on a CPU node, or on a node with a different GPU count, keeps fresh CUDA
    generators: its weights then match only up to the usual device differences).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
