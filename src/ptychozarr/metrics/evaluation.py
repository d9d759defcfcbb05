"""PtychoPINN's ``eval_reconstruction`` composed from the out-of-core metrics."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import dask
import dask.array as da
import numpy as np

from ptychozarr.errors import InvalidParameterError
from ptychozarr.metrics import registry
from ptychozarr.metrics._blocks import Window, halo_map, store_images
from ptychozarr.metrics._common import _NUMPY_CHUNK, _checked, _pair, _require_min_side
from ptychozarr.metrics.fourier import FRC1OVER7, FRC50, _task_bytes, frc, frc_cutoff
from ptychozarr.metrics.multiscale import _levels, _ms_halo, _ms_ssim_of, _radius, _range_block, _range_of
from ptychozarr.metrics.pointwise import mae, mse, phase_plane, psnr, remove_phase_plane
from ptychozarr.metrics.structural import _PAD, WIN_SIZE, _scoring_bytes, _ssim_count, _ssim_sum

__all__ = ["evaluate", "task_memory"]

#: compare_models' metrics in the order evaluate's fused passes produce them.
_COMPUTED = registry.COMPARE_MODELS

#: Bytes per pixel of one input (complex128; complex64 inputs take half).
_INPUT_BYTES = 16
#: float64 arrays per chunk pixel besides the inputs: the statistics pass (a modulus or phase and its
#: float64 copy for the plane moments), the pointwise pass (the four images and a difference) and the
#: pass that writes the four images the windowed passes read
#: (:func:`~ptychozarr.metrics._blocks.store_images`).
_STATS_FLOATS, _POINTWISE_FLOATS, _STORE_FLOATS = 2, 5, 4
#: Extended float64 blocks per image that an SSIM task holds: the overlapped copy and the pre-filtered one.
_BLOCK_COPIES = 2


def _resolve(lazy: bool, *values):
    """The values as they are (one lazy graph) or computed together in one pass."""
    return values if lazy else dask.compute(*values)


def _range(x: da.Array) -> da.Array:
    return x.max() - x.min()


def _ssim_and_range_block(a: np.ndarray, b: np.ndarray, window: Window, data_range, sigma: float):
    """SSIM map sum of the plain images and extrema of the pre-filtered ones, over one block."""
    return [_ssim_sum(a, b, window, data_range), *_range_block(a, b, window, sigma)]


def _ssim_and_range(a: da.Array, b: da.Array, data_range, sigma: float) -> tuple[da.Array, da.Array]:
    """Lazy SSIM of (a, b) and the MS-SSIM data range of their pre-filtered images, in one pass."""
    blocks = halo_map(_ssim_and_range_block, [a, b], max(_PAD, _radius(sigma)), 5, data_range, sigma)
    return blocks[..., 0].sum() / _ssim_count(a.shape), _range_of(blocks[..., 1:])


def task_memory(shape: tuple[int, int], *, chunk: int | None = None) -> dict[str, int]:
    """Projected peak host memory of one task of each pass of :func:`evaluate`, in bytes.

    Parameters
    ----------
    shape : (int, int)
        Shape of the reconstruction and ground truth (before the trim).
    chunk : int, optional
        Edge of the inputs' square chunks; default the chunk numpy inputs get (2048).

    Returns
    -------
    dict
        ``stats`` (means, ranges, phase planes), ``pointwise`` (MAE, MSE, PSNR), ``store`` (the scored
        images written to the work directory), ``ssim`` (SSIM and the pre-filtered range, halo 3),
        ``ms_ssim`` (every level, halo ``3·2**(levels−1)`` + pre-filter radius), ``frc_rows`` and
        ``frc_columns`` (the two FFT passes), then the passes registered metrics add
        (:attr:`Metric.memory <ptychozarr.metrics.registry.Metric>`; the Hann-windowed FRC:
        ``frc_rows_hann``, ``frc_columns_hann``): bytes of one task.

    Notes
    -----
    Built from the constants the metric modules use (chunk, halos, scikit-image strip size, FFT slab and
    ring sub-block sizes), for complex128 inputs and the default ``ms_ssim_sigma`` of 1, as
    :func:`evaluate` runs with a work directory: the windowed passes read their blocks from the written
    images, so the peak of a pass is about this times the tasks running at once.
    """
    rows, cols = (min(chunk or _NUMPY_CHUNK, n) for n in shape)
    inputs = 2 * _INPUT_BYTES * rows * cols

    def windowed(halo: int) -> int:
        ext_rows, ext_cols = (min(c + 2 * halo, n) for c, n in zip((rows, cols), shape, strict=True))
        return 2 * _BLOCK_COPIES * 8 * ext_rows * ext_cols + _scoring_bytes(ext_rows, ext_cols)

    passes = {
        "stats": inputs + _STATS_FLOATS * 8 * rows * cols,
        "pointwise": inputs + _POINTWISE_FLOATS * 8 * rows * cols,
        "store": inputs + _STORE_FLOATS * 8 * rows * cols,
        "ssim": windowed(max(_PAD, _radius(1.0))),
        "ms_ssim": windowed(_ms_halo(1.0, _levels(shape))),
        **_task_bytes(min(shape), _INPUT_BYTES),
    }
    for entry in registry.metrics():
        if entry.memory is not None:
            passes |= entry.memory(tuple(shape), chunk)
    return passes


def evaluate(
    recon: np.ndarray | da.Array,
    ground_truth: np.ndarray | da.Array,
    *,
    phase_align: Literal["plane", "mean"] = "plane",
    trim: int = 2,
    ms_ssim_sigma: float = 1.0,
    frc_sigma: float = 0.0,
    lazy: bool = False,
    workdir: str | Path | None = None,
) -> dict:
    """Score a complex reconstruction against the ground truth with PtychoPINN's conventions.

    Parameters
    ----------
    recon, ground_truth : (H, W) complex numpy or dask arrays of equal shape, aligned already
        (:mod:`ptychozarr.align`) and free of NaN.
    phase_align : {"plane", "mean"}
        Remove each phase image's least-squares plane, or its mean.
    trim : int
        Pixels cut from every side first (PtychoPINN: ``offset // 2`` = 2).
    ms_ssim_sigma : float
        Gaussian pre-filter of the amplitude MS-SSIM (the phase MS-SSIM is never filtered).
    frc_sigma : float
        Gaussian smoothing of the FRC curves.
    lazy : bool
        Return dask objects to compute in one ``dask.compute`` pass instead of numbers.
    workdir : str or Path, optional
        Directory for the images the windowed passes read (SSIM, MS-SSIM) and for the FFT transposition
        of the FRC (see :func:`~ptychozarr.metrics.frc`). When computing dask inputs eagerly without one,
        a temporary directory is used and removed.

    Returns
    -------
    dict
        ``mae``, ``mse``, ``psnr``, ``ssim``, ``ms_ssim``, ``frc50``, ``frc1over7``: (amplitude, phase)
        tuples of floats; ``frc``: (amplitude curve, phase curve); then every other registered metric
        (:mod:`ptychozarr.metrics.registry`; built in: ``frc50_hann``, ``frc1over7_hann``,
        ``frc_halfbit_hann``, ``frc_onebit_hann``, NaN where a curve never crosses) and the curves they
        publish (``frc_hann``: curves of the Hann-windowed images, to Nyquist). Dask objects when
        ``lazy``.

    Notes
    -----
    As ``ptycho.evaluation.eval_reconstruction``, computed in float64:

    - amplitude: ``t = |gt|``, ``p' = |recon| · mean(t) / mean(|recon|)``; phase: ``np.angle`` of each,
      then its own plane (or mean) removed, after the trim;
    - MAE, MSE and PSNR (peak 255) on (t, p') and on the phases in radians;
    - SSIM on (t, p') with ``data_range = max(t) − min(t)``; on ``(φ + π)/2π`` with ``data_range = 1``;
    - MS-SSIM on (t, p') with the pre-filter and on the scaled phases without it;
    - FRC curves on (t, p') and on the phases; frc50 and frc1over7 interpolated (:func:`frc_cutoff`).

    Eagerly, the work runs in nine passes plus the registered metrics', each over one image pair so
    that it streams through memory: global statistics; pointwise; writing the four scored images to
    the work directory; SSIM with the pre-filtered range (amplitude, phase); every MS-SSIM level at
    once (amplitude, phase); FRC (amplitude, phase); then the registered metrics' own (the
    Hann-windowed FRC: amplitude, phase). The SSIM and MS-SSIM tasks read their blocks with halos from
    the written images, so no block waits in memory for its neighbours and a pass's memory does not
    grow with the image (numpy inputs are scored in memory). :func:`task_memory` projects one task of
    each. Give inputs backed by storage (e.g. ``dask.array.from_zarr``) rather than expensive graphs:
    the statistics, pointwise, writing and FRC passes read them.
    NaN in either input raises :class:`~ptychozarr.errors.InvalidParameterError` (when the graph runs,
    if ``lazy``).
    """
    if phase_align not in ("plane", "mean"):
        raise InvalidParameterError(f"phase_align must be 'plane' or 'mean', got {phase_align!r}.")
    if trim < 0:
        raise InvalidParameterError(f"trim must be a non-negative pixel count, got {trim}.")
    rec, gt, numpy_in = _pair(recon, ground_truth)
    crop = slice(trim, rec.shape[0] - trim), slice(trim, rec.shape[1] - trim)
    _require_min_side(
        (rec.shape[0] - 2 * trim, rec.shape[1] - 2 * trim),
        WIN_SIZE,
        f"SSIM and MS-SSIM after trimming {trim} px per side",
    )
    rec, gt = _checked(rec, "recon")[crop], _checked(gt, "ground_truth")[crop]
    t, p = abs(gt).astype(np.float64), abs(rec).astype(np.float64)
    phases = da.angle(gt), da.angle(rec)

    if phase_align == "plane":
        centring = [phase_plane(ph) for ph in phases]
    else:
        centring = [ph.mean() for ph in phases]
    scale, amp_range, *centring = _resolve(lazy, t.mean() / p.mean(), _range(t), *centring)
    p = p * scale
    if phase_align == "plane":
        phi_t, phi_p = (remove_phase_plane(ph, c) for ph, c in zip(phases, centring, strict=True))
    else:
        phi_t, phi_p = (ph - c for ph, c in zip(phases, centring, strict=True))
    s_t, s_p = (phi_t + np.pi) / (2 * np.pi), (phi_p + np.pi) / (2 * np.pi)

    amplitude, phase = (t, p), (phi_t, phi_p)
    pointwise = _resolve(lazy, *(f(*pair) for f in (mae, mse, psnr) for pair in (amplitude, phase)))
    temporary = workdir is None and not (lazy or numpy_in)
    extras = [m for m in registry.metrics() if not m.compare_models]
    with tempfile.TemporaryDirectory() if temporary else nullcontext(workdir) as directory:
        # each pass below takes one image pair, so that it streams through memory; with a directory the
        # windowed passes read their blocks from the pairs written there, so no block waits for another
        windowed = [t, p, s_t, s_p]
        if directory is not None and not lazy:
            windowed = store_images(windowed, directory, "scored")
        ms_pairs = ((*windowed[:2], ms_ssim_sigma, amp_range), (*windowed[2:], 0.0, 1.0))
        ssims, ms_ranges = zip(*(_resolve(lazy, *_ssim_and_range(x, y, r, sg)) for x, y, sg, r in ms_pairs),
                               strict=True)
        multiscale = [_resolve(lazy, _ms_ssim_of(x, y, sg, r))[0]
                      for (x, y, sg, _), r in zip(ms_pairs, ms_ranges, strict=True)]
        curves = [_resolve(lazy, frc(*pair, sigma=frc_sigma, workdir=directory))[0]
                  for pair in (amplitude, phase)]
        scored = registry.Scored(amplitude, phase, (s_t, s_p), lazy=lazy, workdir=directory,
                                 frc_sigma=frc_sigma)
        extra_values = {m.name: tuple(m.compute(scored)) for m in extras}
    values = [*pointwise, *ssims, *multiscale]
    if not lazy:
        values = [float(v) for v in values]
    cutoffs = [frc_cutoff(c, th) for th in (FRC50, FRC1OVER7) for c in curves]
    values += cutoffs
    out = {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(_COMPUTED)}
    out = {name: out[name] for name in registry.compare_models_names()}
    out["frc"] = tuple(curves)
    return out | extra_values | scored.curves
