"""Which reader a path goes to: its extension and its first bytes (:func:`detect_format`), with
a reason naming what to do for formats that are not read."""

from __future__ import annotations

import os
import string
from pathlib import Path

from medvit.data.io.common import _short
from medvit.errors import ImageReadError

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
