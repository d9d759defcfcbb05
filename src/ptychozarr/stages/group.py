"""Group stage: seeded neighbour groups over the whole scan (or a seeded subsample of it).

The groups are written into the scan's store and reused when that store holds complete groups made with
the same parameters from the same scan (its attrs, never consolidated metadata) and with every chunk
stored; groups that lost a chunk or an array are made again. Stages that read the groups key their reuse
by the groups' content (:func:`ptychozarr.stages._common.groups_digest`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

from ptychozarr.config import GroupOptions, ScanOptions
from ptychozarr.errors import StoreError
from ptychozarr.grouping import group
from ptychozarr.io import consolidate, open_store
from ptychozarr.io.store import lost_chunks
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import groups_digest, unconsolidate

__all__ = ["run"]

log = logging.getLogger(__name__)

_ARRAYS = ("nn_indices", "centres", "offsets")


def run(rt: Runtime, ds: xr.Dataset, gridsize: int, options: GroupOptions, scan: ScanOptions) -> xr.Dataset:
    """Groups of ``gridsize²`` neighbours (written into the scan's store; reused when they match)."""
    with rt.timed("group"):
        points = _draw(rt, ds.sizes["pattern"], scan)
        store = Path(ds.attrs["store"])
        consolidated = _consolidated(store)
        if consolidated:  # about to change what it describes
            unconsolidate(store)
        _drop_damaged(store, force=rt.force)
        marker = store / "groups" / "zarr.json"
        before = _stamp(marker)
        groups = group(ds, gridsize, k=options.neighbours, seed=options.group_seed, points=points)
        if before is not None and before == _stamp(marker):  # the grouping kept what it found
            rt.reuse("group", marker.parent)
        elif consolidated:
            consolidate(store)
        groups_digest(groups)
        return groups


def _draw(rt: Runtime, patterns: int, scan: ScanOptions) -> np.ndarray | None:
    """The scan points to group (a seeded draw, sorted), None for all; one group is formed per point.

    Asked for more groups than that (possible at gridsize 1 only: preflight refuses it above), one
    warning line says that every point is used once, as compare_models does at gridsize 1.
    """
    n = min(scan.points or patterns, patterns)
    if scan.n_test_groups is not None and scan.n_test_groups > n:
        rt.warn(
            f"--n-test-groups {scan.n_test_groups} > the {n} scan points in use: forming {n} groups, one "
            "per point, as compare_models does at gridsize 1"
        )
    if n == patterns:
        return None
    return np.sort(np.random.default_rng(scan.subsample_seed).choice(patterns, n, replace=False))


def _consolidated(store: Path) -> bool:
    """Whether the store's root holds consolidated metadata."""
    try:
        return json.loads((store / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _drop_damaged(store: Path, *, force: bool = False) -> None:
    """Mark the store's groups incomplete when an array or a chunk of theirs is missing (or with
    ``force``), so they are made again instead of read as zeros; groups whose metadata cannot be read
    (damaged) are removed, as they can always be made again."""
    try:
        node = open_store(store).get("groups")
        if node is None or not node.attrs.get("complete"):
            return
        absent = [name for name in _ARRAYS if name not in node]
        lost = lost_chunks(node)
    except StoreError as exc:
        log.warning("%s; grouping again", exc)
        shutil.rmtree(store / "groups")
        return
    if absent or lost or force:
        if not force:
            what = f"array {absent[0]!r} is missing" if absent else f"{next(iter(lost))} misses chunks"
            log.warning("%s/groups: %s; grouping again", store, what)
        open_store(store, mode="r+")["groups"].attrs["complete"] = False


def _stamp(path: Path) -> tuple[int, int] | None:
    """Inode and modification time of a file (the grouping replaces its ``groups`` when it regroups)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
