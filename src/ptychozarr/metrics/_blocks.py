"""Blocks with halos: the one overlap map that every windowed metric (SSIM, MS-SSIM, pre-filter) uses.

Picture: the image is cut into its chunks; each chunk is extended by ``depth`` pixels of its neighbours
(none beyond the image border) and handed to a kernel with its :class:`Window` — where the extended
block and the chunk it owns lie in the image. The kernel returns a short vector (sums, minima, maxima)
for the pixels it owns; the vectors come back as an ``(rows of chunks, columns of chunks, width)`` dask
array for a tree reduction. Every chunk of an input is consumed by the tasks of one map, so a pass
holds only the chunks whose neighbours are still to come.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize

__all__: list[str] = []


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


def _starts(chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.concatenate([[0], np.cumsum(chunks)]).tolist())


def _call(*blocks_and_args, kernel, n_arrays, starts, depth, shape, block_id=None):
    blocks, args = blocks_and_args[:n_arrays], blocks_and_args[n_arrays:]
    window = tuple(
        Span(max(s[i] - d, 0), s[i], s[i + 1], n)
        for s, i, d, n in zip(starts, block_id[:2], depth, shape, strict=True)
    )
    return np.asarray(kernel(*blocks, window, *args), dtype=np.float64)[None, None, :]


def halo_map(kernel: Callable, arrays: list[da.Array], depth: int, width: int, *args) -> da.Array:
    """``kernel(*extended_blocks, window, *args) -> (width,)`` for every chunk of the equal-shaped
    ``arrays``, as a lazy ``(row blocks, column blocks, width)`` float64 array.

    Chunks are merged up to at least ``depth`` pixels first (``depth`` is capped at the image side).
    """
    shape = arrays[0].shape
    depths = tuple(max(1, min(depth, n)) for n in shape)
    chunks = tuple(ensure_minimum_chunksize(d, c) for d, c in zip(depths, arrays[0].chunks, strict=True))
    extended = [da.overlap.overlap(x.rechunk(chunks), depth=dict(enumerate(depths)), boundary="none")
                for x in arrays]
    out_chunks = tuple((1,) * len(c) for c in chunks) + ((width,),)
    return da.map_blocks(
        _call, *extended, *args, kernel=kernel, n_arrays=len(arrays),
        starts=tuple(_starts(c) for c in chunks), depth=depths, shape=shape,
        chunks=out_chunks, new_axis=2, dtype=np.float64, meta=np.empty((0, 0, 0), np.float64),
    )
