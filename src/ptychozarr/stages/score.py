"""Score stage: an arm's object aligned to the ground truth, registered if asked, and scored.

Writes ``arms/<arm>/aligned`` and ``aligned_gt`` (named dimensions ``aligned_y``, ``aligned_x``); the
metrics and the registration offset go to ``aligned``'s attrs. The patch size M that placement uses
is read from the arm's stored patches (the iterative arm, which has none, uses the configured M).
"""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import zarr

from ptychozarr import align, memory
from ptychozarr.config import ScoreOptions, to_json
from ptychozarr.io import mark_complete
from ptychozarr.metrics import evaluate, task_memory
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import matches
from ptychozarr.stitch import CanvasFrame

__all__ = ["DIMS", "project_memory", "run"]

log = logging.getLogger(__name__)

DIMS = ("aligned_y", "aligned_x")
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


def run(
    rt: Runtime,
    node: zarr.Group,
    gt: da.Array,
    centres: np.ndarray,
    scan: np.ndarray,
    options: ScoreOptions,
    *,
    registered: bool,
    crop: int,
) -> zarr.Array:
    """Align, register and score ``node/object``; returns ``node/aligned`` (metrics in its attrs).

    ``crop`` is the configured M, used only when the arm has no stored patches (the iterative arm).
    """
    name = f"score:{node.basename}"
    if "patches" in node:
        crop = int(node["patches"]["patches"].shape[-1])
    params = {
        **to_json(options.__dict__),
        "crop": crop,
        "object": dict(node["object"].attrs),
        "registered": registered,
    }
    with rt.timed(name):
        if not rt.force and matches(node.get("aligned"), params):
            rt.reuse(name)
        else:
            _score(rt, node, gt, centres, scan, params)
    return node["aligned"]


def _score(rt: Runtime, node, gt, centres, scan, params) -> None:
    log.info("stage score: aligning and scoring %s", node.basename)
    source = node["object"]
    recon = da.from_zarr(source)
    crop = params["crop"]
    if params["fixed_canvas"]:
        recon, truth = align.align_fixed_canvas(recon, gt, scan, crop)
    elif params["alignment"] == "placement" and "canvas" in source.attrs:
        origin = CanvasFrame.from_attrs(source.attrs["canvas"]).origin
        recon, truth = align.align_by_placement(recon, gt, origin, positions_xy=centres, patch_size=crop)
    else:
        recon, truth = align.align_by_coordinates(recon, gt, centres, crop)
    offset = None
    if params["registered"]:
        found = align.find_offset(recon, truth)
        if max(map(abs, found.offset)) <= params["max_registration_shift"]:
            recon, truth = align.shift_and_crop(recon, truth, found.offset)
            offset = found.offset
        else:
            rt.warn(
                f"{node.basename}: registration found a shift of {found.offset} px, more than "
                f"--max-registration-shift {params['max_registration_shift']}; scored unregistered"
            )
    metrics = rt.compute(
        "metrics", evaluate, recon, truth, phase_align=params["phase_align_method"],
        ms_ssim_sigma=params["ms_ssim_sigma"], frc_sigma=params["frc_sigma"], progress=False,
    )  # fmt: skip
    for name, image in (("aligned_gt", truth), ("aligned", recon)):
        out = node.create_array(
            name, shape=image.shape, dtype=np.complex64, chunks=tuple(min(s, 1024) for s in image.shape),
            overwrite=True, attributes={"complete": False}, dimension_names=DIMS,
        )  # fmt: skip
        rt.compute(
            "metrics", da.store, da.asarray(image).astype(np.complex64), out, lock=False, progress=False
        )
    mark_complete(node["aligned_gt"])
    mark_complete(
        node["aligned"],
        params=to_json(params),
        metrics=to_json(metrics),
        offset=None if offset is None else [float(v) for v in offset],
    )
