"""Lazy, tile-owned scatter-add stitching of cropped patches into one object.

Semantics are those of PtychoPINN's ``reassemble_position`` (spec §3.2): a crop pixel ``(i, j)`` of a
patch whose top-left lands at canvas ``(s_y, s_x) = k + f`` (``k`` integer, ``f`` in ``[0, 1)``) adds
its value with bilinear weights ``(1-f_y)(1-f_x), (1-f_y)f_x, f_y(1-f_x), f_y f_x`` to canvas
``(i + k_y + {0, 1}, j + k_x + {0, 1})``; taps outside the canvas are dropped; the same taps of a unit
patch make the weight, and the result is ``num / (den + 1e-9)`` as complex64.

Design, in words:

- **Tile routing.** The canvas is cut into ``tile × tile`` pieces, which are the chunks of the returned
  dask array (and of the Zarr array :func:`stitch_to_zarr` writes). A patch's footprint, with the extra
  row and column of the bilinear tap, is ``(M+1) × (M+1)`` pixels starting at ``k``; binning the two
  corners of that footprint by ``tile`` gives the tiles it touches (up to four when ``tile > M``). The
  routing is computed once on the host from the positions, which are small.
- **Partial sums.** For every pair (block of patches, tile) with at least one routed patch, one task
  splats the routed patches of that block onto that tile only: the four taps are first combined inside
  each patch (a separable linear spread onto its ``(M+1)²`` footprint), then the footprints are summed
  with ``np.add.at`` into a complex128 numerator and a float64 weight covering just the bounding box
  of those patches inside the tile. Work is proportional to ``n·M²``, never to the canvas area, and a
  tile no patch touches is a plain zero chunk that costs nothing.
- **Tree reduction.** The partials of one tile are summed by a tree of fan-in four, then one task per
  tile divides lazily. Floating-point addition is commutative but not associative, so the tree is made
  independent of the order of the blocks: its leaves are sorted by where the block's patches sit in the
  tile and then by a digest of the block's placements and weights (neither depends on where the block
  sits in the input; neighbours in space are summed first, which keeps partial boxes small), groups
  never split a run of equal keys, and a group that holds such a tie sums its partials in the order of
  their content digests. Every sum thus happens in an order fixed by the data alone, so permuting the
  blocks of patches gives a bitwise-identical canvas on any scheduler. (Cutting the patches into
  *different* blocks changes the rounding, at the level of 1e-16 relative.)
- **Memory.** A splat task holds one block of patches, a batch of footprints and the sums over its box
  (24 bytes per pixel); a tile's partials live until its last block is splatted. So the peak is about
  (threads + tiles in progress) × 24 bytes × tile², plus the blocks in flight. A raster scan keeps
  about one row of tiles in progress: memory grows with the canvas width, never with its area; pass a
  smaller ``tile`` for very wide canvases.
- **One writer per chunk.** :func:`stitch_to_zarr` writes each touched tile as exactly one full Zarr
  chunk, skips untouched tiles (they equal the fill value 0), and sets ``complete`` last.

Positions are object pixels in ``(x, y)`` order (spec §1.3); crop pixel ``(i, j)`` of a patch at
``(x, y)`` sees object pixel ``(y + i - M/2, x + j - M/2)``. :class:`CanvasFrame` maps canvas indices
to that object grid.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError

__all__ = ["CanvasFrame", "stitch", "stitch_to_zarr"]

_EPS = 1e-9  # added to the weight before dividing, as reassemble_position does
_FAN_IN = 4  # partial tiles summed per reduction task
_BLOCK_BYTES = 64 * 2**20  # default block of a numpy input, in bytes of patches
_VALUES_PER_BATCH = 2**19  # footprint pixels scattered at once inside one task


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


class _Partial(NamedTuple):
    """Sums of one tile over a bounding box whose top-left is tile pixel ``(y, x)``."""

    y: int
    x: int
    num: np.ndarray  # complex128
    den: np.ndarray  # float64


@dataclass(frozen=True)
class _Plan:
    """A stitched canvas as a graph: the tiles that hold data and the array itself."""

    array: da.Array
    frame: CanvasFrame
    tile: int
    patch_size: int
    n_patches: int
    touched: tuple[tuple[int, int], ...]


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
    patches : array_like or dask.array.Array
        ``(n, M, M)`` complex crops, ``M`` even. A dask array keeps its blocks along ``n``.
    positions : array_like
        ``(n, 2)`` scan positions in object pixels, ``(x, y)`` order.
    weights : array_like, optional
        ``(n,)`` non-negative multiplicities; each patch counts this many times in both the numerator and
        the weight. Ones (the default) give exactly spec §3.2. Patches of weight 0 are left out.
    tile : int
        Side of the square canvas tiles, which are the chunks of the result.
    canvas : CanvasFrame or ((y0, x0), (rows, cols)), optional
        An explicit canvas on the object grid: crop pixel ``(i, j)`` of a patch at ``(x, y)`` lands at
        canvas ``(y + i - M/2 - y0, x + j - M/2 - x0)``. When omitted, the canvas is PtychoPINN's:
        positions cast to float32, centred on their float32 mean ``com``, ``pad`` the ceiling of the
        largest ``|position - com|`` rounded up to even, square side ``P = M + 2·pad``.
    block : int, optional
        Patches per block: splits a numpy input (default about 64 MiB of patches per block) or re-blocks
        a dask input.

    Returns
    -------
    object : dask.array.Array
        ``(rows, cols)`` complex64, chunked in tiles.
    frame : CanvasFrame
        The canvas ↔ object mapping (spec §3.2 item 7 in the default mode).

    Notes
    -----
    Numerators accumulate in complex128 and weights in float64, so results agree with PtychoPINN's
    float32 TensorFlow implementation to float32 precision. The centre of mass is the exactly summed
    mean of the float32 positions, rounded to float32, so that it does not depend on the order of the
    patches; ``tf.reduce_mean`` sums in float32 in input order and may differ in its last bit (a
    placement difference of about 1e-5 px). The result is bitwise independent of the order of the
    blocks (module docstring).
    """
    plan = _plan(patches, positions, weights, tile=tile, canvas=canvas, block=block)
    return plan.array, plan.frame


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
) -> zarr.Array:
    """Stitch (as :func:`stitch`) straight into a Zarr v3 array chunked in tiles.

    Each tile that a patch touches is computed and written as exactly one whole chunk by one task; the
    others are never written and read as the fill value 0. The array is not sharded (chunks are tiles),
    so no two writers ever share a stored object. The array's attributes carry the canvas frame
    (``canvas``), ``tile``, ``patch_size``, ``n_patches`` and ``attrs``; ``complete`` is set to true only
    after the last chunk is written.

    Parameters
    ----------
    group : zarr.Group
        Where to create the array.
    name : str
        Array name inside ``group`` (e.g. ``"object"``).
    patches, positions, weights, tile, canvas, block
        As for :func:`stitch`.
    attrs : mapping, optional
        More attributes to record (stage parameters, input fingerprint).
    overwrite : bool
        Replace an existing array of that name.

    Returns
    -------
    zarr.Array
        The written array.
    """
    if name in group and not overwrite:
        raise StoreError(
            f"{name!r} already exists in Zarr group {group.path or '/'!r}; pass overwrite=True to replace it"
        )
    plan = _plan(patches, positions, weights, tile=tile, canvas=canvas, block=block)
    out = group.create_array(
        name,
        shape=plan.frame.shape,
        chunks=(plan.tile, plan.tile),
        dtype=np.complex64,
        fill_value=0,
        overwrite=overwrite,
        attributes={
            **dict(attrs or {}),
            "canvas": plan.frame.to_attrs(),
            "tile": plan.tile,
            "patch_size": plan.patch_size,
            "n_patches": plan.n_patches,
            "complete": False,
        },
    )
    name_w = "stitch-write-" + tokenize(plan.array.name, out.store_path)
    dsk = {}
    for i, j in plan.touched:
        region = tuple(
            slice(t * plan.tile, t * plan.tile + c[t]) for t, c in zip((i, j), plan.array.chunks, strict=True)
        )
        dsk[(name_w, i, j)] = (_write_tile, out, (plan.array.name, i, j), region)
    done = "stitch-done-" + tokenize(name_w)
    dsk[done] = (len, list(dsk))
    graph = HighLevelGraph.from_collections(done, dsk, dependencies=[plan.array])
    Delayed(done, graph).compute()
    out.attrs["complete"] = True
    return out


