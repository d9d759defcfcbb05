"""Adapter for a Keras 3 ``.keras`` file whose contract is stated in a JSON sidecar.

Files of one model share a stem: ``<stem>.keras`` (the network), ``<stem>.json`` (``{"spec": ModelSpec
fields, "provenance": {...}}``) and, for models trained through a forward model, ``<stem>.probe.npy``.

Nothing in these files is ever run. :func:`read_spec` (used before any work) checks all three without
TensorFlow: the ``.keras`` archive must hold a ``config.json`` built from Keras objects only (no ``Lambda``
layer, no function or class from another module), the sidecar's fields must have their types, and the
probe must be a plain (unpickled) array. The network itself is loaded in Keras's safe mode.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np

from ptychozarr import _tf
from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import ModelSpec, centre_crop
from ptychozarr.models.formats import ModelFormat, zip_members

__all__ = [
    "KerasFormat",
    "KerasModel",
    "TensorFlowFormat",
    "check_keras_file",
    "load_keras",
    "read_spec",
    "save_keras",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]

_log = logging.getLogger(__name__)

_BUNDLE_MEMBERS = ("manifest.dill", "diffraction_to_obj/model.keras")
_MAX_CONFIG = 64 * 2**20  # bytes of config.json read at most (a zip may unpack to far more)
_SAFE_MODULES = ("keras", "builtins")  # builtins: Keras's own names (e.g. an activation "relu")


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar beside a model file (``.keras``, ``.onnx``)."""
    return Path(path).with_suffix(".json")


def read_spec(path: str | Path) -> tuple[ModelSpec, dict]:
    """Read a model's spec and provenance from its sidecar, without importing TensorFlow.

    The ``.keras`` file (:func:`check_keras_file`) and its probe, when there is one, are checked too, so
    that a model that cannot be loaded safely is refused before any work.

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file.

    Returns
    -------
    spec : ModelSpec
    provenance : dict

    Raises
    ------
    ModelMismatchError
        One line naming the file and what it should hold.
    """
    check_keras_file(path)
    return read_sidecar(path)


def read_sidecar(path: str | Path) -> tuple[ModelSpec, dict]:
    """The spec and provenance in the JSON sidecar beside a model file (any format), checked field by
    field, with the probe beside it when there is one (a plain ``.npy``); no framework is imported.

    Raises
    ------
    ModelMismatchError
        One line naming the file and what it should hold.
    """
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
        spec = ModelSpec(**meta["spec"])
    except FileNotFoundError as exc:
        raise ModelMismatchError(
            f"{path}: no sidecar {side.name}; write one with the ModelSpec fields "
            "(ptychozarr.models.save_keras or write_sidecar does)"
        ) from exc
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ModelMismatchError(
            f"{side}: not a valid model sidecar ({exc}); it needs a 'spec' object"
        ) from exc
    except OSError as exc:
        raise ModelMismatchError(f"{side}: cannot read the model sidecar ({exc.strerror})") from exc
    _check_spec(spec, side)
    _probe_header(Path(path).with_suffix(".probe.npy"))
    provenance = meta.get("provenance", {})
    return spec, provenance if isinstance(provenance, dict) else {}


