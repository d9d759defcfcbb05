"""Infer and stitch, lazily or computed once into Zarr (``store=``): the package's ``infer`` and ``stitch``.

A lazy graph is recomputed by every computation that reads it. :func:`ptychozarr.evaluate` streams its
inputs in several passes (statistics, pointwise, SSIM, each MS-SSIM level, each FRC), so an object that
is still a graph over the model runs the model again in each pass. With ``store=``, :func:`infer` and
:func:`stitch` compute their result once, write it (the patches by block, the object by tile) and
return lazy arrays read from the store, as :func:`xarray.open_zarr` does: what follows reads the
store and never recomputes the stage. Without ``store`` they return the lazy graph, as
:func:`ptychozarr.inference.infer` and :func:`ptychozarr.stitch.stitch` do.

A store written so has the layout of an arm of a compare run (``arms/<arm>/`` of its ``store.zarr``)::

    patches/patches      (patch, crop_y, crop_x) complex64, one chunk per block of model inputs
    patches/positions    (patch, xy) float64, (x, y) in object pixels
    patches/weights      (patch,) float64
    object               (object_y, object_x) complex64 in tiles; attrs: canvas, tile, patch_size
    object_y, object_x   object pixels of the object's rows and columns (the canvas origin + index)

with consolidated metadata, so ``xarray.open_datatree(store, engine="zarr")`` opens it as it opens a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ptychozarr import inference
from ptychozarr import stitch as _stitch
from ptychozarr.errors import InvalidParameterError, StoreError
from ptychozarr.io import consolidate, mark_complete
from ptychozarr.io.store import array_options
from ptychozarr.models import Model
from ptychozarr.stages.stitch import DIMS as OBJECT_DIMS
from ptychozarr.stages.stitch import write_object

__all__ = ["infer", "stitch"]

_PATCH_ARRAYS = ("patches", "positions", "weights")

Store = str | os.PathLike | zarr.Group


def infer(
    ds: xr.Dataset,
    groups: xr.Dataset,
    model: str | Path | Model,
    crop: int = 20,
    block_groups: int = 256,
    batch_size: int = 32,
    tf_threads: int | None = None,
    *,
    trust_bundle: bool = False,
    store: Store | None = None,
    overwrite: bool = False,
) -> xr.Dataset:
    """Predict cropped object patches blockwise; with ``store``, computed once and read back from Zarr.

    Parameters
    ----------
    ds, groups, model, crop, block_groups, batch_size, tf_threads, trust_bundle
        As for :func:`ptychozarr.inference.infer`.
    store : str, PathLike or zarr.Group, optional
        A Zarr v3 group (created when missing) to write the patches into, as its group ``patches``.
    overwrite : bool
        Replace patches already in ``store``, and the object stitched from them.

    Returns
    -------
    xarray.Dataset
        ``patches`` (patch, crop_y, crop_x), ``positions`` (patch, xy), ``weights`` (patch) and the
        attrs of :func:`ptychozarr.inference.infer`: a lazy graph without ``store``, else arrays read
        from the store.
    """
    result = inference.infer(
        ds, groups, model, crop, block_groups, batch_size, tf_threads, trust_bundle=trust_bundle
    )
    if store is None:
        return result
    root = _open(store)
    if "patches" in root:
        if not overwrite:
            raise StoreError(f"{_where(root)} already holds patches; pass overwrite=True or another store")
        for name in ("patches", "object", *OBJECT_DIMS):
            if name in root:
                del root[name]
    node = root.create_group("patches", attributes={"complete": False})
    patches = result["patches"].data
    target = node.create_array(
        "patches", shape=patches.shape, dtype=np.complex64, chunks=(patches.chunks[0][0], *patches.shape[1:]),
        dimension_names=result["patches"].dims, **array_options(),
    )  # fmt: skip
    for name in _PATCH_ARRAYS[1:]:
        values = result[name]
        node.create_array(name, data=values.values, dimension_names=values.dims, **array_options())
    da.store(patches, target, lock=False)
    mark_complete(node, **result.attrs)
    consolidate(root.store)
    variables = {name: (result[name].dims, da.from_zarr(node[name])) for name in _PATCH_ARRAYS}
    return xr.Dataset(variables, coords=result.coords, attrs=result.attrs)


def stitch(
    patches,
    positions=None,
    weights=None,
    *,
    tile: int = 1024,
    canvas: _stitch.CanvasFrame | tuple | None = None,
    block: int | None = None,
    store: Store | None = None,
    overwrite: bool = False,
) -> tuple[da.Array, _stitch.CanvasFrame]:
    """Stitch cropped patches into one object; with ``store``, computed once and read back from Zarr.

    Parameters
    ----------
    patches : array_like, dask.array.Array or xarray.Dataset
        ``(n, M, M)`` crops, or the dataset :func:`infer` returns (its ``patches``, ``positions`` and
        ``weights``; then give neither ``positions`` nor ``weights``).
    positions, weights, tile, canvas, block
        As for :func:`ptychozarr.stitch.stitch`.
    store : str, PathLike or zarr.Group, optional
        A Zarr v3 group (created when missing) to write the object into, as ``object`` in tiles with its
        coordinates ``object_y`` and ``object_x``.
    overwrite : bool
        Replace an object already in ``store``.

    Returns
    -------
    object : dask.array.Array
        ``(rows, cols)`` complex64 in tiles: a lazy graph without ``store``, else read from the store.
    frame : CanvasFrame
        The canvas ↔ object mapping.
    """
    if isinstance(patches, xr.Dataset):
        if positions is not None or weights is not None:
            raise InvalidParameterError(
                "stitch(dataset): positions and weights come from the dataset; do not pass them as well"
            )
        patches, positions, weights = (patches[name] for name in _PATCH_ARRAYS)
        patches, positions, weights = patches.data, positions.values, weights.values
    elif positions is None:
        raise InvalidParameterError("stitch needs positions: (n, 2) in (x, y) order, or the dataset of infer")
    if store is None:
        return _stitch.stitch(patches, positions, weights, tile=tile, canvas=canvas, block=block)
    root = _open(store)
    out = write_object(
        root, patches, positions, weights, tile=tile, canvas=canvas, block=block, overwrite=overwrite
    )
    consolidate(root.store)
    return da.from_zarr(out), _stitch.CanvasFrame.from_attrs(out.attrs["canvas"])


def _open(store: Store) -> zarr.Group:
    """The group to write into, opened past any consolidated metadata (which this write makes stale)."""
    if isinstance(store, zarr.Group):
        return zarr.open_group(store.store, path=store.path, mode="a", zarr_format=3, use_consolidated=False)
    return zarr.open_group(zarr.storage.LocalStore(store), mode="a", zarr_format=3, use_consolidated=False)


def _where(group: zarr.Group) -> str:
    return f"Zarr group {group.path or '/'!r} of {group.store}"
