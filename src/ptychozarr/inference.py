"""Blockwise inference: one Dask task per block of model inputs, only cropped patches leave a task.

One task per block, in three steps that overlap:

1. **read**: the sorted union of the block's members, each chunk that holds some of them visited once,
   in order, by a reader thread (:class:`_Reader`) that copies the rows into one buffer; decoded chunks
   are kept in a small per-process cache (:data:`CHUNK_CACHE_BYTES`), so that consecutive blocks of a
   store laid out in scan order decode each chunk about once;
2. **gather**: each batch is gathered from that buffer, channels last, and multiplied by the one scale
   (the grouping's normaliser ``f`` times the model's ``intensity_scale``, left out for an arm fed
   unscaled) in a single pass into a batch buffer the task reuses; a batch starts as soon as its rows
   are read;
3. **predict**: the model is called with fixed-shape batches (only the last one of a block padded, the
   padding dropped) and crops its output to the central ``M×M`` before anything else happens to it.

Only the ``(b, M, M)`` crops leave the task. :func:`task_memory` projects a task's peak host memory from
the same buffers. Models are loaded once per process through the cache of this module.

Two arms:

- **per group** (a model of gridsize > 1): one output per group, at the group centre, weight 1.
- **distinct patterns** (a model of gridsize 1 on groups of any gridsize): every pattern that appears in
  ``nn_indices`` is predicted once, with zero offsets, at its true position, and carries as weight the
  number of times it appears. Stitching with these weights gives exactly what predicting the flattened
  ``B·C`` stack would, for ``1/C`` of the compute. PtychoPINN's ``compare_models`` instead predicts the
  flattened stack and stitches it at point-reflected positions ``2·centre − position``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.core.buffer import default_buffer_prototype

from ptychozarr.errors import InvalidParameterError, MemoryBudgetError
from ptychozarr.io.store import DEFAULT_CHUNK_BYTES, open_array
from ptychozarr.models import Model, ModelSpec, check_compatible, is_out_of_memory, resolve, spec_of

__all__ = [
    "cached_model",
    "infer",
    "load_count",
    "model_spec",
    "oom_events",
    "predict_patches",
    "release_chunks",
    "task_memory",
]

_log = logging.getLogger(__name__)

_F32, _F64, _C64, _I64 = 4, 8, 8, 8

_MODELS: dict[str, Model] = {}
_LOCK = threading.Lock()
_STATE = {"loads": 0}
_OOM_EVENTS: list[dict] = []


def cached_model(path: str | Path, tf_threads: int | None = None, *, trust_bundle: bool = False) -> Model:
    """The model at ``path``, loaded at most once per process through its format's entry.

    Parameters
    ----------
    path : str or Path
    tf_threads : int, optional
        Framework threads for this process (TensorFlow's intra- and inter-op pools, ONNX Runtime's
        session threads), applied by the format's entry before its first load.
    trust_bundle : bool
        Allow a PtychoPINN bundle, whose loading runs code from the file (see
        :func:`ptychozarr.models.load_model`); checked on every call, cached or not.
    """
    fmt, file = resolve(path)
    fmt.check_trust(file, trust_bundle)
    key = str(file.resolve())
    model = _MODELS.get(key)
    if model is None:
        with _LOCK:
            model = _MODELS.get(key)
            if model is None:
                fmt.configure(tf_threads)
                model = fmt.load(file)
                _MODELS[key] = model
                _STATE["loads"] += 1
    return model


def model_spec(path: str | Path, *, trust_bundle: bool = False) -> ModelSpec:
    """A model's spec: from its sidecar without loading it where the format allows (no framework), else
    from the model loaded once through :func:`cached_model` (a trusted PtychoPINN bundle)."""
    spec = spec_of(path, trust_bundle=trust_bundle)
    return spec if spec is not None else cached_model(path, trust_bundle=trust_bundle).spec


def load_count() -> int:
    """How many models this process has loaded through :func:`cached_model`."""
    return _STATE["loads"]


def oom_events() -> list[dict]:
    """Out-of-memory retries seen in this process: ``{"batch": failed size, "retry": new size}`` each."""
    return list(_OOM_EVENTS)


@dataclass(frozen=True)
class _ModelRef:
    """A model as a task argument: a path (loaded through the cache) or a loaded model."""

    path: str | None = None
    model: Model | None = None
    tf_threads: int | None = None
    trust_bundle: bool = False

    def get(self) -> Model:
        if self.model is not None:
            return self.model
        return cached_model(self.path, self.tf_threads, trust_bundle=self.trust_bundle)

    def spec(self) -> ModelSpec:
        """The model's spec, read from its sidecar without loading the network when the format allows."""
        if self.model is not None:
            return self.model.spec
        spec = spec_of(self.path, trust_bundle=self.trust_bundle)
        return spec if spec is not None else self.get().spec

    def __dask_tokenize__(self):
        return ("ptychozarr-model", self.path if self.path is not None else id(self.model))


