"""PtychoPINN's multi-scale SSIM, level by level on dask arrays."""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize
from scipy.ndimage import gaussian_filter

from ptychozarr.metrics._common import _finish, _one, _pair, _require_min_side
from ptychozarr.metrics.structural import WIN_SIZE, ssim

__all__ = ["ms_ssim", "gaussian_prefilter", "MS_SSIM_WEIGHTS"]

#: Per-level exponents (Wang et al. 2003), as in PtychoPINN.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_FLOOR = 1e-4


def gaussian_prefilter(image, sigma: float):
    """``scipy.ndimage.gaussian_filter(image, sigma)`` (reflect mode, truncate 4) computed blockwise.

    Parameters
    ----------
    image : (H, W) numpy or dask array.
    sigma : float
        Standard deviation in pixels; 0 returns the image as float64.

    Returns
    -------
    (H, W) float64 array, numpy or dask like ``image``.

    Notes
    -----
    Blocks carry a halo of the kernel radius ``int(4·sigma + 0.5)`` and none beyond the image border,
    where scipy's own reflect padding of the edge block reproduces the whole-image result exactly.
    Chunks are merged up to at least the radius first.
    """
    x, eager = _one(image)
    x = x.astype(np.float64)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        _require_min_side(x.shape, radius + 1, f"a Gaussian pre-filter of sigma {sigma}")
        x = x.rechunk(tuple(ensure_minimum_chunksize(radius + 1, c) for c in x.chunks))
        x = x.map_overlap(
            gaussian_filter,
            depth=radius,
            boundary="none",
            sigma=sigma,
            mode="reflect",
            dtype=np.float64,
            meta=np.empty((0, 0), np.float64),
        )
    return _finish(x, eager)


def _levels(shape: tuple[int, int]) -> int:
    """How many levels PtychoPINN's loop scores before a side drops under the SSIM window."""
    n = 1
    while n < len(MS_SSIM_WEIGHTS) and min(-(-s // 2**n) for s in shape) >= WIN_SIZE:
        n += 1
    return n


def _combine(scores: np.ndarray) -> np.ndarray:
    """Π ssim_l^w_l with a negative level clamped to 1e-4 and a NaN level giving 0.0, as PtychoPINN."""
    out = 1.0
    for value, weight in zip(scores, MS_SSIM_WEIGHTS, strict=False):
        if np.isnan(value):
            return np.float64(0.0)
        out *= (value if value >= 0 else _FLOOR) ** weight
    return np.float64(out)


def ms_ssim(a, b, *, sigma: float = 0.0, data_range=None):
    """PtychoPINN's MS-SSIM: SSIM means over up to 5 scales, combined as a weighted product.

    Parameters
    ----------
    a, b : (H, W) numpy or dask arrays of equal shape, both sides ≥ 7.
    sigma : float
        Gaussian pre-filter applied to both images first (0: none).
    data_range : float or 0-d dask array, optional
        Default: ``max(range(a'), range(b'))`` of the pre-filtered images, fixed for every level.

    Returns
    -------
    float, or a 0-d dask array when an input is a dask array.

    Notes
    -----
    Level l scores the images decimated by ``[::2**l, ::2**l]`` (no anti-aliasing) with full SSIM
    (:func:`ssim`, scikit-image defaults). Levels stop early once a side would drop under 7 px, so the
    weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) then need not sum to 1. A negative level SSIM is
    clamped to 1e-4 and a NaN level makes the result 0.0. Images under 7 px raise.
    """
    a, b, eager = _pair(a, b)
    _require_min_side(a.shape, WIN_SIZE, "MS-SSIM (7×7 window at the first level)")
    if data_range is None:
        fa, fb = gaussian_prefilter(a, sigma), gaussian_prefilter(b, sigma)
        data_range = da.maximum(fa.max() - fa.min(), fb.max() - fb.min())
        if eager:
            data_range = float(data_range.compute())
    scores = _level_scores(a, b, sigma, data_range)
    if eager:  # one level per pass, so that no pass holds a whole filtered image
        return float(_combine(np.array([s.compute() for s in scores])))
    return _lazy_combine(scores)


def _lazy_combine(scores: list[da.Array]) -> da.Array:
    """:func:`_combine` of lazy level scores, as a 0-d dask array."""
    return da.stack(scores).rechunk(-1).map_blocks(_combine, drop_axis=0, dtype=np.float64,
                                                   meta=np.float64(0.0))


def _level_scores(a: da.Array, b: da.Array, sigma: float, data_range) -> list[da.Array]:
    """The lazy SSIM mean of every level. Computed one at a time, each level re-reads and re-filters
    its inputs, so that no pass holds a whole filtered image."""
    fa, fb = gaussian_prefilter(a, sigma), gaussian_prefilter(b, sigma)
    return [ssim(fa[:: 2**level, :: 2**level], fb[:: 2**level, :: 2**level], data_range=data_range)
            for level in range(_levels(a.shape))]
