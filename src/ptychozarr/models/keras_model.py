"""Adapter for a Keras 3 ``.keras`` file whose contract is stated in a JSON sidecar.

Files of one model share a stem: ``<stem>.keras`` (the network), ``<stem>.json`` (``{"spec": ModelSpec
fields, "provenance": {...}}``) and, for models trained through a forward model, ``<stem>.probe.npy``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from ptychozarr import _tf
from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import ModelSpec, centre_crop

__all__ = ["KerasModel", "load_keras", "read_spec", "save_keras", "sidecar_path"]


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar beside a ``.keras`` file."""
    return Path(path).with_suffix(".json")


def read_spec(path: str | Path) -> tuple[ModelSpec, dict]:
    """Read a model's spec and provenance from its sidecar, without importing TensorFlow.

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file.

    Returns
    -------
    spec : ModelSpec
    provenance : dict
    """
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
        spec = ModelSpec(**meta["spec"])
    except FileNotFoundError as exc:
        raise ModelMismatchError(
            f"{path}: no sidecar {side.name}; write one with the ModelSpec fields "
            "(ptychozarr.models.save_keras does)"
        ) from exc
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelMismatchError(
            f"{side}: not a valid model sidecar ({exc}); it needs a 'spec' object"
        ) from exc
    return spec, meta.get("provenance", {})


def save_keras(model, spec: ModelSpec, path: str | Path, probe=None, provenance: dict | None = None) -> Path:
    """Save a Keras model with its sidecar (and probe, when given).

    Parameters
    ----------
    model : keras.Model
    spec : ModelSpec
    path : str or Path
        Target ``.keras`` file; the sidecar and probe go beside it.
    probe : ndarray, (N, N) complex, optional
    provenance : dict, optional
        JSON-able description of how the model was made.

    Returns
    -------
    Path
        The ``.keras`` file.
    """
    path = Path(path).with_suffix(".keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    meta = {"spec": spec.to_dict(), "provenance": provenance or {}}
    if probe is not None:
        probe_file = path.with_suffix(".probe.npy")
        np.save(probe_file, np.asarray(probe, np.complex64))
        meta["probe"] = probe_file.name
    sidecar_path(path).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


class KerasModel:
    """A Keras model behind the :class:`~ptychozarr.models.base.Model` contract.

    Parameters
    ----------
    network : keras.Model
    spec : ModelSpec
    path : Path, optional
        Where it was loaded from.
    probe : ndarray, optional
        The probe it was trained with.
    provenance : dict, optional
    """

    def __init__(self, network, spec: ModelSpec, path: Path | None = None, probe=None, provenance=None):
        _check_network(network, spec, path)
        self.network = network
        self.spec = spec
        self.path = path
        self.probe = probe
        self.provenance = provenance or {}
        self._first_call = threading.Lock()
        self._traced = False

    def __getstate__(self) -> dict:  # a lock does not pickle: a copy in another process makes its own
        state = {**self.__dict__, "_traced": False}
        del state["_first_call"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._first_call = threading.Lock()

    def predict_batch(
        self, diffraction: np.ndarray, positions: np.ndarray | None, *, crop: int | None = None
    ) -> np.ndarray:
        """Predict one fixed-shape batch; see :class:`~ptychozarr.models.base.Model`.

        With ``crop``, the network's outputs are cropped before they are combined into complex values.
        """
        inputs = [diffraction, positions] if self.spec.takes_positions else diffraction
        if not self._traced:  # the first call builds the predict function: one thread does it
            with self._first_call:
                out = self.network.predict_on_batch(inputs)
                self._traced = True
        else:
            out = self.network.predict_on_batch(inputs)
        if self.spec.output == "amp_phase":
            amp, phase = (centre_crop(np.asarray(o)[..., 0], crop) for o in out)
            return (amp * np.exp(1j * phase)).astype(np.complex64)
        return centre_crop(np.asarray(out)[..., 0], crop).astype(np.complex64)


def _check_network(network, spec: ModelSpec, path) -> None:
    """Raise ModelMismatchError if the network's inputs and outputs contradict the spec."""
    where = path or spec.name
    inputs, outputs = network.inputs, network.outputs
    want_inputs = 2 if spec.takes_positions else 1
    want_outputs = 2 if spec.output == "amp_phase" else 1
    if len(inputs) != want_inputs or len(outputs) != want_outputs:
        raise ModelMismatchError(
            f"{where}: the network has {len(inputs)} input(s) and {len(outputs)} output(s) but the sidecar "
            f"says takes_positions={spec.takes_positions}, output={spec.output!r}; fix the sidecar"
        )
    shape = tuple(inputs[0].shape[1:])
    if shape != (spec.N, spec.N, spec.channels):
        raise ModelMismatchError(
            f"{where}: the network takes diffraction of shape {shape} but the sidecar says "
            f"N={spec.N}, gridsize={spec.gridsize}; fix the sidecar"
        )


def load_keras(path: str | Path) -> KerasModel:
    """Load a ``.keras`` file and its sidecar, in Keras's safe mode.

    Safe mode refuses what would run code from the file (e.g. the bytecode of ``Lambda`` layers); such a
    file is reported as a :class:`~ptychozarr.errors.ModelMismatchError`.

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file.

    Returns
    -------
    KerasModel
    """
    keras = _tf.keras()
    path = Path(path)
    spec, provenance = read_spec(path)
    try:
        network = keras.saving.load_model(path, compile=False, safe_mode=True)
    except (OSError, ValueError) as exc:
        raise ModelMismatchError(f"{path}: cannot load the Keras model ({exc})") from exc
    probe_file = path.with_suffix(".probe.npy")
    probe = np.load(probe_file) if probe_file.exists() else None
    return KerasModel(network, spec, path=path, probe=probe, provenance=provenance)
