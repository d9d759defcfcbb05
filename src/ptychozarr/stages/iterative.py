"""Iterative stage: an imported reconstruction NPZ (pty-chi, tike) as one more arm's object.

The object may be given in the scan-box frame (compare_models' expectation: the ground truth cut to
the box of the scan positions with an M/2 margin) or in the whole-object frame (the shape of
``objectGuess``); :func:`check_frame` finds which from the files' headers before any work, and refuses a
shape that fits neither. The optional members ``reconstruction_time`` (one number of seconds) and
``algorithm`` (one string) are checked in the same pass: a value of another kind is refused in one line,
never turned into a traceback later.
"""

from __future__ import annotations

import math
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from ptychozarr import align
from ptychozarr.errors import InvalidScanError, PtychozarrError
from ptychozarr.io import mark_complete
from ptychozarr.io.npz import NpzReader
from ptychozarr.io.store import FRAME_DIMS, FRAME_VERSION, array_options
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import arm_key, fingerprint

__all__ = ["check_frame", "check_metadata", "read_reconstruction", "run"]


def run(rt: Runtime, root: zarr.Group, path: Path) -> tuple[str, str, float | None]:
    """Import the NPZ's object into ``arms/<key>/object``; returns (key, label, solver seconds)."""
    obj, seconds, label = read_reconstruction(path)
    key = arm_key(label)
    node = root.require_group(f"arms/{key}")
    params = {"recon": fingerprint(path), "frame": FRAME_VERSION}
    with rt.timed(f"import:{key}"):
        if not rt.reusable(f"import:{key}", node.get("object"), params):
            out = node.create_array(
                "object", shape=obj.shape, dtype=np.complex64, chunks=obj.shape, overwrite=True,
                attributes={"complete": False}, dimension_names=FRAME_DIMS, **array_options(),
            )  # fmt: skip
            out[...] = obj
            mark_complete(out, params=params, label=label, seconds=seconds)
    return key, label, seconds


def check_frame(path: Path, test_data: Path, crop: int) -> str:
    """The frame of the iterative object, ``"scan"`` or ``"object"``, read from headers only.

    The scan box is taken from every scan position (the run later cuts it from the group centres,
    which lie inside it). Placement is :func:`ptychozarr.align.align_iterative` itself, run on lazy
    placeholders of the shapes.

    Raises
    ------
    InvalidScanError
        When the object's shape fits neither frame, or ``reconstruction_time`` or ``algorithm`` is not
        one number or one string.
    """
    reader = _open(path)
    with reader:
        shape = reader.member("reconstructed_object").shape
        _metadata(reader, path)
    gt_shape, positions = _truth_shape_and_positions(test_data)
    try:
        *_, frame = align.align_iterative(
            da.zeros(shape, chunks=-1), da.zeros(gt_shape, chunks=-1), positions, crop
        )
    except InvalidScanError as exc:
        raise InvalidScanError(f"--ptychi-recon {path}: {exc}") from None
    return frame


def _truth_shape_and_positions(test_data: Path) -> tuple[tuple[int, int], np.ndarray]:
    """``objectGuess``'s shape and the scan positions (x, y) of an NPZ or an ingested store."""
    if test_data.suffix == ".npz":
        with NpzReader(test_data) as reader:
            gt_shape = reader.member("objectGuess").shape
            positions = np.stack([reader.read("xcoords"), reader.read("ycoords")], axis=1)
        return gt_shape, positions
    from ptychozarr.io import open_dataset

    ds = open_dataset(test_data)
    return ds["objectGuess"].shape, np.stack([ds["xcoords"].values, ds["ycoords"].values], axis=1)


def read_reconstruction(path: Path) -> tuple[np.ndarray, float | None, str]:
    """An iterative reconstruction NPZ: (complex object, computation time or None, label).

    Reads ``reconstructed_object`` (2-D complex; the header was checked before the run by
    :func:`ptychozarr.preflight.check_reconstruction`), ``algorithm`` (label ``Tike`` for ``tike``, else
    ``PtyChi``, as compare_models) and ``reconstruction_time``. Members stored as pickled objects (e.g. a
    ``metadata`` dict) are never unpickled.
    """
    reader = _open(path)
    with reader:
        algorithm, seconds = _metadata(reader, path)
        obj = reader.read("reconstructed_object")
        if not np.isfinite(obj).all():
            raise InvalidScanError(f"--ptychi-recon {path}: 'reconstructed_object' holds NaN or inf")
    label = "Tike" if str(algorithm).lower() == "tike" else "PtyChi"
    return obj, seconds, label


def check_metadata(path: Path) -> None:
    """Refuse an iterative NPZ whose ``reconstruction_time`` or ``algorithm`` is not one number or one
    string (reads the two small members only); :func:`check_frame` makes this check too."""
    reader = _open(path)
    with reader:
        _metadata(reader, path)


def _open(path: Path) -> NpzReader:
    try:
        return NpzReader(path)
    except PtychozarrError as exc:
        raise InvalidScanError(f"--ptychi-recon {path}: {exc}") from None


def _metadata(reader: NpzReader, path: Path) -> tuple[str | None, float | None]:
    """``algorithm`` (one string) and ``reconstruction_time`` (one finite number ≥ 0), each None if absent.

    Members stored as pickled objects are never unpickled and count as absent, as before; a member of
    another kind (text for the time, several values, a number for the algorithm) is refused.
    """
    time = reader.members.get("reconstruction_time")
    seconds = None
    if time is not None and not time.dtype.hasobject:
        if time.dtype.kind not in "iuf" or math.prod(time.shape) != 1:
            raise InvalidScanError(
                f"--ptychi-recon {path}: 'reconstruction_time' must be one number of seconds, got "
                f"{_describe(reader, time)}; save it as a float (e.g. reconstruction_time=12.5)"
            )
        seconds = float(reader.read("reconstruction_time").item())
        if not (math.isfinite(seconds) and seconds >= 0):
            raise InvalidScanError(
                f"--ptychi-recon {path}: 'reconstruction_time' is {seconds}; give the solver's seconds "
                "(a finite number ≥ 0) or leave the key out"
            )
    member = reader.members.get("algorithm")
    algorithm = None
    if member is not None and not member.dtype.hasobject:
        if member.dtype.kind not in "US" or math.prod(member.shape) != 1:
            raise InvalidScanError(
                f"--ptychi-recon {path}: 'algorithm' must be one string such as 'tike' or 'ptychi', got "
                f"{_describe(reader, member)}; save it as a string or leave the key out"
            )
        value = reader.read("algorithm").item()
        algorithm = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return algorithm, seconds


def _describe(reader: NpzReader, member) -> str:
    """A member's dtype and shape, with its value when it is one short one."""
    text = f"{member.dtype} of shape {member.shape}"
    if math.prod(member.shape) == 1 and member.dtype.itemsize <= 256:
        text += f" ({reader.read(member.name).item()!r})"
    return text
