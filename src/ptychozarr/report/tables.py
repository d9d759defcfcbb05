"""The metrics of one comparison as compare_models' CSV, FRC curve CSVs and a console table.

``comparison_metrics.csv`` keeps compare_models' tidy rows and order: every tuple metric
of every arm, then ``registration_offset_dy`` / ``_dx`` of the registered arms, then
``computation_time_s`` of every arm. After all of those come the engine's own metrics (every other
entry of :mod:`ptychozarr.metrics.registry`, e.g. ``frc50_hann``), one row per arm and metric, so
that compare_models' rows stay a prefix a reader of its CSV sees unchanged; a crossing that never
happens is an empty cell. It adds one trailing column, ``registration``, that marks every
row of an arm ``registered``, ``unregistered`` or ``rejected: <reason>``.

Why a column and not a row: PtychoPINN's study summariser reads each row's ``value`` with
``float()``, so a row holding the word ``registered`` would stop it; its reporters select the
``model, metric, amplitude, phase, value`` columns by name (``csv.DictReader``, pandas), so a trailing
column is invisible to them, while every row a researcher reads says how its arm was scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ptychozarr.metrics import registry
from ptychozarr.report._files import replacing

__all__ = [
    "BETTER",
    "CSV_COLUMNS",
    "METRIC_ORDER",
    "ArmResult",
    "format_table",
    "metrics_rows",
    "write_frc_curves",
    "write_metrics_csv",
]

#: compare_models' metrics in its CSV order (the registry's ``compare_models`` entries; fixed).
METRIC_ORDER = registry.COMPARE_MODELS
CSV_COLUMNS = ("model", "metric", "amplitude", "phase", "value", "registration")


class _Better(Mapping):
    """Which way each registered metric improves, read from the registry at every access."""

    def __getitem__(self, name: str) -> str:
        return registry.metric(name).better

    def __iter__(self):
        return (m.name for m in registry.metrics())

    def __len__(self) -> int:
        return len(registry.metrics())


#: Which way each metric improves (a view of :mod:`ptychozarr.metrics.registry`).
BETTER = _Better()


@dataclass
class ArmResult:
    """One reconstruction's scores, as reported.

    Parameters
    ----------
    key : str
        Short name used in file names and the store (``pinn``, ``baseline``, ``ptychi``).
    label : str
        Name in the CSV's ``model`` column (``PtychoPINN``, ``Baseline``, ``PtyChi``, ``Tike``).
    metrics : dict or None
        :func:`ptychozarr.metrics.evaluate` output; None when the arm is missing or failed, which gives
        explicit empty rows.
    offset : tuple of float or None
        Registration offset (dy, dx) applied to the arm; None when it was not registered.
    computation_time_s : float or None
        Inference wall time (model arms) or the iterative solver's own time.
    registered : bool or None
        Whether the arm was scored after registration; None: derive it (registered when ``offset`` is
        set, unregistered when scored without one, blank when not scored).
    registration_note : str or None
        Why registration was refused (e.g. a weak correlation peak) for an unregistered arm: the arm
        is then marked ``rejected: <note>``.
    registration_confidence : float or None
        The registration measurement's confidence, when the arm was measured.
    """

    key: str
    label: str
    metrics: dict | None = None
    offset: tuple[float, float] | None = None
    computation_time_s: float | None = None
    registered: bool | None = None
    registration_note: str | None = None
    registration_confidence: float | None = None

    @property
    def registration(self) -> str:
        """``registered``, ``unregistered``, ``rejected: <note>``, or ``""`` for an arm not scored."""
        registered = self.offset is not None if self.registered is None else self.registered
        if registered:
            return "registered"
        if self.registration_note:
            return f"rejected: {self.registration_note}"
        if self.registered is None and self.metrics is None:
            return ""
        return "unregistered"

    def metrics_table(self) -> dict:
        """``{metric: {"amplitude": a, "phase": p}}`` of every registered metric (None when missing)."""
        values = self.metrics or {}
        return {
            m.name: dict(zip(("amplitude", "phase"), values.get(m.name, (None, None)), strict=True))
            for m in registry.metrics()
        }


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _row(arm: ArmResult, metric: str, amplitude=None, phase=None, value=None) -> dict:
    return {
        "model": arm.label,
        "metric": metric,
        "amplitude": _num(amplitude),
        "phase": _num(phase),
        "value": _num(value),
        "registration": arm.registration,
    }


def metrics_rows(arms: Sequence[ArmResult]) -> list[dict]:
    """Rows of ``comparison_metrics.csv`` in compare_models' order (see the module docstring), then
    every other registered metric of every arm.

    A missing or failed arm keeps its rows with empty values.
    """
    rows = [
        _row(arm, name, *(arm.metrics or {}).get(name, (None, None)))
        for arm in arms for name in registry.compare_models_names()
    ]
    for arm in arms:
        if arm.offset is not None:
            offsets = zip(("dy", "dx"), arm.offset, strict=True)
            rows += [_row(arm, f"registration_offset_{axis}", value=v) for axis, v in offsets]
    rows += [_row(arm, "computation_time_s", value=arm.computation_time_s) for arm in arms]
    rows += [
        _row(arm, name, *(arm.metrics or {}).get(name, (None, None)))
        for arm in arms for name in registry.extra_names()
    ]
    return rows


def write_metrics_csv(path: str | os.PathLike, arms: Sequence[ArmResult]) -> Path:
    """Write ``comparison_metrics.csv`` (``%.6f``, NaN as empty), atomically."""
    frame = pd.DataFrame(metrics_rows(arms), columns=list(CSV_COLUMNS))
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f", na_rep="")
    return Path(path)


def write_frc_curves(path: str | os.PathLike, label: str, curves) -> Path:
    """Write one arm's FRC curves (amplitude, phase) as ``model,frequency_bin,amplitude_frc,phase_frc``."""
    amp, phase = (np.asarray(c, dtype=float) for c in curves)
    n = max(len(amp), len(phase))
    amp, phase = (np.pad(c, (0, n - len(c)), constant_values=np.nan) for c in (amp, phase))
    frame = pd.DataFrame(
        {"model": label, "frequency_bin": np.arange(n), "amplitude_frc": amp, "phase_frc": phase}
    )
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f", na_rep="")
    return Path(path)


