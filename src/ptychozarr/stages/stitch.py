"""Stitch stage: an arm's stored patches into its object, in tiles (``ptychozarr.stitch``).

Writes ``arms/<arm>/object`` on the object frame (:data:`ptychozarr.io.store.FRAME_DIMS`: dimensions
``object_y``, ``object_x``) beside its coordinates ``object_y`` and ``object_x``: the object pixel of every
canvas row and column, so that xarray lines the object up with the ground truth and the aligned crops.
The default canvas lies on the object's own pixel grid (``canvas="object"``,
:func:`ptychozarr.stitch.object_grid`), so these are exact. PtychoPINN's canvas (``canvas="ptychopinn"``,
compare_models' compatibility) has a sub-pixel origin: the coordinates are then that origin rounded to
the nearest pixel (as placement alignment rounds it) plus the index, and the exact origin stays in the
object's ``canvas`` attrs. With a pixel size, the coordinates in metres ``object_y_m`` and ``object_x_m``
are written too.
"""

from __future__ import annotations

import numpy as np
import zarr

from ptychozarr import memory
from ptychozarr.io.store import FRAME_DIMS, FRAME_VERSION, frame_attributes, write_frame
from ptychozarr.runtime import Runtime
from ptychozarr.stitch import CanvasFrame, stitch_to_zarr, task_memory

__all__ = ["DIMS", "TASK_KINDS", "frame_origin", "project_memory", "run", "write_coordinates", "write_object"]

DIMS = FRAME_DIMS
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


def run(
    rt: Runtime, node: zarr.Group, tile: int, pixel_size_m: float | None = None, canvas: str = "object"
) -> zarr.Array:
    """Stitch ``node/patches`` into ``node/object`` (the patch size M is the stored patches' side);
    ``pixel_size_m`` (the scan's) adds coordinates in metres; ``canvas`` is ``"object"`` (the object's
    pixel grid) or ``"ptychopinn"`` (reassemble_position's canvas)."""
    name = f"stitch:{node.basename}"
    patches = node["patches"]
    params = {
        "patches": dict(patches.attrs["params"]), "tile": tile, "frame": FRAME_VERSION,
        "pixel_size_m": pixel_size_m, "canvas": canvas,
    }  # fmt: skip
    with rt.timed(name):
        if rt.reusable(name, node.get("object"), params):
            if not all(dim in node for dim in DIMS):  # a run stopped between the object and its coordinates
                write_coordinates(node, node["object"], pixel_size_m)
            return node["object"]
        return rt.compute(
            "stitch",
            write_object,
            node,
            patches["patches"],  # the Zarr array itself: each tile task reads its own patches
            patches["positions"][:],
            patches["weights"][:],
            tile=tile,
            canvas="object" if canvas == "object" else None,
            attrs={"params": params},
            overwrite=True,
            pixel_size_m=pixel_size_m,
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
    pixel_size_m: float | None = None,
) -> zarr.Array:
    """Stitch into ``node/object`` (:func:`ptychozarr.stitch.stitch_to_zarr`) and write its coordinates.

    Parameters
    ----------
    node : zarr.Group
        The arm's group.
    patches, positions, weights, tile, canvas, block, attrs, overwrite
        As for :func:`ptychozarr.stitch.stitch_to_zarr`.
    pixel_size_m : float, optional
        Object pixel size in metres: adds the coordinates in metres.

    Returns
    -------
    zarr.Array
        ``node/object``, complete, with dimensions :data:`DIMS`.
    """
    attrs = {**dict(attrs or {}), **frame_attributes(pixel_size_m)}
    out = stitch_to_zarr(
        node, "object", patches, positions, weights, tile=tile, canvas=canvas, block=block, attrs=attrs,
        overwrite=overwrite, dimension_names=DIMS,
    )  # fmt: skip
    write_coordinates(node, out, pixel_size_m)
    return out


def frame_origin(canvas: CanvasFrame) -> tuple[int, int]:
    """The object pixel of a canvas's pixel (0, 0): its origin rounded to the nearest pixel."""
    return tuple(int(np.rint(v)) for v in canvas.origin)


def write_coordinates(node: zarr.Group, obj: zarr.Array, pixel_size_m: float | None = None) -> None:
    """Write ``node/object_y`` and ``node/object_x`` (and in metres, with ``pixel_size_m``): the object
    pixel of each row and column of ``obj``, :func:`frame_origin` of the canvas in its attrs + index
    (:func:`ptychozarr.io.store.write_frame`)."""
    frame = CanvasFrame.from_attrs(obj.attrs["canvas"])
    write_frame(node, frame.shape, pixel_size_m, frame_origin(frame))
