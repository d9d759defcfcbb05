"""Lazy, tile-owned scatter-add stitching of cropped patches into one object.

Semantics are those of PtychoPINN's ``reassemble_position``: a crop pixel ``(i, j)`` of a
patch whose top-left lands at canvas ``(s_y, s_x) = k + f`` (``k`` integer, ``f`` in ``[0, 1)``) adds
its value with bilinear weights ``(1-f_y)(1-f_x), (1-f_y)f_x, f_y(1-f_x), f_y f_x`` to canvas
``(i + k_y + {0, 1}, j + k_x + {0, 1})``; taps outside the canvas are dropped; the same taps of a unit
patch make the weight, and the result is ``num / (den + 1e-9)`` as complex64.

Design: every tile reads the patches that touch it straight from where they are stored, sums them and
writes itself. In words::

    positions (host, small) ── which tiles does each patch's (M+1)² footprint meet?
          │                    → per tile: its patches as runs of consecutive indices, with placements
          ▼
    patches in the store       ├── chunk 0 ──┼── chunk 1 ──┼── chunk 2 ──┼── …    (curve order: a
    (Zarr, curve order)           ▓▓▓▓  ▓▓▓      ▓▓             ▓▓▓▓▓             tile's patches are
          │                       └─ tile a ─┘   └ tile a ┘     └ tile b ┘        a few runs)
          ▼
    tile a: read its runs (one read per chunk they lie in) → sort → splat → divide → write chunk a
    tile b: …                                                          (one task each, no other layer)
    tile d: no patch touches it → a chunk of zeros, written all the same

- **Index.** The canvas is cut into ``tile × tile`` pieces, the chunks of the returned dask array (and
  of the Zarr array :func:`stitch_to_zarr` writes). A patch's footprint, with the extra row and column of
  the bilinear tap, is ``(M+1) × (M+1)`` pixels from ``k``; binning its two corners by ``tile`` gives
  the tiles it meets (up to four when ``tile > M``). This is computed once on the host from the
  positions: per tile, the sorted indices of its patches as runs ``[a, b)`` and each patch's shift and
  weight (24 bytes per patch and tile it meets, kept in the graph).
- **One task per tile.** A *tile* task reads its patches: from a Zarr array, one read per stored chunk
  that its runs touch (runs in one chunk, with whatever gaps between them, are one call that selects just
  their rows, so a task decodes each chunk at most once and holds one at a time); from a numpy array, a
  plain take; from a dask array, the task depends on the input blocks its runs lie in. It then orders
  its patches by their placement in the tile (then, for equal placements, by their bytes), spreads each
  patch's four taps over its ``(M+1)²`` footprint and adds them with ``np.add.at`` (unbuffered, in index
  order) into a float64 real, imaginary and weight sum over the bounding box of its patches, divides,
  and (in :func:`stitch_to_zarr`) writes the tile as its chunk. The order of every sum is fixed by the
  data alone, so any permutation of the patches, and any way of storing or blocking them, gives a
  bitwise-identical canvas on any scheduler.
- **Memory.** A tile task holds its patches (about ``coverage · (tile+M+1)² · 8`` bytes), one decoded
  chunk while reading, its sums (24 bytes per tile pixel) and one scatter batch, then the tile while
  writing. Nothing passes between tasks: no route pieces, no partial canvases, so peak memory does not
  depend on the number of patches or their order (an earlier design routed crops to the tiles through
  dask; in random order they all waited in memory). The price of random order is time: every tile then
  decodes most chunks of the patches. The patches the pipeline writes are in curve order, where a
  tile's patches lie in a few chunks. :func:`task_memory` projects a tile task from the constants below.
  A dask input is not flat in this way: its blocks stay in memory until the last tile that needs them.
- **One writer per chunk.** :func:`stitch_to_zarr` writes every tile as exactly one full Zarr chunk,
  tiles no patch touches included (zeros), so that a missing chunk means a lost write, never the fill
  value; it sets ``complete`` only after the last chunk.

Positions are object pixels in ``(x, y)`` order, as PtychoPINN's; crop pixel ``(i, j)`` of a patch at
``(x, y)`` sees object pixel ``(y + i - M/2, x + j - M/2)``. :class:`CanvasFrame` maps canvas indices
to that object grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError
from ptychozarr.io.store import array_options

__all__ = ["CanvasFrame", "object_grid", "stitch", "stitch_to_zarr", "task_memory"]

_EPS = 1e-9  # added to the weight before dividing, as reassemble_position does
_VALUES_PER_BATCH = 2**17  # footprint pixels scattered at once inside one tile task
_PATCH_BYTES = 8  # bytes per crop pixel (complex64, the patches the engine writes)
_INDEX_BYTES = 4 * 8  # per patch of a tile: its index, shift (2 × float64) and weight, float64
_PLACEMENT_BYTES = 5 * 8  # per patch while summing: integer corner (2 × int64), fraction (2), weight
_READ_BYTES = 6 * _PATCH_BYTES  # per crop pixel of a chunk read: the encoded, checked and decoded copies
_SUM_BYTES = 3 * 8  # per tile pixel: real, imaginary and weight sums, float64
_FINISH_BYTES = _SUM_BYTES + 3 * 8  # … and, while dividing, the shifted weight, a quotient, the result
_BATCH_BYTES = 12 * 8  # per footprint value of a batch: index, weight, taps, spreads, masked copies
_WRITE_BYTES = 6 * _PATCH_BYTES  # per tile pixel while writing: the tile and its copies through the codecs


@dataclass(frozen=True)
class CanvasFrame:
    """Where a stitched canvas sits on the object grid.

    Parameters
    ----------
    origin : tuple of float
        Object ``(y, x)`` of canvas pixel ``(0, 0)``.
    shape : tuple of int
        Canvas ``(rows, columns)``.
    """

    origin: tuple[float, float]
    shape: tuple[int, int]

    def to_object(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Object ``(y, x)`` of canvas indices ``(rows, cols)`` (scalars or arrays)."""
        return np.asarray(rows) + self.origin[0], np.asarray(cols) + self.origin[1]

    def to_canvas(self, y, x) -> tuple[np.ndarray, np.ndarray]:
        """Canvas ``(row, col)``, fractional, of object coordinates ``(y, x)``."""
        return np.asarray(y) - self.origin[0], np.asarray(x) - self.origin[1]

    def to_attrs(self) -> dict:
        """JSON-ready form, for Zarr attributes."""
        return {"origin_yx": [float(v) for v in self.origin], "shape": [int(v) for v in self.shape]}

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> CanvasFrame:
        """Inverse of :meth:`to_attrs`."""
        y0, x0 = attrs["origin_yx"]
        rows, cols = attrs["shape"]
        return cls((float(y0), float(x0)), (int(rows), int(cols)))


