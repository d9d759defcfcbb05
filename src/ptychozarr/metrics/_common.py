"""Input handling shared by the metric modules: dask conversion, checks, lazy/eager edges."""

from __future__ import annotations

import dask.array as da
import numpy as np

from ptychozarr.errors import InvalidParameterError

__all__: list[str] = []

#: Dask chunk edge used when a metric receives a numpy array.
_NUMPY_CHUNK = 2048


def _as_dask(x) -> da.Array:
    """``x`` as a 2-D dask array (numpy inputs are wrapped in square chunks)."""
    if isinstance(x, da.Array):
        arr = x
    else:
        x = np.asarray(x)
        arr = da.from_array(x, chunks=(_NUMPY_CHUNK, _NUMPY_CHUNK))
    if arr.ndim != 2:
        raise InvalidParameterError(
            f"metrics take 2-D images; got an array of shape {arr.shape}. Squeeze or select one image first."
        )
    return arr


def _one(x) -> tuple[da.Array, bool]:
    """One image as a 2-D dask array, and whether to compute (the input was not dask)."""
    return _as_dask(x), not isinstance(x, da.Array)


def _pair(a, b) -> tuple[da.Array, da.Array, bool]:
    """Both images as dask arrays with equal shape and aligned chunks, and whether to compute."""
    eager = not (isinstance(a, da.Array) or isinstance(b, da.Array))
    a, b = _as_dask(a), _as_dask(b)
    if a.shape != b.shape:
        raise InvalidParameterError(
            f"images differ in shape: {a.shape} vs {b.shape}. Align them first (ptychozarr.align)."
        )
    if a.chunks != b.chunks:
        b = b.rechunk(a.chunks)
    return a, b, eager


def _require_min_side(shape: tuple[int, ...], minimum: int, what: str) -> None:
    if min(shape) < minimum:
        raise InvalidParameterError(
            f"image of shape {shape} is too small for {what}: both sides must be at least {minimum} px. "
            "Use a larger region (less trim or border crop)."
        )


def _centre_crop(x: da.Array, shape: tuple[int, int]) -> da.Array:
    """The central ``shape`` region of ``x`` (start ``(h − t) // 2`` per axis, as ``ptychozarr.align``)."""
    r0, c0 = ((n - t) // 2 for n, t in zip(x.shape, shape, strict=True))
    return x[r0 : r0 + shape[0], c0 : c0 + shape[1]]


def _finish(value, eager: bool):
    """Compute ``value`` to a float (0-d) or a numpy array when the inputs were numpy."""
    if not eager:
        return value
    out = value.compute()
    return float(out) if np.ndim(out) == 0 else out


def _raise_on_nan(block: np.ndarray, name: str) -> np.ndarray:
    """Pass ``block`` through, raising when it holds a NaN (used blockwise, so lazily)."""
    if np.isnan(block).any():
        raise InvalidParameterError(
            f"{name} contains NaN values; metrics are undefined. Fill or mask the reconstruction first."
        )
    return block


def _checked(x: da.Array, name: str) -> da.Array:
    """``x`` with a lazy NaN check on every block."""
    return x.map_blocks(_raise_on_nan, name, dtype=x.dtype, meta=np.empty((0, 0), x.dtype))
