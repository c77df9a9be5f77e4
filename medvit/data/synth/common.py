"""What every synthetic modality shares: the sample a generator returns (a manifest row and
the writers of its files), the PNG and text writers, the study-level draw of positive
patients and the class counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TUMOUR_FRACTION = 0.35  # brain tumour patients (paper: 30 of 81) and prostate csPCa patients


@dataclass
class Sample:
    """One manifest row plus the files it needs; the writer turns it into files."""

    row: dict[str, Any]
    files: list[tuple[str, Callable[[Path], None]]]  # (relative path, writer(abs_path))


def png_writer(arr: np.ndarray) -> Callable[[Path], None]:
    """PNG writer for uint8 (gray or RGB) or uint16 (gray) arrays."""
    from PIL import Image

    def write(path: Path) -> None:
        if arr.dtype == np.uint16:
            # Pillow maps uint16 to mode "I;16", which round-trips as a 16-bit grayscale PNG.
            img = Image.fromarray(np.ascontiguousarray(arr, dtype="<u2"))
        else:
            img = Image.fromarray(np.ascontiguousarray(arr))
        img.save(path, format="PNG", optimize=False)

    return write


def text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="ascii")

    return write


def positive_patients(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """(n,) bool: which patients are positive, ``fraction`` of them rounded but at least one
    and never all."""
    positive = np.zeros(n, bool)
    positive[rng.choice(n, int(min(max(round(fraction * n), 1), n - 1)), replace=False)] = True
    return positive


def value_counts(column: pd.Series) -> dict[str, int]:
    """Samples per value of a manifest column, the values sorted (``synth.json`` classes)."""
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}