CHUNK_CACHE_BYTES = 128 * 2**20
"""Decoded diffraction chunks each process keeps, in bytes (at least one chunk). A block of a few hundred
groups reads part of each chunk it touches; in a store laid out in scan order, consecutive blocks read
the same chunks, so keeping the last few decoded lets a chunk be decoded about once per run instead of
once per block that reads from it."""


class _ChunkCache:
    """Decoded chunks by key, least recently used dropped past a capacity in bytes; thread-safe.

    A chunk is decoded once however many threads ask for it at the same time: the others wait for it.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.decoded = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._loading: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def cached(self, key: Hashable) -> np.ndarray | None:
        """The chunk under ``key`` if it is cached, else None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk under ``key``, loaded with ``load()`` when absent."""
        value = self.cached(key)
        if value is not None:
            return value
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            value = self.cached(key)
            if value is not None:
                return value
            value = load()
            with self._lock:
                self.decoded += 1
                self._items[key] = value
                self._loading.pop(key, None)
                while len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.capacity:
                    self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every cached chunk."""
        with self._lock:
            self._items.clear()


_CHUNKS = _ChunkCache(CHUNK_CACHE_BYTES)


def release_chunks() -> None:
    """Free this process's decoded-chunk cache: once the model arms are inferred it serves nothing, and
    would otherwise stay in memory for the rest of the run (and of any run after it in the process)."""
    _CHUNKS.clear()


class _Reader:
    """Read rows ``needed`` (sorted, distinct) of a Zarr array into one buffer, in a background thread.

    The chunks holding needed rows are visited once each, in order. With a ``key`` (naming the array's
    content) and when the chunks fit in this process's chunk cache, each decoded chunk comes from the
    cache (decoded on a miss) and the rows are copied out of it; otherwise, and for a chunk needed whole
    and not cached (which saves a copy), the rows are read straight into :attr:`patterns` (a slice read
    where they are contiguous, an orthogonal selection otherwise).
    :meth:`wait` lets the model start on a batch as soon as its rows are in, so reading the rest of the
    block overlaps with running the model. Use it as a context manager: leaving stops the thread after
    the chunk it is reading.
    """

    def __init__(self, array: zarr.Array, needed: np.ndarray, key: Hashable | None = None):
        self.array, self.needed, self.key = array, needed, key
        self.patterns = np.empty((len(needed), *array.shape[1:]), array.dtype)
        step = array.chunks[0]
        edges = np.searchsorted(needed, np.arange(0, array.shape[0], step)[1:])
        cuts = np.unique(np.concatenate([[0], edges, [len(needed)]]))
        self._runs = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
        chunk_bytes = step * int(np.prod(array.shape[1:])) * array.dtype.itemsize
        if len(self._runs) * chunk_bytes > _CHUNKS.capacity:  # would evict its own chunks: read directly
            self.key = None
        self._filled = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="ptychozarr-read", daemon=True)

    def __enter__(self) -> _Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()

    def _read(self) -> None:
        try:
            for lo, hi in self._runs:
                if self._stop:
                    return
                self._fill(lo, hi)
                with self._cond:
                    self._filled = hi
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the task's thread by wait()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _fill(self, lo: int, hi: int) -> None:
        """Fill ``patterns[lo:hi]`` with rows ``needed[lo:hi]``, which lie in one chunk."""
        rows = self.needed[lo:hi]
        first, last = int(rows[0]), int(rows[-1])
        dest = self.patterns[lo:hi]
        if self.key is not None:
            step = self.array.chunks[0]
            start = first // step * step
            key = (self.key, start)
            if hi - lo < min(step, self.array.shape[0] - start):
                chunk = _CHUNKS.get(key, lambda: self.array[start : start + step])
            else:  # the whole chunk: read straight into the buffer unless it is cached already
                chunk = _CHUNKS.cached(key)
            if chunk is not None:
                np.take(chunk, rows - start, axis=0, out=dest, mode="clip")
                return
        out = default_buffer_prototype().nd_buffer.from_numpy_array(dest)
        if last - first == hi - lo - 1:
            self.array.get_basic_selection(slice(first, last + 1), out=out)
        else:
            self.array.get_orthogonal_selection(rows, out=out)

    def wait(self, rows: int) -> None:
        """Return once rows ``< rows`` of :attr:`patterns` are read; raise the reader's error if any."""
        with self._cond:
            while self._filled < rows and self._error is None:
                self._cond.wait()
            if self._filled < rows:
                raise self._error


