"""Infer and stitch, lazily or computed once into Zarr (``store=``): the package's ``infer`` and ``stitch``.

A lazy graph is recomputed by every computation that reads it. :func:`ptychozarr.evaluate` streams its
inputs in several passes (statistics, pointwise, SSIM, each MS-SSIM level, each FRC), so an object that
is still a graph over the model runs the model again in each pass. With ``store=``, :func:`infer` and
:func:`stitch` compute their result once, write it (the patches by block, the object by tile) and
return lazy arrays read from the store, as :func:`xarray.open_zarr` does: what follows reads the
store and never recomputes the stage. Without ``store`` they return the lazy graph.

A store is reused as a compare run reuses its stages: a complete result made from the same inputs
(content fingerprints: the model's files, the groups' digest, the patches' stage or bytes; never a path)
and parameters is returned as it is, without computing anything; a result made otherwise is refused,
with ``overwrite=True`` as the fix.

A store written so has the layout of an arm of a compare run (``arms/<arm>/`` of its ``store.zarr``)::

    patches/patches      (patch, crop_y, crop_x) complex64, one chunk per block of model inputs
    patches/positions    (patch, xy) float64, (x, y) in object pixels
    patches/weights      (patch,) float64
    object               (object_y, object_x) complex64 in tiles; attrs: canvas, tile, patch_size
    object_y, object_x   object pixels of the object's rows and columns (int64, units: pixel)

with consolidated metadata, so ``xarray.open_datatree(store, engine="zarr")`` opens it as it opens a run.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from ptychozarr import inference
from ptychozarr import stitch as _stitch
from ptychozarr.errors import InvalidParameterError, StoreError
from ptychozarr.io import consolidate, mark_complete
from ptychozarr.io.store import FRAME_VERSION, array_options, holds_result, zarr_source
from ptychozarr.models import Model, model_file
from ptychozarr.report.runjson import to_jsonable
from ptychozarr.stages._common import fingerprint, groups_key
from ptychozarr.stages.stitch import DIMS as OBJECT_DIMS
from ptychozarr.stages.stitch import frame_origin, write_object

__all__ = ["Store", "infer", "stitch"]

_PATCH_ARRAYS = ("patches", "positions", "weights")
_OBJECT_ARRAYS = ("object", *OBJECT_DIMS, *(f"{dim}_m" for dim in OBJECT_DIMS))
_OBJECT_ATTRS = ("canvas", "tile", "patch_size")
_DIGEST_BYTES = 64 * 2**20  # bytes hashed at once when fingerprinting stored patches

Store = str | os.PathLike | zarr.Group
"""Where ``store=`` writes: a folder (a local Zarr v3 store) or a Zarr group."""

ArrayInput = np.ndarray | da.Array | zarr.Array


def infer(
    ds: xr.Dataset,
    groups: xr.Dataset,
    model: str | os.PathLike | Model,
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
        Patches it holds already, complete and made with the same model files, groups and parameters,
        are returned without running the model.
    overwrite : bool
        Compute again and replace patches already in ``store`` (and the object stitched from them),
        whatever made them.

    Returns
    -------
    xarray.Dataset
        ``patches`` (patch, crop_y, crop_x), ``positions`` (patch, xy), ``weights`` (patch) and the
        attrs of :func:`ptychozarr.inference.infer`: a lazy graph without ``store``, else arrays read
        from the store.

    Raises
    ------
    StoreError
        ``store`` holds patches made otherwise, and ``overwrite`` is false.
    """
    predict = functools.partial(
        inference.infer, ds, groups, model, crop, block_groups, batch_size, tf_threads,
        trust_bundle=trust_bundle,
    )  # fmt: skip
    if store is None:
        return predict()
    root = _open(store)
    params = {
        "model": _model_key(model),
        "crop": crop,
        "block_groups": block_groups,
        "batch_size": batch_size,
        "groups": groups_key(groups),
    }
    if overwrite or params["model"] is None or not _holds(root, "patches", params):
        _clear(root, "patches", overwrite, what="patches")
        _write_patches(root, predict(), params)
    return _read_patches(root["patches"])


