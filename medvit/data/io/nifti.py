"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel, reoriented to the closest canonical (RAS)
orientation; a gzip stream cut short is refused."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from medvit.data.io.budget import _check_budget
from medvit.data.io.common import ImageData, _dims, _finish, _short
from medvit.errors import ImageReadError

_NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _read_nifti(p: Path) -> ImageData:
    import nibabel as nib
    from nibabel.cifti2 import Cifti2Image

    try:
        img = nib.load(str(p))
    except Exception as exc:
        raise ImageReadError(p, f"unreadable NIfTI header ({_short(exc, p)})") from exc
    if isinstance(img, Cifti2Image):
        raise ImageReadError(p, "CIFTI-2 file (grayordinate data), not a volume image")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(p, f"not a NIfTI image ({type(img).__name__})")
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise ImageReadError(p, f"complex-valued NIfTI ({dtype}) is not supported; save the magnitude")
    if dtype.kind not in "biuf":
        raise ImageReadError(p, f"unsupported NIfTI data type {dtype} (e.g. RGB); save one channel per file")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise ImageReadError(p, f"NIfTI with shape {shape} is not an image")
    n_channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if n_channels > 4:
        raise ImageReadError(p, f"{len(shape)}D NIfTI {shape}: {n_channels} volumes beyond the 3 spatial axes; at "
                                "most 4 are read as channels, so split time series into 3D files (e.g. fslsplit)")
    _check_budget(p, math.prod(shape), _dims(shape))
    if p.name.lower().endswith(".gz"):
        _check_gzip_complete(p, int(img.header.get_data_offset()) + int(np.prod(shape)) * dtype.itemsize)
    try:
        if len(shape) == 2:  # a single slice: give it a z axis so it can be reoriented
            img = nib.Nifti1Image(img.get_fdata(dtype=np.float32)[..., None], img.affine)
        canon = nib.as_closest_canonical(img)
        data = canon.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter
        zooms = nib.affines.voxel_sizes(canon.affine)[:3]
        unit = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "unknown"
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(p, f"cannot read NIfTI voxel data ({_short(exc, p)})") from exc
    data = data.reshape(data.shape[:3] + (n_channels,))
    arr = np.transpose(data, (3, 2, 1, 0))  # (X, Y, Z, C) -> (C, Z, Y, X): D is the z axis
    scale = _NIFTI_UNIT_MM.get(unit, 1.0)
    # rounded: voxel sizes recovered from a float32 affine carry ~1e-7 noise
    spacing = tuple(round(float(zooms[i]) * scale, 6) for i in (2, 1, 0))
    return _finish(p, arr, spacing, "RAS", None, "nifti")


def _check_gzip_complete(p: Path, expected_size: int) -> None:
    """nibabel stops reading once it has the voxels, so a .nii.gz missing its last bytes
    would pass; the gzip trailer's size field (or, failing that, a full pass) proves the
    stream is complete."""
    with open(p, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    if isize == expected_size % 2**32:
        return
    try:  # multi-member streams or extra bytes: decompress to the end to be sure
        with gzip.open(p, "rb") as g:
            while g.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise ImageReadError(p, f"truncated or corrupt gzip stream ({_short(exc, p)})") from None
