"""Image IO: one function reads every supported input into a channel-first float32 array.

Supported inputs (the full rules, with the reasons behind them, are in ``docs/io.md``):

* PNG, JPEG, TIFF through Pillow. 16-bit stays 16-bit, RGB becomes 3 channels, palette,
  alpha and CMYK modes are converted, and multi-page TIFF with equal pages becomes a volume.
* Single DICOM files through pydicom. Compressed transfer syntaxes (JPEG baseline, extended
  and lossless, JPEG-LS, JPEG 2000, RLE) go through pydicom's pixel-data plugins (pylibjpeg).
  Multi-frame files become volumes.
* DICOM series folders. Every DICOM image in the folder must belong to one
  SeriesInstanceUID. Slices are sorted along the slice normal into ``(C, D, H, W)``.
* NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel, reoriented to the closest canonical
  (RAS) orientation.
* NumPy ``.npy``, loaded with ``allow_pickle=False``.

Every reader first checks the image's size against a pixel budget (:func:`max_pixels`,
``$MEDVIT_MAX_PIXELS``), counted from the header over all channels, frames, pages and slices
before anything is decoded, so a small file that declares a huge image is rejected instead of
exhausting memory.

Intensities are real units. The DICOM modality LUT (rescale slope/intercept) is applied and
MONOCHROME1 is inverted so that larger always means brighter. A VOI LUT or window is applied
only when the caller asks for display values (``window=True``). Anything that cannot be read
raises :class:`~medvit.errors.ImageReadError` with a short reason; no other exception escapes.
"""

from __future__ import annotations

import gzip
import math
import os
import string
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvit.errors import ConfigError, ImageReadError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageData",
    "MAX_PIXELS_ENV",
    "SUPPORTED_FORMATS",
    "detect_format",
    "max_pixels",
    "read_dicom_header",
    "read_image",
    "read_sample",
]

#: Human-readable list used in "unsupported file" reasons and the docs.
SUPPORTED_FORMATS = "PNG, JPEG, TIFF, DICOM (file or series folder), NIfTI (.nii/.nii.gz), NumPy (.npy)"

_EXT_FORMAT = {
    ".png": "png",
    ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg",
    ".tif": "tiff", ".tiff": "tiff",
    ".nii": "nifti", ".nii.gz": "nifti",
    ".npy": "npy",
    ".dcm": "dicom", ".dicom": "dicom", ".dic": "dicom", ".ima": "dicom",
}
# Hints for formats people commonly have; the reason then says what to do.
_EXT_HINT = {
    ".hdr": "Analyze/NIfTI header-image pairs are not read; convert to .nii.gz",
    ".img": "Analyze/NIfTI header-image pairs are not read; convert to .nii.gz",
    ".mgz": "FreeSurfer MGH is not read; convert to .nii.gz (mri_convert)",
    ".mgh": "FreeSurfer MGH is not read; convert to .nii.gz (mri_convert)",
    ".mnc": "MINC is not read; convert to .nii.gz",
    ".par": "Philips PAR/REC is not read; convert to .nii.gz (e.g. dcm2niix)",
    ".rec": "Philips PAR/REC is not read; convert to .nii.gz (e.g. dcm2niix)",
    ".gz": "gzip archives are not unpacked; name gzipped NIfTI files .nii.gz",
    ".npz": "NumPy archives hold several arrays; save the image as .npy",
    ".zip": "archives are not unpacked",
}
_LABEL = {
    "dicom": "DICOM", "dicom-raw": "DICOM", "png": "PNG", "jpeg": "JPEG", "tiff": "TIFF",
    "nifti": "NIfTI", "gzip": "gzip-compressed data", "npy": "a NumPy array", "zip": "a ZIP archive",
    "text": "text", None: "unrecognised data",
}
_PRINTABLE = set(string.printable.encode())
MAX_PIXELS_ENV = "MEDVIT_MAX_PIXELS"
"""Environment variable that replaces :data:`DEFAULT_MAX_PIXELS` (a positive integer)."""
DEFAULT_MAX_PIXELS = 2**27
"""Most pixel values (pixels x channels x frames/pages/slices) one image may declare:
134,217,728, e.g. a 512x512x512 volume or a 6,688x6,688 RGB image. Decoding one costs up to
about 16 bytes per value on the way to float32 (2 GiB at the cap), which leaves room for
parallel jobs and data-loader workers on a 24 GiB machine. Pillow's own limit (about 179
million pixels per page) is kept as well."""
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


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