# --------------------------------------------------------------------------- planning (host, small)


def _plan(patches, positions, weights, *, tile, canvas, block) -> _Plan:
    patches, m = _as_patch_blocks(patches, block)
    n = patches.shape[0]
    pos = _as_positions(positions, n)
    w = _as_weights(weights, n)
    tile = _check_count("tile", tile, "the tile side (e.g. 1024)")
    shift, frame = _shifts(pos, m, canvas)
    # The footprint of a patch is (M+1)² pixels from the integer part of its shift (the +1 is the
    # second bilinear tap); the fraction gives the tap weights.
    k = np.floor(shift)
    frac = shift - k
    k = k.astype(np.int64)
    starts = np.cumsum((0, *patches.chunks[0]))
    keys = _block_digests(shift, w, starts)
    rows, cols = frame.shape
    chunks = (_tile_chunks(rows, tile), _tile_chunks(cols, tile))

    token = tokenize(patches, shift, w, tile, frame)
    splat, red, final = (f"stitch-{s}-{token}" for s in ("splat", "sum", "tile"))
    dsk: dict = {}
    leaves: dict[tuple[int, int], list[tuple[tuple, tuple]]] = {}
    for b, ty, tx, idx in _route(k, w, m, starts, tile, (rows, cols)):
        key = (splat, b, ty, tx)
        local_k = k[idx] - (ty * tile, tx * tile)
        shape = (chunks[0][ty], chunks[1][tx])
        dsk[key] = (_splat_tile, (patches.name, b, 0, 0), idx - starts[b], local_k, frac[idx], w[idx], shape)
        # order of summation: by where the block's patches sit in the tile, then by the block digest
        order = (*np.maximum(local_k.min(axis=0), 0).tolist(), keys[b])
        leaves.setdefault((ty, tx), []).append((order, key))
    for ty, th in enumerate(chunks[0]):
        for tx, tw in enumerate(chunks[1]):
            if (ty, tx) in leaves:
                dsk[(final, ty, tx)] = (_finish_tile, _reduce(leaves[ty, tx], (red, ty, tx), dsk), (th, tw))
            else:
                dsk[(final, ty, tx)] = (np.zeros, (th, tw), np.complex64)
    graph = HighLevelGraph.from_collections(final, dsk, dependencies=[patches])
    array = da.Array(graph, final, chunks, meta=np.empty((0, 0), dtype=np.complex64))
    return _Plan(array, frame, tile, m, n, tuple(sorted(leaves)))


