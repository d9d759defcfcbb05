"""Score stage: every arm aligned to the ground truth, registered if asked, and scored on one box.

Two passes, so that every arm is scored on identical shapes (FRC rings mean the same frequencies):

1. :func:`align_arm` puts an arm's object on the ground truth's grid (placement, coordinates, fixed
   canvas, or :func:`ptychozarr.align.align_iterative` for an imported iterative object in either of
   its frames) and, when asked, registers it (:func:`ptychozarr.align.find_offset`; a measurement that
   is not accepted leaves the arm unregistered, with a warning naming why);
2. :func:`score_arms` cuts every arm and its truth to one box (:func:`ptychozarr.align.crop_to_common`)
   and evaluates each pair.

Writes ``scores/<arm>/aligned`` and ``aligned_gt`` on the object frame (dimensions ``object_y``,
``object_x``) with their coordinates: the object pixels of the ground truth they were cut from, so that
``xarray.align`` lines them up with ``data/objectGuess`` and the arm's object. They sit in a group of their
own, beside ``arms/<arm>``, because a group of a tree has one coordinate per dimension (the stitched
object's extent is not the crop's). The metrics, the registration (offset, confidence, accepted, reason)
and the box go to ``aligned``'s attrs.
The patch size M that placement uses is read from the arm's stored patches (the iterative arm, which
has none, uses the configured M). An arm whose output is complete with the same parameters, box
included, is reused, without measuring its registration again.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ptychozarr import align, memory
from ptychozarr.config import ScoreOptions
from ptychozarr.io import is_complete, mark_complete
from ptychozarr.io.store import FRAME_DIMS, FRAME_VERSION, array_options, frame_attributes, write_frame
from ptychozarr.metrics import evaluate, task_memory
from ptychozarr.registration import MAX_WINDOW
from ptychozarr.report import to_jsonable
from ptychozarr.runtime import Runtime
from ptychozarr.stitch import CanvasFrame

__all__ = ["DIMS", "Aligned", "align_arm", "project_memory", "score_arms", "scores_group"]

log = logging.getLogger(__name__)

DIMS = FRAME_DIMS
_LEGACY = ("aligned", "aligned_gt")
"""Arrays an earlier layout kept in ``arms/<arm>``: removed when the arm is scored again."""
_ANY_SIDE = 2**16
"""Side of the image a metric task is projected for (any larger one projects the same)."""


def project_memory(*, tile: int) -> memory.TaskMemory:
    """Projected host memory of one metric task (:func:`ptychozarr.metrics.task_memory`) on the
    object's ``tile``² chunks, so the tile is the knob that sizes it.

    One pass runs at a time, so the task is the largest pass's. The scored image's shape is not known
    before the run: it is taken as :data:`_ANY_SIDE` square, past which the projection no longer grows.
    """
    passes = task_memory((_ANY_SIDE, _ANY_SIDE), chunk=tile)
    largest = max(passes, key=passes.__getitem__)
    return memory.TaskMemory("metrics", {largest: passes[largest]}, "tile")


@dataclass
class Aligned:
    """One arm on the ground truth's grid, registered when asked, before the common crop.

    Attributes
    ----------
    node : zarr.Group
        The arm's group (``arms/<key>``).
    params : dict
        What the alignment and registration depend on (JSON values).
    recon : dask.array.Array
        The aligned object, before its registration shift (:meth:`shifted`).
    truth : xarray.DataArray
        Its ground-truth crop, of equal shape, dask-backed, with the object-pixel coordinates it has in
        the ground truth (which are the aligned object's too).
    registration : dict or None
        ``offset`` (applied, or None), ``measured``, ``confidence``, ``accepted``, ``reason``,
        ``component`` (what the offset was measured on) and ``channel_confidence`` (the amplitude's and
        the phase's own confidences, when they were tried alone); None when the arm was not to be
        registered. The threshold is the ``min_registration_confidence`` option.
    frame : str or None
        ``"scan"`` or ``"object"``: the frame an imported iterative object was given in.
    """

    node: zarr.Group
    params: dict
    recon: da.Array
    truth: xr.DataArray
    registration: dict | None = None
    frame: str | None = None

    def shifted(self, workdir) -> da.Array:
        """The aligned object moved by the applied registration offset (through ``workdir``: flat in
        memory, :func:`ptychozarr.align.fourier_shift`), or as it is when unregistered."""
        if self.offset is None:
            return self.recon
        return align.fourier_shift(self.recon, self.offset, workdir=workdir)

    @property
    def offset(self) -> tuple[float, float] | None:
        """The applied registration offset (dy, dx), or None when the arm is scored unregistered."""
        off = (self.registration or {}).get("offset")
        return None if off is None else (float(off[0]), float(off[1]))


def align_arm(
    rt: Runtime,
    node: zarr.Group,
    gt: xr.DataArray,
    centres: np.ndarray,
    scan: np.ndarray,
    options: ScoreOptions,
    *,
    registered: bool,
    crop: int,
) -> Aligned:
    """Pass 1: put ``node/object`` on the ground truth's grid and register it when ``registered``.

    ``gt`` is the ground truth on the object frame (``objectGuess`` of :func:`ptychozarr.io.open_dataset`):
    the alignment cuts it as an array, so its crop keeps its coordinates.

    ``crop`` is the configured M, used only when the arm has no stored patches (the iterative arm). A
    registration stored by a complete earlier score with the same parameters is reused.
    """
    if "patches" in node:
        crop = int(node["patches"]["patches"].shape[-1])
    params = to_jsonable(
        {
            **options.__dict__, "crop": crop, "object": dict(node["object"].attrs), "registered": registered,
            "registration_window": MAX_WINDOW,
        }
    )  # fmt: skip
    with rt.timed(f"align:{node.basename}"):
        recon, truth, frame = _align(node, gt, centres, scan, params)
        registration = None
        if registered:
            registration = _stored_registration(node, params) if not rt.force else None
            if registration is None:
                registration = _register(recon, truth.data, params)
            if not registration["accepted"]:
                rt.warn(
                    f"{node.basename}: registration refused ({registration['reason']}); scored unregistered"
                )
    return Aligned(node, params, da.asarray(recon), truth, registration, frame)


def _align(node, gt, centres, scan, params) -> tuple:
    """(recon, truth, frame) on one grid, by the configured alignment; frame only for an import."""
    source = node["object"]
    recon = da.from_zarr(source)
    crop = params["crop"]
    if "patches" not in node and "canvas" not in source.attrs:
        recon, truth, frame = align.align_iterative(recon, gt, centres, crop)
        log.info("arm %s: iterative reconstruction in the %s frame", node.basename, _FRAMES[frame])
        return recon, truth, frame
    if params["fixed_canvas"]:
        return (*align.align_fixed_canvas(recon, gt, scan, crop), None)
    if params["alignment"] == "placement" and "canvas" in source.attrs:
        origin = CanvasFrame.from_attrs(source.attrs["canvas"]).origin
        return (*align.align_by_placement(recon, gt, origin, positions_xy=centres, patch_size=crop), None)
    return (*align.align_by_coordinates(recon, gt, centres, crop), None)


_FRAMES = {"scan": "scan-box", "object": "whole-object (objectGuess)"}


def _stored_registration(node: zarr.Group, params: dict) -> dict | None:
    """The registration a complete earlier score measured with the same alignment parameters."""
    aligned = scores_group(node).get("aligned")
    if aligned is None or not is_complete(aligned) or aligned.attrs.get("params", {}).get("align") != params:
        return None
    return aligned.attrs.get("registration")


def _register(recon, truth, params: dict) -> dict:
    """Measure the arm's shift; the offset to apply is None when the measurement is not accepted."""
    found = align.find_offset(
        recon,
        truth,
        max_shift=params["max_registration_shift"],
        min_confidence=params["min_registration_confidence"],
    )
    return to_jsonable(
        {
            "offset": found.offset if found.accepted else None,
            "measured": found.offset,
            "confidence": found.confidence,
            "accepted": found.accepted,
            "reason": found.reason,
            "component": found.component,
            "channel_confidence": dict(found.channel_confidence),
        }
    )


def score_arms(rt: Runtime, arms: Sequence[Aligned]) -> list[zarr.Array]:
    """Pass 2: cut every arm to the common box, score each and store ``aligned`` / ``aligned_gt``.

    Returns each arm's ``aligned`` array (metrics, registration and box in its attrs), in order.
    """
    if not arms:
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="ptychozarr-shift-") as workdir:
        # a registered arm is shifted (periodically) before the common box cuts off the wrapped border
        pairs = align.crop_to_common(
            {i: (a.shifted(workdir), a.truth) for i, a in enumerate(arms)},
            {i: a.offset for i, a in enumerate(arms)},
        )
        for i, arm in enumerate(arms):
            recon, truth = pairs[i]
            origin = [int(truth[dim][0]) for dim in DIMS]
            params = {"align": arm.params, "box": list(recon.shape), "origin": origin, "frame": FRAME_VERSION}
            name = f"score:{arm.node.basename}"
            node = scores_group(arm.node)
            with rt.timed(name):
                if not rt.reusable(name, node.get("aligned"), params):
                    _score(rt, arm, node, recon, truth, params)
            out.append(node["aligned"])
    return out


def scores_group(node: zarr.Group) -> zarr.Group:
    """The group of an arm's scored crops, ``scores/<arm>`` beside ``arms/<arm>`` (created when missing)."""
    root = zarr.open_group(node.store, mode="a", zarr_format=3, use_consolidated=False)
    return root.require_group("scores").require_group(node.basename)


def _score(rt: Runtime, arm: Aligned, node: zarr.Group, recon, truth: xr.DataArray, params: dict) -> None:
    """Store the arm's ``aligned`` crop and its truth, then score what was stored (every pass of the
    metrics reads the store, not the alignment's graph)."""
    log.info("stage score: scoring %s on a %s box", arm.node.basename, tuple(recon.shape))
    for legacy in _LEGACY:
        if legacy in arm.node:
            del arm.node[legacy]
    pixel_size_m = truth.attrs.get("pixel_size_m")
    for name, image in (("aligned_gt", truth.data), ("aligned", recon)):
        target = node.create_array(
            name, shape=image.shape, dtype=np.complex64, chunks=tuple(min(s, 1024) for s in image.shape),
            overwrite=True, attributes={"complete": False, **frame_attributes(pixel_size_m)},
            dimension_names=DIMS, **array_options(),
        )  # fmt: skip
        rt.compute("metrics", da.store, image.astype(np.complex64), target, lock=False, progress=False)
    write_frame(node, recon.shape, pixel_size_m, tuple(params["origin"]))
    options = params["align"]
    metrics = rt.compute(
        "metrics", evaluate, da.from_zarr(node["aligned"]), da.from_zarr(node["aligned_gt"]),
        phase_align=options["phase_align_method"], ms_ssim_sigma=options["ms_ssim_sigma"],
        frc_sigma=options["frc_sigma"], progress=False,
    )  # fmt: skip
    mark_complete(node["aligned_gt"])
    mark_complete(
        node["aligned"],
        params=to_jsonable(params),
        metrics=to_jsonable(metrics),
        offset=None if arm.offset is None else list(arm.offset),
        registration=arm.registration,
        frame=arm.frame,
    )
