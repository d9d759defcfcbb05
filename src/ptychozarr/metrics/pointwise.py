"""Pointwise metrics (MAE, MSE, PSNR) and phase-plane removal, as tree reductions over chunks."""

from __future__ import annotations

import dask.array as da
import numpy as np

from ptychozarr.metrics._common import _finish, _one, _pair

__all__ = ["mae", "mse", "psnr", "phase_plane", "remove_phase_plane", "remove_phase_mean"]

_DBL_EPSILON = float(np.finfo(np.float64).eps)


def mae(a, b):
    """Mean absolute difference ``mean(|a - b|)``.

    Parameters
    ----------
    a, b : (H, W) numpy or dask arrays of equal shape.

    Returns
    -------
    float, or a 0-d dask array when an input is a dask array.

    Notes
    -----
    Computed in float64 as a tree reduction over chunks. No rescaling happens here: ``evaluate`` rescales
    the amplitude before calling it, as PtychoPINN does.
    """
    a, b, eager = _pair(a, b)
    return _finish(abs(_diff(a, b)).mean(), eager)


def mse(a, b):
    """Mean squared difference ``mean((a - b)**2)`` in float64 (see :func:`mae`)."""
    a, b, eager = _pair(a, b)
    return _finish((_diff(a, b) ** 2).mean(), eager)


def psnr(a, b, *, peak: float = 255.0):
    """Peak signal-to-noise ratio ``20·log10(peak / (RMSE + DBL_EPSILON))``.

    Parameters
    ----------
    a, b : (H, W) numpy or dask arrays of equal shape.
    peak : float
        Peak value R.

    Returns
    -------
    float, or a 0-d dask array when an input is a dask array.

    Notes
    -----
    The default peak of 255 is OpenCV's ``cv2.PSNR`` default, which PtychoPINN uses for amplitude and
    phase alike (whatever the data range): identical images give 361.2.
    """
    a, b, eager = _pair(a, b)
    rmse = da.sqrt((_diff(a, b) ** 2).mean())
    return _finish(20.0 * da.log10(peak / (rmse + _DBL_EPSILON)), eager)


def _diff(a: da.Array, b: da.Array) -> da.Array:
    return a.astype(np.float64) - b.astype(np.float64)


def _plane_moments(block: np.ndarray, centre: tuple[float, float], block_info=None) -> np.ndarray:
    """Sums over one block of the normal-equation terms of ``z = a·x + b·y + c`` (centred x, y).

    The coordinate terms are separable and the data terms are sums of the block's row and column sums,
    so that no image-sized temporary is made besides the block in float64.
    """
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    y = np.arange(r0, r1, dtype=np.float64) - centre[0]
    x = np.arange(c0, c1, dtype=np.float64) - centre[1]
    z = block.astype(np.float64)
    ny, nx = len(y), len(x)
    terms = (
        ny * (x @ x), x.sum() * y.sum(), ny * x.sum(), nx * (y @ y), nx * y.sum(), float(ny * nx),
        z.sum(axis=0) @ x, z.sum(axis=1) @ y, z.sum(),
    )  # fmt: skip
    return np.array(terms)[None, None, :]


def _solve_plane(moments: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    sxx, sxy, sx, syy, sy, n, sxz, syz, sz = moments
    normal = np.array([[sxx, sxy, sx], [sxy, syy, sy], [sx, sy, n]])
    a, b, c = np.linalg.solve(normal, np.array([sxz, syz, sz]))
    return np.array([a, b, c - a * centre[1] - b * centre[0]])


def _subtract_plane(block: np.ndarray, coef: np.ndarray, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    rows = np.arange(r0, r1, dtype=np.float64)[:, None]
    cols = np.arange(c0, c1, dtype=np.float64)[None, :]
    return block.astype(np.float64) - (coef[0] * cols + coef[1] * rows + coef[2])


def phase_plane(phase):
    """Least-squares plane ``z = a·col + b·row + c`` through every pixel of a phase image.

    Parameters
    ----------
    phase : (H, W) numpy or dask array of (wrapped) phase in radians.

    Returns
    -------
    (3,) array ``(a, b, c)``: numpy, or dask when ``phase`` is a dask array.

    Notes
    -----
    Solves the 3×3 normal equations whose nine sums are a tree reduction over chunks (coordinates centred
    on the image for conditioning). Equal to PtychoPINN's ``np.linalg.lstsq`` fit to float precision.
    """
    ph, eager = _one(phase)
    centre = ((ph.shape[0] - 1) / 2.0, (ph.shape[1] - 1) / 2.0)
    moments = ph.map_blocks(
        _plane_moments,
        centre,
        chunks=((1,) * ph.numblocks[0], (1,) * ph.numblocks[1], (9,)),
        new_axis=2,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
    ).sum(axis=(0, 1))
    coefficients = moments.map_blocks(
        _solve_plane, centre, chunks=(3,), dtype=np.float64, meta=np.empty((0,), np.float64)
    )
    return _finish(coefficients, eager)


def remove_phase_plane(phase, coefficients=None):
    """``phase`` minus its least-squares plane (PtychoPINN's ``--phase-align-method plane``).

    Parameters
    ----------
    phase : (H, W) numpy or dask array in radians (not unwrapped).
    coefficients : (3,) array, optional
        ``(a, b, c)`` from :func:`phase_plane`; fitted here when omitted.

    Returns
    -------
    (H, W) float64 array, numpy or dask like ``phase``.

    Notes
    -----
    Each image gets its own plane (prediction and target are never cross-referenced).
    """
    ph, eager = _one(phase)
    coef = phase_plane(ph) if coefficients is None else coefficients
    out = ph.map_blocks(_subtract_plane, coef=coef, dtype=np.float64, meta=np.empty((0, 0), np.float64))
    return _finish(out, eager)


def remove_phase_mean(phase):
    """``phase`` minus its mean (PtychoPINN's ``--phase-align-method mean``), in float64."""
    ph, eager = _one(phase)
    ph = ph.astype(np.float64)
    return _finish(ph - ph.mean(), eager)