@dataclass(frozen=True)
class _Plan:
    """A stitched canvas as tile tasks: where the patches are and, per tile, which of them it sums."""

    frame: CanvasFrame
    tile: int
    patch_size: int
    n_patches: int
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    token: str
    source: dict  # graph entries of the patches (a Zarr or numpy array under one key), may be empty
    dependencies: tuple  # collections the tile tasks depend on (a dask input)
    tiles: dict  # (ty, tx) → (source argument, block offsets or None, starts, stops, shifts, weights)

    def graph(self, name: str, target: zarr.Array | None = None) -> dict:
        """One task per tile, ``(name, ty, tx)``: the tile itself, or (with ``target``) its write."""
        dsk = dict(self.source)
        empty = (None, None, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0))
        for ty, th in enumerate(self.chunks[0]):
            for tx, tw in enumerate(self.chunks[1]):
                args = self.tiles.get((ty, tx), empty)
                corner = (ty * self.tile, tx * self.tile)
                dsk[(name, ty, tx)] = (_tile, *args, corner, (th, tw), target)
        return dsk


def stitch(
    patches,
    positions,
    weights=None,
    *,
    tile: int = 1024,
    canvas: CanvasFrame | tuple | None = None,
    block: int | None = None,
) -> tuple[da.Array, CanvasFrame]:
    """Stitch cropped patches into one complex object, lazily and tile by tile.

    Parameters
    ----------
    patches : zarr.Array, array_like or dask.array.Array
        ``(n, M, M)`` complex crops, ``M`` even. Each tile task reads its own patches from a Zarr array
        (best in curve order, as the pipeline stores them) or a numpy array; with a dask array, a tile
        task depends on the input blocks that hold its patches.
    positions : array_like
        ``(n, 2)`` scan positions in object pixels, ``(x, y)`` order.
    weights : array_like, optional
        ``(n,)`` non-negative multiplicities; each patch counts this many times, in the numerator, the
        weight and the canvas centre. Ones (the default) give ``reassemble_position``. Patches of weight 0
        are left out.
    tile : int
        Side of the square canvas tiles, which are the chunks of the result.
    canvas : CanvasFrame, ((y0, x0), (rows, cols)) or "object", optional
        An explicit canvas on the object grid: crop pixel ``(i, j)`` of a patch at ``(x, y)`` lands at
        canvas ``(y + i - M/2 - y0, x + j - M/2 - x0)``; ``"object"``: :func:`object_grid`, the
        smallest such canvas with a whole-pixel origin. When omitted, the canvas is PtychoPINN's:
        positions cast to float32, centred on their float32 mean ``com`` (weighted by ``weights``),
        ``pad`` the ceiling of the largest ``|position - com|`` rounded up to even, square side
        ``P = M + 2·pad``.
    block : int, optional
        Patches per block of a dask input (it is rechunked to this along ``n``; by default its own
        blocks are kept). Zarr and numpy inputs are read as they are stored, and ignore it.

    Returns
    -------
    object : dask.array.Array
        ``(rows, cols)`` complex64, chunked in tiles.
    frame : CanvasFrame
        The canvas ↔ object mapping (``reassemble_position``'s canvas in the default mode).

    Notes
    -----
    Numerators accumulate in float64, so results agree with PtychoPINN's float32 TensorFlow
    implementation to float32 precision. The centre of mass is the exactly summed (weighted) mean of
    the float32 positions, rounded to float32, so that it does not depend on the order of the patches;
    ``tf.reduce_mean`` sums in float32 in input order and may differ in its last bit (a placement
    difference of about 1e-5 px). Integer weights thus give the canvas of the stack in which each patch
    is repeated that many times (a gridsize-1 arm's distinct patterns stand for the full ``B·C`` stack).
    The result is bitwise independent of the order of the patches and of their blocks (module
    docstring).
    """
    plan = _plan(patches, positions, weights, tile=tile, canvas=canvas, block=block)
    name = f"stitch-tile-{plan.token}"
    graph = HighLevelGraph.from_collections(name, plan.graph(name), dependencies=plan.dependencies)
    array = da.Array(graph, name, plan.chunks, meta=np.empty((0, 0), dtype=np.complex64))
    return array, plan.frame


