"""Ingest stage: an NPZ scan streamed into the run's store (an ingested ``.zarr`` scan is used as is)."""

from __future__ import annotations

import logging
from pathlib import Path

import xarray as xr

from ptychozarr.config import sha256
from ptychozarr.errors import PtychozarrError
from ptychozarr.io import ingest, is_complete, open_dataset, open_store
from ptychozarr.io.store import SCHEMA_VERSION
from ptychozarr.runtime import Runtime

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(rt: Runtime, test_data: Path, store: Path) -> xr.Dataset:
    """The scan as a lazy dataset: ``test_data`` itself when it is a store, else ingested into ``store``
    (reused when the store already holds this file's data, by size and SHA-256, in the current layout:
    its ``schema_version`` is :data:`ptychozarr.io.store.SCHEMA_VERSION`)."""
    if test_data.suffix != ".npz":
        return open_dataset(test_data)
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
    return (
        is_complete(data)
        and attrs.get("schema_version") == SCHEMA_VERSION
        and attrs.get("source_size") == source.stat().st_size
        and attrs.get("source_sha256") == sha256(source)
    )
