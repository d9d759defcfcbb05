"""Alignment of a stitched object to the ground-truth grid, and fine registration.

Three ways to put a reconstruction on the ground truth's grid:

- :func:`align_by_coordinates` — PtychoPINN's default: crop the ground truth to the bounding box of the scan
  centres with a margin of ``M // 2`` (``int()`` truncation), then centre-crop both to their common shape;
- :func:`align_by_placement` — exact: the stitcher knows which object pixel its canvas pixel (0, 0) is,
  so both are cut to the same object region without any centring assumption;
- :func:`align_fixed_canvas` — ``--fixed-canvas``: the box comes from every scan position and the
  reconstruction is centre-padded with zeros or centre-cropped to it.

:func:`align_iterative` places an imported iterative reconstruction given either in the scan-box frame
or in the whole-object frame.

Then :func:`register` measures the remaining shift (:func:`ptychozarr.registration.find_offset`: plain
cross-correlation with a window that follows the content and a blur-matched reference, plus a confidence),
applies it as a Fourier shift and crops 2 px from every side of both images; :func:`crop_to_common` cuts
every arm to one shape. :func:`arms_to_register` decides which arms get registered. Every function accepts
numpy or dask 2-D arrays and returns the same kind; only the registration window is brought into memory.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import dask.array as da
import numpy as np

from ptychozarr.errors import InvalidParameterError, InvalidScanError
from ptychozarr.registration import (
    MAX_WINDOW,
    MIN_CONFIDENCE,
    Registration,
    common_shape,
    crop_to_common,
    find_offset,
    fourier_shift,
    shift_and_crop,
)

__all__ = [
    "MIN_CONFIDENCE",
    "Registration",
    "RegistrationMode",
    "align_by_coordinates",
    "align_by_placement",
    "align_fixed_canvas",
    "align_iterative",
    "arms_to_register",
    "center_crop",
    "center_pad_or_crop",
    "common_shape",
    "crop_to_common",
    "find_offset",
    "fourier_shift",
    "gt_crop_box",
    "register",
    "shift_and_crop",
]

RegistrationMode = Literal["all", "ptychi-only", "none"]


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


def align_by_placement(
    recon, ground_truth, origin_yx: tuple[float, float], positions_xy=None, patch_size: int | None = None
):
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
    return (
        recon[rows[0] - y0 : rows[1] - y0, cols[0] - x0 : cols[1] - x0],
        ground_truth[rows[0] : rows[1], cols[0] : cols[1]],
    )


def align_fixed_canvas(recon, ground_truth, scan_positions_xy, patch_size: int):
    """PtychoPINN's ``--fixed-canvas`` alignment.

    The ground truth is cut to :func:`gt_crop_box` of *all* scan positions (not the group centres of one
    subset), and the reconstruction is centre-padded with zeros or centre-cropped to that shape, so that
    every subset is scored on the same canvas.
    """
    rows, cols = gt_crop_box(scan_positions_xy, patch_size, ground_truth.shape)
    gt = ground_truth[rows, cols]
    return center_pad_or_crop(recon, gt.shape), gt


def register(
    image,
    reference,
    *,
    upsample_factor: int = 50,
    border_crop: int = 2,
    max_window: int = MAX_WINDOW,
    **options,
):
    """Measure, apply and crop: the fine registration of one arm.

    ``options`` go to :func:`find_offset` (``component``, ``max_blur``, ``min_confidence``,
    ``max_shift``).

    Returns
    -------
    (image, reference, Registration)
        When the measurement is accepted, the shifted image and the reference, both cropped by
        ``border_crop`` px per side; otherwise both unchanged (score the arm unregistered; the
        Registration's ``reason`` says why).
    """
    found = find_offset(image, reference, upsample_factor=upsample_factor, max_window=max_window, **options)
    if not found.accepted:
        return image, reference, found
    shifted, ref = shift_and_crop(image, reference, found.offset, border_crop)
    return shifted, ref, found


def align_iterative(recon, ground_truth, positions_xy, patch_size: int):
    """Place an imported iterative reconstruction on the ground truth, in either of its two frames.

    Parameters
    ----------
    recon : (P, Q) array, the iterative reconstruction.
    ground_truth : (H, W) array, the whole ground-truth object (``objectGuess``).
    positions_xy : (n, 2) array of group centres ``(x, y)``, as for :func:`align_by_coordinates`.
    patch_size : int, the stitched crop size M.

    Returns
    -------
    (recon, ground_truth, frame)
        Both cut to the same region, and ``"object"`` or ``"scan"``.

    Raises
    ------
    InvalidScanError
        When the shape fits neither frame.

    Notes
    -----
    - Whole-object frame, ``recon.shape == ground_truth.shape``: the same :func:`gt_crop_box` is cut
      from both (pixel for pixel, no centring assumption).
    - Scan-box frame (compare_models' expectation), each side within ``patch_size`` px of the
      :func:`gt_crop_box` side: :func:`align_by_coordinates` (both centre-cropped to the common shape).
    - Otherwise a reconstruction within ``patch_size`` px of the object's shape per side (e.g. an
      object padded by the solver) counts as the whole-object frame, centre-padded or centre-cropped to
      it first. When both frames fit, the one whose shape is closer wins.
    """
    rows, cols = gt_crop_box(positions_xy, patch_size, ground_truth.shape)
    if tuple(recon.shape) == tuple(ground_truth.shape):
        return recon[rows, cols], ground_truth[rows, cols], "object"
    box = (rows.stop - rows.start, cols.stop - cols.start)
    to_box = max(abs(recon.shape[0] - box[0]), abs(recon.shape[1] - box[1]))
    to_object = max(abs(recon.shape[0] - ground_truth.shape[0]), abs(recon.shape[1] - ground_truth.shape[1]))
    if min(to_box, to_object) > patch_size:
        raise InvalidScanError(
            f"the iterative reconstruction's shape {tuple(recon.shape)} fits neither accepted frame: the "
            f"whole object {tuple(ground_truth.shape)} (objectGuess) or the scan box {box} "
            f"(±{patch_size} px); save it in one of them."
        )
    if to_box <= to_object:
        return (*align_by_coordinates(recon, ground_truth, positions_xy, patch_size), "scan")
    whole = center_pad_or_crop(recon, ground_truth.shape)
    return whole[rows, cols], ground_truth[rows, cols], "object"


def arms_to_register(
    arms: Sequence[str], mode: RegistrationMode = "all", iterative_arms: Collection[str] = ("ptychi", "tike")
) -> list[str]:
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
    unregistered, with a warning, when its registration raises; here also when the measurement is not
    accepted (:attr:`Registration.accepted`). :func:`crop_to_common` then scores every arm on one shape.
    """
    if mode == "all":
        return list(arms)
    if mode == "ptychi-only":
        return [arm for arm in arms if arm in iterative_arms]
    if mode == "none":
        return []
    raise InvalidParameterError(f"registration mode must be 'all', 'ptychi-only' or 'none'; got {mode!r}.")