def stitch_to_zarr(
    group: zarr.Group,
    name: str,
    patches,
    positions,
    weights=None,
    *,
    tile: int = 1024,
    canvas: CanvasFrame | tuple | None = None,
    block: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    dimension_names: tuple[str, str] | None = None,
) -> zarr.Array:
    """Stitch (as :func:`stitch`) straight into a Zarr v3 array chunked in tiles.

    Every tile is computed and written as exactly one whole chunk by one task, which reads its patches,
    sums them and writes; tiles no patch touches are written too (zeros: the array keeps empty chunks),
    so every chunk of a complete array is stored. The array is not sharded (chunks are tiles), so no two
    writers ever share a stored object. The array's attributes carry the canvas frame (``canvas``),
    ``tile``, ``patch_size``, ``n_patches`` and ``attrs``; ``complete`` is set to true only after the
    last chunk is written.

    Parameters
    ----------
    group : zarr.Group
        Where to create the array.
    name : str
        Array name inside ``group`` (e.g. ``"object"``).
    patches, positions, weights, tile, canvas, block
        As for :func:`stitch`. Pass the stored patches as the ``zarr.Array`` itself (not
        ``da.from_zarr`` of it): tile tasks then read them, and memory does not grow with the scan.
    attrs : mapping, optional
        More attributes to record (stage parameters, input fingerprint).
    overwrite : bool
        Replace an existing array of that name.
    dimension_names : (str, str), optional
        Names of the row and column dimensions (e.g. ``("y", "x")``), stored in the Zarr metadata so
        that xarray opens the array with named dimensions.

    Returns
    -------
    zarr.Array
        The written array.
    """
    if name in group and not overwrite:
        raise StoreError(
            f"{name!r} already exists in Zarr group {group.path or '/'!r}; pass overwrite=True to replace it"
        )
    if dimension_names is not None and (
        len(dimension_names) != 2 or not all(isinstance(d, str) for d in dimension_names)
    ):
        raise InvalidParameterError(
            f"dimension_names={dimension_names!r}: expected two strings, e.g. ('y', 'x')"
        )
    plan = _plan(patches, positions, weights, tile=tile, canvas=canvas, block=block)
    out = group.create_array(
        name,
        shape=plan.frame.shape,
        chunks=(plan.tile, plan.tile),
        dtype=np.complex64,
        fill_value=0,
        overwrite=overwrite,
        dimension_names=dimension_names,
        **array_options(),
        attributes={
            **dict(attrs or {}),
            "canvas": plan.frame.to_attrs(),
            "tile": plan.tile,
            "patch_size": plan.patch_size,
            "n_patches": plan.n_patches,
            "complete": False,
        },
    )
    tiles = "stitch-tile-" + tokenize(plan.token, str(out.store_path))
    dsk = plan.graph(tiles, out)
    done = "stitch-done-" + tokenize(tiles)
    dsk[done] = (len, [key for key in dsk if isinstance(key, tuple)])
    Delayed(done, HighLevelGraph.from_collections(done, dsk, dependencies=plan.dependencies)).compute()
    out.attrs["complete"] = True
    return out


