"""What the stages share: reuse checks, input fingerprints, arm names, the run's store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import zarr

from ptychozarr.io.store import is_complete_with, sha256
from ptychozarr.models.keras_model import sidecar_path
from ptychozarr.report import to_jsonable

__all__ = ["arm_key", "fingerprint", "groups_key", "matches", "open_run_store", "unconsolidate"]

_ARM_KEYS = {"PtychoPINN": "pinn", "Baseline": "baseline", "PtyChi": "ptychi", "Tike": "tike"}


def arm_key(label: str) -> str:
    """Store and file name of an arm (``PtychoPINN`` → ``pinn``; others lower-cased, alphanumeric)."""
    return _ARM_KEYS.get(label) or "".join(c if c.isalnum() else "_" for c in label.lower())


def fingerprint(path: Path) -> dict:
    """Name, size and hash of a file (with a ``.keras`` model's sidecar) or of a directory's files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path, *(p for p in [sidecar_path(path)] if path.suffix == ".keras" and p.exists())]
    digest = hashlib.sha256()
    for f in files:
        digest.update(sha256(f).encode())
    return {"name": path.name, "size": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


def groups_key(groups) -> dict:
    """What identifies a grouping, for the parameters of the stages that read it."""
    return {k: groups.attrs.get(k) for k in ("gridsize", "k", "seed", "input", "points")}


def matches(node, params: dict) -> bool:
    """Whether ``node`` is a complete stage output made with ``params``."""
    return is_complete_with(node, {"params": to_jsonable(params)})


def open_run_store(path: Path) -> zarr.Group:
    """The run's store for writing, created when missing, never through consolidated metadata
    (which a previous run may have left behind and this one is about to change)."""
    store = zarr.storage.LocalStore(path)
    return zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)


def unconsolidate(path: Path) -> None:
    """Drop the consolidated metadata a previous run left in the store's root, so that every reader of
    this run sees the metadata as it is written (the run consolidates again at its end)."""
    root = path / "zarr.json"
    if root.is_file():
        meta = json.loads(root.read_text())
        if meta.pop("consolidated_metadata", None) is not None:
            root.write_text(json.dumps(meta, indent=2))
