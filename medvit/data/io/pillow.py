"""2D raster files through Pillow: PNG, JPEG and TIFF (multi-page TIFF with equal pages is a
volume), with the bit depth kept and truncated or damaged PNGs refused."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from medvit.data.io.budget import _check_budget
from medvit.data.io.common import ImageData, _finish, _short
from medvit.errors import ImageReadError

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
