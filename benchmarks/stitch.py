"""Stitching throughput and peak memory: the tiled engine against two in-memory ways.

Variants, each in a fresh process (``_harness.measure``), on an explicit square canvas of side S covered by
a jittered raster of M×M patches at a step of M/2 (so n ≈ 4·S²/M²; every pixel is covered about four
times):

- ``engine``: the patches are first written, block by block, to a Zarr array (chunks of 4096 patches, in
  raster order) in a temporary directory, as the infer stage stores them; then
  :func:`ptychozarr.stitch.stitch_to_zarr` stitches from that array into another (tiles of ``--tile``,
  default scheduler), each tile task reading its own patches. Its wall is the stitch alone; its peak RSS
  covers both steps.
- ``in-memory``: the plain scatter-add, ``np.add.at`` of the four bilinear taps into a full complex128
  numerator and float64 weight held in memory, patches streamed block by block. Skipped where the canvas
  would not fit in 60 % of the memory available now.
- ``translate``: PtychoPINN's way, a full zero-padded canvas per patch, bilinearly shifted
  (``scipy.ndimage.shift``, order 1; real, imaginary and weight) and summed. Its cost is n·S², so it runs
  on at most ``--translate-pixels`` / S² patches and reports the rate of those.

A second table stitches ``n`` patches scattered uniformly over a canvas (``--order-cases S:n``, crop
``--order-patch``), in each of ``--orders``: ``raster`` (rows of M, then x), ``curve`` (the Hilbert curve
the store uses) or ``random``, each patch carrying the same values in every order. The patches are written
in that order to a Zarr array in chunks of ``--order-block`` patches (as inference writes them), then
stitched from it: as the Zarr array itself (``--order-input zarr``, the tile tasks read it) or as
``da.from_zarr`` of it (``--order-input dask``, for code that takes only dask arrays). Per order: the
stitch's wall, the peak RSS, and a digest of the whole stitched object (read back tile by tile), so that
runs of two versions of the code can be compared bit for bit; "bitwise equal" says whether every order
gave the same digest. The last column is what the earliest design's tile-sized partial sums per (block,
tile) pair would have added up to in random order.

Each variant returns the sum of a 256×256 window of its result, so the table also shows they agree.
All variants import the same modules before the clock starts; peak RSS includes the interpreter and
those imports (about 200 MB).

Run from the repository root (``benchmarks/run_all.py`` calls :func:`main` the same way)::

    python benchmarks/stitch.py --sizes 512 1024 2048 4096 8192 16384 --json stitch.json
    python benchmarks/stitch.py --sizes --order-cases 4000:20000 12000:100000
    python benchmarks/stitch.py --sizes --order-cases 12000:100000 --orders random
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import zarr
from scipy import ndimage

from ptychozarr.io.order import curve_order
from ptychozarr.stitch import stitch_to_zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import measure, ratio, table, write_json  # noqa: E402

__all__ = ["main"]

_BLOCK = 4096  # patches per generated block
_WINDOW = 256


def _positions(size: int, m: int) -> np.ndarray:
    """Jittered raster (x, y) covering the canvas, patches wholly inside."""
    step = m // 2
    grid = np.arange(m / 2, size - m / 2 - 1, step)
    y, x = np.meshgrid(grid, grid, indexing="ij")
    pos = np.stack([x.ravel(), y.ravel()], axis=1)
    return pos + np.random.default_rng(0).uniform(0, 1, pos.shape)


def _patch_block(ids: np.ndarray, m: int) -> np.ndarray:
    """Patches number ``ids``: a fixed pattern scaled per patch (cheap to make)."""
    ramp = np.exp(1j * np.linspace(0, np.pi, m * m)).reshape(m, m)
    scale = 1 + 0.5 * np.sin(ids)
    return (scale[:, None, None] * ramp).astype(np.complex64)


def _blocks(n: int):
    for first in range(0, n, _BLOCK):
        yield first, min(_BLOCK, n - first)


def _window_sum(image) -> complex:
    c = image.shape[0] // 2
    return complex(np.asarray(image[c : c + _WINDOW, c : c + _WINDOW], dtype=np.complex128).sum())


def _taps(shift: np.ndarray):
    """Per tap: integer (row, col) of each patch's top-left and the (n,) tap weight."""
    k = np.floor(shift).astype(np.int64)
    f = shift - k
    for dy in (0, 1):
        for dx in (0, 1):
            yield k + (dy, dx), (f[:, 0] if dy else 1 - f[:, 0]) * (f[:, 1] if dx else 1 - f[:, 1])