# --------------------------------------------------------------------------------------
# pixel budget


def max_pixels() -> int:
    """The pixel budget: ``$MEDVIT_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        ConfigError: the variable is set to something other than a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"${MAX_PIXELS_ENV}: got {raw!r}; allowed: a positive integer (pixel values per image, "
                          f"default {DEFAULT_MAX_PIXELS})")
    return value


def _check_budget(p: Path, count: int, what: str) -> None:
    """Refuse an image that declares more than :func:`max_pixels` values (before decoding)."""
    budget = max_pixels()
    if count > budget:
        raise ImageReadError(p, f"image too large: {what} = {count:,} pixel values, over the budget of {budget:,} "
                                f"(${MAX_PIXELS_ENV}); not decoded")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


# --------------------------------------------------------------------------------------
# public entry points


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


def detect_format(path: str | os.PathLike[str]) -> str:
    """Decide how a path would be read, from its name and its first bytes.

    Returns:
        ``"dicom-series"`` for a folder, else ``"dicom"``, ``"png"``, ``"jpeg"``, ``"tiff"``,
        ``"nifti"`` or ``"npy"``.

    Raises:
        ImageReadError: missing or empty file, unsupported type, or content that does not
            match the extension (e.g. a text file named ``.dcm``).
    """
    p = Path(path)
    if p.is_dir():
        return "dicom-series"
    if not p.exists():
        raise ImageReadError(p, "file not found" + (" (broken link)" if p.is_symlink() else ""))
    if not p.is_file():
        raise ImageReadError(p, "not a regular file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise ImageReadError(p, f"cannot open file ({exc.strerror or _short(exc, p)})") from None
    if size == 0:
        raise ImageReadError(p, "empty file (0 bytes)")
    content = _sniff(head)
    suffix = _suffix(p)
    claimed = _EXT_FORMAT.get(suffix)
    if claimed == "dicom" or (claimed is None and _dicom_like_suffix(suffix)):
        if content in ("dicom", "dicom-raw"):
            return "dicom"
        if content is not None and claimed == "dicom":
            raise ImageReadError(p, f"content is {_LABEL[content]}, not DICOM (wrong extension?)")
        if content is not None:
            raise ImageReadError(p, f"not an image: content is {_LABEL[content]} (files without an extension are "
                                    "read as DICOM)")
        raise ImageReadError(p, "not a DICOM file (no 'DICM' marker and no recognisable DICOM header)")
    if claimed is None:
        if content == "dicom":  # the DICM marker is unambiguous whatever the suffix says
            return "dicom"
        hint = _EXT_HINT.get(suffix)
        raise ImageReadError(p,
                             f"unsupported file type {suffix!r}" + (f": {hint}" if hint else "; supported: "
                                                                                             f"{SUPPORTED_FORMATS}"))
    if claimed == "nifti":
        want = "gzip" if suffix == ".nii.gz" else "nifti"
        if content == want:
            return "nifti"
        if suffix == ".nii" and content == "gzip":
            raise ImageReadError(p, "content is gzip-compressed; name the file .nii.gz")
        if suffix == ".nii.gz" and content == "nifti":
            raise ImageReadError(p, "content is an uncompressed NIfTI; name the file .nii")
        raise ImageReadError(p, f"content is {_LABEL[content]}, not NIfTI (wrong extension?)")
    if content != claimed:
        raise ImageReadError(p, f"content is {_LABEL[content]}, not {_LABEL[claimed]} (wrong extension?)")
    return claimed


def read_dicom_header(path: str | os.PathLike[str]):
    """Read a DICOM file's header without its pixel data (for grouping files into series).

    Returns:
        ``pydicom.Dataset`` without the pixel data element.

    Raises:
        ImageReadError: not a DICOM file or an unreadable header.
    """
    p = Path(path)
    if detect_format(p) != "dicom":
        raise ImageReadError(p, "not a DICOM file")
    return _dcmread(p, stop_before_pixels=True)


# --------------------------------------------------------------------------------------
# format detection helpers


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()


def _dicom_like_suffix(suffix: str) -> bool:
    # DICOM files are often extension-less or named by UID ("1.2.840.113619.2.5"), whose
    # "suffix" is a number.
    return suffix == "" or suffix[1:].isdigit()


def _sniff(head: bytes) -> str | None:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if len(head) >= 8:
        # DICOM without the 128-byte preamble: the first element is a group 0002 or 0008 tag
        # (little endian) or a group 0008 tag (explicit VR big endian).
        group_le = int.from_bytes(head[:2], "little")
        group_be = int.from_bytes(head[:2], "big")
        if group_le in (0x0002, 0x0008) or group_be == 0x0008:
            return "dicom-raw"
    if all(b in _PRINTABLE for b in head):
        return "text"
    return None


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


def _cell(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


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


# --------------------------------------------------------------------------------------
# Pillow: PNG / JPEG / TIFF

_PIL_FORMATS = {"png": {"PNG"}, "jpeg": {"JPEG", "MPO"}, "tiff": {"TIFF"}}


def _read_pillow(p: Path, fmt: str) -> ImageData:
    from PIL import Image, ImageOps

    try:
        with Image.open(p) as im:
            if im.format not in _PIL_FORMATS[fmt]:
                raise ImageReadError(p, f"content is {im.format}, not {fmt.upper()} (wrong extension?)")
            n_pages = _pillow_budget(p, im, fmt)
            if fmt == "tiff" and n_pages > 1:
                pages = []
                for i in range(n_pages):
                    im.seek(i)
                    im.load()
                    pages.append(_pil_to_array(p, im))
                if all(pg.shape == pages[0].shape for pg in pages):
                    return _finish(p, np.stack(pages, axis=1), (1.0, 1.0, 1.0), None, None, fmt)
                # pyramidal TIFF: pages are resolution levels; the first is the full image
                return _finish(p, pages[0], (1.0, 1.0), None, None, fmt)
            im.load()
            if fmt == "png":
                _check_png_end(p)
            if fmt == "jpeg":
                im = ImageOps.exif_transpose(im)  # camera photos (dermatology) carry a rotation flag
            return _finish(p, _pil_to_array(p, im), (1.0, 1.0), None, None, fmt)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(p, f"image too large for Pillow ({_short(exc, p)})") from exc
    except Exception as exc:
        raise ImageReadError(p, f"cannot decode {fmt.upper()} ({_short(exc, p)})") from exc


def _pil_values(im) -> int:
    bands = 3 if im.mode in ("P", "PA") else max(1, len(im.getbands()))
    return int(im.width) * int(im.height) * bands


def _pillow_budget(p: Path, im, fmt: str) -> int:
    """Check the pixel budget over every page (multi-page TIFF: all of them) from the page
    headers, before any page is decoded; return the number of pages to read."""
    total = _pil_values(im)
    if fmt != "tiff":
        _check_budget(p, total, f"{im.width}x{im.height}x{total // max(1, im.width * im.height)}")
        return 1
    pages, first = 1, f"{im.width}x{im.height}"
    while True:  # stops at the first page over the budget: a file may declare millions
        _check_budget(p, total, f"the first {pages} pages (first page {first})" if pages > 1 else first)
        try:
            im.seek(pages)
        except EOFError:
            break
        pages += 1
        total += _pil_values(im)
    im.seek(0)
    return pages


def _check_png_end(p: Path) -> None:
    """Pillow decodes a PNG cut after its image data without complaint; the mandatory IEND
    chunk tells a complete file from a truncated one. Pillow also skips the CRC of image data
    chunks, so a flipped bit in IDAT would decode to wrong pixels: every chunk's CRC is checked."""
    with open(p, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 65536))
        tail = fh.read()
    if b"IEND\xaeB`\x82" not in tail:
        raise ImageReadError(p, "truncated PNG (no IEND chunk at the end)")
    with open(p, "rb") as fh:
        fh.seek(8)  # after the signature, which Pillow has checked
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise ImageReadError(p, "corrupt PNG (chunks end before IEND)")
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            data = fh.read(length)
            crc = fh.read(4)
            if len(data) < length or len(crc) < 4:
                raise ImageReadError(p, f"corrupt PNG (chunk {kind!r} runs past the end of the file)")
            if zlib.crc32(data, zlib.crc32(kind)) != int.from_bytes(crc, "big"):
                raise ImageReadError(p, f"corrupt PNG (CRC mismatch in chunk {kind.decode('latin-1')!r}: "
                                        "damaged file)")
            if kind == b"IEND":
                return


