"""Ingest stage: an NPZ scan streamed into the run's store (an ingested ``.zarr`` scan is used as is)."""

from __future__ import annotations

import logging
from pathlib import Path

import xarray as xr

from ptychozarr.config import sha256
from ptychozarr.errors import PtychozarrError
from ptychozarr.io import ingest, is_complete, open_dataset, open_store
from ptychozarr.io.store import SCHEMA_VERSION, check_chunks, file_stat, remove_leftovers
from ptychozarr.runtime import Runtime

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(rt: Runtime, test_data: Path, store: Path) -> xr.Dataset:
    """The scan as a lazy dataset: ``test_data`` itself when it is a store, else ingested into ``store``
    (reused when the store already holds this file's data — the same size and either the same
    :func:`~ptychozarr.io.store.file_stat` or the same SHA-256 — in the current layout:
    its ``schema_version`` is :data:`ptychozarr.io.store.SCHEMA_VERSION`, with every chunk; otherwise
    ingested again). What a killed ingestion left beside ``store`` (scratch, partial stores) is removed.

    A ``.zarr`` scan that lost a chunk is refused (:class:`~ptychozarr.io.store.MissingChunkError`, naming
    the array and the fix), never read as zeros."""
    if test_data.suffix != ".npz":
        return open_dataset(test_data)
    removed = remove_leftovers(store.parent, store.name)
    if removed:
        log.info("removed what a killed run left: %s", ", ".join(p.name for p in removed))
    with rt.timed("ingest"):
        if not rt.force and _ingested(store, test_data):
            rt.reuse("ingest", store)
        else:
            log.info("stage ingest: %s → %s", test_data, store)
            ingest(test_data, store, overwrite=True)
    return open_dataset(store)


def _ingested(store: Path, source: Path) -> bool:
    try:
        data = open_store(store)["data"]
    except (PtychozarrError, KeyError):
        return False
    attrs = data.attrs
    same = (
        is_complete(data)
        and attrs.get("schema_version") == SCHEMA_VERSION
        and attrs.get("source_size") == source.stat().st_size
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