def _as_patch_blocks(patches, block) -> tuple[da.Array, int]:
    """Patches as a dask array blocked along ``n`` only, and the crop size ``M``."""
    if block is not None:
        _check_count("block", block, "patches per block")
    if not isinstance(patches, da.Array):
        patches = np.asarray(patches)
    elif np.isnan(patches.shape).any():
        raise InvalidParameterError(
            "patches have unknown block sizes; call patches.compute_chunk_sizes() before stitching"
        )
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
        blocks = block or patches.chunks[0]
        return patches.rechunk((blocks, m, m)), m
    block = block or max(1, _BLOCK_BYTES // (m * m * patches.dtype.itemsize))
    return da.from_array(patches, chunks=(block, m, m)), m


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


def _shifts(pos: np.ndarray, m: int, canvas) -> tuple[np.ndarray, CanvasFrame]:
    """Canvas ``(row, col)`` of each patch's top-left crop pixel, float64, and the canvas frame."""
    if canvas is None:
        o = pos.astype(np.float32)  # reassemble_position casts the offsets to float32 ...
        com = np.array([math.fsum(c) / len(c) for c in o.T.astype(np.float64)], dtype=np.float32)
        a = o - com  # ... and centres them in float32
        pad = int(np.ceil(np.abs(a).max()))
        pad += pad % 2
        size = m + 2 * pad
        shift = pad + a[:, ::-1].astype(np.float64)  # (x, y) → (row, col); exact in float64
        origin = (float(com[1]) - size / 2, float(com[0]) - size / 2)
        return shift, CanvasFrame(origin, (size, size))
    frame = _as_frame(canvas)
    shift = pos[:, ::-1] - m / 2 - np.asarray(frame.origin)
    return shift, frame


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
            f"canvas={canvas!r}: expected a CanvasFrame or ((y0, x0), (rows, cols)) with a finite origin "
            "and integer rows, cols ≥ 1"
        )
    return CanvasFrame(origin, shape)


