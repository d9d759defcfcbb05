"""What the stages share: reuse checks, input fingerprints, arm names, the run's store."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import zarr

from ptychozarr.io.store import CheckedStore, sha256
from ptychozarr.models.formats import formats

__all__ = [
    "arm_key",
    "fingerprint",
    "groups_digest",
    "groups_key",
    "open_run_store",
    "unconsolidate",
]

log = logging.getLogger(__name__)

_GROUP_ARRAYS = ("nn_indices", "centres", "offsets")
_ARM_KEYS = {"PtychoPINN": "pinn", "Baseline": "baseline", "PtyChi": "ptychi", "Tike": "tike"}


def arm_key(label: str) -> str:
    """Store and file name of an arm (``PtychoPINN`` → ``pinn``; others lower-cased, alphanumeric)."""
    return _ARM_KEYS.get(label) or "".join(c if c.isalnum() else "_" for c in label.lower())


def fingerprint(path: Path) -> dict:
    """Name, size and hash of a file — a model with every file it is made of (its format entry's
    :meth:`~ptychozarr.models.formats.ModelFormat.files`: sidecar, probe) — or of a directory's files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        entry = next((f for f in formats() if f.claims(path)), None)
        files = entry.files(path) if entry is not None else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(sha256(f).encode())
    return {"name": path.name, "size": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


def groups_key(groups) -> dict:
    """What identifies a grouping, for the parameters of the stages that read it: its parameters, the
    fingerprint of the scan it grouped and a digest of what it holds (:func:`groups_digest`)."""
    key = {k: groups.attrs.get(k) for k in ("gridsize", "k", "seed", "input", "points")}
    return {**key, "content_sha256": groups_digest(groups)}


def groups_digest(groups) -> str:
    """SHA-256 of a grouping's content: ``nn_indices``, ``centres``, ``offsets`` and the normaliser
    (read once and kept in ``groups.attrs["content_sha256"]``)."""
    if "content_sha256" not in groups.attrs:
        digest = hashlib.sha256()
        for name in _GROUP_ARRAYS:
            values = np.ascontiguousarray(groups[name].values)
            digest.update(f"{name}{values.dtype.str}{values.shape}".encode())
            digest.update(values.tobytes())
        digest.update(repr(groups.attrs.get("normaliser")).encode())
        groups.attrs["content_sha256"] = digest.hexdigest()
    return groups.attrs["content_sha256"]


def open_run_store(path: Path) -> zarr.Group:
    """The run's store for writing, created when missing, never through consolidated metadata
    (which a previous run may have left behind and this one is about to change); chunks are checked
    against their checksums as they are read (:class:`ptychozarr.io.store.CheckedStore`)."""
    store = CheckedStore(zarr.storage.LocalStore(path), strict=False)
    return zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)


def unconsolidate(path: Path) -> None:
    """Drop the consolidated metadata a previous run left in the store's root, so that every reader of
    this run sees the metadata as it is written (the run consolidates again at its end)."""
    root = path / "zarr.json"
    if root.is_file():
        meta = json.loads(root.read_text())
        if meta.pop("consolidated_metadata", None) is not None:
            root.write_text(json.dumps(meta, indent=2))
