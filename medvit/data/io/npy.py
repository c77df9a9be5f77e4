"""NumPy ``.npy`` arrays, loaded with ``allow_pickle=False`` after a look at the header."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medvit.data.io.budget import _check_budget
from medvit.data.io.common import ImageData, _dims, _finish, _short
from medvit.errors import ImageReadError


def _npy_header(p: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a ``.npy`` header (None when it cannot be parsed: ``np.load``
    then says why)."""
    from numpy.lib import format as npy_format

    try:
        with open(p, "rb") as fh:
            version = npy_format.read_magic(fh)
            read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read(fh)
        return tuple(int(s) for s in shape), dtype
    except Exception:
        return None


def _read_npy(p: Path) -> ImageData:
    header = _npy_header(p)
    if header is not None and not header[1].hasobject:
        _check_budget(p, math.prod(header[0]), _dims(header[0]))
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ImageReadError(p, "object array: loading it would need unpickling, which is refused") from None
        raise ImageReadError(p, f"unreadable .npy ({_short(exc, p)})") from exc
    except Exception as exc:
        raise ImageReadError(p, f"unreadable .npy ({_short(exc, p)})") from exc
    if not isinstance(arr, np.ndarray):
        raise ImageReadError(p, "not a single NumPy array")
    if arr.dtype.kind == "c":
        raise ImageReadError(p, f"complex dtype {arr.dtype} is not supported; save the magnitude")
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(p, f"non-numeric dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4:
        if arr.shape[0] > 4:
            raise ImageReadError(p, f"4D array of shape {arr.shape}: read as (C, D, H, W), but C={arr.shape[0]} > 4")
    else:
        raise ImageReadError(p, f"array has {arr.ndim} dimensions {arr.shape}; expected 2 (H, W), 3 (D, H, W) "
                                "or 4 (C, D, H, W)")
    return _finish(p, arr, (1.0,) * (arr.ndim - 1), None, None, "npy")
