"""Ingest stage: an NPZ scan streamed into the run's store (an ingested ``.zarr`` scan is used as is)."""

from __future__ import annotations

import logging
from pathlib import Path

import xarray as xr

from ptychozarr.io import ingest, open_dataset
from ptychozarr.io.store import ingested_from, remove_leftovers
from ptychozarr.runtime import Runtime

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(rt: Runtime, test_data: Path, store: Path) -> xr.Dataset:
    """The scan as a lazy dataset: ``test_data`` itself when it is a store, else ingested into ``store``
    (reused when the store already holds this file's data in the current layout,
    :func:`~ptychozarr.io.store.ingested_from`; otherwise ingested again). What a killed ingestion left
    beside ``store`` (scratch, partial stores) is removed.

    A ``.zarr`` scan that lost a chunk is refused (:class:`~ptychozarr.io.store.MissingChunkError`, naming
    the array and the fix), never read as zeros."""
    if test_data.suffix != ".npz":
        return open_dataset(test_data)
    removed = remove_leftovers(store.parent, store.name)
    if removed:
        log.info("removed what a killed run left: %s", ", ".join(p.name for p in removed))
    with rt.timed("ingest"):
        if not rt.force and ingested_from(store, test_data):
            rt.reuse("ingest", store)
        else:
            log.info("stage ingest: %s → %s", test_data, store)
            ingest(test_data, store, overwrite=True)
    return open_dataset(store)
