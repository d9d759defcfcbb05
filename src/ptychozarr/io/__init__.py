"""Input and storage: streamed NPZ reading and writing, the scan contract, the Zarr store of a run."""

from ptychozarr.io.npz import NpzReader, NpzWriter
from ptychozarr.io.order import curve_order
from ptychozarr.io.store import (
    array_options,
    check_chunks,
    consolidate,
    ingest,
    is_complete,
    mark_complete,
    missing_chunks,
    open_array,
    open_dataset,
    open_store,
    pattern_intensity,
    replace_path,
    require_complete,
)

__all__ = [
    "NpzReader",
    "NpzWriter",
    "array_options",
    "check_chunks",
    "consolidate",
    "curve_order",
    "ingest",
    "is_complete",
    "mark_complete",
    "missing_chunks",
    "open_array",
    "open_dataset",
    "open_store",
    "pattern_intensity",
    "replace_path",
    "require_complete",
]
