"""FRC thresholds and resolutions: the half-bit / 1-bit curves from ring pixel counts, crossings, lengths.

The thresholds themselves live in :mod:`ptychozarr.metrics.fourier` (re-exported here); the crossings
``evaluate`` reports are :func:`ptychozarr.metrics.frc_crossing` (ring 0 ignored, NaN when never
crossed). :func:`threshold_crossing` is the legacy form (the curve's length when never crossed).

The rings are those of :func:`ptychozarr.metrics.frc`: on the n×n image (the scored image, centre-
cropped to its shorter side), ring ``r`` holds the spectrum's pixels whose integer frequencies
(ky, kx) give ``round(sqrt(ky² + kx²)) = r`` (round half to even), out to the corners.
"""

from __future__ import annotations

import math

import numpy as np

from ptychozarr.metrics import frc_length, half_bit_threshold, one_bit_threshold

__all__ = [
    "frc_side",
    "half_bit_threshold",
    "one_bit_threshold",
    "resolution_m",
    "ring_counts",
    "threshold_crossing",
]

_ROW_BLOCK = 256


def frc_side(shape: tuple[int, int], trim: int = 2) -> int:
    """Side n of the FRC of an image of ``shape`` scored after trimming ``trim`` px per side."""
    return min(shape) - 2 * trim


def ring_counts(n: int) -> np.ndarray:
    """Pixels of each ring of the n×n spectrum, ``(frc_length(n),)`` int64 (row blocks, O(n) memory)."""
    k = np.fft.fftfreq(n, 1.0 / n)
    counts = np.zeros(frc_length(n), dtype=np.int64)
    for start in range(0, n, _ROW_BLOCK):
        ky = k[start : start + _ROW_BLOCK, None]
        ring = np.rint(np.sqrt(ky * ky + k[None, :] ** 2)).astype(np.intp)
        counts += np.bincount(ring.ravel(), minlength=counts.size)
    return counts


def threshold_crossing(curve, threshold) -> float:
    """First ring where an FRC curve falls below a per-ring threshold, linearly interpolated.

    The search starts at ring 1 (ring 0 is the mean, where the half-bit threshold is 1). For the
    first finite ring i with ``c[i] < t[i]``, the difference ``d = c − t`` is interpolated to zero
    between rings i − 1 and i, as :func:`ptychozarr.metrics.frc_cutoff` does for a constant
    threshold; the curve's length when it never crosses; NaN when no ring is finite.
    """
    c = np.asarray(curve, dtype=np.float64)
    d = c - np.broadcast_to(np.asarray(threshold, dtype=np.float64), c.shape)
    finite = np.isfinite(d)
    if not finite[1:].any():
        return math.nan
    below = np.flatnonzero(finite & (d < 0) & (np.arange(d.size) >= 1))
    if below.size == 0:
        return float(d.size)
    i = int(below[0])
    if not np.isfinite(d[i - 1]) or d[i - 1] == d[i]:
        return float(i)
    return float(np.clip(i - 1 + d[i - 1] / (d[i - 1] - d[i]), i - 1, i))


def resolution_m(ring: float, n: int, pixel_size_m: float) -> float:
    """Real-space period resolved at ``ring`` of an n×n FRC: ``n · pixel_size / ring`` (inf at 0)."""
    if not math.isfinite(ring):
        return math.nan
    return math.inf if ring <= 0 else n * pixel_size_m / ring