def _check_spec(spec: ModelSpec, side: Path) -> None:
    """Refuse sidecar fields of the wrong type or range (JSON gives any type)."""

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def positive_number(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")

    checks = {
        "kind": (spec.kind in ("pinn", "baseline"), "'pinn' or 'baseline'"),
        "N": (positive_int(spec.N), "a positive integer"),
        "gridsize": (positive_int(spec.gridsize), "a positive integer"),
        "takes_positions": (isinstance(spec.takes_positions, bool), "true or false"),
        "intensity_scale": (
            spec.intensity_scale is None or positive_number(spec.intensity_scale),
            "a positive number or null",
        ),
        "output": (spec.output in ("complex", "amp_phase"), "'complex' or 'amp_phase'"),
        "name": (isinstance(spec.name, str), "a string"),
        "max_batch": (spec.max_batch is None or positive_int(spec.max_batch), "a positive integer or null"),
    }
    for field, (ok, want) in checks.items():
        if not ok:
            raise ModelMismatchError(
                f"{side}: spec field {field!r} is {getattr(spec, field)!r}; it must be {want}"
            )


def _probe_header(probe_file: Path) -> None:
    """Refuse a probe file that is not a plain ``.npy`` array (a pickled one would run code when read)."""
    if not probe_file.exists():
        return
    try:
        with open(probe_file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else (np.lib.format.read_array_header_2_0)
            )
            _, _, dtype = read_header(fh)
    except (OSError, ValueError) as exc:
        raise ModelMismatchError(
            f"{probe_file}: not a readable .npy probe ({exc}); save the probe with numpy.save, "
            "or remove the file"
        ) from exc
    if dtype.hasobject:
        raise ModelMismatchError(
            f"{probe_file}: holds Python objects (pickled data), which are never loaded; save the probe "
            "as a complex array with numpy.save, or remove the file"
        )


def check_keras_file(path: str | Path) -> None:
    """Refuse a ``.keras`` file that is not a Keras 3 archive of Keras objects, reading only its config.

    Raises :class:`~ptychozarr.errors.ModelMismatchError` (one line naming the file and what it should
    be) for: a file that is not a zip archive; a zip without ``config.json`` (a PtychoPINN bundle renamed
    ``.keras`` is named as such); a ``Lambda`` layer (its Python function is either bytecode in the file
    or a name looked up at load time); any function or class from a module other than Keras.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "config.json" in names and zf.getinfo("config.json").file_size > _MAX_CONFIG:
                raise ModelMismatchError(
                    f"{path}: the archive's config.json unpacks to {zf.getinfo('config.json').file_size} "
                    f"bytes, more than a model's configuration ({_MAX_CONFIG} at most); save the model again"
                )
            raw = zf.read("config.json") if "config.json" in names else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelMismatchError(
            f"{path}: not a Keras 3 .keras file (it is not a zip archive: {exc}); save the model with "
            "model.save('name.keras')"
        ) from exc
    if raw is None:
        if all(m in names for m in _BUNDLE_MEMBERS):
            raise ModelMismatchError(
                f"{path}: this is a PtychoPINN bundle (manifest.dill, diffraction_to_obj/), not a .keras "
                "file; name it wts.h5.zip and pass it with --trust-bundle if you trust it"
            )
        raise ModelMismatchError(
            f"{path}: not a Keras 3 .keras file (the archive has no config.json); save the model with "
            "model.save('name.keras')"
        )
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelMismatchError(
            f"{path}: the archive's config.json is not valid JSON ({exc}); save the model again"
        ) from exc
    problem = _unsafe_object(config)
    if problem:
        raise ModelMismatchError(
            f"{path}: {problem}: code that is not Keras's, which is never loaded (as Keras's safe_mode); "
            "rebuild the model from Keras layers only"
        )


def _unsafe_object(node, depth: int = 0) -> str | None:
    """The first object of a Keras config that names code outside Keras, described; None if none."""
    if depth > 200:
        return "its config.json is nested too deeply"
    if isinstance(node, dict):
        name = node.get("class_name")
        if name in ("Lambda", "__lambda__"):
            return f"it has a Lambda layer ({_layer_name(node)})"
        module = node.get("module")
        if isinstance(name, str) and module is not None:
            if not isinstance(module, str) or module.split(".")[0] not in _SAFE_MODULES:
                return f"it names {module}.{node.get('config') if name == 'function' else name}"
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _unsafe_object(child, depth + 1)
        if found:
            return found
    return None


def _layer_name(node: dict) -> str:
    config = node.get("config")
    return str(config.get("name")) if isinstance(config, dict) else "unnamed"


def write_sidecar(path: str | Path, spec: ModelSpec, probe=None, provenance: dict | None = None) -> Path:
    """Write the JSON sidecar (and the probe, when given) beside a model file of any format.

    Parameters
    ----------
    path : str or Path
        The model file (``.keras``, ``.onnx``); the sidecar is ``<stem>.json``, the probe
        ``<stem>.probe.npy``.
    spec : ModelSpec
    probe : ndarray, (N, N) complex, optional
    provenance : dict, optional

    Returns
    -------
    Path
        The sidecar.
    """
    path = Path(path)
    meta = {"spec": spec.to_dict(), "provenance": provenance or {}}
    if probe is not None:
        probe_file = path.with_suffix(".probe.npy")
        np.save(probe_file, np.asarray(probe, np.complex64))
        meta["probe"] = probe_file.name
    side = sidecar_path(path)
    side.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return side


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
    write_sidecar(path, spec, probe, provenance)
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

    format = "keras"

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
    path = Path(path)
    spec, provenance = read_spec(path)
    keras = _tf.keras()
    try:
        network = keras.saving.load_model(path, compile=False, safe_mode=True)
    except MemoryError:
        raise
    except Exception as exc:  # a damaged file fails anywhere in Keras's deserialisation
        raise ModelMismatchError(
            f"{path}: Keras cannot load the model ({_first_line(exc)}); save it again with model.save"
        ) from exc
    probe_file = path.with_suffix(".probe.npy")
    try:
        probe = np.load(probe_file, allow_pickle=False) if probe_file.exists() else None
    except (OSError, ValueError) as exc:
        raise ModelMismatchError(
            f"{probe_file}: not a readable .npy probe ({exc}); save the probe with numpy.save, "
            "or remove the file"
        ) from exc
    return KerasModel(network, spec, path=path, probe=probe, provenance=provenance)


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (Keras's run over many), for one-line errors."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- the format entry ----------------------------------------------------------------------------------

_TF_STATE = {"configured": False}
_TF_LOCK = threading.Lock()


class TensorFlowFormat(ModelFormat):
    """What the TensorFlow formats (``.keras`` files and PtychoPINN bundles) share: placement, threads,
    out-of-memory errors and the device probe."""

    def configure(self, threads: int | None) -> None:
        """GPU memory growth on and TF thread pools set, once per process, before TF initialises."""
        with _TF_LOCK:
            if _TF_STATE["configured"]:
                return
            tf = _tf.tensorflow()
            for gpu in tf.config.list_physical_devices("GPU"):
                try:
                    tf.config.experimental.set_memory_growth(gpu, True)
                except RuntimeError:  # the runtime is already initialised: keep what it has
                    _log.warning("GPU memory growth could not be set: TensorFlow is already initialised")
            if threads:
                try:
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                    tf.config.threading.set_inter_op_parallelism_threads(threads)
                except RuntimeError:
                    _log.warning(
                        "TF threads could not be set to %d: TensorFlow is already initialised", threads
                    )
            _TF_STATE["configured"] = True

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """TensorFlow's ``ResourceExhaustedError`` (only if TensorFlow is imported: else it was not TF's)."""
        tf = sys.modules.get("tensorflow")
        errors = getattr(tf, "errors", None)
        return errors is not None and isinstance(exc, errors.ResourceExhaustedError)

    def device_peak(self, call, device: str) -> int:
        """TensorFlow's peak memory on ``device`` during ``call()`` (weights included)."""
        tf = _tf.tensorflow()
        tf.config.experimental.reset_memory_stats(device)
        call()
        return int(tf.config.experimental.get_memory_info(device)["peak"])


class KerasFormat(TensorFlowFormat):
    """A Keras 3 ``.keras`` file with its JSON sidecar, loaded in Keras's safe mode (always trusted: no
    code from the file runs)."""

    name = "keras"
    suffixes = (".keras",)
    describe = ".keras file with its .json sidecar"

    def sniff(self, path: Path) -> bool:
        members = zip_members(path)
        return members is not None and "config.json" in members

    def read_spec(self, path: Path) -> ModelSpec:
        return read_spec(path)[0]

    def load(self, path: Path) -> KerasModel:
        return load_keras(path)

    def files(self, path: Path) -> list[Path]:
        extra = [sidecar_path(path), Path(path).with_suffix(".probe.npy")]
        return [Path(path), *(p for p in extra if p.exists())]
