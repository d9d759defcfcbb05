"""Adapter for trained PtychoPINN bundles (``wts.h5.zip``).

A bundle holds PtychoPINN's inference network ``diffraction_to_obj`` with the whole ``params.cfg`` it was
trained under. It is loaded through PtychoPINN's own ``ModelManager``, so the ``ptycho`` package must be
importable; this module imports it (and TensorFlow) only inside :func:`load_bundle`.

**Loading a bundle runs code from it**: ``ModelManager`` unpickles ``manifest.dill`` and ``params.dill``.
As Keras's ``safe_mode`` and PyTorch's ``weights_only``, loading is refused unless the caller opts in
with ``trust_bundle=True`` (CLI ``--trust-bundle``, configuration field ``trust_bundle``); the refusal
comes before anything in the file is read beyond its zip directory.

Choices that differ from PtychoPINN's ``compare_models``, on purpose:

- Calls never exceed :attr:`ModelSpec.max_batch` groups (``groups · C < 64``): above that,
  ``ReassemblePatchesLayer`` sums every group of a call into one canvas. ``max_batch`` is a
  ceiling, not a size to pad to: a call of up to ``max_batch`` groups runs as it is.
- A gridsize-1 bundle (the study's "Baseline" arm) gets ``kind="baseline"`` and
  ``takes_positions=False``: it sees one pattern, whose offset from its own centre is zero, which is what
  it was trained with. The adapter feeds that zero offset itself; compare_models instead feeds it
  re-centred, point-reflected global positions.
- PtychoPINN keeps per-model state in globals: loading sets ``params.cfg`` and every model built in a
  process shares one ``log_scale`` variable. Loading and each call set both to the
  bundle's own values under one lock and put the previous values back, so bundles of different gridsize
  live side by side in one process and PtychoPINN code running beside them sees no change.
"""

import contextlib
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ptychozarr.errors import InvalidParameterError, ModelMismatchError
from ptychozarr.models.base import ModelSpec, centre_crop
from ptychozarr.models.formats import zip_members
from ptychozarr.models.keras_model import TensorFlowFormat

__all__ = ["INSTALL_HINT", "BundleFormat", "PtychoPINNBundle", "is_bundle", "load_bundle", "require_trust"]

INSTALL_HINT = (
    "install PtychoPINN into this environment: `pip install --no-deps -e <PtychoPINN checkout>` "
    "(github.com/hoidn/PtychoPINN) and its inference dependencies `pip install dill "
    "tensorflow-probability tf-keras`"
)

_BUNDLE_NAME = "wts.h5.zip"
_MODEL_DIR = "diffraction_to_obj"
_REQUIRED_MEMBERS = ("manifest.dill", f"{_MODEL_DIR}/model.keras", f"{_MODEL_DIR}/params.dill")
# ReassemblePatchesLayer merges a whole call into one canvas once groups · C reaches this.
_COLLAPSE_PATCHES = 64
# PtychoPINN's globals are process-wide; one lock guards every use of them by this module.
_PTYCHO_LOCK = threading.Lock()


def _bundle_file(path: str | Path) -> Path:
    """The ``wts.h5.zip`` a path names (the file, or a training output directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / _BUNDLE_NAME
    if not path.is_file():
        raise ModelMismatchError(
            f"PtychoPINN bundle {path} does not exist; pass a `{_BUNDLE_NAME}` file or the training "
            "output directory that holds it"
        )
    return path


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` names a PtychoPINN bundle (a ``.zip`` file, or a directory holding a bundle)."""
    path = Path(path)
    return path.suffix == ".zip" or (path.is_dir() and (path / _BUNDLE_NAME).is_file())


def require_trust(path: str | Path, trust_bundle: bool) -> None:
    """Refuse a PtychoPINN bundle unless ``trust_bundle``: loading one runs code from the file.

    Raises
    ------
    InvalidParameterError
        If ``path`` is a bundle and ``trust_bundle`` is false.
    """
    if is_bundle(path) and not trust_bundle:
        _refuse_untrusted(path)


def _refuse_untrusted(path: str | Path) -> None:
    raise InvalidParameterError(
        f"{path}: refusing to load a PtychoPINN bundle, because loading one unpickles its "
        "manifest.dill and params.dill, which runs code from the file; if you trust it, pass "
        "--trust-bundle (configuration: trust_bundle = true; Python: trust_bundle=True)"
    )