def _block_digests(shift: np.ndarray, w: np.ndarray, starts: np.ndarray) -> list[bytes]:
    """A digest per block of what places its patches (shifts and weights), not of where it sits."""
    return [
        hashlib.blake2b(shift[a:b].tobytes() + w[a:b].tobytes(), digest_size=16).digest()
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def _route(k: np.ndarray, w: np.ndarray, m: int, starts: np.ndarray, tile: int, shape):
    """Yield ``(block, tile_row, tile_col, patch_indices)`` for every pair with routed patches."""
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
    blk = np.searchsorted(starts, pidx, side="right") - 1
    order = np.lexsort((pidx, txs, tys, blk))
    pidx, tys, txs, blk = pidx[order], tys[order], txs[order], blk[order]
    cuts = np.flatnonzero(np.diff(blk) | np.diff(tys) | np.diff(txs)) + 1
    for a, b in zip((0, *cuts), (*cuts, len(pidx)), strict=True):
        if b > a:
            yield int(blk[a]), int(tys[a]), int(txs[a]), pidx[a:b]


def _reduce(items: list[tuple[tuple, tuple]], prefix: tuple, dsk: dict):
    """Add a tree summing the partials ``items`` (sort key, task key) to ``dsk``; return the root key."""
    items = sorted(items, key=lambda it: it[0])
    # Runs of equal sort keys (identical placements) are never split across groups, and a group holding
    # such a tie orders its partials by content (in _sum_partials): block order never changes a sum.
    groups: list[list[tuple[tuple, tuple]]] = []
    for _, run in itertools.groupby(items, key=lambda it: it[0]):
        run = list(run)
        if groups and len(groups[-1]) + len(run) <= _FAN_IN:
            groups[-1].extend(run)
        else:
            groups.append(run)
    keys = []
    for g, members in enumerate(groups):
        tied = len({order for order, _ in members}) < len(members)
        keys.append(_sum_task(dsk, (*prefix, 0, g), [k for _, k in members], tied))
    level = 0
    while len(keys) > 1:
        level += 1
        keys = [
            _sum_task(dsk, (*prefix, level, g), keys[i : i + _FAN_IN], False)
            for g, i in enumerate(range(0, len(keys), _FAN_IN))
        ]
    return keys[0]


def _sum_task(dsk: dict, key: tuple, parts: list, tied: bool):
    """Key of the sum of ``parts``: a new task in ``dsk``, or the only part itself."""
    if len(parts) == 1:
        return parts[0]
    dsk[key] = (_sum_partials, parts, tied)
    return key


def _tile_chunks(size: int, tile: int) -> tuple[int, ...]:
    return (tile,) * (size // tile) + ((size % tile,) if size % tile else ())


# --------------------------------------------------------------------------- tasks (workers)


def _splat_tile(block, rows, k, frac, w, shape) -> _Partial:
    """Bilinear splat of ``block[rows]`` onto one tile.

    ``k`` are the tile-local integer top-left corners, ``frac`` the fractional parts of the shifts
    ``(row, col)`` and ``w`` the weights of those patches; ``shape`` is the tile's. Only the bounding
    box of the footprints inside the tile is allocated. The four taps are first combined inside each
    patch (a separable spread onto its ``(M+1)²`` footprint), so each patch scatters ``(M+1)²`` values
    rather than ``4·M²``.
    """
    m = block.shape[1]
    y0, x0 = np.maximum(k.min(axis=0), 0)
    y1, x1 = np.minimum(k.max(axis=0) + m + 1, shape)
    h, wd = int(y1 - y0), int(x1 - x0)
    num = np.zeros(h * wd, dtype=np.complex128)
    den = np.zeros(h * wd)
    ar = np.arange(m + 1)
    step = max(1, _VALUES_PER_BATCH // (m + 1) ** 2)
    for a in range(0, len(rows), step):
        z = np.asarray(block[rows[a : a + step]])
        fy, fx = frac[a : a + step, 0], frac[a : a + step, 1]
        wb = w[a : a + step]
        r = k[a : a + step, 0, None] + ar - y0  # (b, M+1) footprint rows in the box
        c = k[a : a + step, 1, None] + ar - x0
        flat = r[:, :, None] * wd + c[:, None, :]
        weight = _edges(fy, m)[:, :, None] * (_edges(fx, m) * wb[:, None])[:, None, :]
        parts = [_spread(_spread(part, fx, 2, wb), fy, 1, 1.0) for part in (z.real, z.imag)]
        if r[:, 0].min() < 0 or r[:, -1].max() >= h or c[:, 0].min() < 0 or c[:, -1].max() >= wd:
            # taps beyond this tile belong to a neighbour or fall off the canvas
            ok = ((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < wd))[:, None, :]
            flat, weight, parts = flat[ok], weight[ok], [p[ok] for p in parts]
        for out, values in zip((num.real, num.imag, den), (*parts, weight), strict=True):
            np.add.at(out, flat.ravel(), values.ravel())  # unbuffered, in index order
    return _Partial(int(y0), int(x0), num.reshape(h, wd), den.reshape(h, wd))


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


def _sum_partials(parts: list[_Partial], tied: bool) -> _Partial:
    """Sum partial tiles in the given order, or in content order when some share a digest."""
    if tied:
        parts = sorted(parts, key=_content_digest)
    y0 = min(p.y for p in parts)
    x0 = min(p.x for p in parts)
    y1 = max(p.y + p.den.shape[0] for p in parts)
    x1 = max(p.x + p.den.shape[1] for p in parts)
    num = np.zeros((y1 - y0, x1 - x0), dtype=np.complex128)
    den = np.zeros((y1 - y0, x1 - x0))
    for p in parts:
        box = np.s_[p.y - y0 : p.y - y0 + p.den.shape[0], p.x - x0 : p.x - x0 + p.den.shape[1]]
        num[box] += p.num
        den[box] += p.den
    return _Partial(y0, x0, num, den)


def _content_digest(part: _Partial) -> bytes:
    h = hashlib.blake2b(np.array([part.y, part.x, *part.den.shape]).tobytes(), digest_size=16)
    h.update(part.num.tobytes())
    h.update(part.den.tobytes())
    return h.digest()


def _finish_tile(part: _Partial, shape: tuple[int, int]) -> np.ndarray:
    """``num / (den + 1e-9)`` of one whole tile, complex64 (zero outside the partial's box)."""
    out = np.zeros(shape, dtype=np.complex64)
    box = np.s_[part.y : part.y + part.den.shape[0], part.x : part.x + part.den.shape[1]]
    out[box] = part.num / (part.den + _EPS)
    return out


def _write_tile(target: zarr.Array, value: np.ndarray, region: tuple[slice, slice]) -> None:
    target[region] = value