def task_memory(*, patch_size: int, tile: int, block_patches: int, coverage: float = 4.0) -> dict[str, int]:
    """Projected peak host memory of one task of each kind in the stitch graph, in bytes.

    Parameters
    ----------
    patch_size : int
        Crop side ``M`` (complex64 crops, as the engine writes them).
    tile : int
        Canvas tile side.
    block_patches : int
        Patches per stored chunk of the patches (a read decodes a whole chunk).
    coverage : float
        Mean number of patches over a canvas pixel where the scan lies (``n·M²`` over the scanned area;
        a raster at a step of ``M/2`` gives 4). A tile task holds the patches that meet its tile.

    Returns
    -------
    dict of str to int
        ``stitch-tile``, the only kind: the task's index and patches, with the largest of what it holds
        beside them while it reads (one decoded chunk, its encoded bytes and the rows taken from it),
        sums (the tile's sums and one scatter batch) and divides; or, once the patches are freed, the
        tile and its encoded copies while it is written. It does not depend on the number of patches.
    """
    _check_count("patch_size", patch_size, "the crop side M")
    _check_count("tile", tile, "the tile side")
    _check_count("block_patches", block_patches, "patches per stored chunk")
    if not (isinstance(coverage, (int, float)) and math.isfinite(coverage) and coverage > 0):
        raise InvalidParameterError(f"coverage={coverage!r}: must be a positive number of patches per pixel")
    crop = patch_size * patch_size * _PATCH_BYTES
    area = tile * tile
    near = coverage * (tile + patch_size + 1) ** 2 / patch_size**2  # patches whose footprint meets a tile
    batch = min(_VALUES_PER_BATCH, math.ceil(near) * (patch_size + 1) ** 2)
    held = near * (crop + _INDEX_BYTES)
    reading = block_patches * patch_size**2 * _READ_BYTES + min(block_patches, near) * crop
    summing = near * _PLACEMENT_BYTES + max(_SUM_BYTES * area + _BATCH_BYTES * batch, _FINISH_BYTES * area)
    return {"stitch-tile": math.ceil(max(held + max(reading, summing), _WRITE_BYTES * area))}


