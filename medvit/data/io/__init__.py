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

Modules: :mod:`.reader` (:func:`read_image`, :func:`read_sample`), :mod:`.formats` (which reader
a path goes to), :mod:`.budget` (the pixel budget), one module per format family
(:mod:`.pillow`, :mod:`.npy`, :mod:`.nifti`, :mod:`.dicom`) and :mod:`.common` (:class:`ImageData`,
the checks every array passes).
"""

from medvit.data.io.budget import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, max_pixels
from medvit.data.io.common import ImageData
from medvit.data.io.dicom import read_dicom_header
from medvit.data.io.formats import SUPPORTED_FORMATS, detect_format
from medvit.data.io.reader import read_image, read_sample

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