def task_memory(
    *,
    block_groups: int,
    batch_size: int,
    N: int,
    channels: int,
    crop: int,
    model_probe: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, int]:
    """Projected peak host memory of inference, in bytes: per task, and once per process.

    A task's buffers are those :func:`_infer_block` holds at once: the block's distinct patterns (at most
    ``block_groups · channels``, float32), one decoded chunk and its encoded bytes while reading, the
    batch buffer and, for ``channels > 1``, one channel of a batch gathered before it is placed, the
    network's output for one batch (``N²`` complex64 or two float32 planes per row), what the model adds
    per batch, the member indices (the block's, ``np.unique``'s sorted copy and inverse) and offsets, and
    the crops.

    Parameters
    ----------
    block_groups : int
        Model inputs per block (groups, or distinct patterns for a gridsize-1 model).
    batch_size : int
        Rows per model call.
    N : int
        Pattern side.
    channels : int
        Patterns per model input (gridsize²; 1 for a gridsize-1 model).
    crop : int
        Side M of the kept crops.
    model_probe : int
        Host bytes one batch adds inside the model (``ptychozarr.memory.probe_model``).
    chunk_bytes : int
        Decoded size of one chunk of the store's diffraction (``ptychozarr.io.store.DEFAULT_CHUNK_BYTES``
        as ingested).

    Returns
    -------
    dict
        ``{"infer": bytes of one task, "chunk_cache": bytes once per process}`` (the decoded chunks
        kept across tasks: :data:`CHUNK_CACHE_BYTES`, and never less than one chunk).
    """
    for name, value in (
        ("block_groups", block_groups),
        ("batch_size", batch_size),
        ("N", N),
        ("channels", channels),
        ("crop", crop),
        ("chunk_bytes", chunk_bytes),
    ):
        if value < 1:
            raise InvalidParameterError(f"{name}={value}: must be at least 1")
    pattern = N * N * _F32
    inputs = block_groups * channels
    parts = (
        inputs * pattern,  # the block's distinct patterns
        2 * max(chunk_bytes, pattern),  # one chunk, decoded and encoded
        batch_size * pattern * (channels + (channels > 1)),  # batch buffer (+ one gathered channel)
        batch_size * N * N * _C64,  # the network's output for one batch
        int(model_probe),
        inputs * _I64 * 3 + inputs * 2 * (_F64 + _F32),  # members, sorted, inverse; offsets
        block_groups * crop * crop * _C64,  # the task's output
    )
    return {"infer": sum(parts), "chunk_cache": max(CHUNK_CACHE_BYTES, chunk_bytes)}


