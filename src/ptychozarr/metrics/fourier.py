"""Fourier ring correlation through a separable out-of-core 2-D FFT.

Picture: the image is cut into row slabs (whole rows, a few MiB each) and each slab gets a real FFT along
its rows, giving the non-negative column frequencies only (the spectrum of a real image is Hermitian,
so the other half is the conjugate mirror and has the same ring radii). The result is transposed to
column slabs (whole columns) — through a Zarr array on disk when ``workdir`` is given, by a dask
rechunk otherwise — and each slab gets a full FFT along its columns (with a spill, one task per column
slab reads it from disk, transforms and sums it). A column slab then holds the
final spectrum for its frequencies; it computes its ring index (signed frequencies stand in for
``fftshift``) and adds its products to three ``bincount`` ring sums with Hermitian weights 2 (1 for the
self-conjugate columns 0 and n/2). The per-slab sums are a tree reduction. No task holds more than one
slab per image; with ``workdir`` no step holds more than a few slabs, the transposed spectrum lives on disk.

A fourth ring sum counts each ring's pixels, from which the half-bit and 1-bit thresholds follow. With
``window="hann"`` each input block is first multiplied by its rows' and columns' part of the separable
2-D window (an outer product of two 1-D Hann windows), so apodisation costs no extra pass; with
``nyquist=True`` the curve ends at ring n//2. :func:`apodised_entries` registers the windowed crossings
(``frc50_hann`` …) in :mod:`ptychozarr.metrics.registry`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import scipy.fft
import zarr
from dask.graph_manipulation import bind
from scipy.ndimage import gaussian_filter

from ptychozarr.errors import InvalidParameterError
from ptychozarr.io.store import array_options
from ptychozarr.metrics._common import _centre_crop, _finish, _pair

__all__ = [
    "frc",
    "frc_crossing",
    "frc_cutoff",
    "frc_length",
    "frc_rings",
    "half_bit_threshold",
    "one_bit_threshold",
    "FRC50",
    "FRC1OVER7",
]

#: The two thresholds PtychoPINN reports.
FRC50 = 0.5
FRC1OVER7 = 1.0 / 7.0
#: Target bytes of one row or column slab of a complex spectrum (whole rows or whole columns).
_SLAB_BYTES = 2**24
#: Target bytes of one ring-index temporary (a few column-slab columns at a time).
_RING_BYTES = 2**21


def frc_length(n: int) -> int:
    """Length of the FRC curve of an n×n image: the ring of the corners, plus one."""
    half = n // 2
    return int(np.rint(np.sqrt(2.0 * half * half))) + 1


def _slab(n: int, slab_bytes: int) -> int:
    return max(1, min(n, slab_bytes // (16 * n)))


#: Ring-sum temporaries of one column sub-block (ring index, weight, three products and their weighted
#: copies, the index arithmetic), in units of one float64 sub-block.
_RING_TEMPORARIES = 10
#: Ring sums per ring: Re(Fa·Fb*), |Fa|², |Fb|² and the ring's pixel count.
_SUMS = 4
#: Spectrum slabs (of both images) that Zarr's I/O thread may still hold while a spilled task runs.
_IO_SLABS = 1


def _task_bytes(n: int, input_bytes: int, slab_bytes: int = _SLAB_BYTES) -> dict[str, int]:
    """Projected peak bytes of one row-pass and one column-pass task for an n×n pair (spilled path).

    A row task holds a row slab of both inputs (``input_bytes`` per pixel), of both images (float64) and
    their half spectra (complex128); a column
    task holds a column slab of both half spectra (transformed in place) and the ring temporaries of
    one column sub-block. Either may also overlap the slab of both spectra that Zarr's I/O thread has
    just written or read (``_IO_SLABS``): when that thread lets it go depends on how busy the machine is.
    """
    half = n // 2 + 1
    rows, cols = _slab(n, slab_bytes), min(_slab(n, slab_bytes), half)
    ring = _RING_TEMPORARIES * 8 * n * min(_ring_columns(n), cols)
    return {"frc_rows": 2 * rows * ((input_bytes + 8) * n + (1 + _IO_SLABS) * 16 * half),
            "frc_columns": (1 + _IO_SLABS) * 2 * 16 * n * cols + ring}


def _row_spectrum(x: da.Array, slab_bytes: int) -> da.Array:
    """Real FFT along the rows of a square image, in row slabs of whole rows: (n, n//2 + 1) complex."""
    rows = _slab(x.shape[0], slab_bytes)
    return da.fft.rfft(x.astype(np.float64).rechunk((rows, -1)), axis=1)


def _ring_index(n: int, kx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring index (round half to even) and Hermitian weight of columns ``kx`` of the half spectrum."""
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = kx[None, :]
    ring = np.rint(np.sqrt(ky * ky + kx * kx)).astype(np.intp).ravel()
    self_conjugate = (kx == 0) | ((n % 2 == 0) & (kx == n // 2))
    return ring, np.broadcast_to(np.where(self_conjugate, 1.0, 2.0), (n, kx.shape[1])).ravel()


def _ring_columns(n: int) -> int:
    """Columns of a spectrum slab summed at once, so that the ring temporaries stay near ``_RING_BYTES``."""
    return max(1, _RING_BYTES // (8 * n))


def _ring_sums(fa: np.ndarray, fb: np.ndarray, kx: np.ndarray, length: int) -> np.ndarray:
    """Ring sums of Re(Fa·Fb*), |Fa|², |Fb|² and pixel counts over one column slab (frequencies ``kx``)."""
    sums = np.zeros((_SUMS, length))
    step = _ring_columns(fa.shape[0])
    for c0 in range(0, fa.shape[1], step):
        a, b, cols = fa[:, c0 : c0 + step], fb[:, c0 : c0 + step], kx[c0 : c0 + step]
        ring, weight = _ring_index(fa.shape[0], cols)
        terms = (a * b.conj()).real, (a * a.conj()).real, (b * b.conj()).real
        for row, term in zip(sums, terms, strict=False):
            row += np.bincount(ring, weights=term.ravel() * weight, minlength=length)
        sums[3] += np.bincount(ring, weights=weight, minlength=length)
    return sums[None, :, :]


def _spilled_ring_sums(kx: np.ndarray, half_a: zarr.Array, half_b: zarr.Array, length: int) -> np.ndarray:
    """Read one column slab of both row spectra from disk, finish their FFT (in place) and sum its rings."""
    cols = slice(int(kx[0]), int(kx[-1]) + 1)
    fa, fb = (scipy.fft.fft(half[:, cols], axis=0, overwrite_x=True) for half in (half_a, half_b))
    return _ring_sums(fa, fb, kx, length)


def _spill(half: da.Array, workdir: str | Path, cols: int):
    """A Zarr array in ``workdir`` in (row slab × column slab) chunks, and the lazy write of ``half``."""
    target = zarr.create_array(
        store=str(Path(workdir) / f"{half.name}.zarr"), shape=half.shape, chunks=(half.chunks[0][0], cols),
        dtype=half.dtype, overwrite=True, **array_options(compress=False),
    )
    return target, da.store(half, target, lock=False, compute=False)


def _spectrum_ring_sums(a: da.Array, b: da.Array, length: int, workdir, slab_bytes: int) -> da.Array:
    """(4, L) ring sums of the two images' spectra and the rings' pixel counts (module docstring)."""
    n = a.shape[0]
    cols = _slab(n, slab_bytes)
    half_a, half_b = _row_spectrum(a, slab_bytes), _row_spectrum(b, slab_bytes)
    kx = da.arange(half_a.shape[1], chunks=cols, dtype=np.float64)
    new = {"new_axes": {"r": _SUMS, "l": length}, "adjust_chunks": {"j": 1}, "dtype": np.float64,
           "meta": np.empty((0, 0, 0), np.float64)}
    if workdir is None:
        fa, fb = (da.fft.fft(h.rechunk((-1, cols)), axis=0) for h in (half_a, half_b))
        sums = da.blockwise(_ring_sums, "jrl", fa, "ij", fb, "ij", kx, "j", length, None,
                            concatenate=True, **new)
    else:
        (za, write_a), (zb, write_b) = _spill(half_a, workdir, cols), _spill(half_b, workdir, cols)
        # one task per column slab reads, transforms and sums it, so nothing waits in memory
        sums = da.blockwise(_spilled_ring_sums, "jrl", bind(kx, [write_a, write_b]), "j", za, None,
                            zb, None, length, None, **new)
    return sums.sum(axis=0)


def _curve(sums: np.ndarray, sigma: float, length: int) -> np.ndarray:
    """(2, length): the FRC curve (smoothed when ``sigma``) and the rings' pixel counts."""
    sums = sums[:, :length]
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.abs(sums[0]) / np.sqrt(np.abs(sums[1] * sums[2]))
    if sigma > 0:
        curve = gaussian_filter(curve, sigma)
    return np.stack([curve, np.rint(sums[3])])


#: Apodisation windows :func:`frc` knows, by name.
WINDOWS = ("hann",)


@lru_cache(maxsize=8)
def _window(name: str, n: int) -> np.ndarray:
    """The periodic (DFT-even) 1-D window of n samples (``scipy.signal.windows``)."""
    if name != "hann":
        raise InvalidParameterError(f"unknown FRC window {name!r}; known: {', '.join(WINDOWS)}")
    from scipy.signal.windows import hann  # importing scipy.signal costs ~0.7 s: only when asked

    out = hann(n, sym=False)
    out.setflags(write=False)
    return out


def _windowed_block(x: np.ndarray, name: str, n: int, block_info=None) -> np.ndarray:
    """One block times its part of the separable window ``w(row) · w(column)``."""
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    w = _window(name, n)
    return x.astype(np.float64) * w[r0:r1, None] * w[None, c0:c1]


def apodise(x: da.Array, window: str) -> da.Array:
    """The square image ``x`` times the 2-D ``window`` (outer product of two 1-D ones), blockwise."""
    n = x.shape[0]
    _window(window, n)  # an unknown name raises now, not when the graph runs
    return x.map_blocks(_windowed_block, window, n, dtype=np.float64, meta=np.empty((0, 0), np.float64))


def frc_rings(a, b, *, sigma: float = 0.0, window: str | None = None, nyquist: bool = False,
              workdir: str | Path | None = None, slab_bytes: int = _SLAB_BYTES):
    """The FRC curve of two images and each ring's pixel count, as one (2, L) array.

    Parameters are those of :func:`frc`. Row 0 is the curve, row 1 the number of spectrum pixels in
    each ring (as :func:`ptychozarr.report.ring_counts`), from which :func:`half_bit_threshold` and
    :func:`one_bit_threshold` follow.
    """
    a, b, eager = _pair(a, b)
    n = min(a.shape)
    a, b = _centre_crop(a, (n, n)), _centre_crop(b, (n, n))
    if window is not None:
        a, b = apodise(a, window), apodise(b, window)
    full = frc_length(n)
    length = n // 2 + 1 if nyquist else full
    sums = _spectrum_ring_sums(a, b, full, workdir, slab_bytes)
    rings = sums.map_blocks(_curve, sigma, length, chunks=((2,), (length,)), dtype=np.float64,
                            meta=np.empty((0, 0), np.float64))
    return _finish(rings, eager)


def frc(a, b, *, sigma: float = 0.0, window: str | None = None, nyquist: bool = False,
        workdir: str | Path | None = None, slab_bytes: int = _SLAB_BYTES):
    """Fourier ring correlation curve of two images, PtychoPINN's (hoidn/FRC) convention.

    Parameters
    ----------
    a, b : (H, W) numpy or dask arrays of equal shape.
    sigma : float
        Gaussian smoothing of the curve (``scipy.ndimage.gaussian_filter``; 0: none).
    window : {"hann"}, optional
        Apodise both images first: multiply by ``w(row)·w(column)`` (``scipy.signal.windows.hann``,
        periodic), block by block. Without it the box edges correlate with themselves at every ring.
    nyquist : bool
        End the curve at Nyquist (``n // 2 + 1`` rings) instead of the corner ring.
    workdir : str or Path, optional
        Directory for the transposition between the two FFT passes (a Zarr array per image, written
        when the graph runs and left there; the caller removes it). Without it the transposition is an
        in-memory dask rechunk, which holds one half-plane spectrum per image.
    slab_bytes : int
        Target size of one row or column slab of the complex spectrum.

    Returns
    -------
    (L,) float64 curve, numpy or dask like the inputs, with ``L = frc_length(min(H, W))`` (or
    ``min(H, W) // 2 + 1`` with ``nyquist``).

    Notes
    -----
    Non-square images are first centre-cropped to their shorter side. With ``F = fftshift(fft2(·))``
    and ring index ``round(sqrt(R² + C²))`` (round half to even; R, C = index − floor(n/2)), the curve
    is ``|Σ F_a·F_b*| / sqrt(|Σ|F_a|² · Σ|F_b|²|)`` per ring, out to the corners (beyond Nyquist)
    unless ``nyquist``.
    """
    rings = frc_rings(a, b, sigma=sigma, window=window, nyquist=nyquist, workdir=workdir,
                      slab_bytes=slab_bytes)
    return rings[0]


def half_bit_threshold(counts) -> np.ndarray:
    """The half-bit threshold per ring from its pixel count n (van Heel & Schatz 2005).

    ``T(r) = (0.2071 + 1.9102 / sqrt(n)) / (1.2071 + 0.9102 / sqrt(n))``; NaN for an empty ring.

    References
    ----------
    M. van Heel and M. Schatz, "Fourier shell correlation threshold criteria", J. Struct. Biol. 151
    (2005) 250–262.
    """
    return _bit_threshold(counts, 0.2071, 1.9102, 1.2071, 0.9102)


def one_bit_threshold(counts) -> np.ndarray:
    """The 1-bit threshold per ring: ``(0.5 + 2.4142 / sqrt(n)) / (1.5 + 1.4142 / sqrt(n))`` (ibid.)."""
    return _bit_threshold(counts, 0.5, 2.4142, 1.5, 1.4142)


def _bit_threshold(counts, a: float, b: float, c: float, d: float) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = 1.0 / np.sqrt(np.where(counts > 0, counts, np.nan))
    return (a + b * root) / (c + d * root)


#: Thresholds :func:`frc_crossing` takes by name, from the rings' pixel counts.
_BIT_THRESHOLDS = {"halfbit": half_bit_threshold, "onebit": one_bit_threshold}


def _crossing(curve: np.ndarray, threshold: np.ndarray) -> float:
    c = np.asarray(curve, dtype=np.float64)
    d = c - np.broadcast_to(np.asarray(threshold, dtype=np.float64), c.shape)
    rings = np.arange(d.size)
    finite = np.isfinite(c) & (rings >= 1)
    peak = int(np.argmax(np.where(finite, c, -np.inf))) if finite.any() else d.size
    above = np.flatnonzero(np.isfinite(d) & (d >= 0) & (rings >= peak))
    if above.size == 0:
        return 0.0  # never above past ring 0: nothing resolved
    below = np.flatnonzero(np.isfinite(d) & (d < 0) & (rings > above[0]))
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if not np.isfinite(d[i - 1]) or d[i - 1] == d[i]:
        return float(i)
    return float(np.clip(i - 1 + d[i - 1] / (d[i - 1] - d[i]), i - 1, i))


def _crossing_of_rings(rings: np.ndarray, threshold) -> float:
    rings = np.asarray(rings, dtype=np.float64)
    if isinstance(threshold, str):
        threshold = _BIT_THRESHOLDS[threshold](rings[1])
    return _crossing(rings[0], threshold)


def frc_crossing(rings, threshold):
    """Where an FRC curve first falls below a threshold after its peak, in rings, ring 0 ignored.

    Parameters
    ----------
    rings : (2, L) numpy or dask array
        Curve and ring pixel counts, as :func:`frc_rings` returns.
    threshold : float, (L,) array, or {"halfbit", "onebit"}
        A constant (0.5, 1/7), one per ring, or the named threshold from the ring counts.

    Returns
    -------
    float (0-d dask array for dask ``rings``): where the curve first falls below the threshold after
    its peak — the first ring i with ``c[i] < t[i]`` past the first ring at or after the curve's
    highest ring (ring ≥ 1) with ``c ≥ t`` — ``d = c − t`` interpolated linearly to zero between rings
    i − 1 and i. Ring 0 (the images' means) is ignored, and so are the low rings before the peak (a
    phase whose offset or ramp was removed correlates little there, and can dip under a threshold and
    rise again). 0.0 when the curve is never at or above the threshold from its peak on (nothing
    resolved); NaN when it never falls below it (written as an empty cell, never as the curve's
    length).
    """
    if isinstance(rings, da.Array):
        return da.from_delayed(dask.delayed(_crossing_of_rings)(rings, threshold), (), np.float64)
    return _crossing_of_rings(rings, threshold)


def _apodised_rings(scored, window: str) -> list:
    """Both parts' windowed FRC rings to Nyquist, computed once per evaluation and published as a curve."""

    def make():
        out = []
        for pair in (scored.amplitude, scored.phase):
            rings = frc_rings(*pair, sigma=scored.frc_sigma, window=window, nyquist=True,
                              workdir=scored.workdir)
            out.append(scored.resolve(rings)[0])
        scored.curves[f"frc_{window}"] = tuple(r[0] for r in out)
        return out

    return scored.once(f"frc_{window}", make)


def _apodised_crossing(window: str, threshold):
    def compute(scored):
        values = tuple(frc_crossing(r, threshold) for r in _apodised_rings(scored, window))
        return values if scored.lazy else tuple(float(v) for v in values)

    return compute


def _apodised_memory(shape, chunk) -> dict[str, int]:
    """One task of each windowed-FRC pass: as the plain FRC's, with one more float64 image copy."""
    passes = _task_bytes(min(shape), 16 + 8)
    return {f"{k}_hann": v for k, v in passes.items()}


def apodised_entries() -> list:
    """The registry entries of the Hann-windowed FRC crossings (see :mod:`.registry`)."""
    from ptychozarr.metrics.registry import Metric

    crossings = (("frc50", "0.5", FRC50), ("frc1over7", "1/7", FRC1OVER7),
                 ("frc_halfbit", "½-bit", "halfbit"), ("frc_onebit", "1-bit", "onebit"))
    return [
        Metric(f"{name}_hann", f"FRC {label}, Hann (rings)", "higher", _apodised_crossing("hann", th),
               unit="rings", resolution=True, memory=_apodised_memory)
        for name, label, th in crossings
    ]


def _cutoff(curve: np.ndarray, threshold: float) -> np.float64:
    vals = np.asarray(curve, dtype=np.float64)
    finite = np.isfinite(vals)
    if not finite.any():
        return np.float64(np.nan)
    below = np.flatnonzero(finite & (vals < threshold))
    if below.size == 0:
        return np.float64(vals.size)
    i = int(below[0])
    if i == 0:
        return np.float64(0.0)
    y0, y1 = vals[i - 1], vals[i]
    if not np.isfinite(y0) or np.isclose(y1 - y0, 0.0):
        return np.float64(i)
    return np.float64(np.clip(i - 1 + (threshold - y0) / (y1 - y0), i - 1, i))


def frc_cutoff(curve, threshold: float = FRC50):
    """First crossing of ``threshold`` by an FRC curve, linearly interpolated (PtychoPINN HEAD).

    Parameters
    ----------
    curve : (L,) numpy or dask array.
    threshold : float
        0.5 for frc50, 1/7 for frc1over7.

    Returns
    -------
    float, or a 0-d dask array for a dask curve.

    Notes
    -----
    For the first finite bin i below the threshold: ``(i − 1) + (t − c[i−1]) / (c[i] − c[i−1])``,
    clipped to [i − 1, i]; 0.0 when i = 0; ``i`` when the step is flat or the previous bin is not
    finite; ``L`` when the curve never crosses; NaN when no bin is finite. For example
    [.95, .72, .55, .45, .20] gives 2.5 and [.8, .4, .2, .1] gives 0.75 (t = 0.5) and 2.5714… (t = 1/7).
    """
    if isinstance(curve, da.Array):
        return curve.rechunk(-1).map_blocks(
            _cutoff, threshold, drop_axis=0, dtype=np.float64, meta=np.float64(0.0)
        )
    return float(_cutoff(curve, threshold))
