"""ptychozarr: out-of-core comparison of ptychography reconstruction models.

The public API is re-exported here and imported lazily, so that ``import ptychozarr`` stays light
(TensorFlow is imported only when a model is loaded).
"""

import importlib

from ptychozarr.errors import (
    InvalidParameterError,
    InvalidScanError,
    MemoryBudgetError,
    ModelMismatchError,
    PtychozarrError,
    StoreError,
)

# Functions named like their module are bound here, at import, so that a later ``import
# ptychozarr.stitch`` (which sets the package attribute to the module) cannot shadow them.
from ptychozarr.simulate import simulate  # noqa: E402
from ptychozarr.stitch import stitch  # noqa: E402
from ptychozarr.study import study  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "ingest": "ptychozarr.io",
    "open_dataset": "ptychozarr.io",
    "group": "ptychozarr.grouping",
    "open_groups": "ptychozarr.grouping",
    "load_model": "ptychozarr.models",
    "train": "ptychozarr.models",
    "infer": "ptychozarr.inference",
    "evaluate": "ptychozarr.metrics",
    "compare": "ptychozarr.pipeline",
}
_SUBMODULES = {"align", "cluster", "memory", "metrics", "models", "io"}

__all__ = sorted(
    [
        "InvalidParameterError",
        "InvalidScanError",
        "MemoryBudgetError",
        "ModelMismatchError",
        "PtychozarrError",
        "StoreError",
        "__version__",
        "simulate",
        "stitch",
        "study",
        *_LAZY,
        *_SUBMODULES,
    ]
)


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