def predict_patches(
    model: Model,
    patterns: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray | None,
    scale: float,
    crop: int,
    batch_size: int,
    ready: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run ``model`` over groups of ``patterns`` in fixed-shape batches and keep the centre crops.

    Each batch is gathered and scaled in one pass into a buffer the task reuses; the model crops its
    output before anything else is done with it. The last batch is zero-padded to the batch size.

    Parameters
    ----------
    model : Model
    patterns : ndarray, (u, N, N) float32
        Raw diffraction amplitudes.
    members : ndarray, (b, C) int
        Rows of ``patterns`` forming each model input.
    offsets : ndarray, (b, C, 2) float, or None
        Members' offsets (x, y); None gives zeros.
    scale : float
        Factor applied to the patterns (normaliser times the model's intensity scale).
    crop : int
        Side M of the kept centre.
    batch_size : int
        Batch the model is called with (capped by ``model.spec.max_batch``); halved down to 1 when the
        model's format entry says the call ran out of device memory
        (:func:`ptychozarr.models.is_out_of_memory`).
    ready : callable, optional
        Called with ``r`` before a batch that needs rows ``< r`` of ``patterns``; returns once they are
        filled (see :class:`_Reader`).

    Returns
    -------
    ndarray, (b, M, M) complex64
    """
    spec = model.spec
    n, channels = members.shape
    batch_size = min(batch_size, spec.max_batch or batch_size)
    out = np.empty((n, crop, crop), np.complex64)
    x = np.zeros((batch_size, spec.N, spec.N, channels), np.float32)
    pos = np.zeros((batch_size, 1, 2, channels), np.float32) if spec.takes_positions else None
    first = int(members[0, 0]) if n else 0
    contiguous = channels == 1 and np.array_equal(members[:, 0], np.arange(first, first + n))
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        k = stop - start
        rows = members[start:stop]
        if ready is not None:
            ready(int(rows.max()) + 1)
        _gather(patterns, rows, np.float32(scale), x[:batch_size], contiguous)
        x[k:batch_size] = 0
        if pos is not None:
            pos[k:batch_size] = 0
            if offsets is not None:
                pos[:k, 0] = np.swapaxes(offsets[start:stop], 1, 2)
        try:
            pred = model.predict_batch(x[:batch_size], None if pos is None else pos[:batch_size], crop=crop)
        except Exception as exc:
            if not is_out_of_memory(exc, model):
                raise
            if batch_size == 1:
                raise MemoryBudgetError(
                    f"model {spec.name!r} runs out of device memory on a batch of 1 ({spec.N}×{spec.N}×"
                    f"{channels}); use a device with more memory or a smaller model"
                ) from exc
            _OOM_EVENTS.append({"batch": batch_size, "retry": batch_size // 2})
            _log.warning("out of memory at batch %d; retrying with %d", batch_size, batch_size // 2)
            batch_size //= 2
            continue
        out[start:stop] = pred[:k]
        start = stop
    return out


def _gather(patterns, rows, scale, x, contiguous) -> None:
    """Fill ``x[:k]`` (``k = len(rows)``) with ``patterns[rows]`` channels-last, times ``scale``."""
    k, channels = rows.shape
    if channels == 1:
        dest = x[:k, ..., 0]
        if contiguous:
            np.multiply(patterns[rows[0, 0] : rows[0, 0] + k], scale, out=dest)
        else:
            np.take(patterns, rows[:, 0], axis=0, out=dest, mode="clip")
            dest *= scale
        return
    for c in range(channels):  # one channel at a time: a transposing pass over all of them is 3× slower
        np.multiply(patterns[rows[:, c]], scale, out=x[:k, ..., c])


def _infer_block(members, offsets, *, store, model, scale, crop, batch_size, store_key=None):
    """Task body: read a block's patterns from Zarr, predict, return crops ``(b, M, M)``.

    ``store_key`` names the store's content for the chunk cache (None: no caching).
    """
    if members.shape[0] == 0:
        return np.empty((0, crop, crop), np.complex64)
    m = model.get()
    needed, rows = np.unique(members, return_inverse=True)
    diffraction = open_array(store, "data/diffraction")  # a lost chunk is refused, never read as zeros
    with _Reader(diffraction, needed, None if store_key is None else (store, store_key)) as reader:
        return predict_patches(
            m,
            reader.patterns,
            rows.reshape(members.shape),
            offsets,
            scale,
            crop,
            batch_size,
            ready=reader.wait,
        )


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
    intensity_scale: bool = True,
) -> xr.Dataset:
    """Lazy blockwise prediction of cropped object patches.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`ptychozarr.open_dataset` (``attrs["store"]`` names the store).
    groups : xarray.Dataset
        From :func:`ptychozarr.group` / :func:`ptychozarr.open_groups`.
    model : str, Path or Model
        A model path (loaded once per worker process through the cache; preferred) or a loaded model.
    crop : int
        Side M of the kept centre of each predicted patch (even, ``0 < M ≤ N``).
    block_groups : int
        Model inputs per task: groups for a gridsize > 1 model, distinct patterns for a gridsize 1 model.
    batch_size : int
        Fixed batch the model is called with (capped by ``spec.max_batch``; only the last batch of a
        block is padded).
    tf_threads : int, optional
        TensorFlow threads per process.
    trust_bundle : bool
        Allow a PtychoPINN bundle, whose loading runs code from the file (see
        :func:`ptychozarr.models.load_model`).
    intensity_scale : bool
        Multiply the normalised diffraction by the model's ``spec.intensity_scale`` (when it has one);
        False feeds it unscaled, as compare_models feeds its Baseline.

    Returns
    -------
    xarray.Dataset
        ``patches`` (dask, (B', M, M) complex64, chunked by block), ``positions`` ((B', 2) float64,
        (x, y)), ``weights`` ((B',) float64). B' is the number of groups, or of distinct patterns for a
        gridsize 1 model (see the module docstring).
    """
    ref = (
        _ModelRef(model=model)
        if isinstance(model, Model)
        else _ModelRef(path=str(model), tf_threads=tf_threads, trust_bundle=trust_bundle)
    )
    if "store" not in ds.attrs:
        raise InvalidParameterError("ds has no attrs['store']; open the scan with ptychozarr.open_dataset")
    spec = ref.spec()
    n_pix = int(ds.sizes["det_y"])
    gridsize = int(groups.attrs["gridsize"])
    check_compatible(spec, n_pix, gridsize)
    if crop <= 0 or crop > n_pix or crop % 2:
        raise InvalidParameterError(f"crop={crop}: must be even and in (0, N={n_pix}]")
    for name, value in (("block_groups", block_groups), ("batch_size", batch_size)):
        if value < 1:
            raise InvalidParameterError(f"{name}={value}: must be at least 1")

    if spec.gridsize == 1:
        distinct, counts = np.unique(groups["nn_indices"].values, return_counts=True)
        members = da.from_array(distinct[:, None], chunks=(block_groups, 1))
        offsets = da.zeros((len(distinct), 1, 2), chunks=(block_groups, 1, 2))
        positions = np.stack([ds["xcoords"].values[distinct], ds["ycoords"].values[distinct]], axis=1)
        weights = counts.astype(np.float64)
        mode = "distinct_patterns"
    else:
        members = da.asarray(groups["nn_indices"].data).rechunk((block_groups, -1))
        offsets = da.asarray(groups["offsets"].data).rechunk((block_groups, -1, -1))
        positions = groups["centres"].values.astype(np.float64)
        weights = np.ones(len(positions))
        mode = "per_group"
    f = float(groups.attrs["normaliser"])
    input_scale = (spec.intensity_scale or 1.0) if intensity_scale else 1.0
    patches = da.blockwise(
        _infer_block,
        "bij",
        members,
        "bc",
        offsets,
        "bcx",
        new_axes={"i": crop, "j": crop},
        concatenate=True,
        dtype=np.complex64,
        meta=np.empty((0, 0, 0), np.complex64),
        store=str(ds.attrs["store"]),
        store_key=tokenize(dict(ds.attrs)) if "source_sha256" in ds.attrs else None,
        model=ref,
        scale=f * input_scale,
        crop=crop,
        batch_size=batch_size,
    )
    return xr.Dataset(
        {
            "patches": (("patch", "crop_y", "crop_x"), patches),
            "positions": (("patch", "xy"), np.asarray(positions, np.float64)),
            "weights": (("patch",), weights),
        },
        coords={"xy": ["x", "y"]},
        attrs={
            "mode": mode,
            "crop": crop,
            "model": spec.to_dict(),
            "normaliser": f,
            "input_scale": input_scale,
        },
    )