def _pil_to_array(p: Path, im) -> np.ndarray:
    """Pillow image -> (C, H, W) with the original bit depth."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)[None]  # 0/1, so binary masks keep their labels
    if mode in ("L", "I", "F") or mode.startswith("I;"):
        return np.asarray(im)[None]
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))[None]  # alpha is not image content
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        # a grey palette is storage, not colour
        if np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[1], rgb[2]):
            return rgb[:1]
        return rgb
    if mode == "RGB":
        return np.asarray(im).transpose(2, 0, 1)
    if mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    raise ImageReadError(p, f"unsupported image mode {mode!r}")


# --------------------------------------------------------------------------------------
# NumPy


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


# --------------------------------------------------------------------------------------
# NIfTI

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


# --------------------------------------------------------------------------------------
# DICOM


def _dcmread(p: Path, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            has_marker = fh.read(4) == b"DICM"
    except OSError as exc:
        raise ImageReadError(p, f"cannot open file ({exc.strerror or _short(exc, p)})") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # force only for files without the DICM marker, which detect_format has already
            # checked for a plausible first DICOM tag (so text files never get here)
            ds = pydicom.dcmread(p, force=not has_marker, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise ImageReadError(p, f"not a DICOM file ({_short(exc, p)})") from None
    except Exception as exc:
        raise ImageReadError(p, f"unreadable DICOM header ({_short(exc, p)})") from exc
    truncated = False
    for w in caught:
        if "End of file reached before delimiter" in str(w.message):
            truncated = True
        else:  # pass the rest on under the caller's warning filters
            warnings.warn(w.message, w.category, stacklevel=3)
    if truncated:
        raise ImageReadError(p, "truncated file (a sequence or encapsulated pixel data has no end)")
    if len(ds) == 0:
        raise ImageReadError(p, "not a DICOM file (no data elements)")
    if not stop_before_pixels:
        _check_last_element(ds, p)
    return ds


def _check_last_element(ds, p: Path) -> None:
    """pydicom keeps a value cut short by the end of the file; an element shorter than its
    declared length means the file was truncated."""
    try:
        tags = list(ds.keys())
        raw = ds.get_item(tags[-1]) if tags else None
        length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    except Exception:
        return
    if isinstance(length, int) and length != 0xFFFFFFFF and isinstance(value, (bytes, bytearray)) \
            and len(value) < length:
        raise ImageReadError(p, f"truncated file (the last element is {length - len(value)} bytes short)")


def _is_dicomdir(ds) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds


def _modality(ds) -> str | None:
    try:
        value = str(ds.get("Modality", "") or "").strip()
    except Exception:
        return None
    return value or None


def _check_pixel_module(ds, p: Path) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if _is_dicomdir(ds):
            raise ImageReadError(p, "no pixel data (DICOMDIR directory index)")
        modality = _modality(ds)
        raise ImageReadError(p, "no pixel data" + (f" ({modality} object)" if modality else ""))
    needed = ["Rows", "Columns"]
    if "PixelData" in ds:
        needed += ["BitsAllocated", "PhotometricInterpretation"]
    missing = [k for k in needed if k not in ds]
    if missing:
        raise ImageReadError(p, f"incomplete image header (missing {', '.join(missing)})")


def _ensure_transfer_syntax(ds, p: Path) -> None:
    """Files without file meta (or without its Transfer Syntax UID) cannot be decoded by
    pydicom; the encoding the header was read with tells us the native transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise ImageReadError(p, "compressed pixel data without a Transfer Syntax UID (codec unknown)")
    implicit, little = ds.original_encoding
    if little is None or (implicit and not little):
        raise ImageReadError(p, "no Transfer Syntax UID and unknown byte order")
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit


