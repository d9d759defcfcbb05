"""The Zarr v3 store of a run: streamed NPZ ingestion, the lazy dataset view, completeness markers.

Layout (DESIGN.md, "Store"): ``data/diffraction`` (n, N, N) float32 amplitude in chunks of whole
patterns (zstd), ``data/{x,y}coords[_start]`` (n,) float64, ``data/scan_index`` (n,) int64,
``data/intensity_sum`` (n,) float64 (Σ d² of each pattern, computed while ingesting),
``data/input_index`` (n,) int64, ``data/probeGuess`` (N, N) complex64 and, when present,
``data/objectGuess`` (H, W) complex64. Every array carries its dimension names; the ``data`` group
carries the provenance and ``complete``.

Patterns are stored in scan-space order, along a Hilbert curve through their positions
(:mod:`ptychozarr.io.order`), whatever the order of the input: consecutive patterns are close in space,
so the groups of a region read a few contiguous chunks. ``input_index[i]`` is the index in the input file
of stored pattern ``i`` (an auxiliary coordinate on ``pattern``); every per-pattern array follows the same
order. The order depends only on the positions, so the same scan in any order gives the same store, apart
from ``input_index`` and the provenance attrs.

A stage's output counts only once its group has ``"complete": true`` in its attrs, set after its last
chunk (:func:`mark_complete`, :func:`require_complete`). Ingestion writes to a hidden temporary store
beside the target and renames it into place at the end, so no failed run leaves a store behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import ZstdCodec

from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError
from ptychozarr.io.npz import NpzReader, NpzWriter
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

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SCHEMA_VERSION",
    "consolidate",
    "ingest",
    "is_complete",
    "is_complete_with",
    "mark_complete",
    "open_dataset",
    "open_store",
    "pattern_intensity",
    "replace_path",
    "require_complete",
    "scratch_array",
    "sha256",
]

SCHEMA_VERSION = 2
# 4 MiB (64 patterns of 128²): in curve order a block of 256 groups then decodes about 3× its own patterns
# (32 MiB chunks: 7×), and gathering every block costs less than one read of the whole array.
DEFAULT_CHUNK_BYTES = 4 * 2**20
_COMPRESSOR = ZstdCodec(level=3)
_DIMS = {
    "diffraction": ("pattern", "det_y", "det_x"),
    "scan_index": ("pattern",),
    "input_index": ("pattern",),
    "intensity_sum": ("pattern",),
    "probeGuess": ("det_y", "det_x"),
    "objectGuess": ("obj_y", "obj_x"),
    **{key: ("pattern",) for key in COORDINATE_KEYS},
}
_PATTERN_COORDINATES = "input_index"  # CF ``coordinates`` attribute of per-pattern arrays
_SUM_ROWS = 32  # patterns per float64 temporary in pattern_intensity
_PATTERN_ORDER = "Hilbert curve of (xcoords, ycoords); input_index holds each pattern's index in the input"


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


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def open_store(store_path: str | Path, mode: str = "r") -> zarr.Group:
    """Open the root group of a run's store (``mode`` as :func:`zarr.open_group`)."""
    path = Path(store_path)
    if mode == "r" and not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: no Zarr store there; create one with `ptychozarr ingest IN.npz {path}`")
    return zarr.open_group(zarr.storage.LocalStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)


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
        zarr.storage.LocalStore(directory), shape=shape, dtype=dtype, chunks=chunks, compressors=None
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

    Parameters
    ----------
    npz_path : str or Path
        The scan (spec §1.2): ``diff3d`` or ``diffraction`` as (M, N, N), (M, N, N, 1) or legacy (N, N, M);
        ``xcoords``, ``ycoords``, ``probeGuess``; optional ``xcoords_start``, ``ycoords_start``,
        ``scan_index``, ``objectGuess``. Integer diffraction is photon counts and is stored as its square
        root. Other keys (``Y``, ``_metadata``, …) are skipped and listed in the attrs.
    store_path : str or Path
        The store to create.
    overwrite : bool
        Replace an existing ``store_path`` (only once the new store is complete).
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
        ``store_path`` exists and ``overwrite`` is false.
    """
    npz_path, store_path = Path(npz_path), Path(store_path)
    if (store_path.exists() or store_path.is_symlink()) and not overwrite:
        raise StoreError(
            f"{store_path} already exists; choose another path or pass overwrite=True (--overwrite)"
        )
    if chunk_bytes < 1:
        raise InvalidParameterError(f"chunk_bytes={chunk_bytes}: must be a positive number of bytes")
    store_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = store_path.with_name(f".{store_path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with NpzReader(npz_path) as npz, ThreadPoolExecutor(1) as pool:
            digest = pool.submit(sha256, npz_path)  # hashes beside the ingestion (hashlib frees the GIL)
            root = zarr.open_group(zarr.storage.LocalStore(temporary), mode="w", zarr_format=3)
            data = root.create_group("data")
            attrs = _ingest_members(npz, data, chunk_bytes, scratch=store_path.parent)
            mark_complete(
                data,
                source=npz_path.name,
                source_size=npz_path.stat().st_size,
                source_sha256=digest.result(),
                schema_version=SCHEMA_VERSION,
                **attrs,
            )
        replace_path(temporary, store_path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return store_path


def _ingest_members(npz: NpzReader, data: zarr.Group, chunk_bytes: int, scratch: Path) -> dict:
    """Validate and write every member in curve order (reordering in ``scratch``); return the attrs."""
    keys = set(npz.members)
    key = diffraction_key(keys)
    for required in ("xcoords", "ycoords", "probeGuess"):
        if required not in keys:
            raise InvalidScanError(f"missing required key {required!r}; see the data contract (spec §1.2)")
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
    probe = _complex("probeGuess", npz.read("probeGuess"))
    check_square("probeGuess", probe.shape, size)
    obj = _complex("objectGuess", npz.read("objectGuess")) if "objectGuess" in keys else None
    if obj is not None and obj.ndim != 2:
        raise InvalidScanError(f"key 'objectGuess' has shape {obj.shape}; expected a 2-D (H, W) object")
    order = curve_order(*(per_pattern[name] for name in (*COORDINATE_KEYS, "scan_index")))
    _write(data, "intensity_sum", _write_diffraction(npz, layout, data, chunk_bytes, scratch, order))
    _write(data, "input_index", order)
    for name, values in per_pattern.items():
        _write(data, name, values[order])
    _write(data, "probeGuess", probe)
    if obj is not None:
        _write(data, "objectGuess", obj)
    used = {key, *COORDINATE_KEYS, "scan_index", "probeGuess", "objectGuess"}
    return {
        "diffraction_key": key,
        "diffraction_layout": layout.name,
        "diffraction_source_dtype": str(npz.members[key].dtype),
        "diffraction_conversion": "sqrt of integer photon counts" if layout.intensity else "none",
        "pattern_order": _PATTERN_ORDER,
        "defaults": sorted(defaults),
        "skipped_keys": sorted(keys - used),
    }


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
        compressors=_COMPRESSOR,
        dimension_names=_DIMS[name],
        attributes=_attributes(name),
    )


def _attributes(name: str) -> dict:
    """Per-pattern arrays name ``input_index`` as their coordinate (CF), so xarray's zarr engine sees it."""
    per_pattern = _DIMS[name][0] == "pattern" and name != _PATTERN_COORDINATES
    return {"coordinates": _PATTERN_COORDINATES} if per_pattern else {}


