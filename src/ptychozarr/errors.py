"""Exception classes shared by every stage.

Each message names what is wrong (a key, a flag, a file) and what to do about it. The CLI turns any
:class:`PtychozarrError` into one line on stderr and exit code 2.
"""

__all__ = [
    "PtychozarrError",
    "InvalidScanError",
    "InvalidParameterError",
    "ModelMismatchError",
    "MemoryBudgetError",
    "StoreError",
]


class PtychozarrError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidScanError(PtychozarrError, ValueError):
    """The input scan (NPZ or store) breaks the data contract."""


class InvalidParameterError(PtychozarrError, ValueError):
    """A parameter is impossible or inconsistent with the data."""


class ModelMismatchError(PtychozarrError, ValueError):
    """A model does not fit the data (patch size, gridsize, inputs) or cannot be loaded."""


class MemoryBudgetError(PtychozarrError, MemoryError):
    """A plan's projected memory exceeds the budget."""


class StoreError(PtychozarrError, OSError):
    """A Zarr store is missing, incomplete or already exists."""
