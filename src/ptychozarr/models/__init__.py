"""Model adapters, reference architectures and training.

``load_model(path)`` gives a :class:`~ptychozarr.models.base.Model` for a Keras 3 ``.keras`` file with a
JSON sidecar (:mod:`ptychozarr.models.keras_model`) or a PtychoPINN ``wts.h5.zip`` bundle
(:mod:`ptychozarr.models.ptychopinn`). TensorFlow is imported only when a model is loaded or built,
and quietly: importing this package sets up TensorFlow's logging first (:mod:`ptychozarr._tf`).
"""

from __future__ import annotations

from pathlib import Path

from ptychozarr import _tf
from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import Model, ModelSpec
from ptychozarr.models.keras_model import KerasModel, load_keras, read_spec, save_keras
from ptychozarr.models.reference import build_baseline, build_pinn
from ptychozarr.models.train import train  # binds the name over the submodule of the same name

_tf.quiet()  # before any TensorFlow import made by the modules below, in any process

__all__ = [
    "KerasModel",
    "Model",
    "ModelSpec",
    "build_baseline",
    "build_pinn",
    "check_compatible",
    "demo_weights",
    "load_model",
    "model_file",
    "read_spec",
    "save_keras",
    "train",
]

_WEIGHTS = Path(__file__).parent / "weights"


def model_file(path: str | Path) -> Path:
    """The model file a path names: itself, or the only ``.keras`` file of a directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.keras"))
        if len(found) != 1:
            raise ModelMismatchError(
                f"{path}: a model directory must hold exactly one .keras file, found {len(found)}; "
                "pass the file itself"
            )
        return found[0]
    if not path.exists():
        raise ModelMismatchError(f"{path}: no such model file")
    return path


def load_model(path: str | Path, *, trust_bundle: bool = False) -> Model:
    """Load a model from a file.

    Parameters
    ----------
    path : str or Path
        A ``.keras`` file with its ``.json`` sidecar (or a directory holding one), or a PtychoPINN
        ``wts.h5.zip`` bundle.
    trust_bundle : bool
        Allow a PtychoPINN bundle. Loading one unpickles files from it, which runs code from the file,
        so it is refused (:class:`~ptychozarr.errors.InvalidParameterError`) unless this is true.
        ``.keras`` files are always loaded in Keras's safe mode.

    Returns
    -------
    Model
    """
    path = model_file(path)
    if path.suffix == ".zip":
        from ptychozarr.models.ptychopinn import load_bundle

        return load_bundle(path, trust_bundle=trust_bundle)
    if path.suffix == ".keras":
        return load_keras(path)
    raise ModelMismatchError(
        f"{path}: unknown model format; give a .keras file (with sidecar) or a wts.h5.zip"
    )


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
