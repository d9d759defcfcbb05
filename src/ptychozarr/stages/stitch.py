"""Stitch stage: an arm's stored patches into its object, in tiles (``ptychozarr.stitch``).

Writes ``arms/<arm>/object`` (named dimensions ``object_y``, ``object_x``) beside its coordinates
``object_y`` and ``object_x``: the object-grid position of every canvas row and column, in object
pixels (the canvas frame's origin plus the index), so that xarray opens the object on the object grid.
"""

from __future__ import annotations

import numpy as np
import zarr

from ptychozarr import memory
from ptychozarr.io.store import array_options
from ptychozarr.runtime import Runtime
from ptychozarr.stitch import CanvasFrame, stitch_to_zarr, task_memory

__all__ = ["DIMS", "TASK_KINDS", "project_memory", "run", "write_coordinates", "write_object"]

DIMS = ("object_y", "object_x")
"""Dimension names of a stitched object (and the names of its coordinate arrays)."""

TASK_KINDS = ("stitch-tile",)
"""Layer names of the stitch graph (``ptychozarr.stitch``): the task kinds :func:`project_memory` projects
and the run measures apart. One kind: a tile task reads its patches from the store, sums and writes them."""


def project_memory(
    *, patch_size: int, tile: int, block_patches: int, coverage: float = 4.0
) -> tuple[memory.TaskMemory, ...]:
    """Projected host memory of one task of each kind (:func:`ptychozarr.stitch.task_memory`), sized by
    the tile; ``block_patches`` is the patches per stored chunk (a block of the infer stage) and
    ``coverage`` the scan's mean number of patches over a scanned pixel."""
    projected = task_memory(patch_size=patch_size, tile=tile, block_patches=block_patches, coverage=coverage)
    return tuple(memory.TaskMemory(kind, {"task": projected[kind]}, "tile") for kind in TASK_KINDS)


def run(rt: Runtime, node: zarr.Group, tile: int) -> zarr.Array:
    """Stitch ``node/patches`` into ``node/object`` (the patch size M is the stored patches' side)."""
    name = f"stitch:{node.basename}"
    patches = node["patches"]
    params = {"patches": dict(patches.attrs["params"]), "tile": tile, "dims": DIMS}
    with rt.timed(name):
        if rt.reusable(name, node.get("object"), params):
            if not all(dim in node for dim in DIMS):  # a run stopped between the object and its coordinates
                write_coordinates(node, node["object"])
            return node["object"]
        return rt.compute(
            "stitch",
            write_object,
            node,
            patches["patches"],  # the Zarr array itself: each tile task reads its own patches
            patches["positions"][:],
            patches["weights"][:],
            tile=tile,
            attrs={"params": params},
            overwrite=True,
            task_kinds=TASK_KINDS,
        )


def write_object(
    node: zarr.Group,
    patches,
    positions,
    weights=None,
    *,
    tile: int = 1024,
    canvas: CanvasFrame | tuple | None = None,
    block: int | None = None,
    attrs: dict | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """Stitch into ``node/object`` (:func:`ptychozarr.stitch.stitch_to_zarr`) and write its coordinates.

    Parameters
    ----------
    node : zarr.Group
        The arm's group.
    patches, positions, weights, tile, canvas, block, attrs, overwrite
        As for :func:`ptychozarr.stitch.stitch_to_zarr`.

    Returns
    -------
    zarr.Array
        ``node/object``, complete, with dimensions :data:`DIMS`.
    """
    out = stitch_to_zarr(
        node, "object", patches, positions, weights, tile=tile, canvas=canvas, block=block, attrs=attrs,
        overwrite=overwrite, dimension_names=DIMS,
    )  # fmt: skip
    write_coordinates(node, out)
    return out


def write_coordinates(node: zarr.Group, obj: zarr.Array) -> None:
    """Write ``node/object_y`` and ``node/object_x``: origin + index of each row and column of ``obj``.

    The origin is the canvas frame recorded in ``obj``'s attrs; positions are object pixels, as the scan
    coordinates and ``objectGuess``'s indices.
    """
    frame = CanvasFrame.from_attrs(obj.attrs["canvas"])
    positions = frame.to_object(np.arange(frame.shape[0]), np.arange(frame.shape[1]))
    for dim, values in zip(DIMS, positions, strict=True):
        node.create_array(
            dim, data=values.astype(np.float64), dimension_names=(dim,), overwrite=True,
            attributes={"units": "object pixels", "long_name": f"object {dim[-1]} of the pixel"},
            **array_options(),
        )  # fmt: skip
