"""The one contract every model the engine runs keeps.

A model takes a block of grouped, normalised diffraction amplitudes ``(b, N, N, C)`` float32 (already
multiplied by ``spec.intensity_scale`` when that is set) and, when ``spec.takes_positions``, the
members' offsets ``(b, 1, 2, C)`` float32 (PtychoPINN's ``coords_nominal``: −(position − group centre),
``(x, y)`` on axis 2). It gives one complex object patch ``(b, N, N)`` complex64 per group, centred on
the group centre (on the pattern's own position when ``C == 1``).
"""

from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["Model", "ModelSpec", "centre_crop"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes and gives.

    Parameters
    ----------
    kind : {"pinn", "baseline"}
        ``pinn`` models see a whole group (C = gridsize² channels); ``baseline`` models see one pattern.
    N : int
        Pattern (and output patch) side in pixels.
    gridsize : int
        Group side; the model takes C = gridsize² channels.
    takes_positions : bool
        Whether the model has a second input with the members' offsets.
    intensity_scale : float or None
        Factor applied to the normalised diffraction before the model (PtychoPINN's
        ``intensity_scale``); None means the model takes the normalised diffraction as is.
    output : {"complex", "amp_phase"}
        What the underlying network returns: one complex tensor, or a list [amplitude, phase].
    name : str
        A label for logs and reports.
    max_batch : int or None
        Largest batch the model may be called with (PtychoPINN bundles merge a whole call into one
        canvas above a size); None means no limit.
    """

    kind: Literal["pinn", "baseline"]
    N: int
    gridsize: int
    takes_positions: bool
    intensity_scale: float | None
    output: Literal["complex", "amp_phase"]
    name: str = "model"
    max_batch: int | None = None

    @property
    def channels(self) -> int:
        """Number of group members C the model takes."""
        return self.gridsize**2

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values."""
        return asdict(self)


@runtime_checkable
class Model(Protocol):
    """A loaded model: its spec and one fixed-shape batch call."""

    spec: ModelSpec

    def predict_batch(
        self, diffraction: np.ndarray, positions: np.ndarray | None, *, crop: int | None = None
    ) -> np.ndarray:
        """Predict one batch.

        Parameters
        ----------
        diffraction : ndarray, (b, N, N, C) float32
            Normalised (and, per the spec, scaled) diffraction amplitudes.
        positions : ndarray, (b, 1, 2, C) float32, or None
            Member offsets, when ``spec.takes_positions``.
        crop : int, optional
            Keep only the central ``crop × crop`` of each patch (taken from the network's output before
            any further work on it).

        Returns
        -------
        ndarray, (b, N, N) complex64, or (b, crop, crop) with ``crop``
        """
        ...


def centre_crop(patches: np.ndarray, crop: int | None) -> np.ndarray:
    """The central ``crop × crop`` of ``(b, N, N)`` patches (a view); all of them when ``crop`` is None.

    The crop starts at ``N // 2 − crop // 2`` on both axes, as stitching expects.
    """
    if crop is None:
        return patches
    lo = patches.shape[1] // 2 - crop // 2
    return patches[:, lo : lo + crop, lo : lo + crop]