# --------------------------------------------------------------------------- planning (host, small)


def _plan(patches, positions, weights, *, tile, canvas, block) -> _Plan:
    patches, m = _as_patches(patches, block)
    n = patches.shape[0]
    pos = _as_positions(positions, n)
    w = _as_weights(weights, n)
    tile = _check_count("tile", tile, "the tile side (e.g. 1024)")
    shift, frame = _shifts(pos, w, m, canvas)
    rows, cols = frame.shape
    chunks = (_tile_chunks(rows, tile), _tile_chunks(cols, tile))
    if isinstance(patches, da.Array):
        token = tokenize(patches.name, shift, w, tile, frame)
        offsets = np.cumsum((0, *patches.chunks[0]))
        source, dependencies = {}, (patches,)
    else:
        token = tokenize(patches, shift, w, tile, frame)
        key = f"stitch-patches-{token}"
        source, dependencies = {key: patches}, ()
    tiles = {}
    for ty, tx, idx in _tile_index(np.floor(shift).astype(np.int64), w, m, tile, (rows, cols)):
        cut = np.flatnonzero(np.diff(idx) != 1) + 1
        starts, stops = idx[np.r_[0, cut]], idx[np.r_[cut - 1, len(idx) - 1]] + 1
        if source:
            where, first = key, None
        else:  # the input blocks that hold the tile's patches, and the index of each one's first patch
            blocks = np.unique(np.searchsorted(offsets, idx, side="right") - 1)
            where, first = [(patches.name, int(b), 0, 0) for b in blocks], offsets[blocks]
        tiles[ty, tx] = (where, first, starts, stops, shift[idx], w[idx])
    return _Plan(frame, tile, m, n, chunks, token, source, dependencies, tiles)


def _as_patches(patches, block):
    """Patches as a Zarr array, a numpy array or a dask array blocked along ``n`` only; and ``M``."""
    if block is not None:
        _check_count("block", block, "patches per block")
    if isinstance(patches, da.Array):
        if np.isnan(patches.shape).any():
            raise InvalidParameterError(
                "patches have unknown block sizes; call patches.compute_chunk_sizes() before stitching"
            )
    elif not isinstance(patches, zarr.Array):
        patches = np.asarray(patches)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        raise InvalidParameterError(
            f"patches have shape {patches.shape}; expected (n, M, M) square crops (crop them first)"
        )
    n, m = patches.shape[0], patches.shape[1]
    if n == 0 or m == 0:
        raise InvalidParameterError(f"patches have shape {patches.shape}: nothing to stitch")
    if m % 2:
        raise InvalidParameterError(
            f"crop size M={m} is odd; reassemble_position needs an even M (its crop N/2−M/2:N/2+M/2 "
            "is M−1 wide for odd M): use an even stitch crop size"
        )
    if not (np.issubdtype(patches.dtype, np.complexfloating) or np.issubdtype(patches.dtype, np.floating)):
        raise InvalidParameterError(f"patches have dtype {patches.dtype}; expected complex (or real) floats")
    if isinstance(patches, da.Array):
        patches = patches.rechunk((block or patches.chunks[0], m, m))
    return patches, m


def _check_count(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidParameterError(f"{name}={value!r}: {what} must be an integer ≥ 1")
    return int(value)


def _as_positions(positions, n: int) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n, 2):
        raise InvalidParameterError(
            f"positions have shape {pos.shape} but there are {n} patches; expected ({n}, 2) in (x, y) order"
        )
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise InvalidScanError(
            f"positions hold NaN or infinite values at {int(bad.sum())} patches (first: index "
            f"{int(np.argmax(bad))}); drop those patches or fix the scan coordinates"
        )
    return pos


