"""Group stage: seeded neighbour groups over the whole scan (or a seeded subsample of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ptychozarr.config import GroupOptions, ScanOptions
from ptychozarr.grouping import group
from ptychozarr.runtime import Runtime

__all__ = ["run"]


def run(rt: Runtime, ds: xr.Dataset, gridsize: int, options: GroupOptions, scan: ScanOptions) -> xr.Dataset:
    """Groups of ``gridsize²`` neighbours (written into the scan's store; reused when they match)."""
    with rt.timed("group"):
        points = None
        n = scan.n_test_groups
        if n is not None and n < ds.sizes["pattern"]:
            rng = np.random.default_rng(scan.subsample_seed)
            points = np.sort(rng.choice(ds.sizes["pattern"], n, replace=False))
        marker = Path(ds.attrs["store"]) / "groups" / "zarr.json"
        before = _stamp(marker)
        groups = group(ds, gridsize, k=options.neighbours, seed=options.group_seed, points=points)
        if before is not None and before == _stamp(marker):  # the grouping kept what it found
            rt.reuse("group", marker.parent)
        return groups


def _stamp(path: Path) -> tuple[int, int] | None:
    """Inode and modification time of a file (the grouping replaces its ``groups`` when it regroups)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