def _pair(values, entry: registry.Metric) -> str:
    amp, phase = values
    if amp is None and phase is None:
        return "—"
    if entry.unit == "rings" and not entry.compare_models:  # NaN: a crossing that never happens
        return " / ".join("none" if v is not None and math.isnan(float(v)) else _fmt(v) for v in values)
    return f"{_fmt(amp)} / {_fmt(phase)}"


def _fmt(x) -> str:
    return "—" if x is None or not math.isfinite(float(x)) else f"{float(x):.4g}"


def format_table(arms: Sequence[ArmResult]) -> str:
    """The comparison as a plain-text table: one column per arm, one row per metric.

    One row per registered metric; each cell is ``amplitude / phase`` (``none``: a windowed FRC that
    never crosses its threshold; ``—``: not scored); the ``registration`` row says how each arm was scored
    (with the applied offset in px), and rejected registrations are explained below the table.
    """
    header = ["metric (amplitude / phase)", *(a.label for a in arms)]
    tables = [a.metrics_table() for a in arms]
    body = [[m.display, *(_pair(t[m.name].values(), m) for t in tables)] for m in registry.metrics()]
    body.append(["registration", *(_registration_cell(a) for a in arms)])
    body.append(["computation time (s)", *(_fmt(a.computation_time_s) for a in arms)])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{a.label}: {a.registration}" for a in arms if a.registration.startswith("rejected")]
    return "\n".join(lines)


def _registration_cell(arm: ArmResult) -> str:
    status = arm.registration
    if status == "registered" and arm.offset is not None:
        return f"registered ({arm.offset[0]:+.2f}, {arm.offset[1]:+.2f}) px"
    return "rejected (see below)" if status.startswith("rejected") else (status or "—")
