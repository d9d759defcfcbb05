"""Iterative stage: an imported reconstruction NPZ (pty-chi, tike) as one more arm's object."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ptychozarr.errors import InvalidScanError, PtychozarrError
from ptychozarr.io import mark_complete
from ptychozarr.io.npz import NpzReader
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import arm_key, fingerprint, matches

__all__ = ["read_reconstruction", "run"]


def run(rt: Runtime, root: zarr.Group, path: Path) -> tuple[str, str, float | None]:
    """Import the NPZ's object into ``arms/<key>/object``; returns (key, label, solver seconds)."""
    obj, seconds, label = read_reconstruction(path)
    key = arm_key(label)
    node = root.require_group(f"arms/{key}")
    params = {"recon": fingerprint(path)}
    with rt.timed(f"import:{key}"):
        if not rt.force and matches(node.get("object"), params):
            rt.reuse(f"import:{key}")
        else:
            out = node.create_array(
                "object", shape=obj.shape, dtype=np.complex64, chunks=obj.shape, overwrite=True,
                attributes={"complete": False}, dimension_names=("obj_y", "obj_x"),
            )  # fmt: skip
            out[...] = obj
            mark_complete(out, params=params, label=label, seconds=seconds)
    return key, label, seconds


def read_reconstruction(path: Path) -> tuple[np.ndarray, float | None, str]:
    """An iterative reconstruction NPZ: (complex object, computation time or None, label).

    Reads ``reconstructed_object`` (2-D complex; the header was checked before the run by
    :func:`ptychozarr.preflight.check_reconstruction`), ``algorithm`` (label ``Tike`` for ``tike``, else
    ``PtyChi``, as compare_models) and ``reconstruction_time``. Members stored as pickled objects (e.g. a
    ``metadata`` dict) are never unpickled.
    """
    try:
        reader = NpzReader(path)
    except PtychozarrError as exc:
        raise InvalidScanError(f"--ptychi-recon {path}: {exc}") from None
    with reader:
        obj = reader.read("reconstructed_object")
        if not np.isfinite(obj).all():
            raise InvalidScanError(f"--ptychi-recon {path}: 'reconstructed_object' holds NaN or inf")
        algorithm = _scalar(reader, "algorithm")
        seconds = _scalar(reader, "reconstruction_time")
    label = "Tike" if str(algorithm).lower() == "tike" else "PtyChi"
    return obj, (float(seconds) if seconds is not None else None), label


def _scalar(reader: NpzReader, key: str):
    member = reader.members.get(key)
    if member is None or member.dtype.hasobject:
        return None
    return reader.read(key).item()
