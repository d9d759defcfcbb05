"""SSIM as a blockwise map over overlapping blocks, reduced to scikit-image's global mean.

Picture: scikit-image filters the whole image with a 7×7 window (reflect padding at the borders), forms
the SSIM map and averages it over the map cropped by ``pad = (7 - 1) // 2`` pixels per side. The map is
local, so each block extended by ``pad`` pixels of its neighbours (none beyond the image border) gives
exactly the global map on its own pixels that lie at least ``pad`` from the image border — the only
pixels the mean uses. Each block returns the sum of those map values; the sums are a tree reduction.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize
from skimage.metrics import structural_similarity

from ptychozarr.metrics._common import _finish, _pair, _require_min_side

__all__ = ["ssim", "WIN_SIZE"]

#: scikit-image's default SSIM window (uniform, 7×7).
WIN_SIZE = 7
_PAD = (WIN_SIZE - 1) // 2


def _ssim_block_sum(a: np.ndarray, b: np.ndarray, data_range, starts, shape, block_id=None) -> np.ndarray:
    """Sum of the global SSIM map over one block's pixels that the global mean uses."""
    i, j = block_id
    (r0, r1), (c0, c1) = starts[0][i : i + 2], starts[1][j : j + 2]
    # offsets of the block inside its extended copy (no halo beyond the image border)
    top, left = r0 - max(r0 - _PAD, 0), c0 - max(c0 - _PAD, 0)
    _, smap = structural_similarity(a, b, data_range=float(data_range), full=True)
    rows = slice(top + max(_PAD - r0, 0), top + min(r1, shape[0] - _PAD) - r0)
    cols = slice(left + max(_PAD - c0, 0), left + min(c1, shape[1] - _PAD) - c0)
    return np.array([[smap[rows, cols].sum(dtype=np.float64)]])


def _block_starts(chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.concatenate([[0], np.cumsum(chunks)]).tolist())


def ssim(a, b, *, data_range=None):
    """Mean structural similarity with scikit-image's defaults, computed blockwise.

    Parameters
    ----------
    a, b : (H, W) numpy or dask arrays of equal shape, both sides ≥ 7.
        ``a`` is the reference (ground truth).
    data_range : float or 0-d dask array, optional
        Default: ``max(a) - min(a)`` (the reference's range, PtychoPINN's choice for amplitude).

    Returns
    -------
    float, or a 0-d dask array when an input is a dask array.

    Notes
    -----
    Equals ``skimage.metrics.structural_similarity(a, b, data_range=data_range)`` (7×7 uniform window,
    K1 = 0.01, K2 = 0.03, sample covariance, mean over the map cropped by 3 px): each block is scored by
    scikit-image itself with a 3-px halo, and chunks are first merged up to at least 7 px per side.
    """
    a, b, eager = _pair(a, b)
    _require_min_side(a.shape, WIN_SIZE, "SSIM (7×7 window)")
    if data_range is None:
        data_range = a.max() - a.min()
    chunks = tuple(ensure_minimum_chunksize(WIN_SIZE, c) for c in a.chunks)
    a, b = a.rechunk(chunks).astype(np.float64), b.rechunk(chunks).astype(np.float64)
    starts = (_block_starts(chunks[0]), _block_starts(chunks[1]))
    ext_a = da.overlap.overlap(a, depth=_PAD, boundary="none")
    ext_b = da.overlap.overlap(b, depth=_PAD, boundary="none")
    sums = da.map_blocks(
        _ssim_block_sum,
        ext_a,
        ext_b,
        data_range,
        starts,
        a.shape,
        chunks=((1,) * a.numblocks[0], (1,) * a.numblocks[1]),
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    )
    count = (a.shape[0] - 2 * _PAD) * (a.shape[1] - 2 * _PAD)
    return _finish(sums.sum() / count, eager)
