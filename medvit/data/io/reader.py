"""The entry points: :func:`read_image` (any supported file or DICOM series folder) and
:func:`read_sample` (the image of one manifest row, its channels stacked)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medvit.data.io.budget import max_pixels
from medvit.data.io.common import ImageData, _short
from medvit.data.io.dicom import _read_dicom_file, _read_dicom_series
from medvit.data.io.formats import detect_format
from medvit.data.io.nifti import _read_nifti
from medvit.data.io.npy import _read_npy
from medvit.data.io.pillow import _read_pillow
from medvit.errors import ImageReadError


def read_image(path: str | os.PathLike[str], *, window: bool = False) -> ImageData:
    """Read any supported image file or DICOM series folder.

    Args:
        path: image file, or a folder holding one DICOM series.
        window: DICOM only. False (default) returns modality values: the rescale is applied
            (e.g. Hounsfield units for CT) and MONOCHROME1 is inverted. True returns display
            values in [0, 1]: the file's VOI LUT or first window is applied, and without one
            the image's min-max range is used. Colour DICOM is divided by its maximum value.
            Other formats ignore the flag.

    Returns:
        :class:`ImageData` with a finite float32 channel-first array.

    Raises:
        ImageReadError: the file is missing, empty, truncated, unsupported, has the wrong
            extension for its content, has no pixel data, or holds NaN/Inf values. The reason
            says which. No other exception escapes.
    """
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise ImageReadError(str(path), f"not a file path ({type(path).__name__})") from None
    max_pixels()  # a malformed $MEDVIT_MAX_PIXELS is a ConfigError of the run, not of this file
    try:
        fmt = detect_format(p)
        if fmt == "dicom-series":
            return _read_dicom_series(p, window)
        if fmt == "dicom":
            return _read_dicom_file(p, window)
        if fmt == "nifti":
            return _read_nifti(p)
        if fmt == "npy":
            return _read_npy(p)
        return _read_pillow(p, fmt)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(p, "out of memory while reading") from None
    except Exception as exc:  # safety net: third-party decoders raise anything
        raise ImageReadError(p, f"unexpected error while reading ({_short(exc, p)})") from exc


def read_sample(row: Mapping[str, Any], root: str | os.PathLike[str], *, window: bool = False) -> ImageData:
    """Read the image of one manifest row (Contract 1).

    The row's ``image`` value is used when present. Otherwise its ``image_<channel>`` columns
    are read in column order and stacked into C channels. They must share one spatial grid
    (same shape and spacing).

    Args:
        row: a manifest row (dict or pandas Series); paths are relative to ``root``.
        root: the manifest's folder.
        window: passed to :func:`read_image`.

    Raises:
        ImageReadError: no image column, an empty channel cell, an unreadable file, or
            channels on different grids.
    """
    root = Path(root)
    image = _cell(row.get("image"))
    if image is not None:
        return read_image(root / image, window=window)
    channels = [(str(k), _cell(v)) for k, v in row.items() if isinstance(k, str) and k.startswith("image_")]
    if not channels:
        raise ImageReadError(root, "manifest row has no `image` value and no `image_<channel>` columns")
    for name, value in channels:
        if value is None:
            raise ImageReadError(root, f"manifest row has an empty `{name}` cell")
    parts = [read_image(root / value, window=window) for _, value in channels]
    ref_name, ref = channels[0][0], parts[0]
    for (name, value), part in zip(channels[1:], parts[1:]):
        if part.shape[1:] != ref.shape[1:]:
            raise ImageReadError(root / value, f"`{name}` has spatial shape {part.shape[1:]} but `{ref_name}` has "
                                               f"{ref.shape[1:]}; channels must share one grid (resample first)")
        if not np.allclose(part.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
            raise ImageReadError(root / value, f"`{name}` has spacing {part.spacing} mm but `{ref_name}` has "
                                               f"{ref.spacing} mm; channels must share one grid (resample first)")
    array = np.concatenate([p.array for p in parts], axis=0)
    return ImageData(array, ref.spacing, ref.orientation, ref.modality, ref.source_format)


def _cell(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None
