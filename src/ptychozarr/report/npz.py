"""``reconstructions.npz`` and ``reconstructions_aligned.npz``, streamed in row slabs.

Members follow compare_models: ``<prefix>_amplitude`` / ``_phase`` (float32) and
``_complex`` (complex64) per arm, the PINN arm under the prefix ``ptychopinn``, and numeric members
only (a missing registration offset is NaN, never an object array). Beyond compare_models:

- every array has ``<prefix>_origin``: float64 (y, x) of its pixel [0, 0] in ground-truth object
  pixels (NaN when unknown), so canvases of different extents can be overlaid;
- the aligned file always has compare_models' ``ground_truth_*`` (the first arm's crop, as
  compare_models scores every arm on the PINN's), and also each arm's own crop
  (``ground_truth_<prefix>_*``) when the arms' crops differ.

Beside each file, ``reconstructions_metadata.txt`` / ``reconstructions_aligned_metadata.txt`` list its
members as compare_models writes them (``- key: shape dtype``, a scalar's value, ``None (not
available)`` for compare_models' PINN and Baseline members the run has not, and for a registration
offset that is NaN), then compare_models' description lines.

Members are stored, not deflated (compare_models uses ``np.savez_compressed``; ``np.load`` reads
both): reconstructions deflate to about 0.9 of their size, and deflating took most of the report's
time (10 of 14 s at 32,000 positions).

Each file is written under a unique temporary name and renamed into place. Inputs may be numpy,
Zarr or dask arrays; at most one row slab of one array is in memory at a time: about ``slab_bytes``,
in whole row chunks of a chunked array (so a chunk is never decoded twice).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ptychozarr.errors import InvalidParameterError
from ptychozarr.io.npz import NpzWriter
from ptychozarr.io.store import read_by_chunk
from ptychozarr.report._files import replacing

__all__ = ["metadata_path", "npz_prefix", "write_aligned_npz", "write_reconstructions_npz"]

_SLAB_BYTES = 2**24
_PREFIX = {"pinn": "ptychopinn"}
_NAN_PAIR = (np.nan, np.nan)


def npz_prefix(key: str) -> str:
    """Member prefix of an arm's arrays (compare_models names the PINN arm ``ptychopinn``)."""
    return _PREFIX.get(key, key)