def stitch(
    patches: xr.Dataset | ArrayInput,
    positions: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    tile: int = 1024,
    canvas: _stitch.CanvasFrame | tuple | None = None,
    block: int | None = None,
    store: Store | None = None,
    overwrite: bool = False,
) -> xr.DataArray:
    """Stitch cropped patches into one object on the object frame; with ``store``, computed once.

    Patches read from a Zarr array (those :func:`infer` returns with ``store=``, or a ``zarr.Array``)
    are read by the tile tasks themselves, so memory does not grow with the scan.

    Parameters
    ----------
    patches : xarray.Dataset, array_like, dask.array.Array or zarr.Array
        ``(n, M, M)`` crops, or the dataset :func:`infer` returns (its ``patches``, ``positions`` and
        ``weights``; then give neither ``positions`` nor ``weights``).
    positions, weights, tile, canvas, block
        As for :func:`ptychozarr.stitch.stitch`.
    store : str, PathLike or zarr.Group, optional
        A Zarr v3 group (created when missing) to write the object into, as ``object`` in tiles with its
        coordinates ``object_y`` and ``object_x``. An object it holds already, complete and stitched from
        the same patches (their stage's parameters, or their bytes), positions, weights and parameters,
        is returned without stitching.
    overwrite : bool
        Stitch again and replace an object already in ``store``, whatever made it.

    Returns
    -------
    xarray.DataArray
        ``(object_y, object_x)`` complex64, dask-backed in tiles (a lazy graph without ``store``, else read
        from the store), with coordinates ``object_y`` and ``object_x``: the object pixel of each row and
        column (the canvas origin rounded to the nearest pixel, plus the index; ``units: pixel``), and
        attrs ``canvas`` (the exact frame: ``origin_yx``, ``shape``; :meth:`CanvasFrame.from_attrs`),
        ``tile`` and ``patch_size``.

    Raises
    ------
    StoreError
        ``store`` holds an object made otherwise, and ``overwrite`` is false.
    """
    patches, positions, weights = _stitch_inputs(patches, positions, weights)
    if store is None:
        data, frame = _stitch.stitch(patches, positions, weights, tile=tile, canvas=canvas, block=block)
        attrs = {"canvas": frame.to_attrs(), "tile": tile, "patch_size": int(patches.shape[-1])}
        return _object_array(data, attrs)
    root = _open(store)
    params = {
        "patches": _patches_key(patches),
        "positions": _digest(np.asarray(positions, np.float64)),
        "weights": None if weights is None else _digest(np.asarray(weights, np.float64)),
        "tile": tile,
        "canvas": canvas.to_attrs() if isinstance(canvas, _stitch.CanvasFrame) else canvas,
        "block": block,
        "frame": FRAME_VERSION,
    }
    if overwrite or not _holds(root, "object", params):
        _clear(root, "object", overwrite, what="an object")
        write_object(
            root, patches, positions, weights, tile=tile, canvas=canvas, block=block,
            attrs={"params": to_jsonable(params)}, overwrite=True,
        )  # fmt: skip
        consolidate(root.store)
    stored = root["object"]
    return _object_array(da.from_zarr(stored), {k: stored.attrs[k] for k in _OBJECT_ATTRS})


def _stitch_inputs(patches, positions, weights) -> tuple[ArrayInput, np.ndarray, np.ndarray | None]:
    """``(patches, positions, weights)`` from a dataset of :func:`infer` or the three arrays; patches
    that are a dask view of a whole Zarr array are that Zarr array (the flat, tile-reads-its-patches
    path of :func:`ptychozarr.stitch.stitch`)."""
    if isinstance(patches, xr.Dataset):
        if positions is not None or weights is not None:
            raise InvalidParameterError(
                "stitch(dataset): positions and weights come from the dataset; do not pass them as well"
            )
        patches, positions, weights = (patches[name] for name in _PATCH_ARRAYS)
        patches, positions, weights = patches.data, positions.values, weights.values
    elif positions is None:
        raise InvalidParameterError("stitch needs positions: (n, 2) in (x, y) order, or the dataset of infer")
    stored = zarr_source(patches)
    return (patches if stored is None else stored), positions, weights


