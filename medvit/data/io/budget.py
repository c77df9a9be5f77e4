"""The pixel budget: how many pixel values one image may declare, checked from its header
before anything is decoded (``$MEDVIT_MAX_PIXELS``)."""

from __future__ import annotations

import os
from pathlib import Path

from medvit.errors import ConfigError, ImageReadError

MAX_PIXELS_ENV = "MEDVIT_MAX_PIXELS"
"""Environment variable that replaces :data:`DEFAULT_MAX_PIXELS` (a positive integer)."""
DEFAULT_MAX_PIXELS = 2**27
"""Most pixel values (pixels x channels x frames/pages/slices) one image may declare:
134,217,728, e.g. a 512x512x512 volume or a 6,688x6,688 RGB image. Decoding one costs up to
about 16 bytes per value on the way to float32 (2 GiB at the cap), which leaves room for
parallel jobs and data-loader workers on a 24 GiB machine. Pillow's own limit (about 179
million pixels per page) is kept as well."""


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
