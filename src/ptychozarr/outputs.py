"""The files a comparison leaves beside its store, in compare_models' formats (spec §5.1, §6).

- ``comparison_metrics.csv``: tidy ``model,metric,amplitude,phase,value`` rows, in compare_models' order.
- ``<arm>_frc_curves.csv``: ``model,frequency_bin,amplitude_frc,phase_frc`` per arm (the iterative arm
  included, which compare_models leaves out).
- ``comparison_plot.png``: phase row over amplitude row, per-panel p10/p90 limits, offsets in titles.
- ``reconstructions.npz`` / ``reconstructions_aligned.npz``: plain numeric members only (a missing
  registration offset is NaN, never an object array).
- ``run.json``: inputs, parameters, versions, timings, memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "METRIC_ORDER",
    "ArmResult",
    "metrics_rows",
    "write_comparison_plot",
    "write_frc_curves",
    "write_json",
    "write_metrics_csv",
]

METRIC_ORDER = ("mae", "mse", "psnr", "ssim", "ms_ssim", "frc50", "frc1over7")


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
        Registration offset (dy, dx) when the arm was registered.
    computation_time_s : float or None
        Inference wall time (model arms) or the iterative solver's own time.
    """

    key: str
    label: str
    metrics: dict | None = None
    offset: tuple[float, float] | None = None
    computation_time_s: float | None = None

    def metrics_table(self) -> dict:
        """``{metric: {"amplitude": a, "phase": p}}`` of the tuple metrics (empty when missing)."""
        return {
            name: dict(zip(("amplitude", "phase"), (self.metrics or {}).get(name, (None, None)), strict=True))
            for name in METRIC_ORDER
        }


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def metrics_rows(arms: list[ArmResult]) -> list[dict]:
    """Rows of ``comparison_metrics.csv`` in compare_models' order.

    Tuple metrics of every arm first (arms in the given order, metrics in :data:`METRIC_ORDER`), then
    ``registration_offset_dy`` / ``_dx`` of registered arms, then ``computation_time_s`` of every arm.
    A missing or failed arm keeps its rows with empty values.
    """
    rows = []
    for arm in arms:
        for name in METRIC_ORDER:
            amp, phase = (arm.metrics or {}).get(name, (None, None))
            rows.append(
                {
                    "model": arm.label,
                    "metric": name,
                    "amplitude": _num(amp),
                    "phase": _num(phase),
                    "value": math.nan,
                }
            )
    for arm in arms:
        if arm.offset is not None:
            for axis, value in zip(("dy", "dx"), arm.offset, strict=True):
                rows.append(
                    {
                        "model": arm.label,
                        "metric": f"registration_offset_{axis}",
                        "amplitude": math.nan,
                        "phase": math.nan,
                        "value": float(value),
                    }
                )
    for arm in arms:
        rows.append(
            {
                "model": arm.label,
                "metric": "computation_time_s",
                "amplitude": math.nan,
                "phase": math.nan,
                "value": _num(arm.computation_time_s),
            }
        )
    return rows


def write_metrics_csv(path: str | os.PathLike, arms: list[ArmResult]) -> Path:
    """Write ``comparison_metrics.csv`` (``%.6f``, NaN as empty)."""
    frame = pd.DataFrame(metrics_rows(arms), columns=["model", "metric", "amplitude", "phase", "value"])
    frame.to_csv(path, index=False, float_format="%.6f", na_rep="")
    return Path(path)


def write_frc_curves(path: str | os.PathLike, label: str, curves) -> Path:
    """Write one arm's FRC curves (amplitude, phase) as ``model,frequency_bin,amplitude_frc,phase_frc``."""
    amp, phase = (np.asarray(c, dtype=float) for c in curves)
    n = max(len(amp), len(phase))
    pad = lambda c: np.concatenate([c, np.full(n - len(c), np.nan)])  # noqa: E731
    frame = pd.DataFrame(
        {"model": label, "frequency_bin": np.arange(n), "amplitude_frc": pad(amp), "phase_frc": pad(phase)}
    )
    frame.to_csv(path, index=False, float_format="%.6f", na_rep="")
    return Path(path)


def write_comparison_plot(
    path: str | os.PathLike, panels: list[tuple[str, np.ndarray]], p_min: float = 10.0, p_max: float = 90.0
) -> Path:
    """Phase over amplitude for each (title, complex image) panel, per-panel percentile limits."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 9))
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (title, image) in enumerate(panels):
        for row, (part, cmap) in enumerate(((np.angle, "viridis"), (np.abs, "gray"))):
            values = part(image)
            finite = values[np.isfinite(values)]
            lo, hi = np.percentile(finite, [p_min, p_max]) if finite.size else (0, 1)
            ax = axes[row, col]
            shown = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(title)
    axes[0, 0].set_ylabel("Phase", fontsize=14)
    axes[1, 0].set_ylabel("Amplitude", fontsize=14)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return Path(path)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON (NaN as null), atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
