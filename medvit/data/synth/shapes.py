"""Geometry and noise the synthetic phantoms are drawn with: pixel-centre grids, rotated
ellipses with soft edges and smooth Gaussian noise fields."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import expit


def grid2d(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (yy, xx), each (size, size); y points down."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="ij")


def ellipse_r(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float,
              theta: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside) of an ellipse rotated by ``theta`` radians."""
    dy, dx = y - cy, x - cx
    if theta:
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = dx * c + dy * s, -dx * s + dy * c
    return np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2)


def inside(r: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``r < 1`` with an edge ``width`` (in units of r)."""
    return expit((1.0 - r) / width)


def noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Smooth Gaussian noise field with zero mean and unit std; ``sigma`` in pixels."""
    n = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-12)
