"""The Zarr v3 store of a run: streamed NPZ ingestion, the lazy dataset view, completeness markers.

Layout (DESIGN.md, "Store"): ``data/diffraction`` (n, N, N) float32 amplitude in chunks of whole
patterns (zstd), ``data/{x,y}coords[_start]`` (n,) float64, ``data/scan_index`` (n,) int64,
``data/intensity_sum`` (n,) float64 (Σ d² of each pattern, computed while ingesting),
``data/input_index`` (n,) int64, ``data/probeGuess`` (N, N) complex64 and, when present,
``data/objectGuess`` (H, W) complex64 on the object frame (:func:`write_frame`): dimensions ``object_y``,
``object_x`` with their coordinates in object pixels (and in metres, ``object_y_m`` / ``object_x_m``, when
the scan gives ``pixel_size_m``). Every array carries its dimension names and ``units``; the ``data``
group carries the provenance, ``pixel_size_m`` and ``energy_eV`` when the scan gives them, and
``complete``.

Patterns are stored in scan-space order, along a Hilbert curve through their positions
(:mod:`ptychozarr.io.order`), whatever the order of the input: consecutive patterns are close in space,
so the groups of a region read a few contiguous chunks. ``input_index[i]`` is the index in the input file
of stored pattern ``i`` (an auxiliary coordinate on ``pattern``); every per-pattern array follows the same
order. The order depends only on the positions, so the same scan in any order gives the same store, apart
from ``input_index`` and the provenance attrs.

A stage's output counts only once its group has ``"complete": true`` in its attrs, set after its last
chunk (:func:`mark_complete`, :func:`require_complete`). Ingestion writes to a hidden temporary store
beside the target and renames it into place at the end, so no failed run leaves a store behind; what a
killed one left (partial store, scratch, named with the owner's process id) goes at the next ingestion
(:func:`remove_leftovers`).

Data proves itself. Every array the engine writes is created with :func:`array_options`: its chunks end
with a CRC-32C (Zarr v3's ``crc32c`` codec, after zstd) and every chunk is stored, even one equal to the
fill value, so a chunk absent from the store is a chunk lost (:func:`missing_chunks`,
:func:`check_chunks`). Stores are read through a :class:`CheckedStore` and never through consolidated
metadata: a damaged chunk, a truncated chunk or metadata that is not JSON raise :class:`StoreError` and a
lost chunk :class:`MissingChunkError`, each one line naming the array and the fix, never a fill value.
Schema 3 was the first with checksums; schema 4 (this layout) puts the ground truth on the object frame.
Older stores are refused with the fix (re-ingest).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import google_crc32c
import numpy as np
import psutil
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from ptychozarr.errors import InvalidParameterError, InvalidScanError, PtychozarrError, StoreError
from ptychozarr.io.npz import NpzMember, NpzReader, NpzWriter
from ptychozarr.io.order import curve_order
from ptychozarr.io.validate import (
    COORDINATE_KEYS,
    DiffractionLayout,
    check_block,
    check_coordinates,
    check_square,
    diffraction_key,
    diffraction_layout,
)

log = logging.getLogger(__name__)

__all__ = [
    "ARRAY_CONFIG",
    "DEFAULT_CHUNK_BYTES",
    "SCHEMA_VERSION",
    "CheckedStore",
    "DamagedScanError",
    "FRAME_DIMS",
    "FRAME_VERSION",
    "MissingChunkError",
    "array_options",
    "check_chunks",
    "codecs",
    "consolidate",
    "file_stat",
    "frame_attributes",
    "holds_result",
    "ingest",
    "ingested_from",
    "is_complete",
    "is_complete_with",
    "lost_chunks",
    "mark_complete",
    "missing_chunks",
    "open_array",
    "open_dataset",
    "open_store",
    "pattern_intensity",
    "read_by_chunk",
    "read_errors",
    "remove_leftovers",
    "replace_path",
    "require_complete",
    "scratch_array",
    "sha256",
    "stores_every_chunk",
    "writable",
    "write_frame",
    "zarr_source",
]

SCHEMA_VERSION = 4  # 3: every chunk stored and checksummed (crc32c); 4: the ground truth on the object frame
FRAME_DIMS = ("object_y", "object_x")
"""Dimensions of every 2-D object the engine stores (ground truth, stitched objects, aligned crops); each is
also a coordinate array beside the object: the object pixel of each row and column (``units: pixel``)."""
FRAME_VERSION = 2
"""Version of the object frame, in the parameters of every stage that writes an object (1: each array had
its own dimension names, the stitched object fractional coordinates); a result of another version is
computed again, never read in the wrong frame."""
OPTIONAL_SCALARS = {"pixel_size_m": "m", "energy_eV": "eV"}
"""Optional scalar keys of a scan NPZ kept in ``data``'s attrs: the object pixel size in metres and the
photon energy in electronvolts (PtychoPINN's NPZs name neither; these are the names this engine reads)."""
# 4 MiB (64 patterns of 128²): in curve order a block of 256 groups then decodes about 3× its own patterns
# (32 MiB chunks: 7×), and gathering every block costs less than one read of the whole array.
DEFAULT_CHUNK_BYTES = 4 * 2**20
OBJECT_TILE = 1024
"""Side of the stored ground truth's square chunks (as the stitched objects' default tile)."""
ARRAY_CONFIG = {"write_empty_chunks": True}
"""Zarr array config of every array the engine writes: every chunk is stored, even one equal to the fill
value, so that a chunk absent from the store means a chunk lost (:func:`missing_chunks`)."""
_SCRATCH_PREFIX = ".ptychozarr-scratch-"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
_SCRATCH = re.compile(r"^\.ptychozarr-scratch-(?:(?P<pid>\d+)-)?")
_DIMS = {
    "diffraction": ("pattern", "det_y", "det_x"),
    "scan_index": ("pattern",),
    "input_index": ("pattern",),
    "intensity_sum": ("pattern",),
    "probeGuess": ("det_y", "det_x"),
    "objectGuess": FRAME_DIMS,
    **{key: ("pattern",) for key in COORDINATE_KEYS},
}
_PATTERN_COORDINATES = "input_index"  # CF ``coordinates`` attribute of per-pattern arrays
_SUM_ROWS = 32  # patterns per float64 temporary in pattern_intensity
_UNITS = {
    "diffraction": "arbitrary",  # sqrt(counts) when converted from integer counts (set at ingest)
    "intensity_sum": "arbitrary",
    "probeGuess": "arbitrary",
    "objectGuess": "1",
    "scan_index": "1",
    "input_index": "1",
    **dict.fromkeys(COORDINATE_KEYS, "pixel"),
}
_PATTERN_ORDER = "Hilbert curve of (xcoords, ycoords); input_index holds each pattern's index in the input"


class MissingChunkError(StoreError):
    """A chunk that an array must hold is not in its store (lost or deleted): never read as its fill value."""


class DamagedScanError(StoreError):
    """The scan's stored data is damaged or lost: no arm can be computed from it (the run is refused)."""


def codecs(compress: bool = True) -> tuple:
    """The bytes-to-bytes codecs (``compressors=``) of every array the engine writes: zstd (unless
    ``compress`` is false), then a CRC-32C checksum of each stored chunk (Zarr v3's ``crc32c`` codec)."""
    return (ZstdCodec(level=3), Crc32cCodec()) if compress else (Crc32cCodec(),)


def array_options(compress: bool = True) -> dict:
    """Keyword arguments of every ``create_array`` the engine makes: the codecs of :func:`codecs` and
    :data:`ARRAY_CONFIG` (every chunk written): ``group.create_array(name, data=x, **array_options())``."""
    return {"compressors": codecs(compress), "config": dict(ARRAY_CONFIG)}


def zarr_source(array) -> zarr.Array | None:
    """The Zarr array a dask array reads, when it is exactly ``da.from_zarr(z)`` of one (not sliced,
    rechunked or computed on); None otherwise. What :func:`open_dataset` and the stores written with
    ``store=`` return are such arrays, so a consumer can read the store itself."""
    if not isinstance(array, da.Array) or not array.name.startswith("from-zarr-"):
        return None
    source = array.dask.get(f"original-{array.name}")
    return source if isinstance(source, zarr.Array) and source.shape == array.shape else None


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` with :data:`ARRAY_CONFIG`: an array opened again from its store has zarr's default config,
    which skips (and deletes) chunks equal to the fill value; write into existing arrays through this."""
    return array.with_config(ARRAY_CONFIG)


def _location(store, path: str = "") -> str:
    """A readable name of ``path`` in ``store`` (the directory of a local store)."""
    while isinstance(store, WrapperStore):
        store = store._store
    root = getattr(store, "root", None)
    base = str(root) if root is not None else str(store)
    return f"{base}/{path}".rstrip("/")


def _chunk_grid(array: zarr.Array) -> tuple[int, ...]:
    """Chunks (shards, for a sharded array) along each axis: the stored objects' grid."""
    step = array.shards or array.chunks
    return tuple(-(-size // c) for size, c in zip(array.shape, step, strict=True))


def _stored_keys(array: zarr.Array) -> set[str]:
    """Keys of the chunks of ``array`` present in its store, relative to the array (one listing)."""
    store, path = array.store_path.store, array.store_path.path
    prefix = f"{path}/" if path else ""

    async def collect() -> set[str]:
        return {key[len(prefix) :] async for key in store.list_prefix(prefix)}

    return sync(collect())


def stores_every_chunk(array: zarr.Array) -> bool:
    """Whether ``array`` was written with :func:`array_options`: its last codec is ``crc32c``, and the
    engine writes every chunk of such arrays, so a chunk it lacks is a chunk lost."""
    codecs_ = getattr(array.metadata, "codecs", ())
    return bool(codecs_) and isinstance(codecs_[-1], Crc32cCodec)


def missing_chunks(array: zarr.Array) -> list[tuple[int, ...]]:
    """Grid coordinates of the chunks (shards, if sharded) of ``array`` that are not in its store.

    Every array the engine writes stores every chunk (:data:`ARRAY_CONFIG`), so a chunk absent from a
    finished array is a chunk lost. Costs one listing of the array's keys, no read.
    """
    grid = _chunk_grid(array)
    if not all(grid):
        return []
    stored = _stored_keys(array)
    encode = array.metadata.encode_chunk_key
    return [c for c in itertools.product(*(range(n) for n in grid)) if encode(c) not in stored]


def check_chunks(node: zarr.Group | zarr.Array, fix: str) -> None:
    """Raise :class:`MissingChunkError` (naming the array and ``fix``) unless every array of ``node`` (an
    array, or a group's arrays, not recursively) holds all its chunks."""
    arrays = [node] if isinstance(node, zarr.Array) else [a for _, a in sorted(node.arrays())]
    for array in arrays:
        lost = missing_chunks(array)
        if lost:
            total = int(np.prod(_chunk_grid(array)))
            raise MissingChunkError(
                f"{_location(array.store_path.store, array.path)}: {len(lost)} of {total} chunks are missing "
                f"(first: chunk {list(lost[0])}); {fix}"
            )


_CHUNK_KEY = re.compile(r"^(?:(?P<array>.*)/)?c(?:[/.]\d+)*$")
_REINGEST = "re-ingest the scan from its NPZ (`ptychozarr ingest IN.npz STORE --overwrite`)"
_RECOMPUTE = "recompute it: run again with --force"


def _fix_for(path: str) -> str:
    return _REINGEST if path == "data" or path.startswith("data/") else _RECOMPUTE


class CheckedStore(WrapperStore):
    """A store whose reads prove the data, wrapping another (a :class:`zarr.storage.LocalStore`).

    - a chunk of an array whose codecs end with ``crc32c`` is checked against its checksum before it is
      decoded: a damaged or truncated chunk raises :class:`StoreError`;
    - a metadata document (``zarr.json``) that is not JSON raises :class:`StoreError`;
    - with ``strict`` (stores opened for reading), a chunk key that is absent from an array written with
      :func:`array_options` (every chunk stored, the last codec ``crc32c``: :func:`stores_every_chunk`)
      raises :class:`MissingChunkError` instead of reading as the fill value; arrays written otherwise
      (by an older version) read as before. A writable store is not strict,
      since zarr reads a chunk that does not exist yet when a write covers part of it; stages check their
      outputs with :func:`missing_chunks` before reusing them.

    Each error is one line naming the array and the fix. Picklable, so dask tasks read through it too.
    """

    def __init__(self, store, strict: bool = True):
        super().__init__(store)
        self._strict = strict
        self._crc: dict[str, bool] = {}

    def _with_store(self, store):
        return type(self)(store, strict=self._strict)

    def __getstate__(self) -> dict:
        return {"store": self._store, "strict": self._strict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["store"], strict=state["strict"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and self._store == other._store

    __hash__ = None

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if key.endswith("zarr.json"):
            if value is not None and byte_range is None:
                try:
                    json.loads(value.to_bytes())
                except ValueError:
                    path = key.removesuffix("zarr.json").rstrip("/")
                    raise StoreError(
                        f"{_location(self._store, key)}: the metadata is damaged (not JSON); {_fix_for(path)}"
                    ) from None
            return value
        match = _CHUNK_KEY.match(key)
        if match is None:
            return value
        array = match["array"] or ""
        if value is None:
            if self._strict and await self._checksummed(array, prototype):
                raise MissingChunkError(
                    f"{_location(self._store, array)}: chunk {key[len(array) :].lstrip('/')} is missing "
                    f"(lost or deleted); {_fix_for(array)}"
                )
            return value
        if byte_range is None and await self._checksummed(array, prototype):
            data = value.as_numpy_array().view(np.uint8).reshape(-1)
            stored = bytes(data[-4:]) if data.size >= 4 else b""
            if np.uint32(google_crc32c.value(data[:-4])).tobytes() != stored:
                raise StoreError(
                    f"{_location(self._store, array)}: chunk {key[len(array) :].lstrip('/')} is damaged "
                    f"(checksum mismatch); {_fix_for(array)}"
                )
        return value

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key, value) -> None:
        if key.endswith("zarr.json"):  # an array made again may have other codecs
            self._crc.pop(key.removesuffix("zarr.json").rstrip("/"), None)
        await self._store.set(key, value)

    async def delete(self, key) -> None:
        if key.endswith("zarr.json"):
            self._crc.pop(key.removesuffix("zarr.json").rstrip("/"), None)
        await self._store.delete(key)

    async def delete_dir(self, prefix) -> None:
        self._crc.clear()
        await self._store.delete_dir(prefix)

    async def _checksummed(self, array: str, prototype) -> bool:
        """Whether the chunks of ``array`` end with a CRC-32C of the rest (its last codec is crc32c)."""
        if array not in self._crc:
            raw = await self._store.get(f"{array}/zarr.json" if array else "zarr.json", prototype)
            try:
                meta = json.loads(raw.to_bytes()) if raw is not None else {}
            except ValueError:
                meta = {}
            names = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
            self._crc[array] = bool(names) and names[-1] == "crc32c" and "sharding_indexed" not in names
        return self._crc[array]


_DAMAGE = ("checksum", "zstd", "decompress", "corrupt", "truncat")


@contextmanager
def read_errors(what: str, fix: str = _RECOMPUTE, error: type[StoreError] = StoreError) -> Iterator[None]:
    """Turn the errors zarr and its codecs raise on a damaged chunk (checksum mismatch, a truncated zstd
    frame, metadata that is not JSON) into one ``error`` line naming ``what`` and ``fix``, for reads that
    do not go through a :class:`CheckedStore`; a :class:`StoreError` raised inside (by a
    :class:`CheckedStore`) becomes ``error`` too."""
    try:
        yield
    except StoreError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None
    except PtychozarrError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:
        text = str(exc).lower()
        if not isinstance(exc, json.JSONDecodeError) and not any(word in text for word in _DAMAGE):
            raise
        raise error(f"{what}: damaged data ({str(exc).splitlines()[0][:200]}); {fix}") from None


def open_array(store_path: str | Path, path: str, mode: str = "r") -> zarr.Array:
    """The array ``path`` of a store, read through a :class:`CheckedStore` (strict when ``mode`` is
    ``"r"``), never through consolidated metadata."""
    store = CheckedStore(zarr.storage.LocalStore(Path(store_path), read_only=mode == "r"), strict=mode == "r")
    try:
        return zarr.open_array(store, path=path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreError(f"{_location(store, path)}: no such array; {_fix_for(path)}") from None


def read_by_chunk(array, rows: slice, cols: slice) -> np.ndarray:
    """``array[rows, cols]`` of a 2-D Zarr, dask or numpy array, read one chunk at a time.

    A selection across many chunks of a Zarr array decodes them all at once (and one of a dask array
    computes them all at once), so that reading a band of a wide object would hold as many decoded
    chunks as it crosses; read piece by piece, no more than one is held besides the result.
    """
    shape = tuple(array.shape)
    chunks = getattr(array, "chunks", None) or shape
    pieces = [
        _pieces(range(*sel.indices(n)), _chunk_edges(c, n))
        for sel, n, c in zip((rows, cols), shape, chunks, strict=True)
    ]
    out = np.empty(tuple(p[-1][0].stop if p else 0 for p in pieces), np.dtype(array.dtype))
    for at_row, read_rows in pieces[0]:
        for at_col, read_cols in pieces[1]:
            out[at_row, at_col] = np.asarray(array[read_rows, read_cols])
    return out


def _chunk_edges(chunks: int | tuple[int, ...], n: int) -> np.ndarray:
    """Where the chunks along an axis of length ``n`` end: regular (Zarr) or listed (dask) chunks."""
    return np.arange(chunks, n + chunks, chunks) if isinstance(chunks, int) else np.cumsum(chunks)


def _pieces(index: range, edges: np.ndarray) -> list[tuple[slice, slice]]:
    """``index`` cut where it enters the next chunk: (output slice, input slice) pairs."""
    within = np.searchsorted(edges, np.asarray(index), side="right")
    starts = [0, *(np.flatnonzero(np.diff(within)) + 1).tolist(), len(index)]
    pairs = zip(starts, starts[1:], strict=False)
    return [(slice(a, b), slice(index[a], index[b - 1] + 1, index.step)) for a, b in pairs if b > a]


def remove_leftovers(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed runs left in ``directory``: ingestion scratch (``.ptychozarr-scratch-*``) and
    partial stores (``.<name>.partial-*``, any name when ``name`` is None) whose owning process is gone.

    The owner's process id is part of each name; a name without one (an older version's) has no owner
    left. Returns the removed paths.
    """
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _SCRATCH.match(entry.name) or _PARTIAL.match(entry.name)
        if match is None or (name is not None and "name" in match.groupdict() and match["name"] != name):
            continue
        pid = match["pid"]
        if pid is not None and _alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process counts as running)."""
    if pid == os.getpid():
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def mark_complete(node: zarr.Group | zarr.Array, **attrs) -> None:
    """Record ``attrs`` and ``complete: true`` on a group or array; call after its last chunk."""
    node.attrs.update({**attrs, "complete": True})


def consolidate(store: str | Path | zarr.abc.store.Store) -> None:
    """Consolidate the metadata of a whole store (a path or a Zarr store), so readers open it in one read."""
    if not isinstance(store, zarr.abc.store.Store):
        store = zarr.storage.LocalStore(store)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(store)


def is_complete(node: zarr.Group | zarr.Array) -> bool:
    """Whether a stage marked ``node`` complete."""
    return node.attrs.get("complete") is True


def is_complete_with(node: zarr.Group | zarr.Array | None, attrs: dict) -> bool:
    """Whether ``node`` exists, is marked complete and was made with ``attrs`` (its attrs hold each
    of them, equal): the check every stage makes before reusing its output."""
    return node is not None and is_complete(node) and all(node.attrs.get(k) == v for k, v in attrs.items())


def lost_chunks(node) -> dict[str, list]:
    """The arrays of ``node`` (an array, or a group's arrays, recursively) that miss chunks, by path.

    Only arrays that store every chunk (:func:`stores_every_chunk`) are checked: in others (written by an
    older version) a chunk equal to the fill value was never stored.
    """
    if node is None:
        return {}
    arrays = [node] if isinstance(node, zarr.Array) else [a for _, a in node.arrays()]
    lost = {a.path: missing_chunks(a) for a in arrays if stores_every_chunk(a)}
    if isinstance(node, zarr.Group):
        for _, child in node.groups():
            lost |= lost_chunks(child)
    return {path: chunks for path, chunks in lost.items() if chunks}


def holds_result(node, params: dict) -> bool:
    """Whether ``node`` is a complete stage output made with ``params`` (JSON values: the stage's
    parameters with the content fingerprints of what it read) that still holds every chunk it wrote.
    A lost chunk is never read as its fill value: the stage computes its output again."""
    if not is_complete_with(node, {"params": params}):
        return False
    lost = lost_chunks(node)
    if lost:
        path, chunks = next(iter(lost.items()))
        log.warning("%s: %d chunk(s) missing (first: %s); computing it again", path, len(chunks), chunks[0])
        return False
    return True


def file_stat(path: str | os.PathLike) -> list[int]:
    """What changes when a file's content is changed or replaced: size, modification and change times
    (ns) and inode. The change time cannot be set back by hand, so an equal stat means the same
    content without reading it (as ``git`` trusts its index)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def open_store(store_path: str | Path, mode: str = "r") -> zarr.Group:
    """Open the root group of a run's store (``mode`` as :func:`zarr.open_group`) through a
    :class:`CheckedStore` (strict when reading), never through consolidated metadata, which an earlier
    run left and which need not describe what the store holds now."""
    path = Path(store_path)
    if mode == "r" and not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: no Zarr store there; create one with `ptychozarr ingest IN.npz {path}`")
    store = CheckedStore(zarr.storage.LocalStore(path, read_only=mode == "r"), strict=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def require_complete(root: zarr.Group, name: str) -> zarr.Group:
    """The sub-group ``name`` of ``root``, or :class:`StoreError` if absent or not marked complete."""
    try:
        node = root[name]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Group) or not is_complete(node):
        state = "is incomplete (an interrupted run?)" if node is not None else "is missing"
        raise StoreError(f"{root.store}: group {name!r} {state}; re-run the stage that writes it")
    return node


def scratch_array(
    directory: str | Path, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]
) -> zarr.Array:
    """An uncompressed Zarr array in ``directory``, to reorder data that does not fit in memory."""
    return zarr.create_array(
        zarr.storage.LocalStore(directory), shape=shape, dtype=dtype, chunks=chunks, **array_options(False)
    )


def replace_path(temporary: Path, target: Path) -> None:
    """Rename ``temporary`` to ``target``, replacing what is there only once the new one is in place."""
    if not (target.exists() or target.is_symlink()):
        os.rename(temporary, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(temporary, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def ingest(
    npz_path: str | Path,
    store_path: str | Path,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Path:
    """Stream an NPZ scan into a new Zarr v3 store, never holding a whole member in memory.

    A store that already holds this file's data in the current layout (:func:`ingested_from`) is
    reused as it is, unless ``overwrite``.

    Parameters
    ----------
    npz_path : str or Path
        The scan: ``diff3d`` or ``diffraction`` as (M, N, N), (M, N, N, 1) or legacy (N, N, M);
        ``xcoords``, ``ycoords``, ``probeGuess``; optional ``xcoords_start``, ``ycoords_start``,
        ``scan_index``, ``objectGuess``, ``pixel_size_m`` (metres) and ``energy_eV`` (scalars). Integer
        diffraction is photon counts and is stored as its square root. Other keys (``Y``, ``_metadata``,
        …) are skipped and listed in the attrs.
    store_path : str or Path
        The store to create.
    overwrite : bool
        Replace an existing ``store_path`` (only once the new store is complete), even one holding this
        file's data. Only a Zarr store (a
        folder holding ``zarr.json``) is ever replaced: any other file or folder there is refused.
    chunk_bytes : int
        Target bytes of one diffraction chunk (whole patterns, at least one) and of one read.

    Returns
    -------
    Path
        ``store_path``.

    Raises
    ------
    InvalidScanError
        The file breaks the data contract (the message names the key).
    StoreError
        ``store_path`` exists, holds something else than this file's data and ``overwrite`` is false.
    InvalidParameterError
        ``overwrite`` is true and ``store_path`` is something other than a Zarr store.
    """
    npz_path, store_path = Path(npz_path), Path(store_path)
    if store_path.exists() or store_path.is_symlink():
        if not overwrite and ingested_from(store_path, npz_path, chunk_bytes):
            log.info("ingest: %s already holds %s; reusing it", store_path, npz_path.name)
            return store_path
        if not overwrite:
            raise StoreError(
                f"{store_path} already exists and holds another scan, chunking or version's layout; choose "
                "another path or pass overwrite=True (--overwrite)"
            )
        if not (store_path / "zarr.json").is_file():
            raise InvalidParameterError(
                f"overwrite=True (--overwrite) replaces a Zarr store only, and {store_path} is not one "
                "(no zarr.json); remove it yourself or give another output path"
            )
    if chunk_bytes < 1:
        raise InvalidParameterError(f"chunk_bytes={chunk_bytes}: must be a positive number of bytes")
    store_path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(store_path.parent)
    temporary = store_path.with_name(f".{store_path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    stat = file_stat(npz_path)  # before reading: a file changed meanwhile no longer matches it
    try:
        with NpzReader(npz_path) as npz, ThreadPoolExecutor(1) as pool:
            # hashed (stored members' CRC-32 checked) beside the ingestion: hashlib and zlib free the GIL
            digest = pool.submit(npz.digest)
            root = zarr.open_group(zarr.storage.LocalStore(temporary), mode="w", zarr_format=3)
            data = root.create_group("data")
            attrs = _ingest_members(npz, data, chunk_bytes, scratch=store_path.parent)
            mark_complete(
                data,
                source=npz_path.name,
                source_size=stat[0],
                source_sha256=digest.result(),
                source_stat=stat,
                schema_version=SCHEMA_VERSION,
                chunk_bytes=chunk_bytes,
                **attrs,
            )
        replace_path(temporary, store_path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return store_path


def ingested_from(store_path: str | Path, npz_path: str | Path, chunk_bytes: int | None = None) -> bool:
    """Whether ``store_path`` holds the complete ingestion of ``npz_path`` in this layout: its ``data`` is
    complete, of :data:`SCHEMA_VERSION`, made from a file of the same size and either the same
    :func:`file_stat` or the same SHA-256 (and, when given, with the same ``chunk_bytes``), and holds
    every chunk (a lost one is logged). The one rule by which :func:`ingest` and the pipeline's ingest
    stage reuse a store."""
    source = Path(npz_path)
    try:
        data = open_store(store_path)["data"]
    except (PtychozarrError, KeyError):
        return False
    attrs = data.attrs
    same = (
        is_complete(data)
        and attrs.get("schema_version") == SCHEMA_VERSION
        and attrs.get("source_size") == source.stat().st_size
        and (chunk_bytes is None or attrs.get("chunk_bytes") == chunk_bytes)
        and (attrs.get("source_stat") == file_stat(source) or attrs.get("source_sha256") == sha256(source))
    )
    if not same:
        return False
    try:
        check_chunks(data, "ingesting it again")
    except PtychozarrError as exc:
        log.warning("%s", exc)
        return False
    return True


def _ingest_members(npz: NpzReader, data: zarr.Group, chunk_bytes: int, scratch: Path) -> dict:
    """Validate and write every member in curve order (reordering in ``scratch``); return the attrs."""
    keys = set(npz.members)
    key = diffraction_key(keys)
    for required in ("xcoords", "ycoords", "probeGuess"):
        if required not in keys:
            raise InvalidScanError(
                f"missing required key {required!r}; a scan NPZ holds diffraction (or diff3d), xcoords, "
                "ycoords and probeGuess"
            )
    coordinates = {name: npz.read(name) for name in ("xcoords", "ycoords")}
    if coordinates["xcoords"].ndim != 1:
        raise InvalidScanError(f"key 'xcoords' has shape {coordinates['xcoords'].shape}; expected (M,)")
    layout = diffraction_layout(npz.member(key), len(coordinates["xcoords"]))
    n, size = layout.n_patterns, layout.size
    defaults, per_pattern = [], {}
    for name in COORDINATE_KEYS:
        source = name if name in keys else name.removesuffix("_start")
        if source != name:
            defaults.append(name)
        values = coordinates[source] if source in coordinates else npz.read(source)
        per_pattern[name] = check_coordinates(name, values, n)
    scan_index = npz.read("scan_index") if "scan_index" in keys else np.zeros(n, np.int64)
    if "scan_index" not in keys:
        defaults.append("scan_index")
    if scan_index.shape != (n,) or not np.issubdtype(scan_index.dtype, np.integer):
        raise InvalidScanError(
            f"key 'scan_index' has shape {scan_index.shape} and dtype {scan_index.dtype}; "
            f"expected ({n},) integers"
        )
    per_pattern["scan_index"] = scan_index.astype(np.int64)
    scalars = {name: _scalar(npz, name) for name in OPTIONAL_SCALARS if name in keys}
    probe = _complex("probeGuess", npz.read("probeGuess"))
    check_square("probeGuess", probe.shape, size)
    truth = npz.member("objectGuess") if "objectGuess" in keys else None
    if truth is not None and len(truth.shape) != 2:
        raise InvalidScanError(f"key 'objectGuess' has shape {truth.shape}; expected a 2-D (H, W) object")
    if truth is not None:  # before the diffraction: a damaged object is refused early
        _write_object(npz, truth, data, scalars.get("pixel_size_m"))
    order = curve_order(*(per_pattern[name] for name in (*COORDINATE_KEYS, "scan_index")))
    _write(data, "intensity_sum", _write_diffraction(npz, layout, data, chunk_bytes, scratch, order))
    _write(data, "input_index", order)
    for name, values in per_pattern.items():
        _write(data, name, values[order])
    _write(data, "probeGuess", probe)
    if layout.intensity:
        data["diffraction"].attrs["units"] = "sqrt(counts)"
    if truth is not None:
        write_frame(data, truth.shape, scalars.get("pixel_size_m"))
    used = {key, *COORDINATE_KEYS, "scan_index", "probeGuess", "objectGuess", *scalars}
    return {
        **scalars,
        "diffraction_key": key,
        "diffraction_layout": layout.name,
        "diffraction_source_dtype": str(npz.members[key].dtype),
        "diffraction_conversion": "sqrt of integer photon counts" if layout.intensity else "none",
        "pattern_order": _PATTERN_ORDER,
        "defaults": sorted(defaults),
        "skipped_keys": sorted(keys - used),
    }


def _write_object(npz: NpzReader, member: NpzMember, data: zarr.Group, pixel_size_m: float | None) -> None:
    """Stream ``objectGuess`` into ``data`` in slabs of about :data:`DEFAULT_CHUNK_BYTES`, stored in
    :data:`OBJECT_TILE`² chunks: an object of any size is never held whole (a Fortran-ordered member
    streams by columns), and a slab is written one chunk at a time, so that the chunks Zarr reads, merges
    and re-encodes at once do not grow with the object's width."""
    shape = tuple(member.shape)
    out = data.create_array(
        "objectGuess", shape=shape, dtype=np.complex64, chunks=tuple(min(OBJECT_TILE, n) for n in shape),
        dimension_names=_DIMS["objectGuess"], **array_options(),
        attributes={**_attributes("objectGuess"), **frame_attributes(pixel_size_m)},
    )  # fmt: skip
    stored = member.storage_shape
    rows = max(1, DEFAULT_CHUNK_BYTES // (stored[1] * member.dtype.itemsize))
    start = 0
    for block in npz.iter_blocks("objectGuess", rows):
        block = _complex("objectGuess", block)
        for across in range(0, block.shape[1], OBJECT_TILE):
            part = block[:, across : across + OBJECT_TILE]
            if member.fortran_order:
                out[across : across + part.shape[1], start : start + len(block)] = part.T
            else:
                out[start : start + len(block), across : across + part.shape[1]] = part
        start += len(block)


def _scalar(npz: NpzReader, key: str) -> float:
    """An optional scalar of the scan (:data:`OPTIONAL_SCALARS`): one finite positive number."""
    unit = OPTIONAL_SCALARS[key]
    values = npz.read(key) if npz.member(key).shape in ((), (1,)) else None
    if values is None or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise InvalidScanError(f"key {key!r} must be one real number ({unit}); fix it in the file")
    value = float(values.reshape(()))
    if not np.isfinite(value) or value <= 0:
        raise InvalidScanError(f"key {key!r} is {value}; give a finite positive number ({unit})")
    return value


def write_frame(
    group: zarr.Group, shape: tuple[int, int], pixel_size_m: float | None, origin: tuple[int, int] = (0, 0)
) -> None:
    """Write the object frame's coordinates beside a 2-D object in ``group``: ``object_y`` and ``object_x``
    (int64 object pixels, ``origin`` + index) and, with ``pixel_size_m``, ``object_y_m`` and
    ``object_x_m`` (metres, pixel × size), named as the objects' CF ``coordinates``.

    Parameters
    ----------
    group : zarr.Group
        The group holding the object(s) of this ``shape`` on :data:`FRAME_DIMS`.
    shape : (int, int)
        Rows and columns of the object.
    pixel_size_m : float or None
        Object pixel size in metres.
    origin : (int, int)
        Object pixel of the object's pixel (0, 0).
    """
    for dim, size, start in zip(FRAME_DIMS, shape, origin, strict=True):
        pixels = np.arange(start, start + size, dtype=np.int64)
        attrs = {"units": "pixel", "long_name": f"object {dim[-1]} (pixel)"}
        if pixel_size_m is not None:
            attrs["pixel_size_m"] = pixel_size_m
        group.create_array(dim, data=pixels, dimension_names=(dim,), overwrite=True, attributes=attrs,
                           **array_options())  # fmt: skip
        if pixel_size_m is not None:
            group.create_array(
                f"{dim}_m", data=pixels * pixel_size_m, dimension_names=(dim,), overwrite=True,
                attributes={"units": "m", "long_name": f"object {dim[-1]} (m)"}, **array_options(),
            )  # fmt: skip


def frame_attributes(pixel_size_m: float | None) -> dict:
    """Attributes of an object on the frame: its metre coordinates (CF ``coordinates``) and pixel size."""
    if pixel_size_m is None:
        return {}
    return {"coordinates": " ".join(f"{d}_m" for d in FRAME_DIMS), "pixel_size_m": pixel_size_m}


def _complex(key: str, values: np.ndarray) -> np.ndarray:
    """A probe or object as complex64, refusing non-numeric data and NaN or inf."""
    if not np.issubdtype(values.dtype, np.number):
        raise InvalidScanError(f"key {key!r} has dtype {values.dtype}; expected complex64")
    if not np.isfinite(values).all():
        raise InvalidScanError(f"key {key!r} holds NaN or inf; fix the {key} saved in the file")
    return values.astype(np.complex64)


def _write(group: zarr.Group, name: str, values: np.ndarray) -> None:
    group.create_array(
        name,
        data=values,
        chunks=values.shape,
        **array_options(),
        dimension_names=_DIMS[name],
        attributes=_attributes(name),
    )


def _attributes(name: str) -> dict:
    """Per-pattern arrays name ``input_index`` as their coordinate (CF), so xarray's zarr engine sees it."""
    per_pattern = _DIMS[name][0] == "pattern" and name != _PATTERN_COORDINATES
    units = {"units": _UNITS[name]}
    return {"coordinates": _PATTERN_COORDINATES, **units} if per_pattern else units


def pattern_intensity(patterns) -> np.ndarray:
    """Σ_hw d² of each pattern of a (k, N, N) block, in float64 (the normaliser's input).

    Each pattern's sum depends on its values only (not on the block around it), so ingestion and a later
    recomputation over other blocks agree bitwise.
    """
    sums = np.empty(len(patterns), np.float64)
    for start in range(0, len(patterns), _SUM_ROWS):
        part = np.array(patterns[start : start + _SUM_ROWS], dtype=np.float64, order="C")
        sums[start : start + len(part)] = np.square(part, out=part).sum(axis=(1, 2))
    return sums


def _write_diffraction(
    npz: NpzReader,
    layout: DiffractionLayout,
    data: zarr.Group,
    chunk_bytes: int,
    scratch: Path,
    order: np.ndarray,
) -> np.ndarray:
    """Write ``data/diffraction`` in curve ``order``: float32 amplitude, whole-pattern chunks.

    Each chunk's patterns are gathered from the input by index (:func:`_pattern_reader`), checked,
    written while the next chunk is read, and summed (Σ d², returned in store order).
    """
    n, size = layout.n_patterns, layout.size
    per_chunk = max(1, min(n, chunk_bytes // (size * size * 4)))
    target = data.create_array(
        "diffraction",
        shape=(n, size, size),
        dtype=np.float32,
        chunks=(per_chunk, size, size),
        **array_options(),
        dimension_names=_DIMS["diffraction"],
        attributes=_attributes("diffraction"),
    )
    sums = np.empty(n, np.float64)
    pending = None
    with _pattern_reader(npz, layout, per_chunk, chunk_bytes, scratch) as read, ThreadPoolExecutor(1) as pool:
        for first in range(0, n, per_chunk):  # one chunk is compressed and written while the next is read
            rows = order[first : first + per_chunk]
            block = read(rows)
            check_block(layout.key, block, rows)
            if layout.intensity:
                values = np.sqrt(block, dtype=np.float32)
            else:
                values = block.astype(np.float32, copy=False)
            sums[first : first + len(rows)] = pattern_intensity(values)
            if pending is not None:
                pending.result()
            pending = pool.submit(target.__setitem__, slice(first, first + len(rows)), values)
        if pending is not None:
            pending.result()
    return sums


@contextmanager
def _pattern_reader(
    npz: NpzReader, layout: DiffractionLayout, per_chunk: int, chunk_bytes: int, scratch: Path
) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """A function reading the patterns of given input indices, (k, N, N) in the member's dtype.

    A stored member with patterns first is read in place, pattern by pattern at its byte offset. Any other
    member (deflated, which only streams from its start, or not pattern-major) is first streamed once, in
    input order, into an uncompressed NPZ under ``scratch`` that is then read the same way: two sequential
    passes and scratch disk the size of the uncompressed patterns, but memory of one chunk and one read of
    every pattern, whatever the order (a gather from compressed chunks would decompress every chunk once
    per output chunk).
    """
    member = npz.member(layout.key)
    if layout.patterns_first and not member.compressed:
        yield lambda rows: npz.read_rows(layout.key, rows, layout.stream_shape).transpose(layout.to_patterns)
        return
    n, size = layout.n_patterns, layout.size
    with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=scratch) as tmp:
        staged_path = Path(tmp) / "patterns.npz"
        with NpzWriter(staged_path) as staged, staged.stream("d", (n, size, size), member.dtype) as append:
            for block in _pattern_blocks(npz, layout, per_chunk, chunk_bytes, Path(tmp)):
                append(block)
        with NpzReader(staged_path) as staged:
            yield lambda rows: staged.read_rows("d", rows)


def _pattern_blocks(
    npz: NpzReader, layout: DiffractionLayout, per_chunk: int, chunk_bytes: int, scratch: Path
) -> Iterator:
    """Blocks of ``per_chunk`` whole patterns (pattern, det_y, det_x) in input order, in the member's dtype.

    When the member is not stored pattern after pattern (legacy (N, N, M)), bands of rows go to a scratch
    array chunked (rows, N, per_chunk) in a temporary directory under ``scratch``, and the patterns come
    back one chunk at a time.
    """
    if layout.patterns_first:
        for block in npz.iter_blocks(layout.key, per_chunk, layout.stream_shape):
            yield block.transpose(layout.to_patterns)
        return
    n, size = layout.n_patterns, layout.size
    itemsize = npz.members[layout.key].dtype.itemsize
    rows = max(1, min(size, chunk_bytes // (size * n * itemsize)))
    with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=scratch) as tmp:
        staged = scratch_array(
            tmp, layout.stream_shape, npz.members[layout.key].dtype, (rows, size, per_chunk)
        )
        band = npz.iter_blocks(layout.key, rows, layout.stream_shape)
        for start, block in zip(range(0, size, rows), band, strict=True):
            staged[start : start + len(block)] = block
        for start in range(0, n, per_chunk):
            yield staged[:, :, start : start + per_chunk].transpose(layout.to_patterns)


def open_dataset(store_path: str | Path, *, verify: bool = True) -> xr.Dataset:
    """The ingested scan as a lazy :class:`xarray.Dataset` backed by dask.

    Variables ``diffraction`` (pattern, det_y, det_x), ``xcoords``, ``ycoords``, ``xcoords_start``,
    ``ycoords_start``, ``scan_index``, ``intensity_sum`` (pattern), ``probeGuess`` (det_y, det_x) and,
    when present, ``objectGuess`` (object_y, object_x), each chunked as stored and with its ``units``,
    and the coordinates ``input_index`` (pattern: patterns are in curve order, ``input_index`` maps them
    to the input's), ``object_y`` and ``object_x`` (object pixels) and, with a pixel size, ``object_y_m``
    and ``object_x_m`` (metres). ``attrs`` are those of ``data`` plus ``store``, the store's path.

    The store is opened past any consolidated metadata, and with ``verify`` every array's chunks are
    listed first: a store that lost a chunk is refused here, before any work. Without ``verify`` a lost
    chunk is refused when it is read (never read as zeros).

    Raises
    ------
    StoreError
        No store at ``store_path``, its ``data`` is incomplete, written by another version, or (with
        ``verify``) misses a chunk (:class:`MissingChunkError`).
    """
    data = require_complete(open_store(store_path), "data")
    version = data.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{store_path}: written by another version of ptychozarr (store schema {version}, this one reads "
            f"{SCHEMA_VERSION}); {_REINGEST}"
        )
    if verify:
        check_chunks(data, _REINGEST)
    variables = {
        name: (array.metadata.dimension_names, da.from_zarr(array)) for name, array in sorted(data.arrays())
    }
    ds = xr.Dataset(variables, attrs={**data.attrs, "store": str(Path(store_path))})
    for name, variable in ds.variables.items():  # units, pixel size; CF coordinates are applied below
        variable.attrs.update({k: v for k, v in data[name].attrs.items() if k != "coordinates"})
    metres = [f"{dim}_m" for dim in FRAME_DIMS]
    return ds.set_coords([name for name in (_PATTERN_COORDINATES, *metres) if name in ds])
