"""Global, seeded neighbour groups and the diffraction normaliser (PtychoPINN's intensity scale).

Each scan point seeds one group. Its C = gridsize² members are drawn without replacement from its K
nearest neighbours, the point itself excluded (a ``cKDTree`` queried with K + 1, first hit dropped,
exactly as PtychoPINN), but with a seeded generator so that runs are reproducible, and over the whole
scan at once, never per chunk. With gridsize 1 each point is its own group.

Stored in ``groups/`` of the run's store: ``nn_indices`` (B, C) int32, ``centres`` (B, 2) float64 (mean
member position, (x, y)), ``offsets`` (B, C, 2) float64 = −(start position − start centre), PtychoPINN's
``coords_nominal``. The attrs hold ``gridsize``, ``k``, ``seed``, the input fingerprint and the normaliser

    f = sqrt((N/2)² / mean_{b,c} Σ_{h,w} d[nn[b,c]]²),

computed in float64 over the grouped stack (a pattern counts as often as it appears in groups) from Σ d² per
pattern weighted by multiplicity. Ingestion stores Σ d² (``data/intensity_sum``), so grouping never reads
the diffraction; for a store without it, the sums are streamed over the diffraction blocks.

Everything runs in store order. A store lays its patterns along a Hilbert curve of the positions
(:mod:`ptychozarr.io.order`), so group ``b`` is seeded by stored pattern ``b``: consecutive groups are close
in space and a block of them reads a few contiguous diffraction chunks. The neighbour draws are a function
of the store's order only, and the store is the same whatever the input's order, so the same scan shuffled
gives the same groups. Indices (``nn_indices``, ``points``) are store indices; ``input_index`` in the
store maps them to the input's.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

from ptychozarr.errors import InvalidParameterError, InvalidScanError
from ptychozarr.io import (
    mark_complete,
    open_store,
    pattern_intensity,
    replace_path,
    require_complete,
)
from ptychozarr.io.store import array_options, is_complete_with

__all__ = ["group", "neighbour_groups", "normaliser", "open_groups"]

_DIMS = {
    "nn_indices": ("group", "member"),
    "centres": ("group", "xy"),
    "offsets": ("group", "member", "xy"),
}
_ROWS_PER_CHUNK = 2**18


def neighbour_groups(x: np.ndarray, y: np.ndarray, gridsize: int, k: int = 7, seed: int = 0) -> np.ndarray:
    """Member indices of every point's group, ``(n, gridsize²)`` int32.

    Parameters
    ----------
    x, y : numpy.ndarray
        Scan positions (object pixels).
    gridsize : int
        Group side: C = gridsize² members. 1 makes each point its own group.
    k : int
        Neighbours to draw from (the point itself excluded); at least C.
    seed : int
        Seed of :func:`numpy.random.default_rng` for the draws.
    """
    n, members = len(x), gridsize**2
    if gridsize < 1:
        raise InvalidParameterError(f"gridsize={gridsize}: must be at least 1")
    if seed < 0:
        raise InvalidParameterError(f"seed={seed}: use a non-negative integer")
    if gridsize == 1:
        return np.arange(n, dtype=np.int32)[:, None]
    if k < members:
        raise InvalidParameterError(
            f"k={k} < gridsize²={members}: groups draw {members} distinct members from the k nearest "
            f"neighbours; pass k ≥ {members}"
        )
    if n < k + 1:
        raise InvalidParameterError(
            f"only {n} scan points: each point needs k={k} neighbours besides itself; "
            f"lower k (to at least {members}) or use a larger scan"
        )
    points = np.column_stack([x, y]).astype(np.float64)
    _, nearest = cKDTree(points).query(points, k=k + 1)
    rng = np.random.default_rng(seed)
    draw = np.argsort(rng.random((n, k)), axis=1)[:, :members]  # C of K without replacement, per row
    return np.take_along_axis(nearest[:, 1:], draw, axis=1).astype(np.int32)


def normaliser(diffraction, nn_indices: np.ndarray, intensity_sum: np.ndarray | None = None) -> float:
    """PtychoPINN's normaliser f over the grouped stack, computed in float64.

    Parameters
    ----------
    diffraction : dask.array.Array or numpy.ndarray
        (n, N, N) amplitudes. Read (streamed over its blocks) only when ``intensity_sum`` is not given.
    nn_indices : numpy.ndarray
        (B, C) member indices.
    intensity_sum : numpy.ndarray, optional
        (n,) Σ_hw d² of each pattern, as ingestion stores it (``data/intensity_sum``).
    """
    size = diffraction.shape[-1]
    if intensity_sum is None:
        blocks = da.asarray(diffraction).rechunk({1: -1, 2: -1})  # whole patterns per block
        intensity_sum = blocks.map_blocks(
            pattern_intensity, drop_axis=(1, 2), dtype=np.float64, meta=np.empty(0, np.float64)
        ).compute()
    multiplicity = np.bincount(nn_indices.ravel(), minlength=len(intensity_sum))
    total = float(multiplicity @ intensity_sum)
    if not total > 0:
        raise InvalidScanError("key 'diffraction': every grouped pattern is zero, so it cannot be normalised")
    return float(np.sqrt((size / 2) ** 2 * nn_indices.size / total))


def group(
    ds: xr.Dataset, gridsize: int, k: int = 7, seed: int = 0, points: np.ndarray | None = None
) -> xr.Dataset:
    """Group a scan and, when ``ds`` comes from a store, write the groups into its ``groups/``.

    Groups already in the store with the same ``gridsize``, ``k``, ``seed`` and input are reused.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`ptychozarr.open_dataset` (``attrs["store"]`` names the store; without it nothing is
        written).
    gridsize, k, seed
        As :func:`neighbour_groups`.
    points : array of int, optional
        Scan points to group (a subsample, e.g. compare's ``--n-test-subsample``), as store indices (store
        order, see the module docstring; ``input_index[points]`` are their input indices). Neighbours are
        found among them only, groups come in store order whatever the order of ``points``, and
        ``nn_indices`` keep the indices of the whole scan. All points when None.

    Returns
    -------
    xarray.Dataset
        ``nn_indices`` (group, member), ``centres`` (group, xy), ``offsets`` (group, member, xy), group
        ``b`` seeded by the ``b``-th chosen point in store order, with the parameters and ``normaliser``
        in ``attrs``.
    """
    params = {"gridsize": int(gridsize), "k": int(k), "seed": int(seed), "points": _points_key(points)}
    fingerprint = {"source_sha256": ds.attrs.get("source_sha256"), "n_points": int(ds.sizes["pattern"])}
    store = ds.attrs.get("store")
    wanted = {**params, "input": fingerprint}
    if store is not None and is_complete_with(open_store(store).get("groups"), wanted):
        return open_groups(store)
    x, y = ds["xcoords"].values, ds["ycoords"].values
    chosen = np.arange(len(x)) if points is None else np.sort(_check_points(points, len(x)))
    nn = chosen[neighbour_groups(x[chosen], y[chosen], gridsize, k, seed)].astype(np.int32)
    start = np.stack([ds["xcoords_start"].values, ds["ycoords_start"].values], axis=-1)[nn]
    arrays = {
        "nn_indices": nn,
        "centres": np.stack([x, y], axis=-1)[nn].mean(axis=1),
        "offsets": -(start - start.mean(axis=1, keepdims=True)),
    }
    sums = ds["intensity_sum"].values if "intensity_sum" in ds else None
    attrs = {**params, "normaliser": normaliser(ds["diffraction"].data, nn, sums), "input": fingerprint}
    if store is None:
        return _dataset({name: (_DIMS[name], value) for name, value in arrays.items()}, attrs)
    _write(Path(store), arrays, attrs)
    return open_groups(store)


def _points_key(points) -> dict | None:
    """A short fingerprint of a subsample (count and hash), None for the whole scan."""
    if points is None:
        return None
    chosen = np.ascontiguousarray(points, dtype=np.int64)
    return {"count": int(chosen.size), "sha256": hashlib.sha256(chosen.tobytes()).hexdigest()}


def _check_points(points, n: int) -> np.ndarray:
    chosen = np.asarray(points)
    if chosen.ndim != 1 or chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
        raise InvalidParameterError("points: give a non-empty 1-D array of scan point indices")
    if chosen.min() < 0 or chosen.max() >= n or np.unique(chosen).size != chosen.size:
        raise InvalidParameterError(f"points: indices must be distinct and in [0, {n}); got others")
    return chosen


def open_groups(store_path: str | Path) -> xr.Dataset:
    """The groups of a store, lazily (as :func:`group` returns them); ``StoreError`` if absent."""
    groups = require_complete(open_store(store_path), "groups")
    variables = {name: (_DIMS[name], da.from_zarr(groups[name])) for name in _DIMS}
    return _dataset(variables, {**groups.attrs, "store": str(store_path)})


def _dataset(variables: dict, attrs: dict) -> xr.Dataset:
    return xr.Dataset(variables, coords={"xy": ["x", "y"]}, attrs=attrs)


def _write(store: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write the groups under a temporary name, mark them complete, then rename them to ``groups``."""
    name = f"groups-partial-{uuid.uuid4().hex[:8]}"
    staging = open_store(store, mode="r+").create_group(name)
    try:
        for key, value in arrays.items():
            staging.create_array(
                key,
                data=value,
                chunks=(min(len(value), _ROWS_PER_CHUNK), *value.shape[1:]),
                dimension_names=_DIMS[key],
                **array_options(),
            )
        mark_complete(staging, **attrs)
        replace_path(store / name, store / "groups")
    finally:
        if (store / name).exists():
            shutil.rmtree(store / name)
