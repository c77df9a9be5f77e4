"""What every reader shares: the :class:`ImageData` it returns, the checks every array passes
(:func:`_finish`: shape, finite values, spacing) and short error reasons without full paths."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvit.errors import ImageReadError


@dataclass
class ImageData:
    """An image or volume with the metadata the pipeline needs.

    Attributes:
        array: float32, channel-first: ``(C, H, W)`` for 2D, ``(C, D, H, W)`` for 3D. C is 1
            for grayscale, 3 for RGB; multi-channel inputs stack their channels.
        spacing: mm per pixel/voxel in array axis order without C (``(H, W)`` or
            ``(D, H, W)``); 1.0 where the file does not say.
        orientation: anatomical axis codes of the W, H and D axes (nibabel convention:
            the direction each index increases towards), e.g. ``"RAS"`` for NIfTI after
            canonicalisation or ``"LPS"`` for an axial DICOM series; None for 2D images and
            where unknown.
        modality: DICOM Modality (e.g. ``"CR"``, ``"MR"``) or None.
        source_format: ``"png"``, ``"jpeg"``, ``"tiff"``, ``"dicom"``, ``"dicom-series"``,
            ``"nifti"`` or ``"npy"``.
    """

    array: np.ndarray = field(repr=False)
    spacing: tuple[float, ...]
    orientation: str | None
    modality: str | None
    source_format: str

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`, ``(C, H, W)`` or ``(C, D, H, W)``."""
        return tuple(int(s) for s in self.array.shape)

    def __repr__(self) -> str:
        return (f"ImageData(shape={self.shape}, spacing={self.spacing}, orientation={self.orientation!r}, "
                f"modality={self.modality!r}, source_format={self.source_format!r})")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _short(exc: BaseException, p: Path | None = None) -> str:
    """First lines of an exception message, without the file's full path (which the error
    already carries and which may name a patient folder)."""
    text = str(exc)
    if p is not None:
        for form in {os.path.abspath(p), str(p)}:
            text = text.replace(form, p.name)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = " ".join(lines[:2])[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _finish(p: Path, arr: np.ndarray, spacing: tuple[float, ...], orientation: str | None,
            modality: str | None, fmt: str) -> ImageData:
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.ndim not in (3, 4):
        raise ImageReadError(p, f"array has shape {out.shape}; expected (C, H, W) or (C, D, H, W)")
    if out.size == 0:
        raise ImageReadError(p, f"empty image (shape {out.shape})")
    n_bad = int(out.size - np.count_nonzero(np.isfinite(out)))
    if n_bad:
        raise ImageReadError(p, f"contains {n_bad} non-finite values (NaN/Inf, or beyond float32 range) of "
                                f"{out.size}; replace them (e.g. numpy.nan_to_num) before use")
    clean = tuple(float(s) if math.isfinite(float(s)) and float(s) > 0 else 1.0 for s in spacing)
    if len(clean) != out.ndim - 1:
        clean = (1.0,) * (out.ndim - 1)
    return ImageData(out, clean, orientation, modality, fmt)
