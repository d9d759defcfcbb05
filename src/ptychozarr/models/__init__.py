"""Model adapters, reference architectures and training.

``load_model(path)`` gives a :class:`~ptychozarr.models.base.Model` for any format of the registry
(:mod:`ptychozarr.models.formats`): a Keras 3 ``.keras`` file with a JSON sidecar
(:mod:`ptychozarr.models.keras_model`), a PtychoPINN ``wts.h5.zip`` bundle
(:mod:`ptychozarr.models.ptychopinn`) or an ``.onnx`` graph with the same sidecar, run by ONNX Runtime
(:mod:`ptychozarr.models.onnx_model`). A framework is imported only when a model of its format is loaded
or built, and TensorFlow quietly: importing this package sets up its logging first (:mod:`ptychozarr._tf`).
"""

from __future__ import annotations

from pathlib import Path

from ptychozarr import _tf
from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import Model, ModelSpec
from ptychozarr.models.formats import ModelFormat, format_named, formats, is_out_of_memory, register, resolve
from ptychozarr.models.keras_model import KerasModel, load_keras, read_spec, save_keras, write_sidecar
from ptychozarr.models.onnx_model import OnnxModel, load_onnx, save_onnx
from ptychozarr.models.reference import build_baseline, build_pinn
from ptychozarr.models.train import train  # binds the name over the submodule of the same name

_tf.quiet()  # before any TensorFlow import made by the modules below, in any process

__all__ = [
    "KerasModel",
    "Model",
    "ModelFormat",
    "ModelSpec",
    "OnnxModel",
    "build_baseline",
    "build_pinn",
    "check_compatible",
    "demo_weights",
    "format_named",
    "formats",
    "is_out_of_memory",
    "load_model",
    "load_keras",
    "load_onnx",
    "model_file",
    "read_spec",
    "register",
    "resolve",
    "save_keras",
    "save_onnx",
    "spec_of",
    "train",
    "write_sidecar",
]

_WEIGHTS = Path(__file__).parent / "weights"


def model_file(path: str | Path) -> Path:
    """The model file a path names: itself, or the only model file of a directory (any format)."""
    return resolve(path)[1]


def spec_of(path: str | Path, *, trust_bundle: bool = False) -> ModelSpec | None:
    """A model's spec read without loading it (sidecar; no framework), after its format's trust check;
    None for a format whose spec is known only once loaded (a PtychoPINN bundle)."""
    fmt, file = resolve(path)
    fmt.check_trust(file, trust_bundle)
    return fmt.read_spec(file)


def load_model(path: str | Path, *, trust_bundle: bool = False) -> Model:
    """Load a model from a file, through its format's entry (:mod:`ptychozarr.models.formats`).

    Parameters
    ----------
    path : str or Path
        A ``.keras`` or ``.onnx`` file with its ``.json`` sidecar (or a directory holding one model
        file), or a PtychoPINN ``wts.h5.zip`` bundle.
    trust_bundle : bool
        Allow a PtychoPINN bundle. Loading one unpickles files from it, which runs code from the file,
        so it is refused (:class:`~ptychozarr.errors.InvalidParameterError`) unless this is true.
        ``.keras`` files are always loaded in Keras's safe mode; ``.onnx`` files hold no code.

    Returns
    -------
    Model
    """
    fmt, file = resolve(path)
    fmt.check_trust(file, trust_bundle)
    return fmt.load(file)


def check_compatible(spec: ModelSpec, N: int, gridsize: int) -> None:
    """Raise :class:`~ptychozarr.errors.ModelMismatchError` if a model cannot run on the data.

    A model of gridsize 1 runs on any grouping (each distinct pattern once); a model of gridsize > 1
    needs groups of the same gridsize.

    Parameters
    ----------
    spec : ModelSpec
    N : int
        Pattern side of the data.
    gridsize : int
        Gridsize of the data's groups.
    """
    if spec.N != N:
        raise ModelMismatchError(
            f"model {spec.name!r} takes {spec.N}×{spec.N} patterns but the data has {N}×{N}; "
            "use a model trained at this N"
        )
    if spec.gridsize != 1 and spec.gridsize != gridsize:
        raise ModelMismatchError(
            f"model {spec.name!r} has gridsize {spec.gridsize} but the groups have gridsize {gridsize}; "
            f"group the data with gridsize={spec.gridsize}"
        )


def demo_weights(name: str) -> Path:
    """Path of a shipped demo model (``"pinn_gs2_n64"`` or ``"baseline_n64"``); see weights/README.md."""
    path = _WEIGHTS / f"{name}.keras"
    if not path.exists():
        known = sorted(p.stem for p in _WEIGHTS.glob("*.keras"))
        raise ModelMismatchError(f"no shipped model {name!r}; available: {known}")
    return path
