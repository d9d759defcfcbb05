"""The order of the patterns in a store: a Hilbert curve through the scan positions.

Scans arrive in any order (the study's simulated scans are random in space). Ingestion stores the patterns
in the order of a Hilbert curve through their positions, so that patterns close in space are close in the
store: a run of consecutive patterns, and so a block of consecutive groups with their neighbours, lies in a
few contiguous chunks whatever the input order was.

The curve runs on a 2¹⁶ × 2¹⁶ grid laid over the bounding square of the positions (one scale for both axes,
so that the curve's cells are square). Points in one cell, and points at equal positions, are ordered by
their exact coordinates (then by any further keys), so the order depends on the set of positions only,
not on the order they came in; points equal in every key keep their input order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["curve_order", "hilbert_index"]

_BITS = 16


def hilbert_index(ix: np.ndarray, iy: np.ndarray, bits: int) -> np.ndarray:
    """Distance along the Hilbert curve of the cells ``(ix, iy)`` of a 2^bits × 2^bits grid.

    Parameters
    ----------
    ix, iy : numpy.ndarray
        Integer cell coordinates in ``[0, 2**bits)``.
    bits : int
        Grid order (at most 31, so that the distance fits in 62 bits).

    Returns
    -------
    numpy.ndarray
        uint64 distances in ``[0, 4**bits)``; successive distances are edge-adjacent cells.

    Notes
    -----
    The standard iterative conversion (``xy2d``): from the coarsest bit down, add the quadrant's offset,
    then flip and transpose the lower bits into that quadrant's frame.
    """
    x = np.asarray(ix, dtype=np.uint64).copy()
    y = np.asarray(iy, dtype=np.uint64).copy()
    full = np.uint64((1 << bits) - 1)
    d = np.zeros(x.shape, np.uint64)
    for level in range(bits - 1, -1, -1):
        s = np.uint64(1 << level)
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((np.uint64(3) * rx) ^ ry).astype(np.uint64)
        flip = ~ry & rx
        x[flip], y[flip] = full - x[flip], full - y[flip]
        swap = ~ry
        x[swap], y[swap] = y[swap], x[swap]
    return d


def curve_order(x: np.ndarray, y: np.ndarray, *ties: np.ndarray) -> np.ndarray:
    """The permutation putting points ``(x, y)`` in Hilbert-curve order.

    Parameters
    ----------
    x, y : numpy.ndarray
        Positions (any real unit), 1-D, finite.
    *ties : numpy.ndarray
        Further per-point keys ordering points that share a cell and equal ``x`` and ``y``.

    Returns
    -------
    numpy.ndarray
        int64 ``order`` such that ``x[order]`` runs along the curve: ``order[i]`` is the input index of the
        i-th point in curve order.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0:
        return np.zeros(0, np.int64)
    span = max(float(np.ptp(x)), float(np.ptp(y)))
    last = (1 << _BITS) - 1
    scale = last / span if span > 0 else 0.0
    cells = [np.minimum(np.floor((v - v.min()) * scale), last).astype(np.uint64) for v in (x, y)]
    distance = hilbert_index(*cells, _BITS)
    return np.lexsort((*reversed(ties), y, x, distance)).astype(np.int64)
