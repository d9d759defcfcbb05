"""SSIM as a blockwise map over overlapping blocks, reduced to scikit-image's global mean.

Picture: scikit-image filters the whole image with a 7×7 window (reflect padding at the borders), forms
the SSIM map and averages it over the map cropped by ``pad = (7 - 1) // 2`` pixels per side. The map is
local, so each block extended by ``pad`` pixels of its neighbours (none beyond the image border) gives
exactly the global map on its own pixels that lie at least ``pad`` from the image border — the only
pixels the mean uses. Each block returns the sum of those map values; the sums are a tree reduction.
The same holds for the image decimated by a step ``s`` (an MS-SSIM level): a block then needs
``pad · s`` pixels of halo, and scores the decimated pixels it owns (:func:`_ssim_sum`).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from ptychozarr.metrics._blocks import Span, Window, halo_map
from ptychozarr.metrics._common import _finish, _pair, _require_min_side

__all__ = ["ssim", "WIN_SIZE"]

#: scikit-image's default SSIM window (uniform, 7×7).
WIN_SIZE = 7
_PAD = (WIN_SIZE - 1) // 2
#: Strip-sized float64 arrays scikit-image's SSIM holds at once (two inputs, five filtered moments,
#: their combinations and the map; measured with tracemalloc, rounded up).
_SSIM_TEMPORARIES = 24
#: Target bytes of one float64 strip that scikit-image scores at a time (a block is scored in strips of
#: whole block rows, so that its temporaries stay small whatever the block size).
_STRIP_BYTES = 2**19


def _scored(span: Span, step: int) -> slice | None:
    """Rows of the extended block that the SSIM of the image decimated by ``step`` needs to score the
    decimated pixels the block owns (with a ``pad`` margin of decimated pixels), or None if it owns none."""
    decimated = -(-span.size // step)
    k0, k1 = max(-(-span.own0 // step), _PAD), min(-(-span.own1 // step), decimated - _PAD)
    if k1 <= k0:
        return None
    return slice((k0 - _PAD) * step - span.start, (k1 + _PAD - 1) * step - span.start + 1, step)


def _ssim_sum(a: np.ndarray, b: np.ndarray, window: Window, data_range, step: int = 1) -> float:
    """Sum of the global SSIM map of the images decimated by ``step`` over the pixels this block owns
    that the global mean uses (``a``, ``b``: extended blocks, exact to ``pad · step`` px)."""
    rows, cols = _scored(window[0], step), _scored(window[1], step)
    if rows is None or cols is None:
        return 0.0
    a, b = a[rows, cols], b[rows, cols]
    scored, strip = a.shape[0] - 2 * _PAD, _strip_rows(a.shape[1])
    total = 0.0
    for k in range(0, scored, strip):
        part = slice(k, min(k + strip, scored) + 2 * _PAD)
        _, smap = structural_similarity(a[part], b[part], data_range=float(data_range), full=True)
        total += float(smap[_PAD:-_PAD, _PAD:-_PAD].sum(dtype=np.float64))
    return total


def _strip_rows(cols: int) -> int:
    """Scored rows per scikit-image call for blocks ``cols`` wide (see ``_STRIP_BYTES``)."""
    return max(1, _STRIP_BYTES // (8 * cols))


def _scoring_bytes(rows: int, cols: int) -> int:
    """Projected bytes of scikit-image's temporaries while scoring an extended block of rows × cols."""
    return _SSIM_TEMPORARIES * 8 * min(rows, _strip_rows(cols) + 2 * _PAD) * cols


def _ssim_count(shape: tuple[int, ...], step: int = 1) -> int:
    """How many map pixels the global mean of the images decimated by ``step`` averages."""
    rows, cols = (-(-n // step) - 2 * _PAD for n in shape)
    return rows * cols


def _ssim_block(a: np.ndarray, b: np.ndarray, window: Window, data_range) -> list[float]:
    return [_ssim_sum(a, b, window, data_range)]


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
    scikit-image itself with a 3-px halo, and chunks are first merged up to at least 3 px per side.
    """
    a, b, eager = _pair(a, b)
    _require_min_side(a.shape, WIN_SIZE, "SSIM (7×7 window)")
    if data_range is None:
        data_range = a.max() - a.min()
    a, b = a.astype(np.float64), b.astype(np.float64)
    sums = halo_map(_ssim_block, [a, b], _PAD, 1, data_range)
    return _finish(sums[..., 0].sum() / _ssim_count(a.shape), eager)
