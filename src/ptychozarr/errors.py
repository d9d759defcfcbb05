"""Exception classes shared by every stage.

Each message names what is wrong (a key, a flag, a file) and what to do about it, on one line. The CLI
turns any :class:`PtychozarrError` into that line on stderr and exit code 2 (bad input, refused before
any work where the headers tell). Faults of the machine are not these classes: an ``OSError`` for a full
disk, a file-size limit, a read-only or forbidden path, and a ``MemoryError``, become one line and exit
code 1 in the CLI; any other exception is a bug and keeps its traceback.
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