def _as_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise InvalidParameterError(f"weights have shape {w.shape}; expected ({n},), one per patch")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InvalidParameterError("weights must be finite and ≥ 0 (a patch's multiplicity)")
    return w


def _shifts(pos: np.ndarray, w: np.ndarray, m: int, canvas) -> tuple[np.ndarray, CanvasFrame]:
    """Canvas ``(row, col)`` of each patch's top-left crop pixel, float64, and the canvas frame."""
    if canvas is None:
        used = w > 0
        if not used.any():
            raise InvalidParameterError("every weight is 0: nothing to stitch (give some patch a weight > 0)")
        o = pos.astype(np.float32)  # reassemble_position casts the offsets to float32 ...
        wu = w[used]
        com = np.array(
            [math.fsum(c * wu) / math.fsum(wu) for c in o[used].T.astype(np.float64)], dtype=np.float32
        )
        a = o - com  # ... and centres them in float32
        pad = int(np.ceil(np.abs(a[used]).max()))
        pad += pad % 2
        size = m + 2 * pad
        shift = pad + a[:, ::-1].astype(np.float64)  # (x, y) → (row, col); exact in float64
        origin = (float(com[1]) - size / 2, float(com[0]) - size / 2)
        return shift, CanvasFrame(origin, (size, size))
    if isinstance(canvas, str) and canvas == "object":
        frame = object_grid(pos, m, w)
    else:
        frame = _as_frame(canvas)
    shift = pos[:, ::-1] - m / 2 - np.asarray(frame.origin)
    return shift, frame


def object_grid(positions, patch_size: int, weights=None) -> CanvasFrame:
    """The smallest canvas on the object's own pixel grid that holds every tap of every weighted patch.

    Its origin is a whole object pixel, so canvas pixel ``(r, c)`` *is* object pixel ``(y0 + r, x0 + c)``
    (no sub-pixel remainder for the alignment or the registration to undo); it spans from the floor of
    the first crop pixel's position to the last pixel a bilinear tap with a non-zero weight reaches.

    Parameters
    ----------
    positions : (n, 2) array
        Scan positions ``(x, y)`` in object pixels.
    patch_size : int
        Crop side ``M``.
    weights : (n,) array, optional
        Patches of weight 0 are left out.
    """
    pos = np.asarray(positions, np.float64)
    if weights is not None:
        pos = pos[np.asarray(weights) > 0]
    if len(pos) == 0:
        raise InvalidParameterError("every weight is 0: nothing to stitch (give some patch a weight > 0)")
    corner = pos[:, ::-1] - patch_size / 2  # (row, col) of each top-left crop pixel
    first, last = np.floor(corner.min(axis=0)), np.ceil(corner.max(axis=0)) + patch_size - 1
    return CanvasFrame(tuple(float(v) for v in first), tuple(int(v) for v in last - first + 1))


