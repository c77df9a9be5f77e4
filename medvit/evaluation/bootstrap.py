"""Confidence intervals by a (cluster) bootstrap over patients.

Each resample draws ``n_patients`` patients with replacement. A patient-level metric sees
each drawn patient once per draw; a sample-level metric sees *all* samples of each drawn
patient once per draw (a cluster bootstrap), so samples of one patient move together and
their correlation widens the interval as it should.

A resample is represented by its multiplicities: a (B, N) weight matrix whose row ``b``
says how often each of the N rows (patients, or samples via their patient) is drawn. The
weighted metric kernels of :mod:`medvit.evaluation.metrics` evaluate all resamples of a
chunk at once. Resamples where a metric is undefined (NaN, e.g. AUROC of a resample with
no positive patient) are skipped; the number used is reported. Intervals are percentile
intervals of the remaining values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# (B, N) weights -> (B,) metric values (NaN where undefined).
Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass
class Interval:
    """A bootstrap interval.

    Attributes:
        lo, hi: interval bounds (NaN when no resample defined the metric).
        n_used: resamples where the metric was defined.
        n_total: resamples drawn.
    """

    lo: float
    hi: float
    n_used: int
    n_total: int


def resample_counts(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities of ``n_boot`` resamples of ``n_clusters`` clusters drawn with replacement.

    Returns:
        (n_boot, n_clusters) int64 counts; each row sums to ``n_clusters``.
    """
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = draws + (np.arange(n_boot) * n_clusters)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def percentile_interval(values: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite ``values`` (NaN, NaN when there are none)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def cluster_bootstrap(statistics: Mapping[str, Statistic], clusters: np.ndarray, n_boot: int = 1000,
                      ci: float = 0.95, seed: int = 0, chunk: int = 250) -> dict[str, Interval]:
    """Bootstrap intervals for several statistics from the same resamples.

    Args:
        statistics: name -> function of (b, N) row weights returning (b,) values.
        clusters: (N,) integer cluster (patient) code of each row, in ``[0, n_clusters)``.
            For patient-level rows pass ``np.arange(n_patients)``.
        n_boot: number of resamples (0 gives NaN intervals).
        ci: interval coverage, e.g. 0.95.
        seed: seeds the resampling; the same seed, clusters and ``n_boot`` give the same intervals.
        chunk: resamples evaluated per vectorised pass (bounds memory at ``chunk * N`` floats).

    Returns:
        name -> :class:`Interval`.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    clusters = np.asarray(clusters, dtype=np.int64).ravel()
    n_clusters = int(clusters.max()) + 1 if clusters.size else 0
    values: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    if n_clusters and n_boot > 0:
        rng = np.random.default_rng(seed)
        for start in range(0, n_boot, chunk):
            counts = resample_counts(n_clusters, min(chunk, n_boot - start), rng)
            weights = counts[:, clusters].astype(float)
            for name, stat in statistics.items():
                values[name].append(np.asarray(stat(weights), dtype=float))
    out = {}
    for name, parts in values.items():
        v = np.concatenate(parts) if parts else np.empty(0)
        lo, hi = percentile_interval(v, ci)
        out[name] = Interval(lo, hi, int(np.isfinite(v).sum()), int(max(n_boot, 0)) if n_clusters else 0)
    return out