def pattern_intensity(patterns) -> np.ndarray:
    """Σ_hw d² of each pattern of a (k, N, N) block, in float64 (the normaliser's input, spec §1.4).

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
        compressors=_COMPRESSOR,
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
    with tempfile.TemporaryDirectory(prefix=".ptychozarr-scratch-", dir=scratch) as tmp:
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
    with tempfile.TemporaryDirectory(prefix=".ptychozarr-scratch-", dir=scratch) as tmp:
        staged = scratch_array(
            tmp, layout.stream_shape, npz.members[layout.key].dtype, (rows, size, per_chunk)
        )
        band = npz.iter_blocks(layout.key, rows, layout.stream_shape)
        for start, block in zip(range(0, size, rows), band, strict=True):
            staged[start : start + len(block)] = block
        for start in range(0, n, per_chunk):
            yield staged[:, :, start : start + per_chunk].transpose(layout.to_patterns)


def open_dataset(store_path: str | Path) -> xr.Dataset:
    """The ingested scan as a lazy :class:`xarray.Dataset` backed by dask.

    Variables ``diffraction`` (pattern, det_y, det_x), ``xcoords``, ``ycoords``, ``xcoords_start``,
    ``ycoords_start``, ``scan_index``, ``intensity_sum`` (pattern), ``probeGuess`` (det_y, det_x) and,
    when present, ``objectGuess`` (obj_y, obj_x), each chunked as stored, with the coordinate
    ``input_index`` (pattern): patterns are in curve order, ``input_index`` maps them to the input's.
    ``attrs`` are those of ``data`` plus ``store``, the store's path.

    Raises
    ------
    StoreError
        No store at ``store_path``, or its ``data`` is incomplete.
    """
    data = require_complete(open_store(store_path), "data")
    variables = {
        name: (array.metadata.dimension_names, da.from_zarr(array)) for name, array in sorted(data.arrays())
    }
    ds = xr.Dataset(variables, attrs={**data.attrs, "store": str(Path(store_path))})
    return ds.set_coords(_PATTERN_COORDINATES) if _PATTERN_COORDINATES in ds else ds