def _object_array(data: da.Array, attrs: Mapping[str, Any]) -> xr.DataArray:
    """A stitched object as a DataArray on the object frame, its coordinates from its canvas."""
    frame = _stitch.CanvasFrame.from_attrs(attrs["canvas"])
    coords = {
        dim: (dim, np.arange(start, start + size, dtype=np.int64), {"units": "pixel"})
        for dim, start, size in zip(OBJECT_DIMS, frame_origin(frame), frame.shape, strict=True)
    }
    return xr.DataArray(data, dims=OBJECT_DIMS, coords=coords, attrs=dict(attrs), name="object")


def _write_patches(root: zarr.Group, result: xr.Dataset, params: dict) -> None:
    """Write the patches of :func:`ptychozarr.inference.infer` into ``root/patches``, block by block."""
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
    mark_complete(node, params=to_jsonable(params), **result.attrs)
    consolidate(root.store)


def _read_patches(node: zarr.Group) -> xr.Dataset:
    """The stored patches as the dataset :func:`infer` returns, read lazily from the store."""
    variables = {
        name: (node[name].metadata.dimension_names, da.from_zarr(node[name])) for name in _PATCH_ARRAYS
    }
    attrs = {k: v for k, v in node.attrs.items() if k not in ("complete", "params")}
    return xr.Dataset(variables, coords={"xy": ["x", "y"]}, attrs=attrs)


def _holds(root: zarr.Group, name: str, params: dict) -> bool:
    """The one reuse rule (:func:`ptychozarr.io.store.holds_result`): ``root/name`` is complete, made
    with ``params`` and holds every chunk."""
    return holds_result(root.get(name), to_jsonable(params))


def _clear(root: zarr.Group, name: str, overwrite: bool, *, what: str) -> None:
    """Make room for a new ``root/name``: refuse an existing one unless ``overwrite``; new patches also
    drop the object stitched from the old ones."""
    if name in root and not overwrite:
        raise StoreError(
            f"{_where(root)} already holds {what} made from other inputs or parameters; pass "
            "overwrite=True or another store"
        )
    for stale in (name, *(_OBJECT_ARRAYS if name == "patches" else _OBJECT_ARRAYS[1:])):
        if stale in root:
            del root[stale]


def _model_key(model: str | os.PathLike | Model) -> dict | None:
    """The content fingerprint of a model's files (a loaded model: the file it was read from); None for
    a model built in memory, whose patches are then never reused."""
    path = getattr(model, "path", None) if isinstance(model, Model) else model
    return None if path is None else fingerprint(model_file(path))


def _patches_key(patches: ArrayInput) -> dict:
    """What identifies patches: the parameters of the stage that stored them (a complete group of
    :func:`infer`), else their bytes (a dask graph: its token)."""
    if isinstance(patches, zarr.Array):
        parent = patches.path.rpartition("/")[0]
        group = zarr.open_group(patches.store, path=parent, mode="r", use_consolidated=False)
        if group.attrs.get("complete") is True and "params" in group.attrs:
            return {"stage": group.attrs["params"]}
    if isinstance(patches, da.Array):
        return {"dask": tokenize(patches)}
    return {"sha256": _digest(patches)}


def _digest(values: np.ndarray | zarr.Array) -> str:
    """SHA-256 of an array's shape, dtype and bytes, read in slabs along its first axis."""
    digest = hashlib.sha256(f"{values.dtype.str}{tuple(values.shape)}".encode())
    rows = max(1, _DIGEST_BYTES // max(1, values.dtype.itemsize * int(np.prod(values.shape[1:]))))
    for start in range(0, values.shape[0], rows):
        digest.update(np.ascontiguousarray(values[start : start + rows]).tobytes())
    return digest.hexdigest()


def _open(store: Store) -> zarr.Group:
    """The group to write into, opened past any consolidated metadata (which this write makes stale)."""
    if isinstance(store, zarr.Group):
        return zarr.open_group(store.store, path=store.path, mode="a", zarr_format=3, use_consolidated=False)
    return zarr.open_group(zarr.storage.LocalStore(store), mode="a", zarr_format=3, use_consolidated=False)


def _where(group: zarr.Group) -> str:
    return f"Zarr group {group.path or '/'!r} of {group.store}"
