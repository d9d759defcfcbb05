"""Blocks with halos: the one overlap map that every windowed metric (SSIM, MS-SSIM, pre-filter) uses.

Picture: the image is cut into its chunks; each chunk is extended by ``depth`` pixels of its neighbours
(none beyond the image border) and handed to a kernel with its :class:`Window` — where the extended
block and the chunk it owns lie in the image. The kernel returns a short vector (sums, minima, maxima)
for the pixels it owns; the vectors come back as an ``(rows of chunks, columns of chunks, width)`` dask
array for a tree reduction.

Two ways to build the extended blocks, with the same blocks and so the same results:

- from dask arrays, by :func:`dask.array.overlap.overlap`: each chunk is computed once and its edges are
  handed to its neighbours, so a pass holds the chunks whose neighbours are still to come — about one
  row of chunks per image, which grows with the image's side;
- from images written to disk first (:func:`store_images`, :class:`Stored`): every task reads its own
  extended block from the Zarr array, so tasks share nothing and a pass holds only the blocks being
  scored, whatever the image's size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import dask.array as da
import numpy as np
import zarr
from dask.array.overlap import ensure_minimum_chunksize

from ptychozarr.io.store import array_options

__all__: list[str] = []

#: Edge of the chunks of a stored image: small, so that a block's halo reads little beyond it.
_STORED_CHUNK = 256


class Span(NamedTuple):
    """One axis of a block: the extended block starts at ``start``; the block owns ``[own0, own1)``;
    the image has ``size`` pixels along the axis."""

    start: int
    own0: int
    own1: int
    size: int

    def own(self) -> slice:
        """The owned pixels as a slice of the extended block."""
        return slice(self.own0 - self.start, self.own1 - self.start)


Window = tuple[Span, Span]


class Stored(NamedTuple):
    """An image written to a Zarr array, scored by the blocks ``chunks`` of the array it was written from."""

    array: zarr.Array
    chunks: tuple[tuple[int, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def as_dask(self) -> da.Array:
        """The image as a dask array read from the store, in its blocks."""
        return da.from_zarr(self.array, chunks=self.chunks)


def store_images(images: list[da.Array], directory: str | Path, name: str) -> list[Stored]:
    """Write the equal-shaped ``images`` to Zarr arrays ``<directory>/<name>_<i>.zarr`` in one pass.

    Parameters
    ----------
    images : list of 2-D dask arrays
    directory : str or Path
        An existing directory (the arrays are overwritten).
    name : str
        Prefix of the arrays' names.

    Returns
    -------
    list of Stored
    """
    targets = [
        zarr.create_array(
            store=str(Path(directory) / f"{name}_{i}.zarr"), shape=x.shape, dtype=x.dtype, overwrite=True,
            chunks=tuple(min(_STORED_CHUNK, n) for n in x.shape), **array_options(compress=False),
        )
        for i, x in enumerate(images)
    ]  # fmt: skip
    da.store(images, targets, lock=True)  # a dask chunk may fill part of a Zarr chunk that another fills
    return [Stored(target, x.chunks) for target, x in zip(targets, images, strict=True)]


def _starts(chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.concatenate([[0], np.cumsum(chunks)]).tolist())


def _window(index: tuple[int, int], starts, depth, shape) -> Window:
    return tuple(
        Span(max(s[i] - d, 0), s[i], s[i + 1], n)
        for s, i, d, n in zip(starts, index, depth, shape, strict=True)
    )


def _score(kernel, blocks, window: Window, args) -> np.ndarray:
    return np.asarray(kernel(*blocks, window, *args), dtype=np.float64)[None, None, :]


def _call(*blocks_and_args, kernel, n_arrays, starts, depth, shape, block_id=None):
    blocks, args = blocks_and_args[:n_arrays], blocks_and_args[n_arrays:]
    return _score(kernel, blocks, _window(block_id[:2], starts, depth, shape), args)


def _read_call(_, *args, kernel, arrays, starts, depth, shape, block_id=None):
    window = _window(block_id[:2], starts, depth, shape)
    extent = tuple(slice(s.start, min(s.own1 + d, s.size)) for s, d in zip(window, depth, strict=True))
    return _score(kernel, [a[extent] for a in arrays], window, args)


def halo_map(kernel: Callable, arrays: list, depth: int, width: int, *args) -> da.Array:
    """``kernel(*extended_blocks, window, *args) -> (width,)`` for every block of the equal-shaped
    ``arrays``, as a lazy ``(row blocks, column blocks, width)`` float64 array.

    ``arrays`` are dask arrays (blocks: their chunks) or :class:`Stored` images (blocks: the chunks of
    the arrays they were written from, each read with its halo by its own task). Blocks are merged up to
    at least ``depth`` pixels first (``depth`` is capped at the image side).
    """
    shape = arrays[0].shape
    depths = tuple(max(1, min(depth, n)) for n in shape)
    chunks = tuple(ensure_minimum_chunksize(d, c) for d, c in zip(depths, arrays[0].chunks, strict=True))
    where = {"starts": tuple(_starts(c) for c in chunks), "depth": depths, "shape": shape}
    out = {"dtype": np.float64, "meta": np.empty((0, 0, 0), np.float64)}
    out_chunks = tuple((1,) * len(c) for c in chunks) + ((width,),)
    if isinstance(arrays[0], Stored):
        blocks = da.zeros(tuple(len(c) for c in chunks), chunks=1, dtype=np.int8)  # one task per block
        return da.map_blocks(
            _read_call, blocks, *args, kernel=kernel, arrays=[s.array for s in arrays], **where,
            chunks=out_chunks, new_axis=2, **out,
        )  # fmt: skip
    extended = [da.overlap.overlap(x.rechunk(chunks), depth=dict(enumerate(depths)), boundary="none")
                for x in arrays]
    return da.map_blocks(
        _call, *extended, *args, kernel=kernel, n_arrays=len(arrays), **where,
        chunks=out_chunks, new_axis=2, **out,
    )  # fmt: skip
