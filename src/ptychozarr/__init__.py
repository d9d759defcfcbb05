"""ptychozarr: out-of-core comparison of ptychography reconstruction models.

The public API is listed in ``__all__``. Names are imported on first use (module ``__getattr__``), so
that ``import ptychozarr`` stays light: dask, zarr, xarray and pandas load when an API that needs them
is first touched, TensorFlow only when a model is loaded. Type checkers and IDEs see every name through
the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ptychozarr.errors import (
    InvalidParameterError,
    InvalidScanError,
    MemoryBudgetError,
    ModelMismatchError,
    PtychozarrError,
    StoreError,
)

if TYPE_CHECKING:
    from ptychozarr import align, cluster, io, memory, metrics, models
    from ptychozarr.api import infer, stitch
    from ptychozarr.config import CompareConfig
    from ptychozarr.grouping import group, open_groups
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.metrics import evaluate
    from ptychozarr.models import load_model, train
    from ptychozarr.pipeline import Comparison, compare, run_compare
    from ptychozarr.simulate import simulate
    from ptychozarr.study import study

__version__ = "0.1.0"

_LAZY = {
    "CompareConfig": "ptychozarr.config",
    "Comparison": "ptychozarr.pipeline",
    "compare": "ptychozarr.pipeline",
    "evaluate": "ptychozarr.metrics",
    "group": "ptychozarr.grouping",
    "infer": "ptychozarr.api",
    "ingest": "ptychozarr.io",
    "load_model": "ptychozarr.models",
    "open_dataset": "ptychozarr.io",
    "open_groups": "ptychozarr.grouping",
    "run_compare": "ptychozarr.pipeline",
    "simulate": "ptychozarr.simulate",
    "stitch": "ptychozarr.api",
    "study": "ptychozarr.study",
    "train": "ptychozarr.models",
}
_SUBMODULES = ("align", "cluster", "io", "memory", "metrics", "models")

__all__ = [
    "CompareConfig",
    "Comparison",
    "InvalidParameterError",
    "InvalidScanError",
    "MemoryBudgetError",
    "ModelMismatchError",
    "PtychozarrError",
    "StoreError",
    "__version__",
    "align",
    "cluster",
    "compare",
    "evaluate",
    "group",
    "infer",
    "ingest",
    "io",
    "load_model",
    "memory",
    "metrics",
    "models",
    "open_dataset",
    "open_groups",
    "run_compare",
    "simulate",
    "stitch",
    "study",
    "train",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"ptychozarr.{name}")
    else:
        raise AttributeError(f"module 'ptychozarr' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """The package module: importing a submodule named like a public function (``ptychozarr.stitch``,
    ``ptychozarr.study``, ``ptychozarr.simulate``) does not bind the submodule as the package attribute,
    so that ``ptychozarr.stitch`` is always the public function (bound on first use, from ``_LAZY``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _LAZY:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