def _as_frame(canvas) -> CanvasFrame:
    try:
        frame = canvas if isinstance(canvas, CanvasFrame) else CanvasFrame(*canvas)
        origin = tuple(float(v) for v in frame.origin)
        shape = tuple(int(v) for v in frame.shape)
        ok = (
            len(origin) == 2
            and len(shape) == 2
            and np.isfinite(origin).all()
            and min(shape) >= 1
            and all(float(v) == s for v, s in zip(frame.shape, shape, strict=True))
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidParameterError(
            f"canvas={canvas!r}: expected 'object', a CanvasFrame or ((y0, x0), (rows, cols)) with a finite "
            "origin and integer rows, cols ≥ 1"
        )
    return CanvasFrame(origin, shape)


def _tile_index(k: np.ndarray, w: np.ndarray, m: int, tile: int, shape):
    """Yield ``(tile_row, tile_col, patch_indices)`` (ascending) for every tile some footprint meets."""
    rows, cols = shape
    lo = np.maximum(k, 0)
    hi = np.minimum(k + m, (rows - 1, cols - 1))  # last footprint pixel inside the canvas
    inside = (lo <= hi).all(axis=1) & (w > 0)
    t_lo, t_hi = lo // tile, hi // tile
    span = -(-(m + 1) // tile) + 1  # most tiles a footprint meets along one axis
    pidx, tys, txs = [], [], []
    for dy in range(span):
        for dx in range(span):
            ty, tx = t_lo[:, 0] + dy, t_lo[:, 1] + dx
            hit = inside & (ty <= t_hi[:, 0]) & (tx <= t_hi[:, 1])
            pidx.append(np.flatnonzero(hit))
            tys.append(ty[hit])
            txs.append(tx[hit])
    pidx, tys, txs = np.concatenate(pidx), np.concatenate(tys), np.concatenate(txs)
    order = np.lexsort((pidx, txs, tys))
    pidx, tys, txs = pidx[order], tys[order], txs[order]
    cuts = np.flatnonzero(np.diff(tys) | np.diff(txs)) + 1
    for a, b in zip((0, *cuts), (*cuts, len(pidx)), strict=True):
        if b > a:
            yield int(tys[a]), int(txs[a]), pidx[a:b]


def _tile_chunks(size: int, tile: int) -> tuple[int, ...]:
    return (tile,) * (size // tile) + ((size % tile,) if size % tile else ())


# --------------------------------------------------------------------------- tasks (workers)


def _tile(source, first, starts, stops, shift, w, corner, shape, target) -> np.ndarray | None:
    """One tile: read its patches, sum them (:func:`_sum_tile`); return it, or write it to ``target``."""
    if len(starts):
        k = np.floor(shift)
        frac = shift - k
        k = k.astype(np.int64) - corner
        value = _sum_tile(_read(source, first, starts, stops), k, frac, w, shape)
    else:
        value = np.zeros(shape, dtype=np.complex64)
    if target is None:
        return value
    target[tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))] = value
    return None


def _read(source, first, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Patches ``[a, b)`` for each run, in index order, from a Zarr array, a numpy array or input blocks.

    A Zarr array is read one stored chunk at a time: the rows of every run in that chunk by one call, so
    each chunk is decoded once and only one is held decoded.
    """
    idx = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
    if isinstance(source, np.ndarray):
        return source[idx]
    if isinstance(source, zarr.Array):
        where = idx // source.chunks[0]
        cuts = np.flatnonzero(np.diff(where)) + 1
        out = np.empty((len(idx), *source.shape[1:]), dtype=source.dtype)
        for a, b in zip((0, *cuts), (*cuts, len(idx)), strict=True):
            lo, hi = int(idx[a]), int(idx[b - 1]) + 1
            out[a:b] = source[lo:hi] if hi - lo == b - a else source.oindex[idx[a:b]]
        return out
    # input blocks: ``source[j]`` holds patches ``first[j]`` onwards
    out = np.empty((len(idx), *source[0].shape[1:]), dtype=source[0].dtype)
    where = np.searchsorted(first, idx, side="right") - 1
    cuts = np.flatnonzero(np.diff(where)) + 1
    for a, b in zip((0, *cuts), (*cuts, len(idx)), strict=True):
        out[a:b] = source[where[a]][idx[a:b] - first[where[a]]]
    return out


def _sum_tile(z: np.ndarray, k: np.ndarray, frac: np.ndarray, w: np.ndarray, shape) -> np.ndarray:
    """``num / (den + 1e-9)`` of one tile from its patches (corners ``k`` in the tile), complex64.

    The patches are splatted in :func:`_canonical_order`, in batches of about ``_VALUES_PER_BATCH``
    footprint pixels, into sums over the bounding box of their footprints inside the tile.
    """
    order = _canonical_order(z, k, frac, w)
    m = z.shape[1]
    y0, x0 = np.maximum(k.min(axis=0), 0)
    y1, x1 = np.minimum(k.max(axis=0) + m + 1, shape)
    box = (int(y1 - y0), int(x1 - x0))
    sums = [np.zeros(box[0] * box[1]) for _ in range(3)]  # real, imaginary, weight
    step = max(1, _VALUES_PER_BATCH // (m + 1) ** 2)
    for a in range(0, len(order), step):
        take = order[a : a + step]
        _splat(z[take], k[take] - (y0, x0), frac[take], w[take], box, sums)
    out = np.zeros(shape, dtype=np.complex64)
    den = sums[2].reshape(box) + _EPS
    inside = out[y0:y1, x0:x1]
    inside.real = sums[0].reshape(box) / den
    inside.imag = sums[1].reshape(box) / den
    return out


def _canonical_order(z: np.ndarray, k: np.ndarray, frac: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Order of the patches by placement (corner, fraction, weight), equal placements by their bytes.

    It depends on the patches alone, never on the order they came in, so every sum of a tile adds the
    same numbers in the same order. Patches that tie on placement and bytes are interchangeable.
    """
    order = np.lexsort((w, frac[:, 1], frac[:, 0], k[:, 1], k[:, 0]))
    key = np.column_stack([k, frac, w])[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (key[1:] != key[:-1]).any(axis=1)
    first = np.flatnonzero(new)
    for a, b in zip(first, (*first[1:], len(order)), strict=True):
        if b - a > 1:
            order[a:b] = sorted(order[a:b], key=lambda i: z[i].tobytes())
    return order


def _splat(z: np.ndarray, k: np.ndarray, frac: np.ndarray, w: np.ndarray, box, sums) -> None:
    """Add the bilinear taps of patches ``z`` (corners ``k`` in the box) to the flat ``sums``.

    The four taps are first combined inside each patch (a separable spread onto its ``(M+1)²``
    footprint), so each patch scatters ``(M+1)²`` values rather than ``4·M²``; taps beyond the box
    belong to a neighbouring tile or fall off the canvas and are dropped.
    """
    m = z.shape[1]
    h, wd = box
    ar = np.arange(m + 1)
    fy, fx = frac[:, 0], frac[:, 1]
    r = k[:, 0, None] + ar  # (b, M+1) footprint rows in the box
    c = k[:, 1, None] + ar
    flat = r[:, :, None] * wd + c[:, None, :]
    weight = _edges(fy, m)[:, :, None] * (_edges(fx, m) * w[:, None])[:, None, :]
    parts = [_spread(_spread(part, fx, 2, w), fy, 1, 1.0) for part in (z.real, z.imag)]
    if r[:, 0].min() < 0 or r[:, -1].max() >= h or c[:, 0].min() < 0 or c[:, -1].max() >= wd:
        ok = ((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < wd))[:, None, :]
        flat, weight, parts = flat[ok], weight[ok], [p[ok] for p in parts]
    for out, values in zip(sums, (*parts, weight), strict=True):
        np.add.at(out, flat.ravel(), values.ravel())  # unbuffered, in index order


def _spread(x: np.ndarray, f: np.ndarray, axis: int, scale) -> np.ndarray:
    """Linear taps of each patch of ``x`` along ``axis``: ``x·(1-f)`` at offset 0 plus ``x·f`` at 1.

    ``f`` holds one value per patch and ``scale`` (one per patch, or a scalar) multiplies both taps.
    """
    shape = list(x.shape)
    shape[axis] += 1
    out = np.empty(shape)
    lead, last, tail = ([slice(None)] * 3 for _ in range(3))
    lead[axis], last[axis], tail[axis] = slice(0, -1), -1, slice(1, None)
    first, second = ((1 - f) * scale)[:, None, None], (f * scale)[:, None, None]
    np.multiply(x, first, out=out[tuple(lead)])
    out[tuple(last)] = 0
    out[tuple(tail)] += x * second
    return out


def _edges(f: np.ndarray, m: int) -> np.ndarray:
    """Summed tap weights of a unit patch along one axis: ``(1-f, 1, …, 1, f)``, shape ``(b, M+1)``."""
    return np.concatenate([1 - f[:, None], np.ones((len(f), m - 1)), f[:, None]], axis=1)