def _check_layout(path: Path) -> None:
    """Raise unless ``path`` is a zip with the members of a PtychoPINN bundle."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelMismatchError(
            f"{path} is not a PtychoPINN bundle: it cannot be read as a zip archive ({exc}); pass the "
            f"`{_BUNDLE_NAME}` written by PtychoPINN's training script"
        ) from exc
    missing = [m for m in _REQUIRED_MEMBERS if m not in names]
    if missing:
        raise ModelMismatchError(
            f"{path} is not a PtychoPINN bundle: it lacks {', '.join(missing)}; pass the "
            f"`{_BUNDLE_NAME}` written by PtychoPINN's training script"
        )


def _extract_network(path: Path, folder: str) -> Path:
    """Extract the bundle's ``diffraction_to_obj`` directory into ``folder``; return its path."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(folder, members=[m for m in zf.namelist() if m.startswith(f"{_MODEL_DIR}/")])
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelMismatchError(
            f"PtychoPINN bundle {path} is corrupt ({exc}); copy or re-export the `{_BUNDLE_NAME}`"
        ) from exc
    return Path(folder) / _MODEL_DIR


def _import_ptycho(path: Path) -> tuple[Any, Any, Any]:
    """PtychoPINN's ``params`` and ``model`` modules and its ``ModelManager``, or a clear error."""
    try:
        from ptycho import model, params
        from ptycho.model_manager import ModelManager
    except ImportError as exc:
        raise ModelMismatchError(
            f"cannot load PtychoPINN bundle {path}: the `ptycho` package is not importable ({exc}); "
            f"{INSTALL_HINT}"
        ) from exc
    return params, model, ModelManager


@contextlib.contextmanager
def _ptycho_globals(params: Any, model: Any, cfg: dict | None, log_scale: float | None) -> Iterator[None]:
    """Hold the lock with ``params.cfg`` and the shared ``log_scale`` set; restore both on exit.

    ``None`` leaves that global as it is while still restoring it afterwards (used while loading, which
    writes both).
    """
    with _PTYCHO_LOCK:
        saved_cfg = dict(params.cfg)
        shared = model._lazy_cache.get("log_scale")
        saved_log_scale = None if shared is None else shared.numpy()
        try:
            if cfg is not None:
                params.cfg.update(cfg)
            if log_scale is not None:
                model._get_log_scale().assign(log_scale)
            yield
        finally:
            params.cfg.clear()
            params.cfg.update(saved_cfg)
            if saved_log_scale is not None:
                model._lazy_cache["log_scale"].assign(saved_log_scale)


class PtychoPINNBundle:
    """A loaded PtychoPINN bundle keeping the :class:`~ptychozarr.models.base.Model` contract.

    Build it with :func:`load_bundle`.

    Attributes
    ----------
    spec : ModelSpec
        ``kind`` is ``"pinn"`` for gridsize > 1 and ``"baseline"`` for gridsize 1; ``intensity_scale`` is
        the bundle's trained ``exp(log_scale)``; ``max_batch`` is the largest call without batch collapse.
    format : str
        ``"ptychopinn"``, its entry in :mod:`ptychozarr.models.formats`.
    path : Path
        The bundle file.
    params : dict
        The bundle's ``params.cfg`` as saved, without tensors (``probe``).
    """

    format = "ptychopinn"

    def __init__(self, path: Path, network: Any, cfg: dict, ptycho: tuple[Any, Any]) -> None:
        gridsize, n = int(cfg["gridsize"]), int(cfg["N"])
        channels = gridsize**2
        self.path = path
        self.params = {k: v for k, v in cfg.items() if k != "probe"}
        self.spec = ModelSpec(
            kind="pinn" if gridsize > 1 else "baseline",
            N=n,
            gridsize=gridsize,
            takes_positions=gridsize > 1,
            intensity_scale=float(cfg["intensity_scale"]),
            output="complex",
            name=f"ptychopinn_gs{gridsize}",
            max_batch=(_COLLAPSE_PATCHES - 1) // channels,
        )
        self._network = network
        self._cfg = cfg
        self._ptycho = ptycho

    def __repr__(self) -> str:
        return f"PtychoPINNBundle({str(self.path)!r}, gridsize={self.spec.gridsize}, N={self.spec.N})"

    def predict_batch(
        self, diffraction: np.ndarray, positions: np.ndarray | None, *, crop: int | None = None
    ) -> np.ndarray:
        """Predict one object patch per group.

        A call of up to ``spec.max_batch`` groups runs as one network call of that size. A larger one
        runs in calls of exactly ``spec.max_batch`` groups, the last one zero-padded (the padding
        dropped), so that the network sees one shape.

        Parameters
        ----------
        diffraction : ndarray, (b, N, N, C) float32
            Normalised diffraction amplitudes times ``spec.intensity_scale``.
        positions : ndarray, (b, 1, 2, C) float32, or None
            Member offsets −(position − group centre); required when ``spec.takes_positions``. A
            gridsize-1 bundle takes None (or all-zero offsets).

        crop : int, optional
            Keep only the central ``crop × crop`` of each patch.

        Returns
        -------
        ndarray, (b, N, N) complex64, or (b, crop, crop)
        """
        spec = self.spec
        x = np.ascontiguousarray(diffraction, dtype=np.float32)
        shape = (spec.N, spec.N, spec.channels)
        if x.ndim != 4 or x.shape[1:] != shape:
            raise ModelMismatchError(
                f"{spec.name} ({self.path}) takes diffraction (b, {spec.N}, {spec.N}, {spec.channels}), "
                f"got {x.shape}; group the data with gridsize {spec.gridsize} and patterns of {spec.N} px"
            )
        offsets = self._offsets(positions, len(x))
        step = spec.max_batch
        side = spec.N if crop is None else crop
        out = np.empty((len(x), side, side), np.complex64)
        for start in range(0, len(x), step):
            stop = min(start + step, len(x))
            out[start:stop] = self._call(x[start:stop], offsets[start:stop], crop, pad=len(x) > step)
        return out

    def _offsets(self, positions: np.ndarray | None, b: int) -> np.ndarray:
        """The network's position input for ``b`` groups."""
        spec = self.spec
        shape = (b, 1, 2, spec.channels)
        if positions is None:
            if spec.takes_positions:
                raise ModelMismatchError(
                    f"{spec.name} ({self.path}) needs the members' offsets (b, 1, 2, {spec.channels}); "
                    "got positions=None"
                )
            return np.zeros(shape, np.float32)
        offsets = np.asarray(positions, dtype=np.float32)
        if offsets.shape != shape:
            raise ModelMismatchError(
                f"{spec.name} ({self.path}) takes positions {shape}, got {offsets.shape}"
            )
        if not spec.takes_positions and np.any(offsets):
            raise ModelMismatchError(
                f"{spec.name} ({self.path}) is a gridsize-1 model: each pattern sits at its own centre, so "
                "its offsets are zero; pass positions=None and stitch with the patterns' true positions"
            )
        return offsets

    def _call(self, x: np.ndarray, offsets: np.ndarray, crop: int | None, pad: bool) -> np.ndarray:
        """One network call on ``x`` (padded to ``max_batch`` groups when ``pad``); ``len(x)`` patches."""
        b, pad = len(x), (self.spec.max_batch - len(x)) if pad else 0
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            offsets = np.concatenate([offsets, np.zeros((pad, *offsets.shape[1:]), offsets.dtype)])
        params, model = self._ptycho
        log_scale = float(np.log(self.spec.intensity_scale))
        with _ptycho_globals(params, model, self._cfg, log_scale):
            y = self._network.predict_on_batch([x, offsets])
        return centre_crop(np.asarray(y)[:b, :, :, 0], crop).astype(np.complex64, copy=False)