def _rows(array, slab_bytes: int) -> int:
    """Rows per slab: about ``slab_bytes`` of complex64, in whole row chunks of a chunked array when one
    fits (so that no chunk is read twice), else fewer (a chunk is then read by each slab it meets)."""
    rows = max(1, slab_bytes // max(1, array.shape[1] * 8))
    chunks = getattr(array, "chunks", None)
    if not chunks:
        return rows
    chunk = chunks[0] if isinstance(chunks[0], int) else max(chunks[0])
    return rows // chunk * chunk or rows


def _slabs(array, slab_bytes: int):
    """Row slabs of ``array``, each read one chunk at a time (:func:`~ptychozarr.io.store.read_by_chunk`):
    no more than one decoded chunk is held however wide the array."""
    rows = _rows(array, slab_bytes)
    for start in range(0, array.shape[0], rows):
        yield read_by_chunk(array, slice(start, start + rows), slice(None))


_PARTS = ("amplitude", "phase", "complex")
# compare_models' members for its two arms, listed as not available in the metadata when absent
_COMPARE_MODELS_ARMS = ("ptychopinn", "baseline")
_DESCRIPTION = (
    "- *_amplitude: Real-valued amplitude data",
    "- *_phase: Real-valued phase data in radians",
    "- *_complex: Complex-valued reconstruction data",
)


def metadata_path(path: str | os.PathLike) -> Path:
    """The metadata text file beside an NPZ (``reconstructions.npz`` → ``reconstructions_metadata.txt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_metadata.txt")


class _Listing:
    """The members written to an NPZ, in order, for its metadata file."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: set[str] = set()

    def array(self, name: str, shape, dtype) -> None:
        self.names.add(name)
        self.lines.append(f"- {name}: {tuple(int(n) for n in shape)} {np.dtype(dtype).name}")

    def scalar(self, name: str, value: float) -> None:
        self.names.add(name)
        shown = "None (not available)" if not np.isfinite(value) else f"{float(value)} (scalar)"
        self.lines.append(f"- {name}: {shown}")

    def absent_arms(self) -> list[str]:
        return [
            f"- {prefix}_{part}: None (not available)"
            for prefix in _COMPARE_MODELS_ARMS
            if f"{prefix}_complex" not in self.names
            for part in _PARTS
        ]


def _write_metadata(path: Path, title: str, listing: _Listing, description: tuple[str, ...]) -> Path:
    target = metadata_path(path)
    lines = [
        title,
        "=" * len(title),
        "",
        f"Arrays saved in {Path(path).name}:",
        *listing.absent_arms(),
        *listing.lines,
        "",
        "Description:",
        *description,
    ]
    with replacing(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def _stream_parts(
    npz: NpzWriter, prefix: str, array, slab_bytes: int, listing: _Listing | None = None
) -> None:
    """``<prefix>_amplitude``, ``_phase`` and ``_complex`` of a 2-D complex array, slab by slab."""
    if len(array.shape) != 2:
        raise InvalidParameterError(f"{prefix}: expected a 2-D image, got shape {tuple(array.shape)}")
    for part, func, dtype in (
        ("amplitude", np.abs, np.float32),
        ("phase", np.angle, np.float32),
        ("complex", np.asarray, np.complex64),
    ):
        with npz.stream(f"{prefix}_{part}", tuple(array.shape), dtype) as append:
            for slab in _slabs(array, slab_bytes):
                append(func(slab).astype(dtype))
        if listing is not None:
            listing.array(f"{prefix}_{part}", array.shape, dtype)


def _write_origin(npz: NpzWriter, prefix: str, origin, listing: _Listing | None = None) -> None:
    value = np.asarray(_NAN_PAIR if origin is None else origin, dtype=np.float64)
    npz.write(f"{prefix}_origin", value)
    if listing is not None:
        listing.array(f"{prefix}_origin", value.shape, value.dtype)


def write_reconstructions_npz(
    path: str | os.PathLike,
    objects: Mapping[str, object],
    origins: Mapping[str, tuple[float, float] | None],
    *,
    ground_truth=None,
    slab_bytes: int = _SLAB_BYTES,
) -> Path:
    """Write each arm's object (before alignment) with its origin, and the whole ground truth.

    Parameters
    ----------
    path : path
        The NPZ to write (``reconstructions.npz``).
    objects : mapping of arm key to 2-D complex array
        Stitched or imported objects, in the order to write them.
    origins : mapping of arm key to (y, x) or None
        Position of each object's pixel [0, 0] in ground-truth object pixels (a canvas' origin); a
        missing key or None is written as NaN.
    ground_truth : 2-D complex array, optional
        The whole ``objectGuess``, written as ``ground_truth_*`` with origin (0, 0).
    slab_bytes : int
        Approximate size of one row slab read at a time.
    """
    listing = _Listing()
    with replacing(path) as tmp, NpzWriter(tmp) as npz:
        for key, array in objects.items():
            _stream_parts(npz, npz_prefix(key), array, slab_bytes, listing)
            _write_origin(npz, npz_prefix(key), origins.get(key), listing)
        if ground_truth is not None:
            _stream_parts(npz, "ground_truth", ground_truth, slab_bytes, listing)
            _write_origin(npz, "ground_truth", (0.0, 0.0), listing)
    description = (
        *_DESCRIPTION,
        "- *_origin: (y, x) of pixel [0, 0] in ground-truth object pixels (NaN: unknown)",
        "- Data saved BEFORE registration correction",
    )
    _write_metadata(Path(path), "NPZ File Contents:", listing, description)
    return Path(path)


def write_aligned_npz(
    path: str | os.PathLike,
    aligned: Mapping[str, object],
    ground_truth,
    *,
    offsets: Mapping[str, tuple[float, float] | None] | None = None,
    origins: Mapping[str, tuple[float, float] | None] | None = None,
    slab_bytes: int = _SLAB_BYTES,
) -> Path:
    """Write each arm's aligned crop, its registration offset and the ground truth it was scored on.

    Parameters
    ----------
    path : path
        The NPZ to write (``reconstructions_aligned.npz``).
    aligned : mapping of arm key to 2-D complex array
        Each arm after alignment (and registration), in the order to write them.
    ground_truth : 2-D complex array, or mapping of arm key to one
        The ground-truth crop each arm was scored against. A single array, or a mapping whose crops
        are all equal, is written once as ``ground_truth_*``; when crops differ (in shape or
        content, compared slab by slab), ``ground_truth_*`` is the first arm's crop and every arm's
        crop is also written as ``ground_truth_<prefix>_*``.
    offsets : mapping of arm key to (dy, dx) or None, optional
        Registration offsets, written as ``<key>_offset_dy`` / ``_dx`` (NaN when None or missing).
    origins : mapping of arm key to (y, x) or None, optional
        Position of each crop's pixel [0, 0] in ground-truth object pixels (NaN when unknown); the
        arm's ground-truth crop shares it.
    slab_bytes : int
        Approximate size of one row slab read at a time.
    """
    offsets, origins = offsets or {}, origins or {}
    shared, truths = _truths(ground_truth, list(aligned), slab_bytes)
    listing = _Listing()
    with replacing(path) as tmp, NpzWriter(tmp) as npz:
        for key, array in aligned.items():
            prefix = npz_prefix(key)
            _stream_parts(npz, prefix, array, slab_bytes, listing)
            offset = offsets.get(key)
            for axis, value in zip(("dy", "dx"), _NAN_PAIR if offset is None else offset, strict=True):
                npz.write(f"{key}_offset_{axis}", np.float64(value))
                listing.scalar(f"{key}_offset_{axis}", float(value))
            _write_origin(npz, prefix, origins.get(key), listing)
            if truths is not None:
                _stream_parts(npz, f"ground_truth_{prefix}", truths[key], slab_bytes, listing)
        if shared is not None:
            _stream_parts(npz, "ground_truth", shared, slab_bytes, listing)
    description = (
        *_DESCRIPTION,
        "- *_offset_dy, *_offset_dx: Registration offsets in pixels (NaN: not registered)",
        "- *_origin: (y, x) of pixel [0, 0] in ground-truth object pixels (NaN: unknown)",
        "- ground_truth_*: the first arm's ground-truth crop; ground_truth_<arm>_*: each arm's own crop, "
        "written when the crops differ",
        "- Data saved AFTER registration correction and alignment",
    )
    _write_metadata(Path(path), "Aligned NPZ File Contents:", listing, description)
    return Path(path)


def _truths(ground_truth, keys: list[str], slab_bytes: int) -> tuple[object, Mapping | None]:
    """(the one truth serving every arm, None) or (the first arm's truth, the per-arm truths) when
    they differ."""
    if not isinstance(ground_truth, Mapping):
        return ground_truth, None
    missing = [k for k in keys if k not in ground_truth]
    if missing:
        raise InvalidParameterError(
            f"ground truth crops are missing for arms {missing}; give one crop per aligned arm or one array"
        )
    if not keys:
        return None, None
    first = ground_truth[keys[0]]
    if all(_equal(first, ground_truth[k], slab_bytes) for k in keys[1:]):
        return first, None
    return first, ground_truth


def _equal(a, b, slab_bytes: int) -> bool:
    if a is b:
        return True
    if tuple(a.shape) != tuple(b.shape):
        return False
    return all(
        np.array_equal(x, y, equal_nan=True)
        for x, y in zip(_slabs(a, slab_bytes), _slabs(b, slab_bytes), strict=True)
    )
