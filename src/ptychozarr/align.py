"""Alignment of a stitched object to the ground-truth grid, and fine registration (spec §4).

Three ways to put a reconstruction on the ground truth's grid:

- :func:`align_by_coordinates` — PtychoPINN's default: crop the ground truth to the bounding box of the scan
  centres with a margin of ``M // 2`` (``int()`` truncation), then centre-crop both to their common shape;
- :func:`align_by_placement` — exact: the stitcher knows which object pixel its canvas pixel (0, 0) is,
  so both are cut to the same object region without any centring assumption;
- :func:`align_fixed_canvas` — ``--fixed-canvas``: the box comes from every scan position and the
  reconstruction is centre-padded with zeros or centre-cropped to it.

Then :func:`register` measures the remaining shift with scikit-image's ``phase_cross_correlation``
(upsampling 50, on magnitudes as float32), applies it as a Fourier shift and crops 2 px from every side of
both images. :func:`arms_to_register` decides which arms get registered. Every function accepts numpy or
dask 2-D arrays and returns the same kind; only the registration window is brought into memory.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np
from skimage import filters
from skimage.registration import phase_cross_correlation

from ptychozarr.errors import InvalidParameterError

__all__ = [
    "Registration",
    "RegistrationMode",
    "align_by_coordinates",
    "align_by_placement",
    "align_fixed_canvas",
    "arms_to_register",
    "center_crop",
    "center_pad_or_crop",
    "find_offset",
    "fourier_shift",
    "gt_crop_box",
    "register",
    "shift_and_crop",
]

RegistrationMode = Literal["all", "ptychi-only", "none"]
_MAX_WINDOW = 2048


def gt_crop_box(positions_xy, patch_size: int, gt_shape: tuple[int, int]) -> tuple[slice, slice]:
    """The ground-truth region a stitched object covers, as PtychoPINN computes it.

    Parameters
    ----------
    positions_xy : (n, 2) array
        Scan or group-centre positions ``(x, y)`` in object pixels.
    patch_size : int
        Size M of the stitched crops; the margin is ``M // 2``.
    gt_shape : (H, W)
        Shape of the ground truth.

    Returns
    -------
    (rows, cols) slices.

    Notes
    -----
    Rows ``[max(0, int(min_y) − M//2), min(H, int(max_y) + M//2))``, columns likewise; ``int()``
    truncates toward zero.
    """
    pos = np.asarray(positions_xy, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise InvalidParameterError(f"positions must have shape (n, 2) as (x, y); got {pos.shape}.")
    (min_x, min_y), (max_x, max_y) = pos.min(axis=0), pos.max(axis=0)
    margin = patch_size // 2
    rows = slice(max(0, int(min_y) - margin), min(gt_shape[0], int(max_y) + margin))
    cols = slice(max(0, int(min_x) - margin), min(gt_shape[1], int(max_x) + margin))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        raise InvalidParameterError(
            f"the scan box rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} misses the ground "
            f"truth of shape {tuple(gt_shape)}; check that positions are in object pixels."
        )
    return rows, cols


def center_crop(image, shape: tuple[int, int]):
    """The central ``shape`` region of ``image`` (start ``(h − t) // 2`` per axis)."""
    h, w = image.shape[-2:]
    th, tw = shape
    if th > h or tw > w or th <= 0 or tw <= 0:
        raise InvalidParameterError(f"cannot centre-crop an image of shape {(h, w)} to {tuple(shape)}.")
    r0, c0 = (h - th) // 2, (w - tw) // 2
    return image[..., r0 : r0 + th, c0 : c0 + tw]


def center_pad_or_crop(image, shape: tuple[int, int]):
    """``image`` centre-padded with zeros (extra row/column at the end) or centre-cropped to ``shape``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(0, shape[0] - h), max(0, shape[1] - w)
    if pad_h or pad_w:
        widths = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        image = da.pad(image, widths) if isinstance(image, da.Array) else np.pad(image, widths)
    return center_crop(image, (min(shape[0], image.shape[0]), min(shape[1], image.shape[1])))


def align_by_coordinates(recon, ground_truth, positions_xy, patch_size: int):
    """PtychoPINN's coordinate alignment (``align_for_evaluation``).

    Parameters
    ----------
    recon : (P, Q) array, the stitched object.
    ground_truth : (H, W) array, the whole ground-truth object.
    positions_xy : (n, 2) array of group centres ``(x, y)`` used for stitching.
    patch_size : int, the stitched crop size M.

    Returns
    -------
    (recon, ground_truth) of equal shape.

    Notes
    -----
    The ground truth is cut to :func:`gt_crop_box`, then both are centre-cropped to the common minimum
    shape. This assumes the canvas centre coincides with the box centre; :func:`align_by_placement`
    does not.
    """
    rows, cols = gt_crop_box(positions_xy, patch_size, ground_truth.shape)
    gt = ground_truth[rows, cols]
    shape = (min(recon.shape[0], gt.shape[0]), min(recon.shape[1], gt.shape[1]))
    return center_crop(recon, shape), center_crop(gt, shape)


def align_by_placement(recon, ground_truth, origin_yx: tuple[float, float], positions_xy=None,
                       patch_size: int | None = None):
    """Exact alignment from the stitcher's canvas ↔ object mapping.

    Parameters
    ----------
    recon : (P, Q) array, the stitched canvas.
    ground_truth : (H, W) array, the whole ground-truth object.
    origin_yx : (float, float)
        Object pixel ``(y0, x0)`` of canvas pixel (0, 0), as the stitcher's ``CanvasFrame`` records it;
        rounded to the nearest pixel (a sub-pixel remainder is left to :func:`register`).
    positions_xy, patch_size : optional
        When given, the region is further limited to :func:`gt_crop_box`, as in PtychoPINN.

    Returns
    -------
    (recon, ground_truth) covering the same object pixels.
    """
    y0, x0 = (int(np.rint(v)) for v in origin_yx)
    rows = [max(0, y0), min(ground_truth.shape[0], y0 + recon.shape[0])]
    cols = [max(0, x0), min(ground_truth.shape[1], x0 + recon.shape[1])]
    if positions_xy is not None:
        if patch_size is None:
            raise InvalidParameterError("align_by_placement needs patch_size together with positions_xy.")
        box = gt_crop_box(positions_xy, patch_size, ground_truth.shape)
        rows = [max(rows[0], box[0].start), min(rows[1], box[0].stop)]
        cols = [max(cols[0], box[1].start), min(cols[1], box[1].stop)]
    if rows[0] >= rows[1] or cols[0] >= cols[1]:
        raise InvalidParameterError(
            f"the canvas at object origin {(y0, x0)} with shape {recon.shape} does not overlap the ground "
            f"truth region; check the canvas origin and the positions."
        )
    return (recon[rows[0] - y0 : rows[1] - y0, cols[0] - x0 : cols[1] - x0],
            ground_truth[rows[0] : rows[1], cols[0] : cols[1]])


def align_fixed_canvas(recon, ground_truth, scan_positions_xy, patch_size: int):
    """PtychoPINN's ``--fixed-canvas`` alignment.

    The ground truth is cut to :func:`gt_crop_box` of *all* scan positions (not the group centres of one
    subset), and the reconstruction is centre-padded with zeros or centre-cropped to that shape, so that
    every subset is scored on the same canvas.
    """
    rows, cols = gt_crop_box(scan_positions_xy, patch_size, ground_truth.shape)
    gt = ground_truth[rows, cols]
    return center_pad_or_crop(recon, gt.shape), gt


@dataclass(frozen=True)
class Registration:
    """A measured translation.

    Attributes
    ----------
    offset : (dy, dx)
        Shift to apply to the image to align it with the reference (the negative of a roll applied to
        the reference to make the image).
    window : (rows, cols) slices
        Region of both images the shift was measured on.
    windowed : bool
        True when that region is a central window smaller than the images.
    """

    offset: tuple[float, float]
    window: tuple[slice, slice]
    windowed: bool


def _magnitude(x, apodize: bool) -> np.ndarray:
    x = np.abs(x.compute() if isinstance(x, da.Array) else np.asarray(x)).astype(np.float64)
    if apodize:
        x = (x - x.mean()) * filters.window("hann", x.shape)
    return x.astype(np.float32)


def find_offset(image, reference, *, upsample_factor: int = 50, max_window: int = _MAX_WINDOW,
                apodize: bool = True) -> Registration:
    """Sub-pixel shift of ``image`` relative to ``reference`` (PtychoPINN's ``find_translation_offset``).

    Parameters
    ----------
    image, reference : (H, W) numpy or dask arrays of equal shape (complex or real).
    upsample_factor : int
        Sub-pixel precision 1/upsample_factor.
    max_window : int
        Larger images are registered on their central ``max_window``-sided window, the only part
        brought into memory (PtychoPINN uses the whole image; for one rigid shift the window gives the
        same answer unless it lacks structure).
    apodize : bool
        Remove each magnitude's mean and taper it with a Hann window first (default). Without it
        (PtychoPINN's way) the straight edges of two cropped images correlate at zero shift and, with
        phase normalisation, that peak often wins over the true one: a 2-px shift of a cropped image
        is then reported as 0.

    Returns
    -------
    Registration

    Notes
    -----
    ``skimage.registration.phase_cross_correlation(|reference|, |image|, upsample_factor=...)`` on
    magnitudes cast to float32 (apodized unless ``apodize=False``), with scikit-image's defaults
    (phase normalisation, real space input).
    """
    if image.shape != reference.shape or len(image.shape) != 2:
        raise InvalidParameterError(
            f"registration needs two 2-D images of equal shape; got {image.shape} and {reference.shape}."
        )
    h, w = image.shape
    wh, ww = min(h, max_window), min(w, max_window)
    r0, c0 = (h - wh) // 2, (w - ww) // 2
    window = (slice(r0, r0 + wh), slice(c0, c0 + ww))
    shift, _, _ = phase_cross_correlation(_magnitude(reference[window], apodize),
                                          _magnitude(image[window], apodize), upsample_factor=upsample_factor)
    return Registration((float(shift[0]), float(shift[1])), window, (wh, ww) != (h, w))


def _ramp(n: int, shift: float) -> np.ndarray:
    return np.exp(-2j * np.pi * shift * np.fft.fftfreq(n))


def _shift_axis(block: np.ndarray, shift: float, axis: int) -> np.ndarray:
    ramp = _ramp(block.shape[axis], shift)
    ramp = ramp[:, None] if axis == 0 else ramp[None, :]
    return np.fft.ifft(np.fft.fft(block, axis=axis) * ramp, axis=axis)


def fourier_shift(image, offset: tuple[float, float]):
    """``image`` translated by ``offset = (dy, dx)`` pixels through the Fourier domain (periodic).

    Parameters
    ----------
    image : (H, W) numpy or dask array, real or complex.
    offset : (dy, dx); positive moves content down / right.

    Returns
    -------
    Array of the same kind; real input gives real output, complex stays complex128.

    Notes
    -----
    ``ifft2(fft2(image) · exp(−2πi(dy·ky + dx·kx)))`` with numpy ``fftfreq``. On dask arrays it runs as
    two 1-D passes (row slabs, then column slabs), which is the same product because the ramp is
    separable.
    """
    dy, dx = offset
    if isinstance(image, da.Array):
        meta = np.empty((0, 0), np.complex128)
        rows = image.rechunk({1: -1}).map_blocks(_shift_axis, dx, 1, dtype=np.complex128, meta=meta)
        out = rows.rechunk({0: -1, 1: image.chunks[1]}).map_blocks(_shift_axis, dy, 0, dtype=np.complex128,
                                                                    meta=meta)
        out = out.rechunk(image.chunks)
    else:
        image = np.asarray(image)
        out = np.fft.ifft2(np.fft.fft2(image) * (_ramp(image.shape[0], dy)[:, None]
                                                 * _ramp(image.shape[1], dx)[None, :]))
    return out if np.iscomplexobj(image) else out.real


def shift_and_crop(image, reference, offset: tuple[float, float], border_crop: int = 2):
    """Shift ``image`` by ``offset`` and crop ``border_crop`` px from every side of both images.

    The reference is cropped, never shifted (PtychoPINN's ``apply_shift_and_crop``); the crop removes
    the wrap-around of the periodic shift.
    """
    if border_crop < 0:
        raise InvalidParameterError(f"border_crop must be non-negative, got {border_crop}.")
    h, w = image.shape
    if 2 * border_crop >= min(h, w):
        raise InvalidParameterError(
            f"border_crop {border_crop} leaves nothing of an image of shape {(h, w)}; use a smaller one."
        )
    crop = (slice(border_crop, h - border_crop), slice(border_crop, w - border_crop))
    return fourier_shift(image, offset)[crop], reference[crop]


def register(image, reference, *, upsample_factor: int = 50, border_crop: int = 2,
             max_window: int = _MAX_WINDOW):
    """Measure, apply and crop: PtychoPINN's fine registration of one arm (spec §4.2).

    Returns
    -------
    (image, reference, Registration)
        The shifted image and the reference, both cropped by ``border_crop`` px per side, and the
        measurement (whose ``windowed`` says whether a central window was used, see :func:`find_offset`).
    """
    found = find_offset(image, reference, upsample_factor=upsample_factor, max_window=max_window)
    shifted, ref = shift_and_crop(image, reference, found.offset, border_crop)
    return shifted, ref, found


def arms_to_register(arms: Sequence[str], mode: RegistrationMode = "all",
                     iterative_arms: Collection[str] = ("ptychi", "tike")) -> list[str]:
    """The arms that get fine registration under compare_models' modes.

    Parameters
    ----------
    arms : names of the arms, in order.
    mode : {"all", "ptychi-only", "none"}
        ``"all"`` (default): every arm; ``"ptychi-only"`` (``--register-ptychi-only``, used by the study):
        only the imported iterative reconstructions; ``"none"`` (``--skip-registration``): no arm.
    iterative_arms : names that count as imported iterative reconstructions.

    Returns
    -------
    list of arm names, in the order given.

    Notes
    -----
    A registered arm is scored against the ground truth cropped by the same border as its image; an
    unregistered arm against the coordinate-aligned ground truth. compare_models keeps an arm
    unregistered, with a warning, when its registration raises.
    """
    if mode == "all":
        return list(arms)
    if mode == "ptychi-only":
        return [arm for arm in arms if arm in iterative_arms]
    if mode == "none":
        return []
    raise InvalidParameterError(f"registration mode must be 'all', 'ptychi-only' or 'none'; got {mode!r}.")
