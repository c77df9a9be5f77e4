"""DICOM through pydicom: single files (multi-frame ones become volumes) and series folders
sorted along the slice normal; the modality LUT is applied, MONOCHROME1 inverted, and a VOI
LUT or window only for display values."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvit.data.io.budget import _check_budget
from medvit.data.io.common import ImageData, _finish, _short
from medvit.data.io.formats import detect_format
from medvit.errors import ImageReadError

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


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
