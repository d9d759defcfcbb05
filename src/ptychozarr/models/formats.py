"""The model-format registry: one entry per kind of model file, which every consumer reads.

An entry (:class:`ModelFormat`) owns everything that depends on the framework behind a format:

- **finding** the file: which suffixes it claims, which files of a directory are its models, and, for a
  file of no known suffix, whether its content is of this format (:meth:`ModelFormat.sniff`);
- **trust**: whether loading the file may run code from it, and the refusal when the caller did not opt
  in (:meth:`ModelFormat.check_trust`);
- **spec**: the :class:`~ptychozarr.models.base.ModelSpec`, read from a sidecar or the file without the
  framework where the format allows (:meth:`ModelFormat.read_spec`);
- **load**, giving an object that keeps the :class:`~ptychozarr.models.base.Model` contract (whose
  ``predict_batch`` is the batch call), and **device placement** and threads, set once per process
  before the first load (:meth:`ModelFormat.configure`);
- **out-of-memory detection** (:meth:`ModelFormat.is_out_of_memory`), which inference asks before it
  retries with a smaller batch, and the **device memory probe** (:meth:`ModelFormat.device_peak`);
- the **files** a model is made of (its sidecar too), which fingerprints cover.

The entries: ``keras`` (:mod:`ptychozarr.models.keras_model`), ``ptychopinn``
(:mod:`ptychozarr.models.ptychopinn`) and ``onnx`` (:mod:`ptychozarr.models.onnx_model`). Nothing
outside an entry and its helpers imports a framework: TensorFlow only in the first two, ONNX Runtime only
in the third, and each only when its entry loads or runs a model. A new format is one more entry given to
:func:`register`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import Model, ModelSpec

__all__ = [
    "ModelFormat",
    "format_named",
    "format_of_model",
    "formats",
    "is_out_of_memory",
    "register",
    "resolve",
]


class ModelFormat:
    """One model file format. Subclasses set the attributes and override the methods they need.

    Attributes
    ----------
    name : str
        Short name (``"keras"``, ``"ptychopinn"``, ``"onnx"``); a model's ``format`` attribute names
        its entry.
    suffixes : tuple of str
        File name endings this format claims (``".keras"``).
    describe : str
        How a user gives such a model, for error messages (``".keras file with its .json sidecar"``).
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    describe: str = ""

    def claims(self, path: Path) -> bool:
        """Whether ``path`` (a file) is of this format by its name."""
        return path.name.endswith(self.suffixes)

    def candidates(self, folder: Path) -> list[Path]:
        """The model files of this format directly inside ``folder``."""
        return sorted(p for p in folder.iterdir() if p.is_file() and self.claims(p))

    def sniff(self, path: Path) -> bool:
        """Whether a file of no known suffix is of this format by its content (read cheaply)."""
        return False

    def check_trust(self, path: Path, trust_bundle: bool) -> None:
        """Refuse (with :class:`~ptychozarr.errors.InvalidParameterError`) a file whose loading runs
        code from it, unless the caller opted in. Formats that never run code from the file accept."""

    def read_spec(self, path: Path) -> ModelSpec | None:
        """The model's spec without loading it (no framework), or None when only loading tells."""
        return None

    def load(self, path: Path) -> Model:
        """Load the model (trust already checked)."""
        raise NotImplementedError

    def configure(self, threads: int | None) -> None:
        """Set this process's device placement and framework threads, before the format's first load."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by a batch call of this format, means the device ran out of memory
        (so that a smaller batch may fit). Must not import the framework."""
        return False

    def device_peak(self, call: Callable[[], Any], device: str) -> int:
        """Peak device memory in bytes while ``call()`` (one batch) runs on ``device`` (e.g. ``"GPU:0"``)."""
        raise ModelMismatchError(f"{self.name} models have no device memory probe")

    def files(self, path: Path) -> list[Path]:
        """The files the model at ``path`` is made of (those that exist), for fingerprints."""
        return [path]


_FORMATS: dict[str, ModelFormat] = {}
_BUILTIN: list[bool] = []  # non-empty once the built-in entries are registered


def register(fmt: ModelFormat) -> ModelFormat:
    """Add (or replace, by name) a format entry; returns it."""
    _ensure_builtin()
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> tuple[ModelFormat, ...]:
    """The registered entries, in the order they are asked."""
    _ensure_builtin()
    return tuple(_FORMATS.values())


def format_named(name: str) -> ModelFormat:
    """The entry called ``name``."""
    _ensure_builtin()
    try:
        return _FORMATS[name]
    except KeyError:
        raise ModelMismatchError(f"no model format {name!r}; known: {sorted(_FORMATS)}") from None


def format_of_model(model: object) -> ModelFormat | None:
    """The entry of a loaded model (its ``format`` attribute), or None for a model of no known format."""
    name = getattr(model, "format", None)
    _ensure_builtin()
    return _FORMATS.get(name) if isinstance(name, str) else None


def _known() -> str:
    return "; ".join(f.describe for f in formats())


def resolve(path: str | Path) -> tuple[ModelFormat, Path]:
    """The format entry and model file a path names.

    A file is claimed by its suffix, else by its content; a directory must hold exactly one model file
    of any format (a PtychoPINN training output directory holds its ``wts.h5.zip``).

    Raises
    ------
    ModelMismatchError
        For a missing path, a directory of none or several models, or a file of no known format.
    """
    path = Path(path)
    if path.is_dir():
        found = [(f, p) for f in formats() for p in f.candidates(path)]
        if len(found) != 1:
            names = ", ".join(p.name for _, p in found) or "none"
            raise ModelMismatchError(
                f"{path}: a model directory must hold exactly one model file ({_known()}), found "
                f"{len(found)} ({names}); pass the file itself"
            )
        return found[0]
    if not path.exists():
        raise ModelMismatchError(f"{path}: no such model file")
    for fmt in formats():
        if fmt.claims(path):
            return fmt, path
    for fmt in formats():
        if fmt.sniff(path):
            return fmt, path
    raise ModelMismatchError(f"{path}: unknown model format; give a {_known()}")


def is_out_of_memory(exc: BaseException, model: object = None) -> bool:
    """Whether ``exc`` from a batch call means the device ran out of memory.

    The model's own entry is asked when it has one; otherwise (a model object of another kind) every
    entry is, each recognising only its framework's errors without importing it.
    """
    fmt = format_of_model(model)
    entries = (fmt,) if fmt is not None else formats()
    return any(f.is_out_of_memory(exc) for f in entries)


def zip_members(path: Path) -> set[str] | None:
    """Member names of a zip archive, or None when ``path`` is not one (a helper for sniffing)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return set(zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def _ensure_builtin() -> None:
    """Register the built-in entries on first use (their modules import no framework), ahead of any
    entry registered before; an entry registered under a built-in name keeps its place and wins."""
    if _BUILTIN:
        return
    _BUILTIN.append(True)
    from ptychozarr.models.keras_model import KerasFormat
    from ptychozarr.models.onnx_model import OnnxFormat
    from ptychozarr.models.ptychopinn import BundleFormat

    custom = dict(_FORMATS)
    _FORMATS.clear()
    for fmt in (KerasFormat(), BundleFormat(), OnnxFormat()):
        _FORMATS[fmt.name] = custom.pop(fmt.name, fmt)
    _FORMATS.update(custom)