def _store_patches(path: Path, ids: list[np.ndarray], m: int) -> zarr.Array:
    """Patches number ``ids[b]`` as chunk ``b`` of a Zarr array (every chunk but the last full)."""
    n, block = sum(len(i) for i in ids), len(ids[0])
    arr = zarr.create_array(
        zarr.storage.LocalStore(path), shape=(n, m, m), chunks=(block, m, m), dtype=np.complex64
    )
    first = 0
    for i in ids:
        arr[first : first + len(i)] = _patch_block(i, m)
        first += len(i)
    return arr


def _stitch_stored(arr: zarr.Array, path: Path, pos: np.ndarray, tile: int, size: int, how: str):
    """Stitch the stored patches (the Zarr array, or ``da.from_zarr`` of it); the array and the wall."""
    patches = arr if how == "zarr" else da.from_zarr(arr)
    t0 = time.perf_counter()
    out = stitch_to_zarr(
        zarr.open_group(path, mode="w"), "object", patches, pos, tile=tile, canvas=((0.0, 0.0), (size, size))
    )
    return out, time.perf_counter() - t0


def _digest(arr: zarr.Array, tile: int) -> str:
    """SHA-256 of the stitched object, read tile by tile (row-major tiles)."""
    h = hashlib.sha256()
    for y in range(0, arr.shape[0], tile):
        for x in range(0, arr.shape[1], tile):
            h.update(np.ascontiguousarray(arr[y : y + tile, x : x + tile]).tobytes())
    return h.hexdigest()[:16]


def run_engine(size: int, m: int, tile: int) -> tuple[complex, float]:
    pos = _positions(size, m)
    ids = [np.arange(first, first + count) for first, count in _blocks(len(pos))]
    with tempfile.TemporaryDirectory() as tmp:
        arr = _store_patches(Path(tmp) / "p.zarr", ids, m)
        out, wall = _stitch_stored(arr, Path(tmp) / "s.zarr", pos, tile, size, "zarr")
        return _window_sum(out), wall


