"""The scan data contract (PtychoPINN's NPZ keys): which keys, which layouts, which values are accepted.

Every check raises :class:`~ptychozarr.errors.InvalidScanError` with the key, the problem and the fix.
The checks of diffraction values run on one block at a time, as the blocks stream past.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptychozarr.errors import InvalidScanError
from ptychozarr.io.npz import NpzMember

__all__ = [
    "COORDINATE_KEYS",
    "DIFFRACTION_KEYS",
    "DiffractionLayout",
    "check_block",
    "check_coordinates",
    "check_square",
    "diffraction_key",
    "diffraction_layout",
]

DIFFRACTION_KEYS = ("diff3d", "diffraction")  # looked up in this order, as compare_models does
COORDINATE_KEYS = ("xcoords", "ycoords", "xcoords_start", "ycoords_start")


@dataclass(frozen=True)
class DiffractionLayout:
    """How the diffraction member is stored and how to turn it into (pattern, det_y, det_x).

    Attributes
    ----------
    key : str
        The member.
    n_patterns, size : int
        M and N.
    stream_shape : tuple of int
        The member's data read as a C-ordered 3-D array (singleton axis dropped, Fortran order reversed).
    to_patterns : tuple of int
        Transpose of a ``stream_shape`` array giving (pattern, det_y, det_x).
    intensity : bool
        Integer data: photon counts, stored as their square root.
    name : str
        The layout in words, for the store's attrs.
    """

    key: str
    n_patterns: int
    size: int
    stream_shape: tuple[int, int, int]
    to_patterns: tuple[int, int, int]
    intensity: bool
    name: str

    @property
    def patterns_first(self) -> bool:
        """Whether the first stream axis is the pattern axis (blocks of rows are blocks of patterns)."""
        return self.to_patterns[0] == 0


def diffraction_key(keys) -> str:
    """The diffraction key present in ``keys``."""
    for key in DIFFRACTION_KEYS:
        if key in keys:
            return key
    raise InvalidScanError(
        "missing required key 'diff3d' or 'diffraction' (the diffraction amplitudes, (M, N, N) float32)"
    )


def diffraction_layout(member: NpzMember, n_points: int) -> DiffractionLayout:
    """Recognise (M, N, N), (M, N, N, 1) and legacy (N, N, M) layouts, in C or Fortran order.

    Parameters
    ----------
    member : NpzMember
        The diffraction member.
    n_points : int
        Length of ``xcoords``: the pattern count.
    """
    key, shape = member.name, member.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidScanError(
            f"key {key!r} has shape {member.shape}; expected (M, N, N), (M, N, N, 1) or legacy (N, N, M)"
        )
    if not (np.issubdtype(member.dtype, np.floating) or np.issubdtype(member.dtype, np.integer)):
        raise InvalidScanError(
            f"key {key!r} has dtype {member.dtype}; expected float32 amplitude or uint16 counts"
        )
    if shape[0] == n_points:
        labels, pair = "mrc", shape[1:]
    elif shape[2] == n_points:
        labels, pair = "rcm", shape[:2]
    else:
        raise InvalidScanError(
            f"key {key!r} has shape {member.shape} but 'xcoords' has {n_points} entries: the pattern count "
            "must equal the coordinate count (first axis, or last axis for the legacy (N, N, M) layout)"
        )
    if pair[0] != pair[1]:
        raise InvalidScanError(
            f"key {key!r}: patterns are {pair[0]}×{pair[1]}; crop or pad them to square N×N patterns"
        )
    if n_points == 0:
        raise InvalidScanError(f"key {key!r} holds no patterns (empty scan); nothing to ingest")
    stream = labels[::-1] if member.fortran_order else labels
    return DiffractionLayout(
        key=key,
        n_patterns=n_points,
        size=pair[0],
        stream_shape=tuple(shape[::-1] if member.fortran_order else shape),
        to_patterns=tuple(stream.index(axis) for axis in "mrc"),
        intensity=bool(np.issubdtype(member.dtype, np.integer)),
        name={"mrc": "(M, N, N", "rcm": "(N, N, M"}[labels]
        + (", 1)" if len(member.shape) == 4 else ")")
        + (" Fortran order" if member.fortran_order else ""),
    )


def check_coordinates(key: str, values: np.ndarray, n_points: int) -> np.ndarray:
    """Check one coordinate member: 1-D, ``n_points`` long, finite; return it as float64."""
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n_points:
        raise InvalidScanError(
            f"key {key!r} has shape {values.shape}; expected ({n_points},), one entry per scan position"
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise InvalidScanError(
            f"key {key!r} has dtype {values.dtype}; expected real numbers (float64 pixels)"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InvalidScanError(
            f"key {key!r} holds NaN or inf at {bad.size} position(s) (first at index {bad[0]}); "
            "fix or drop those scan positions"
        )
    return values.astype(np.float64)


def check_square(key: str, shape: tuple[int, ...], size: int) -> None:
    """Check that a 2-D array (the probe) is ``size``×``size``, the pattern shape."""
    if tuple(shape) != (size, size):
        raise InvalidScanError(
            f"key {key!r} has shape {shape}; expected ({size}, {size}), the shape of the diffraction patterns"
        )


def check_block(key: str, block: np.ndarray, indices: np.ndarray) -> None:
    """Check one block of diffraction values: finite and not negative.

    ``indices`` are the input indices of the block's patterns, named in the message.
    """
    if np.issubdtype(block.dtype, np.floating):
        finite = np.isfinite(block)
        if not finite.all():
            index = indices[np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0]]
            raise InvalidScanError(
                f"key {key!r}: pattern {index} holds NaN or inf; fix or drop that pattern before ingesting"
            )
    if block.size and block.min() < 0:
        index = indices[np.flatnonzero(block.reshape(len(block), -1).min(axis=1) < 0)[0]]
        raise InvalidScanError(
            f"key {key!r}: pattern {index} holds negative values; diffraction must be amplitudes "
            "(sqrt of counts, ≥ 0) or integer counts"
        )
