"""The checks made once, before any work: a configuration against the scan's header.

:func:`validate` reads headers only (the NPZ's member headers or the store's metadata, the models'
sidecars, the iterative NPZ's header) and raises a :class:`~ptychozarr.errors.PtychozarrError` with one
line naming the problem and the fix, so that a run that cannot succeed is refused (exit code 2 on the
command line) before anything is ingested, inferred or marked complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptychozarr.config import CompareConfig, ScanOptions, check_crop
from ptychozarr.errors import InvalidParameterError, InvalidScanError, PtychozarrError
from ptychozarr.models.base import ModelSpec

__all__ = ["ScanHeader", "check_groups", "check_positions", "model_spec", "validate"]

MAX_CANVAS = 2**20
"""Largest canvas side (pixels) a scan without ``objectGuess`` may stitch to."""
TRUTH_FACTOR = 8
"""With ``objectGuess``, the canvas side may reach this many times the object's (or pattern's) side."""


@dataclass(frozen=True)
class ScanHeader:
    """What a run needs to know of its scan and models before any work.

    Attributes
    ----------
    patterns : int
        Scan positions in the file.
    N : int
        Pattern side in pixels.
    has_truth : bool
        Whether the scan holds ``objectGuess`` (without it nothing is scored).
    is_store : bool
        Whether the scan is an ingested Zarr store (else an NPZ).
    gridsize : int
        Gridsize of the groups the models need (the largest of the models').
    """

    patterns: int
    N: int
    has_truth: bool
    is_store: bool
    gridsize: int


def model_spec(path: Path, *, trust_bundle: bool) -> ModelSpec:
    """A model's spec through its format's entry: from its sidecar (no framework), or once loaded."""
    from ptychozarr.inference import model_spec

    return model_spec(path, trust_bundle=trust_bundle)


def validate(config: CompareConfig) -> ScanHeader:
    """Check ``config`` against its scan, models and iterative NPZ, reading headers only.

    Returns
    -------
    ScanHeader

    Raises
    ------
    PtychozarrError
        One line naming the flag or file and the fix: a missing input, nothing to compare, a crop M
        that is odd or larger than N, a model of another N or gridsize, more groups than scan points
        at gridsize > 1 (:func:`check_groups`), a bundle without
        ``--trust-bundle``, an iterative NPZ without a 2-D complex ``reconstructed_object`` or with a
        ``reconstruction_time`` or ``algorithm`` that is not one number or one string, positions that are
        not finite or span a canvas far larger than the object (:func:`check_positions`).
    """
    from ptychozarr.models import check_compatible

    if not config.test_data.exists():
        raise InvalidParameterError(f"--test-data {config.test_data}: no such file or store")
    if not (config.test_data.is_file() or config.test_data.is_dir()):  # stat only: a FIFO is never opened
        raise InvalidParameterError(
            f"--test-data {config.test_data}: not a regular file or a store directory (a FIFO or device?); "
            "give an NPZ file or an ingested .zarr store"
        )
    if not config.models and config.ptychi_recon is None:
        raise InvalidParameterError(
            "nothing to compare: give --pinn-model, --baseline-model, --model or --ptychi-recon"
        )
    for label, path in config.models:
        if not path.exists():
            raise InvalidParameterError(
                f"model {label!r}: {path} does not exist; give an existing model path"
            )
        if not (path.is_file() or path.is_dir()):
            raise InvalidParameterError(
                f"model {label!r}: {path} is not a regular file or directory (a FIFO or device?); "
                "give a model file"
            )
    patterns, n_pix, has_truth, is_store = _scan_header(config.test_data)
    crop = check_crop(config.infer.stitch_crop_size, n_pix)
    check_positions(config.test_data, crop, n_pix)
    specs = [model_spec(path, trust_bundle=config.infer.trust_bundle) for _, path in config.models]
    gridsize = max((s.gridsize for s in specs), default=1)
    for spec in specs:
        check_compatible(spec, n_pix, gridsize)
    check_groups(config.scan, patterns, gridsize)
    if config.ptychi_recon is not None:
        check_reconstruction(config.ptychi_recon)
    return ScanHeader(patterns, n_pix, has_truth, is_store, gridsize)


def check_groups(scan: ScanOptions, patterns: int, gridsize: int) -> None:
    """Refuse more groups than scan points at gridsize > 1, as compare_models does.

    Each drawn scan point seeds one group. compare_models then forms more groups only by K-choose-C
    oversampling, which it never enables, so it fails (after loading the models and the data); here the
    request is refused before any work. At gridsize 1 it uses every point once instead, and so does the
    group stage (:func:`ptychozarr.stages.group.run`, one warning line).

    Parameters
    ----------
    scan : ScanOptions
        ``--n-test-groups`` G, ``--n-test-subsample`` S.
    patterns : int
        Scan points in the file: min(S or G, patterns) points are drawn.
    gridsize : int
        Gridsize of the groups (the largest of the models').
    """
    groups = scan.n_test_groups
    drawn = min(scan.points or patterns, patterns)
    if groups is None or groups <= drawn or gridsize == 1:
        return
    subsample = scan.n_test_subsample
    if subsample is None:
        source, fix = f"the scan has only {patterns} points", ""
    else:
        whole = f" (the scan has only {patterns})" if subsample > patterns else ""
        source = f"--n-test-subsample {subsample} draws {drawn} points{whole}"
        fix = f", or --n-test-subsample {groups} or more" if groups <= patterns else ""
    raise InvalidParameterError(
        f"--n-test-groups {groups}: {source}, and at gridsize {gridsize} each point seeds one group "
        "(more groups than points needs K-choose-C oversampling, which compare_models refuses too); "
        f"give --n-test-groups {drawn} or less{fix}"
    )


def _scan_header(test_data: Path) -> tuple[int, int, bool, bool]:
    """Patterns, pattern side, ground truth present, is a store — from the NPZ header or the store."""
    from ptychozarr.io import open_dataset
    from ptychozarr.io.npz import NpzReader
    from ptychozarr.io.validate import diffraction_key, diffraction_layout

    if test_data.suffix != ".npz":
        ds = open_dataset(test_data)
        return int(ds.sizes["pattern"]), int(ds.sizes["det_y"]), "objectGuess" in ds, True
    with NpzReader(test_data) as npz:
        if "xcoords" not in npz.members:
            raise InvalidScanError(f"{test_data}: missing required key 'xcoords'")
        n_points = npz.members["xcoords"].shape[0] if npz.members["xcoords"].shape else 0
        layout = diffraction_layout(npz.members[diffraction_key(npz.members)], n_points)
        return layout.n_patterns, layout.size, "objectGuess" in npz.members, False


def check_positions(test_data: Path, crop: int, n_pix: int) -> int:
    """Refuse scan positions that cannot be stitched: not finite, or spanning a canvas far too large.

    The canvas is the one PtychoPINN's ``reassemble_position`` makes (:func:`ptychozarr.stitch.stitch`):
    side ``M + 2·ceil(max |position − centre|)``, estimated here about the mean position. With
    ``objectGuess`` it may be at most :data:`TRUTH_FACTOR` times the object's side (or the pattern's, if
    larger); without, at most :data:`MAX_CANVAS` pixels. Positions scaled by a wrong unit (metres read
    as pixels, or pixels multiplied by 1e12) are refused here, before any work, instead of exhausting
    memory while stitching. Reads the coordinates only (a few small 1-D arrays) and the object's header.

    Returns
    -------
    int
        The estimated canvas side in pixels.
    """
    from ptychozarr.io.validate import check_coordinates

    try:
        coordinates, n_points, object_shape = _read_positions(test_data)
        pairs = [
            (pair, np.stack([check_coordinates(key, coordinates[key], n_points) for key in pair], axis=-1))
            for pair in (("xcoords", "ycoords"), ("xcoords_start", "ycoords_start"))
            if all(key in coordinates for key in pair)
        ]
    except InvalidScanError as exc:
        raise InvalidScanError(
            f"{test_data}: {exc}" if str(test_data) not in str(exc) else str(exc)
        ) from None
    side, worst = crop, None
    for pair, xy in pairs:
        with np.errstate(over="ignore", invalid="ignore"):
            reach = float(np.abs(xy - xy.mean(axis=0)).max(initial=0.0))
        pad = math.inf if not math.isfinite(reach) else math.ceil(reach)
        candidate = crop + 2 * (pad + pad % 2) if math.isfinite(pad) else math.inf
        if candidate > side:
            side, worst = candidate, pair
    if object_shape is not None:
        reference = max((*object_shape, n_pix))
        limit = TRUTH_FACTOR * reference
        bound = f"{TRUTH_FACTOR}× the {reference} px side of objectGuess"
    else:
        limit, bound = MAX_CANVAS, f"the {MAX_CANVAS} px bound for a scan without objectGuess"
    if side > limit:
        extent = "an unbounded" if not math.isfinite(side) else f"a {side:.0f}×{side:.0f} px"
        raise InvalidScanError(
            f"{test_data}: positions {worst[0]}/{worst[1]} span {extent} canvas, more than {bound}; "
            "positions must be in object pixels: convert them (e.g. divide metres by the pixel size) "
            "and save the scan again"
        )
    return int(side)


def _read_positions(test_data: Path) -> tuple[dict[str, np.ndarray], int, tuple[int, ...] | None]:
    """The coordinate arrays present, the number of positions, and the object's shape (None if absent)."""
    keys = ("xcoords", "ycoords", "xcoords_start", "ycoords_start")
    if test_data.suffix != ".npz":
        from ptychozarr.io import open_dataset

        ds = open_dataset(test_data)
        coordinates = {key: np.asarray(ds[key].values) for key in keys if key in ds}
        shape = tuple(int(v) for v in ds["objectGuess"].shape) if "objectGuess" in ds else None
        return coordinates, int(ds.sizes["pattern"]), shape
    from ptychozarr.io.npz import NpzReader

    with NpzReader(test_data) as npz:
        shape = npz.members["xcoords"].shape
        n_points = shape[0] if shape else 0
        coordinates = {}
        for key in keys:
            if key not in npz.members:
                continue
            if tuple(npz.members[key].shape) != (n_points,):  # checked before reading: never a huge member
                raise InvalidScanError(
                    f"key {key!r} has shape {tuple(npz.members[key].shape)}; expected ({n_points},), one "
                    "entry per scan position"
                )
            coordinates[key] = npz.read(key)
        member = npz.members.get("objectGuess")
        shape = None if member is None else tuple(int(v) for v in member.shape)
        return coordinates, n_points, shape


def check_reconstruction(path: Path) -> None:
    """Refuse an iterative NPZ whose header lacks a 2-D complex ``reconstructed_object``, or whose
    ``reconstruction_time`` or ``algorithm`` is not one number or one string."""
    from ptychozarr.io.npz import NpzReader
    from ptychozarr.stages.iterative import check_metadata

    if not path.is_file():
        raise InvalidParameterError(f"--ptychi-recon {path}: no such file")
    try:
        reader = NpzReader(path)
    except PtychozarrError as exc:
        raise InvalidScanError(f"--ptychi-recon {path}: {exc}") from None
    with reader:
        member = reader.members.get("reconstructed_object")
    if member is None:
        raise InvalidScanError(
            f"--ptychi-recon {path}: no 'reconstructed_object' key (has {sorted(reader.members)}); "
            "save the object under that key"
        )
    if len(member.shape) != 2 or not np.issubdtype(member.dtype, np.complexfloating):
        raise InvalidScanError(
            f"--ptychi-recon {path}: 'reconstructed_object' must be a 2-D complex array, "
            f"got {member.dtype} {member.shape}"
        )
    check_metadata(path)