def load_bundle(path: str | Path, *, trust_bundle: bool = False) -> PtychoPINNBundle:
    """Load a PtychoPINN bundle's inference network.

    Parameters
    ----------
    path : str or Path
        A ``wts.h5.zip`` written by PtychoPINN's training script, or the output directory holding it.
    trust_bundle : bool
        Load it although loading unpickles files of the bundle (which runs code from them); refused
        otherwise.

    Returns
    -------
    PtychoPINNBundle

    Raises
    ------
    InvalidParameterError
        Without ``trust_bundle``.
    ModelMismatchError
        If the path is not a readable bundle, the ``ptycho`` package is not importable (the message says
        what to install), or PtychoPINN fails to rebuild the network.
    """
    path = _bundle_file(path)
    _check_layout(path)
    require_trust(path, trust_bundle)
    with tempfile.TemporaryDirectory(prefix="ptychozarr-bundle-") as tmp:
        network_dir = _extract_network(path, tmp)
        params, model, manager = _import_ptycho(path)
        with _ptycho_globals(params, model, None, None):
            try:
                network = manager.load_model(str(network_dir))
            except Exception as exc:
                raise ModelMismatchError(
                    f"PtychoPINN could not rebuild the network of bundle {path}: {exc!r}; the bundle may "
                    "come from an incompatible PtychoPINN version"
                ) from exc
            cfg = dict(params.cfg)
    return PtychoPINNBundle(path, network, cfg, (params, model))


class BundleFormat(TensorFlowFormat):
    """A PtychoPINN ``wts.h5.zip`` (or the training output directory holding it): loaded only when
    trusted, since loading unpickles files of the bundle; its spec is known only once loaded."""

    name = "ptychopinn"
    suffixes = (".zip",)
    describe = f"PtychoPINN {_BUNDLE_NAME} (with --trust-bundle)"

    def candidates(self, folder: Path) -> list[Path]:
        return [folder / _BUNDLE_NAME] if (folder / _BUNDLE_NAME).is_file() else []

    def sniff(self, path: Path) -> bool:
        members = zip_members(path)
        return members is not None and all(m in members for m in _REQUIRED_MEMBERS)

    def check_trust(self, path: Path, trust_bundle: bool) -> None:
        if not trust_bundle:
            _refuse_untrusted(path)

    def load(self, path: Path) -> PtychoPINNBundle:
        return load_bundle(path, trust_bundle=True)