def _scattered(size: int, n: int, m: int, order: str) -> np.ndarray:
    """``n`` uniform random (x, y) inside the canvas, in ``raster`` order (rows of M, then x), along the
    Hilbert ``curve``, or shuffled (``random``)."""
    rng = np.random.default_rng(1)
    pos = rng.uniform(m / 2, size - m / 2 - 1, (n, 2))
    pos = pos[np.lexsort((pos[:, 0], pos[:, 1] // m))]
    if order == "curve":
        return pos[curve_order(pos[:, 0], pos[:, 1])]
    return pos if order == "raster" else pos[rng.permutation(n)]


def run_ordered(size: int, n: int, m: int, tile: int, block: int, order: str, how: str):
    """Stitch ``n`` scattered patches stored in ``order``; a patch's values follow its position.

    Returns the window sum, the stitch's wall and the object's digest.
    """
    pos = _scattered(size, n, m, order)
    ident = np.lexsort((pos[:, 0], pos[:, 1]))  # the same patch gets the same values in any order
    rank = np.empty(n, np.int64)
    rank[ident] = np.arange(n)
    ids = [rank[a : a + block] for a in range(0, n, block)]
    with tempfile.TemporaryDirectory() as tmp:
        arr = _store_patches(Path(tmp) / "p.zarr", ids, m)
        out, wall = _stitch_stored(arr, Path(tmp) / "s.zarr", pos, tile, size, how)
        return _window_sum(out), wall, _digest(out, tile)


def run_in_memory(size: int, m: int) -> complex:
    pos = _positions(size, m)
    shift = pos[:, ::-1] - m / 2
    num = np.zeros(size * size, dtype=np.complex128)
    den = np.zeros(size * size)
    ii = np.arange(m)
    for first, count in _blocks(len(pos)):
        z = _patch_block(np.arange(first, first + count), m)
        for k, w in _taps(shift[first : first + count]):
            idx = ((k[:, 0, None] + ii) * size)[:, :, None] + (k[:, 1, None] + ii)[:, None, :]
            np.add.at(num, idx.ravel(), (z * w[:, None, None]).ravel())
            np.add.at(den, idx.ravel(), np.repeat(w, m * m))
    return _window_sum((num / (den + 1e-9)).astype(np.complex64).reshape(size, size))


def run_translate(size: int, m: int, count: int) -> complex:
    shift = (_positions(size, m)[:, ::-1] - m / 2)[:count]
    num = np.zeros((size, size), dtype=np.complex128)
    den = np.zeros((size, size))
    ones = np.zeros((size, size))
    ones[:m, :m] = 1
    canvas = np.zeros((size, size), dtype=np.complex128)
    for first, n in _blocks(count):
        z = _patch_block(np.arange(first, first + n), m)
        for crop, s in zip(z, shift[first : first + n], strict=True):
            canvas[:m, :m] = crop
            move = {"shift": s, "order": 1, "mode": "grid-constant"}
            num += ndimage.shift(canvas.real, **move) + 1j * ndimage.shift(canvas.imag, **move)
            den += ndimage.shift(ones, **move)
    return _window_sum((num / (den + 1e-9)).astype(np.complex64))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print its markdown tables and return their rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--patch", type=int, default=32, help="crop size M")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--translate-pixels", type=float, default=2**28, help="n·S² budget of 'translate'")
    ap.add_argument("--order-cases", nargs="*", default=["4000:20000"], help="S:n, raster beside random")
    ap.add_argument("--order-patch", type=int, default=20, help="crop size M of the order cases")
    ap.add_argument(
        "--order-block", type=int, default=256, help="patches per stored chunk of the order cases"
    )
    ap.add_argument(
        "--orders", nargs="+", default=["raster", "random"], choices=["raster", "curve", "random"]
    )
    ap.add_argument(
        "--order-input",
        default="zarr",
        choices=["zarr", "dask"],
        help="stitch the Zarr array, or da.from_zarr",
    )
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    rows = [_size_row(size, args) for size in args.sizes]
    if rows:
        print(table(rows))
    order_rows = [_order_row(*map(int, case.split(":")), args) for case in args.order_cases]
    if order_rows:
        print(table(order_rows))
    if args.json:
        write_json(args.json, "stitch", rows + order_rows)
    return rows + order_rows


def _size_row(size: int, args) -> dict:
    n = len(_positions(size, args.patch))
    row = {"canvas side": size, "patches": n}
    eng = measure(run_engine, size, args.patch, args.tile)
    eng.value, eng.wall_s = eng.value
    row |= {"engine s": eng.wall_s, "engine patch/s": n / eng.wall_s, "engine RSS MB": eng.peak_rss_mb}
    if size * size * 40 < 0.6 * psutil.virtual_memory().available:
        mem = measure(run_in_memory, size, args.patch)
        row |= {
            "in-mem s": mem.wall_s,
            "in-mem patch/s": n / mem.wall_s,
            "in-mem RSS MB": mem.peak_rss_mb,
            "speed engine/in-mem": ratio(mem.wall_s, eng.wall_s),
            "RSS in-mem/engine": ratio(mem.peak_rss_mb, eng.peak_rss_mb),
            "agree": bool(np.isclose(mem.value, eng.value, rtol=1e-6)),
        }
    count = int(min(n, max(1, args.translate_pixels // size**2)))
    tr = measure(run_translate, size, args.patch, count)
    row |= {
        "translate patches run": count,
        "translate patch/s": count / tr.wall_s,
        "translate RSS MB": tr.peak_rss_mb,
        "speed engine/translate": ratio(n / eng.wall_s, count / tr.wall_s),
    }
    if count == n:
        row["translate agrees"] = bool(np.isclose(tr.value, eng.value, rtol=1e-6))
    print(f"done {size}²", file=sys.stderr)
    return row


def _order_row(size: int, n: int, args) -> dict:
    m, block, tile = args.order_patch, args.order_block, args.tile
    row = {"canvas side": size, "patches": n, "M": m, "stored chunk": block, "input": args.order_input}
    digests = set()
    for order in args.orders:
        got = measure(run_ordered, size, n, m, tile, block, order, args.order_input)
        _, wall, digest = got.value
        digests.add(digest)
        row |= {f"{order} s": wall, f"{order} RSS MB": got.peak_rss_mb, f"{order} digest": digest}
        print(f"done {size}² with {n} patches in {order} order", file=sys.stderr)
    row["bitwise equal"] = len(digests) == 1
    if "random" in args.orders:
        row["tile partials MB (earliest design, random)"] = _tile_partials(size, n, m, tile, block) / 2**20
    return row


def _tile_partials(size: int, n: int, m: int, tile: int, block: int) -> int:
    """Bytes of one tile-sized partial sum (24 B per pixel) per (block, tile) pair, in random order."""
    k = np.floor(_scattered(size, n, m, "random")[:, ::-1] - m / 2).astype(np.int64)
    blocks = np.arange(n) // block
    pairs = {
        (b, ty, tx)
        for dy in (0, m)
        for dx in (0, m)
        for b, ty, tx in zip(blocks, (k[:, 0] + dy) // tile, (k[:, 1] + dx) // tile, strict=True)
    }
    return len(pairs) * 24 * tile * tile


if __name__ == "__main__":
    main()
