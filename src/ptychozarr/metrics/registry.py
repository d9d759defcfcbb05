"""The one table of metrics: what :func:`~ptychozarr.metrics.evaluate` computes and every report shows.

Each :class:`Metric` is one entry: its name (the key in ``evaluate``'s dict and the CSV's ``metric``
column), its display name, which way it improves, how it is computed and what one of its tasks holds in
memory. ``evaluate``, ``comparison_metrics.csv``, the console and markdown tables, the figure's table
and the study deltas all iterate :func:`metrics`, so a new metric is one :func:`register` call.

compare_models' seven metrics come first, flagged ``compare_models=True``: ``evaluate`` computes them in
its own fused passes (``compute`` is None) and the CSV writes them where compare_models does. Every
other entry has a ``compute(scored)`` that returns ``(amplitude, phase)`` from the scored images
(:class:`Scored`); its CSV rows follow all of compare_models' rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dask

__all__ = [
    "COMPARE_MODELS",
    "Metric",
    "Scored",
    "compare_models_names",
    "extra_names",
    "metric",
    "metrics",
    "register",
    "unregister",
]


@dataclass
class Scored:
    """The image pairs ``evaluate`` scores, handed to each registered metric's ``compute``.

    Attributes
    ----------
    amplitude : (t, p')
        Truth amplitude and the reconstruction's, scaled to the truth's mean (float64 dask arrays).
    phase : (φt, φp)
        Phases in radians with their plane (or mean) removed.
    scaled_phase : ((φt + π)/2π, (φp + π)/2π)
    lazy : bool
        Whether ``evaluate`` returns dask objects; :meth:`resolve` honours it.
    workdir : str or Path or None
        Directory for the FFT transposition (:func:`~ptychozarr.metrics.frc`).
    frc_sigma : float
        Gaussian smoothing of FRC curves.
    curves : dict
        Curves a metric publishes for the reports (``name: (amplitude curve, phase curve)``); evaluate
        returns them beside the metrics.
    cache : dict
        Values shared between entries (e.g. one windowed FRC serves four crossings): :meth:`once`.
    """

    amplitude: tuple
    phase: tuple
    scaled_phase: tuple
    lazy: bool = False
    workdir: str | Path | None = None
    frc_sigma: float = 0.0
    curves: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def resolve(self, *values):
        """The values as they are (lazy) or computed together in one pass."""
        return values if self.lazy else dask.compute(*values)

    def once(self, key: str, make: Callable):
        """``make()`` the first time ``key`` is asked for, the cached value afterwards."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass(frozen=True)
class Metric:
    """One metric, as every consumer reads it.

    Parameters
    ----------
    name : str
        Key in ``evaluate``'s dict and the CSV's ``metric`` column.
    display : str
        Label in the console table and the figure.
    better : {"higher", "lower"}
        Which way it improves (the study deltas' verdicts).
    compute : callable, optional
        ``compute(scored: Scored) -> (amplitude, phase)``; floats eagerly, dask scalars when
        ``scored.lazy``. None for compare_models' metrics, which ``evaluate`` fuses into its passes.
    unit : str
        ``"rings"`` for an FRC crossing (the figure writes ``≥ L`` for an uncrossed legacy curve and can
        add the period in nm); empty otherwise.
    resolution : bool
        The figure adds a row with the crossing as a period in nm when the pixel size is known.
    compare_models : bool
        One of compare_models' rows, written in its block and order.
    memory : callable, optional
        ``memory(shape, chunk) -> {pass: bytes}``: the peak of one task of each pass it adds
        (:func:`~ptychozarr.metrics.task_memory` merges them).
    """

    name: str
    display: str
    better: Literal["higher", "lower"]
    compute: Callable | None = None
    unit: str = ""
    resolution: bool = False
    compare_models: bool = False
    memory: Callable | None = None

    def __post_init__(self):
        if self.better not in ("higher", "lower"):
            raise ValueError(f"metric {self.name}: better must be 'higher' or 'lower', got {self.better!r}")
        if self.compute is None and not self.compare_models:
            raise ValueError(f"metric {self.name}: give compute(scored) -> (amplitude, phase)")


#: compare_models' metrics (name, display name, better, unit), in its CSV order; fixed.
_COMPARE_MODELS = (
    ("mae", "MAE", "lower", ""),
    ("mse", "MSE", "lower", ""),
    ("psnr", "PSNR (dB)", "higher", ""),
    ("ssim", "SSIM", "higher", ""),
    ("ms_ssim", "MS-SSIM", "higher", ""),
    ("frc50", "FRC 0.5 (rings)", "higher", "rings"),
    ("frc1over7", "FRC 1/7 (rings)", "higher", "rings"),
)
#: Their names: the first rows of every arm in ``comparison_metrics.csv``.
COMPARE_MODELS = tuple(row[0] for row in _COMPARE_MODELS)

_REGISTRY: dict[str, Metric] = {}
_LOADED = False


def register(entry: Metric, *, replace: bool = False) -> Metric:
    """Add ``entry`` after the registered metrics (or in its place with ``replace``); returns it."""
    _load()
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"metric {entry.name!r} is registered already; pass replace=True")
    if entry.name in ("frc", "frc_hann") or entry.name.startswith("registration_") or \
            entry.name == "computation_time_s":
        raise ValueError(f"metric name {entry.name!r} is reserved")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> Metric:
    """Remove a metric (compare_models' cannot be removed); returns it."""
    _load()
    if _REGISTRY[name].compare_models:
        raise ValueError(f"{name} is one of compare_models' metrics; its rows are fixed")
    return _REGISTRY.pop(name)


def metrics() -> tuple[Metric, ...]:
    """Every registered metric in order: compare_models' seven, then the others as registered."""
    _load()
    return tuple(_REGISTRY.values())


def metric(name: str) -> Metric:
    """The registered metric ``name``."""
    _load()
    return _REGISTRY[name]


def compare_models_names() -> tuple[str, ...]:
    """compare_models' metrics, in its CSV order."""
    return tuple(m.name for m in metrics() if m.compare_models)


def extra_names() -> tuple[str, ...]:
    """The engine's metrics beyond compare_models', in registration order."""
    return tuple(m.name for m in metrics() if not m.compare_models)


def _load() -> None:
    """Register the built-in metrics on first use (their modules import dask, scipy)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name, display, better, unit in _COMPARE_MODELS:
        _REGISTRY[name] = Metric(name, display, better, unit=unit, compare_models=True)
    from ptychozarr.metrics.fourier import apodised_entries

    for entry in apodised_entries():
        _REGISTRY[entry.name] = entry
