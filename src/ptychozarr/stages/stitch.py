"""Stitch stage: an arm's stored patches into its object, in tiles (``ptychozarr.stitch``)."""

from __future__ import annotations

import dask.array as da
import zarr

from ptychozarr import memory
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import matches
from ptychozarr.stitch import stitch_to_zarr

__all__ = ["TASK_KINDS", "project_memory", "run"]

TASK_KINDS = ("stitch-splat", "stitch-sum")
"""Layer names of the stitch graph (``ptychozarr.stitch``), whose task memory is projected apart."""


def project_memory(*, patch_size: int, tile: int, block_patches: int) -> tuple[memory.TaskMemory, ...]:
    """Projected host memory of one splat and one tree-sum task (:func:`ptychozarr.memory.project_stitch`)."""
    return memory.project_stitch(tile, block_patches, patch_size)


def run(rt: Runtime, node: zarr.Group, tile: int) -> zarr.Array:
    """Stitch ``node/patches`` into ``node/object`` (the patch size M is the stored patches' side)."""
    name = f"stitch:{node.basename}"
    patches = node["patches"]
    params = {"patches": dict(patches.attrs["params"]), "tile": tile}
    with rt.timed(name):
        if not rt.force and matches(node.get("object"), params):
            rt.reuse(name)
            return node["object"]
        return rt.compute(
            "stitch",
            stitch_to_zarr,
            node,
            "object",
            da.from_zarr(patches["patches"]),
            patches["positions"][:],
            patches["weights"][:],
            tile=tile,
            attrs={"params": params},
            overwrite=True,
            task_kinds=TASK_KINDS,
        )