def _n_frames(ds, p: Path) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:
        raise ImageReadError(p, f"invalid NumberOfFrames {ds['NumberOfFrames'].value!r}") from None


def _dicom_samples(ds) -> int:
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception:
        samples = 1
    return max(samples, 3 if photometric == "PALETTE COLOR" else 1)


def _dicom_values(ds, p: Path) -> int:
    """Pixel values a DICOM header declares (rows x columns x frames x samples), from the
    header alone; 0 when Rows/Columns are unusable (decoding then says why)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception:
        return 0
    return max(rows, 0) * max(cols, 0) * _n_frames(ds, p) * _dicom_samples(ds)


def _floats(value: Any, n: int) -> np.ndarray | None:
    """A DICOM multi-value as n floats, or None when absent or malformed."""
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:
        return None
    if out.shape != (n,) or not np.isfinite(out).all():
        return None
    return out


def _fg_value(ds, frame: int | None, sequence: str, attribute: str) -> Any:
    """A value from an enhanced multi-frame functional group: per-frame first, then shared."""
    places = []
    if frame is not None and ds.get("PerFrameFunctionalGroupsSequence"):
        try:
            places.append(ds.PerFrameFunctionalGroupsSequence[frame])
        except Exception:
            pass
    if ds.get("SharedFunctionalGroupsSequence"):
        places.append(ds.SharedFunctionalGroupsSequence[0])
    for item in places:
        seq = item.get(sequence)
        if seq:
            value = seq[0].get(attribute)
            if value is not None:
                return value
    return None


def _pixel_spacing(ds) -> tuple[float, float]:
    """(row spacing, column spacing) in mm, i.e. along H and W."""
    for name in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = _floats(ds.get(name), 2)
        if value is not None and (value > 0).all():
            return float(value[0]), float(value[1])
    value = _floats(_fg_value(ds, 0, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if value is not None and (value > 0).all():
        return float(value[0]), float(value[1])
    return 1.0, 1.0


def _slice_gap(ds, n_frames: int) -> float:
    """Distance between frames of a multi-frame file in mm (1.0 when unknown)."""
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None:
        iop = _floats(_fg_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if iop is not None and ds.get("PerFrameFunctionalGroupsSequence"):
        normal = np.cross(iop[:3], iop[3:])
        pos = [_floats(_fg_value(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3) for i in range(n_frames)]
        if all(q is not None for q in pos) and np.linalg.norm(normal) > 0.5:
            gaps = np.abs(np.diff([float(np.dot(q, normal)) for q in pos]))
            if len(gaps) and np.median(gaps) > 0:
                return float(np.median(gaps))
    offsets = ds.get("GridFrameOffsetVector")  # RT dose grids, some NM
    if offsets is not None:
        try:
            gaps = np.abs(np.diff([float(v) for v in offsets]))
            if len(gaps) and np.median(gaps) > 0:
                return float(np.median(gaps))
        except Exception:
            pass
    for value in (ds.get("SpacingBetweenSlices"), ds.get("SliceThickness"),
                  _fg_value(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"),
                  _fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness")):
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except Exception:
            continue
    return 1.0


def _stored_range(ds, raw: np.ndarray) -> tuple[float, float]:
    try:
        bits = int(ds.BitsStored)
        if int(ds.get("PixelRepresentation", 0)) == 0:
            return 0.0, float(2**bits - 1)
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    except Exception:  # float pixel data has no BitsStored
        return float(raw.min()), float(raw.max())


def _modality_values(ds, raw: np.ndarray, p: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the modality LUT / rescale to grayscale frames (F, H, W).

    Returns the values (float64) and the modality range [lo, hi] that the stored bit depth
    maps to, used for MONOCHROME1 inversion.
    """
    from pydicom.pixels import apply_modality_lut

    s_lo, s_hi = _stored_range(ds, raw)
    if ds.get("ModalityLUTSequence"):
        vals = apply_modality_lut(raw, ds).astype(np.float64)
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return vals, (0.0, float(2**bits - 1))
    if ds.get("RescaleSlope") is not None or ds.get("RescaleIntercept") is not None:
        if ds.get("RescaleSlope") is None:
            ds.RescaleSlope = 1
        if ds.get("RescaleIntercept") is None:
            ds.RescaleIntercept = 0
        vals = apply_modality_lut(raw, ds).astype(np.float64)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    else:
        # enhanced multi-frame objects keep the rescale in functional groups, per frame
        vals = raw.astype(np.float64)
        slope, intercept = 1.0, 0.0
        for i in range(vals.shape[0]):
            s = _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
            b = _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
            if s is not None or b is not None:
                fs = float(s) if s is not None else 1.0
                fb = float(b) if b is not None else 0.0
                vals[i] = vals[i] * fs + fb
                if i == 0:
                    slope, intercept = fs, fb
    if _modality(ds) == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        scale = float(ds.DoseGridScaling)  # stored integers * scaling = dose in Gy
        vals *= scale
        slope, intercept = slope * scale, intercept * scale
    lo, hi = sorted((s_lo * slope + intercept, s_hi * slope + intercept))
    return vals, (lo, hi)


