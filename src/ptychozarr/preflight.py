"""The checks made once, before any work: a configuration against the scan's header.

:func:`validate` reads headers only (the NPZ's member headers or the store's metadata, the models'
sidecars, the iterative NPZ's header) and raises a :class:`~ptychozarr.errors.PtychozarrError` with one
line naming the problem and the fix, so that a run that cannot succeed is refused (exit code 2 on the
command line) before anything is ingested, inferred or marked complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptychozarr.config import CompareConfig, check_crop
from ptychozarr.errors import InvalidParameterError, InvalidScanError, PtychozarrError
from ptychozarr.models.base import ModelSpec

__all__ = ["ScanHeader", "model_spec", "validate"]
"""File name of a PtychoPINN model bundle."""


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
        that is odd or larger than N, a model of another N or gridsize, a bundle without
        ``--trust-bundle``, an iterative NPZ without a 2-D complex ``reconstructed_object``.
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
    check_crop(config.infer.stitch_crop_size, n_pix)
    specs = [model_spec(path, trust_bundle=config.infer.trust_bundle) for _, path in config.models]
    gridsize = max((s.gridsize for s in specs), default=1)
    for spec in specs:
        check_compatible(spec, n_pix, gridsize)
    if config.ptychi_recon is not None:
        check_reconstruction(config.ptychi_recon)
    return ScanHeader(patterns, n_pix, has_truth, is_store, gridsize)


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


def check_reconstruction(path: Path) -> None:
    """Refuse an iterative NPZ whose header lacks a 2-D complex ``reconstructed_object``."""
    from ptychozarr.io.npz import NpzReader

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
