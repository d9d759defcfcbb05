"""PtychoPINN's multi-scale SSIM, every level in one pass of blocks with halos.

Picture: level l scores the pre-filtered images decimated by ``s = 2**l``. A block extended by
``pad · s_max + r`` pixels (``pad`` = 3, the SSIM half-window; ``r`` the pre-filter radius) holds the
exact pre-filtered image ``pad · s_max`` pixels beyond its own, so one task pre-filters it, decimates it
at every level and scores the decimated pixels it owns (:func:`~ptychozarr.metrics.structural._ssim_sum`).
The level sums are a tree reduction; nothing larger than an extended block is ever held.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy.ndimage import gaussian_filter

from ptychozarr.metrics._blocks import Window, halo_map
from ptychozarr.metrics._common import _finish, _one, _pair, _require_min_side
from ptychozarr.metrics.structural import _PAD, WIN_SIZE, _ssim_count, _ssim_sum

__all__ = ["ms_ssim", "gaussian_prefilter", "MS_SSIM_WEIGHTS"]

#: Per-level exponents (Wang et al. 2003), as in PtychoPINN.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_FLOOR = 1e-4


def _radius(sigma: float) -> int:
    """Half-width of scipy's Gaussian kernel (truncate 4); 0 without a filter."""
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def _filtered(block: np.ndarray, sigma: float) -> np.ndarray:
    block = np.asarray(block, dtype=np.float64)
    return gaussian_filter(block, sigma, mode="reflect") if sigma > 0 else block


def _filtered_own(block: np.ndarray, window: Window, sigma: float) -> np.ndarray:
    return _filtered(block, sigma)[window[0].own(), window[1].own()]


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
    """
    x, eager = _one(image)
    x = x.astype(np.float64)
    radius = _radius(sigma)
    if radius:
        _require_min_side(x.shape, radius + 1, f"a Gaussian pre-filter of sigma {sigma}")
        x = x.map_overlap(_filtered, depth=radius, boundary="none", sigma=sigma, dtype=np.float64,
                          meta=np.empty((0, 0), np.float64))
    return _finish(x, eager)


def _range_block(a: np.ndarray, b: np.ndarray, window: Window, sigma: float) -> list[float]:
    """Minimum and maximum of both pre-filtered images over the pixels this block owns."""
    fa, fb = _filtered_own(a, window, sigma), _filtered_own(b, window, sigma)
    return [fa.min(), fa.max(), fb.min(), fb.max()]


def _range_of(extrema: da.Array) -> da.Array:
    """``max(range(a'), range(b'))`` from the per-block ``_range_block`` vectors."""
    lo, hi = extrema[..., 0::2].min(axis=(0, 1)), extrema[..., 1::2].max(axis=(0, 1))
    return (hi - lo).max()


def _prefiltered_range(a: da.Array, b: da.Array, sigma: float) -> da.Array:
    """Lazy ``max(range(a'), range(b'))`` of the pre-filtered images, in one pass of blocks."""
    return _range_of(halo_map(_range_block, [a, b], max(_radius(sigma), 1), 4, sigma))


def _levels(shape: tuple[int, int]) -> int:
    """How many levels PtychoPINN's loop scores before a side drops under the SSIM window."""
    n = 1
    while n < len(MS_SSIM_WEIGHTS) and min(-(-s // 2**n) for s in shape) >= WIN_SIZE:
        n += 1
    return n


def _ms_halo(sigma: float, levels: int) -> int:
    """Halo that makes every level of a block exact: ``pad`` decimated pixels at the coarsest level,
    plus the pre-filter radius."""
    return _PAD * 2 ** (levels - 1) + _radius(sigma)


def _ms_block(a: np.ndarray, b: np.ndarray, window: Window, sigma: float, data_range, levels: int):
    """SSIM map sums of every level over the pixels this block owns."""
    fa, fb = _filtered(a, sigma), _filtered(b, sigma)
    return [_ssim_sum(fa, fb, window, data_range, 2**level) for level in range(levels)]


def _combine(scores: np.ndarray) -> np.ndarray:
    """Π ssim_l^w_l with a negative level clamped to 1e-4 and a NaN level giving 0.0, as PtychoPINN."""
    out = 1.0
    for value, weight in zip(scores, MS_SSIM_WEIGHTS, strict=False):
        if np.isnan(value):
            return np.float64(0.0)
        out *= (value if value >= 0 else _FLOOR) ** weight
    return np.float64(out)


def _ms_from_sums(sums: np.ndarray, shape: tuple[int, int]) -> np.float64:
    """MS-SSIM from the level sums of the SSIM maps."""
    return _combine([s / _ssim_count(shape, 2**level) for level, s in enumerate(sums)])


def _ms_ssim_of(a: da.Array, b: da.Array, sigma: float, data_range) -> da.Array:
    """Lazy MS-SSIM of two float64 dask images with a fixed ``data_range``, in one pass of blocks."""
    levels = _levels(a.shape)
    sums = halo_map(_ms_block, [a, b], _ms_halo(sigma, levels), levels, sigma, data_range, levels)
    return sums.sum(axis=(0, 1)).map_blocks(_ms_from_sums, a.shape, drop_axis=0, dtype=np.float64,
                                            meta=np.float64(0.0))


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
    (:func:`~ptychozarr.metrics.ssim`, scikit-image defaults). Levels stop early once a side would drop
    under 7 px, so the weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) then need not sum to 1. A
    negative level SSIM is clamped to 1e-4 and a NaN level makes the result 0.0. Images under 7 px raise.
    Eagerly, the data range (when not given) and the levels are two passes over the inputs.
    """
    a, b, eager = _pair(a, b)
    _require_min_side(a.shape, WIN_SIZE, "MS-SSIM (7×7 window at the first level)")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if data_range is None:
        data_range = _prefiltered_range(a, b, sigma)
        if eager:
            data_range = float(data_range.compute())
    return _finish(_ms_ssim_of(a, b, sigma, data_range), eager)