def _voi_range(ds) -> tuple[float, float] | None:
    """Output range of pydicom's apply_voi_lut for this dataset (mirrors pydicom's rules)."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


@dataclass
class _DicomPixels:
    values: np.ndarray             # (C, F, H, W) float64; grayscale: modality values, not inverted
    monochrome1: bool
    modality_range: tuple[float, float]
    color_max: float               # colour: largest representable value


def _decode_dicom(ds, p: Path) -> _DicomPixels:
    from pydicom.pixels import apply_color_lut

    _check_pixel_module(ds, p)
    _ensure_transfer_syntax(ds, p)
    frames = _n_frames(ds, p)
    rows, cols = int(ds.Rows), int(ds.Columns)
    _check_budget(p, _dicom_values(ds, p), f"{frames} frame(s) of {rows}x{cols}x{_dicom_samples(ds)}")
    try:
        raw = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(p, f"cannot decode pixel data ({_short(exc, p)})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        try:
            raw = apply_color_lut(raw, ds)
        except Exception as exc:
            raise ImageReadError(p, f"cannot apply the colour palette ({_short(exc, p)})") from exc
    channels = raw.size // max(1, frames * rows * cols)
    if channels not in (1, 3) or raw.size != frames * rows * cols * channels:
        raise ImageReadError(p, f"decoded pixel data has shape {raw.shape}, which does not fit {frames} frame(s) of "
                                f"{rows}x{cols}")
    raw = raw.reshape(frames, rows, cols, channels)
    if channels == 3:
        vals = np.moveaxis(raw, -1, 0).astype(np.float64)
        color_max = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "ui" else max(1.0, float(raw.max()))
        if raw.dtype.kind in "ui" and photometric != "PALETTE COLOR":
            try:
                color_max = float(2 ** int(ds.BitsStored) - 1)
            except Exception:
                pass
        return _DicomPixels(vals, False, (0.0, color_max), color_max)
    try:
        vals, vrange = _modality_values(ds, raw[..., 0], p)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(p, f"cannot apply the modality LUT/rescale ({_short(exc, p)})") from exc
    return _DicomPixels(vals[None], photometric == "MONOCHROME1", vrange, 1.0)


def _dicom_output(ds, px: _DicomPixels, window: bool) -> tuple[np.ndarray, bool]:
    """Modality values (MONOCHROME1 inverted) or, with ``window``, display values in [0, 1].

    Returns the array and whether a display mapping was applied (False means the caller
    still has to min-max scale when it wants display values).
    """
    from pydicom.pixels import apply_voi_lut

    vals = px.values
    if vals.shape[0] == 3:
        return (vals / px.color_max, True) if window else (vals, False)
    if window:
        try:
            out_range = _voi_range(ds)
            if out_range is not None and out_range[1] > out_range[0]:
                disp = apply_voi_lut(vals[0], ds).astype(np.float64)
                disp = np.clip((disp - out_range[0]) / (out_range[1] - out_range[0]), 0.0, 1.0)
                if px.monochrome1:
                    disp = 1.0 - disp
                return disp[None], True
        except Exception:
            pass  # malformed window: fall back to the min-max display range
    if px.monochrome1:
        lo, hi = px.modality_range
        vals = (lo + hi) - vals
    return vals, False


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _read_dicom_file(p: Path, window: bool) -> ImageData:
    ds = _dcmread(p, stop_before_pixels=False)
    px = _decode_dicom(ds, p)
    arr, done = _dicom_output(ds, px, window)
    if window and not done:
        arr = _minmax(arr)
    spacing2d = _pixel_spacing(ds)
    if arr.shape[1] == 1:
        return _finish(p, arr[:, 0], spacing2d, None, _modality(ds), "dicom")
    return _finish(p, arr, (_slice_gap(ds, arr.shape[1]),) + spacing2d, None, _modality(ds), "dicom")


def _axcodes(row: np.ndarray, col: np.ndarray, normal: np.ndarray) -> str | None:
    """Axis codes of (W, H, D) for a DICOM grid (LPS patient coordinates)."""
    from nibabel.orientations import aff2axcodes

    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = lps_to_ras @ row     # W: along a row, i.e. increasing column index
    affine[:3, 1] = lps_to_ras @ col     # H: increasing row index
    affine[:3, 2] = lps_to_ras @ normal  # D: increasing slice position
    try:
        codes = aff2axcodes(affine)
    except Exception:
        return None
    return None if None in codes else "".join(codes)


def _order_slices(headers: list[tuple[Path, Any]], folder: Path) -> tuple[list[Path], float, str | None]:
    """Sort a series' files along the slice normal (fallback: InstanceNumber).

    Returns the ordered files, the slice spacing in mm and the axis codes.
    """
    ipps = [_floats(ds.get("ImagePositionPatient"), 3) for _, ds in headers]
    iops = [_floats(ds.get("ImageOrientationPatient"), 6) for _, ds in headers]
    if all(v is not None for v in ipps) and all(v is not None for v in iops):
        iop0 = iops[0]
        if any(np.abs(v - iop0).max() > 1e-3 for v in iops):
            raise ImageReadError(folder, "slices have different orientations (e.g. a localizer series); cannot stack")
        row, col = iop0[:3], iop0[3:]
        normal = np.cross(row, col)
        if np.linalg.norm(normal) < 0.5:
            raise ImageReadError(folder, "invalid ImageOrientationPatient (row and column directions not orthogonal)")
        normal = normal / np.linalg.norm(normal)
        pos = np.array([float(np.dot(v, normal)) for v in ipps])
        order = np.argsort(pos, kind="stable")
        gaps = np.diff(pos[order])
        dup = int(np.sum(gaps < 1e-3))
        if dup:
            raise ImageReadError(folder, f"{dup + 1} slices share a position (multi-echo, multi-phase or duplicated "
                                         "files?); put each volume in its own folder")
        dz = float(np.median(gaps))
        if gaps.max() - gaps.min() > max(0.1 * dz, 1e-3):
            raise ImageReadError(folder, f"irregular slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm): "
                                         "missing slices?")
        return [headers[i][0] for i in order], dz, _axcodes(row, col, normal)
    numbers = []
    for _, ds in headers:
        try:
            numbers.append(int(ds.InstanceNumber))
        except Exception:
            raise ImageReadError(folder, "cannot order slices: no ImagePositionPatient/ImageOrientationPatient and "
                                         "no InstanceNumber") from None
    if len(set(numbers)) != len(numbers):
        raise ImageReadError(folder, "cannot order slices: no slice positions and repeated InstanceNumber values")
    order = np.argsort(numbers, kind="stable")
    return [headers[i][0] for i in order], _slice_gap(headers[0][1], 1), None


def _read_dicom_series(folder: Path, window: bool) -> ImageData:
    try:
        entries = sorted(e for e in folder.iterdir())
    except OSError as exc:
        raise ImageReadError(folder, f"cannot list folder ({exc.strerror or _short(exc, folder)})") from None
    files = [e for e in entries if e.is_file()]
    headers: list[tuple[Path, Any]] = []
    n_other = 0
    for f in files:
        try:
            if detect_format(f) != "dicom":
                n_other += 1
                continue
        except ImageReadError:
            n_other += 1  # README, thumbnails, ... are not part of the series
            continue
        ds = _dcmread(f, stop_before_pixels=True)  # a broken slice breaks the series: raise
        if "Rows" not in ds:
            n_other += 1  # DICOMDIR, reports and other objects without an image
            continue
        headers.append((f, ds))
    if not headers:
        if not entries:
            raise ImageReadError(folder, "empty folder")
        extra = f" ({n_other} file(s) without image data or not DICOM)" if n_other else ""
        raise ImageReadError(folder, "no DICOM images in folder" + extra)
    series = {str(ds.get("SeriesInstanceUID", "") or "") for _, ds in headers}
    if len(series) > 1:
        raise ImageReadError(folder, f"folder holds {len(series)} DICOM series; a series folder must hold exactly one "
                                     "(`medvit ingest` separates them)")
    if len(headers) == 1:
        img = _read_dicom_file(headers[0][0], window)
        if img.array.ndim == 3:
            gap = _slice_gap(headers[0][1], 1)
            return ImageData(img.array[:, None], (gap,) + img.spacing, None, img.modality, "dicom-series")
        return ImageData(img.array, img.spacing, img.orientation, img.modality, "dicom-series")
    for f, ds in headers:
        if _n_frames(ds, f) > 1:
            raise ImageReadError(folder, "series holds several multi-frame files; read them one by one")
    _check_budget(folder, sum(_dicom_values(ds, f) for f, ds in headers), f"{len(headers)} slices")
    ordered, dz, orientation = _order_slices(headers, folder)
    datasets, pixels = [], []
    for f in ordered:
        ds = _dcmread(f, stop_before_pixels=False)
        datasets.append(ds)
        pixels.append(_decode_dicom(ds, f))
    shapes = {px.values.shape for px in pixels}
    if len(shapes) > 1:
        raise ImageReadError(folder, f"slices differ in size or channels: {sorted(s[:1] + s[2:] for s in shapes)}")
    spacings = {tuple(round(v, 4) for v in _pixel_spacing(ds)) for ds in datasets}
    if len(spacings) > 1:
        raise ImageReadError(folder, f"slices differ in pixel spacing: {sorted(spacings)}")
    outputs = [_dicom_output(ds, px, window) for ds, px in zip(datasets, pixels)]
    if window and not all(done for _, done in outputs):
        # one display range for the whole volume, so slices stay comparable
        vol = _minmax(np.concatenate([_dicom_output(ds, px, False)[0] for ds, px in zip(datasets, pixels)], axis=1))
    else:
        vol = np.concatenate([arr for arr, _ in outputs], axis=1)
    spacing = (dz,) + _pixel_spacing(datasets[0])
    return _finish(folder, vol, spacing, orientation, _modality(datasets[0]), "dicom-series")
