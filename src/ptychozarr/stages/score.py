"""Score stage: an arm's object aligned to the ground truth, registered if asked, and scored.

Writes ``arms/<arm>/aligned`` and ``aligned_gt`` (named dimensions ``aligned_y``, ``aligned_x``); the
metrics and the registration offset go to ``aligned``'s attrs. The patch size M that placement uses
is read from the arm's stored patches (the iterative arm, which has none, uses the configured M).
"""

from __future__ import annotations

import dataclasses
import logging

import dask.array as da
import numpy as np
import zarr

from ptychozarr import align, memory
from ptychozarr.config import ScoreOptions, to_json
from ptychozarr.io import mark_complete
from ptychozarr.metrics import evaluate
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import matches
from ptychozarr.stitch import CanvasFrame

__all__ = ["DIMS", "HALO", "project_memory", "run"]

log = logging.getLogger(__name__)

DIMS = ("aligned_y", "aligned_x")
HALO = 5
"""Overlap of a metric task (the MS-SSIM Gaussian's radius at the default σ, with a margin)."""


def project_memory(*, chunk: int) -> memory.TaskMemory:
    """Projected host memory of one metric task on ``chunk``² blocks: the object's tiles, so the knob
    that sizes it is the tile."""
    return dataclasses.replace(memory.project_metrics(chunk, HALO), knob="tile")


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
