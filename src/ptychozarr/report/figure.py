"""``comparison_plot.png``: every arm beside the truth on shared scales, errors, metrics and FRC curves.

Layout (one column per image, the ground truth first)::

    amplitude  | truth | arm 1 | arm 2 | …   one colour scale per row, its bar as tall as the panels
    phase      | truth | arm 1 | arm 2 | …
    |Δ ampl.|  |       | arm 1 | arm 2 | …
    Δ phase    |       | arm 1 | arm 2 | …
    metrics table (amplitude / phase) | amplitude FRC | phase FRC

Each arm is shown as it was scored: its amplitude scaled to the truth's mean amplitude and its
constant phase offset to the truth removed (the phase of Σ recon·conj(truth)), so that arms compare
by colour. The error maps are ``| |recon| − |truth| |`` and the wrapped phase difference. The table
has one row per registered metric (:mod:`ptychozarr.metrics.registry`). The FRC panels draw, to
Nyquist, every arm's curve of the Hann-windowed images (solid, with its 0.5 and half-bit crossings)
and compare_models' unwindowed curve (thin, dashed), with the 0.5, 1/7, half-bit and 1-bit thresholds
(the last two from the ring pixel counts, :mod:`ptychozarr.report.resolution`); given a pixel size,
crossings are also given in nm and a top axis shows spatial frequency. compare_models' crossing
``L`` (never crossed) reads ``≥ L`` rings (``≤`` the finest period in nm); a windowed curve that never
crosses reads ``none``. Images larger than ``max_side`` are strided.
Built with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptychozarr.errors import InvalidParameterError
from ptychozarr.metrics import FRC1OVER7, FRC50, frc_length, one_bit_threshold, registry
from ptychozarr.metrics.registry import Metric
from ptychozarr.report._files import replacing
from ptychozarr.report.resolution import frc_side, half_bit_threshold, resolution_m, ring_counts
from ptychozarr.report.tables import ArmResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["comparison_figure", "write_comparison_figure", "write_objects_plot"]

_MAX_SIDE = 600  # larger images are strided: a 3-inch panel at 150 dpi shows 450 pixels
_PANEL_IN = 3.0
_ROWS = (
    ("amplitude", "gray", "amplitude (transmission)"),
    ("phase", "viridis", "phase (rad)"),
    ("amplitude_error", "magma", "|Δ amplitude|"),
    ("phase_error", "RdBu_r", "Δ phase (rad, wrapped)"),
)
def _step(shape, max_side: int) -> int:
    return max(1, -(-max(shape) // max_side))


def _strided(array, step: int) -> np.ndarray:
    return np.asarray(array[::step, ::step]).astype(np.complex128)


def _as_scored(recon: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Amplitude scaled to the truth's mean, phase offset removed, and the two error maps."""
    amp_t, amp_r = np.abs(truth), np.abs(recon)
    scale = np.nanmean(amp_t) / np.nanmean(amp_r) if np.nanmean(amp_r) > 0 else 1.0
    rotated = recon * np.exp(-1j * np.angle(np.nansum(recon * truth.conj())))
    return {
        "amplitude": amp_r * scale,
        "phase": np.angle(rotated),
        "amplitude_error": np.abs(amp_r * scale - amp_t),
        "phase_error": np.angle(rotated * truth.conj()),
    }


def _limits(quantity: str, images: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([im[np.isfinite(im)].ravel() for im in images])
    if values.size == 0:
        return 0.0, 1.0
    if quantity == "phase_error":
        bound = float(np.percentile(np.abs(values), 99)) or 1.0
        return -bound, bound
    if quantity == "amplitude_error":
        return 0.0, float(np.percentile(values, 99)) or 1.0
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _truths(truth, labels: Sequence[str]) -> dict:
    if isinstance(truth, Mapping):
        missing = [lb for lb in labels if lb not in truth]
        if missing:
            raise InvalidParameterError(
                f"no ground-truth crop for arms {missing}; give one per arm or one array"
            )
        return {lb: truth[lb] for lb in labels}
    return dict.fromkeys(labels, truth)


def comparison_figure(
    truth,
    arms: Mapping[str, object],
    results: Sequence[ArmResult] = (),
    *,
    title: str,
    pixel_size_m: float | None = None,
    trim: int = 2,
    max_side: int = _MAX_SIDE,
) -> Figure:
    """Build the comparison figure (see the module docstring).

    Parameters
    ----------
    truth : 2-D complex array, or mapping of arm label to one
        The ground truth each arm was aligned to (per arm when the arms' crops differ).
    arms : mapping of arm label to 2-D complex array
        Each arm after alignment (and registration), the shape of its truth; numpy, Zarr or dask.
    results : sequence of ArmResult
        Scores for the table and FRC curves (``metrics["frc"]``), matched to ``arms`` by label.
    title : str
        Figure title (e.g. the test data's name).
    pixel_size_m : float, optional
        Object pixel size in metres; adds resolutions in nm and a spatial-frequency axis.
    trim : int
        Pixels trimmed per side before scoring (:func:`ptychozarr.metrics.evaluate`), which sets the
        FRC's image side and so its rings' pixel counts.
    max_side : int
        Largest side of a displayed image; larger images are strided.
    """
    if not arms:
        raise InvalidParameterError("the comparison figure needs at least one aligned arm")
    labels = list(arms)
    truths = _truths(truth, labels)
    for label in labels:
        if tuple(arms[label].shape) != tuple(truths[label].shape):
            raise InvalidParameterError(
                f"arm {label}: aligned shape {tuple(arms[label].shape)} differs from its ground truth's "
                f"{tuple(truths[label].shape)}; give the crop it was scored against"
            )
    by_label = {r.label: r for r in results}
    step = _step(arms[labels[0]].shape, max_side)
    read = {id(t): _strided(t, step) for t in truths.values()}  # each distinct truth read once
    shown_truth = read[id(truths[labels[0]])]
    panels = {lb: _as_scored(_strided(arms[lb], step), read[id(truths[lb])]) for lb in labels}
    sides = {lb: frc_side(tuple(arms[lb].shape), trim) for lb in labels}

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = len(labels) + 1
    fig = Figure(figsize=(_PANEL_IN * ncols + 3.0, 4 * _PANEL_IN + 6.3), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=14)
    top, bottom = fig.subfigures(2, 1, height_ratios=[4 * _PANEL_IN, 5.8])
    top.suptitle(
        "arms as scored: amplitude scaled to the truth's mean, constant phase offset removed"
        + (f"; 1 pixel in {step} per axis shown" if step > 1 else "")
        + (f"; pixel {pixel_size_m * 1e9:.3g} nm" if pixel_size_m else ""),
        fontsize=9,
    )
    _draw_images(top, labels, shown_truth, panels, by_label)
    _check_curves(labels, by_label, sides)
    thresholds = {n: _thresholds(n) for n in set(sides.values())}
    grid = bottom.add_gridspec(1, 3, width_ratios=[1.5, 1, 1])
    _draw_table(bottom.add_subplot(grid[0]), labels, by_label, sides, pixel_size_m)
    for part in (0, 1):
        ax = bottom.add_subplot(grid[part + 1])
        _draw_frc(ax, part, labels, by_label, sides, thresholds, pixel_size_m)
    return fig


def write_comparison_figure(
    path: str | os.PathLike,
    truth,
    arms: Mapping[str, object],
    results: Sequence[ArmResult] = (),
    *,
    title: str,
    pixel_size_m: float | None = None,
    trim: int = 2,
    max_side: int = _MAX_SIDE,
    dpi: int = 150,
) -> Path:
    """Build the comparison figure (:func:`comparison_figure`) and write it as PNG, atomically."""
    fig = comparison_figure(
        truth, arms, results, title=title, pixel_size_m=pixel_size_m, trim=trim, max_side=max_side
    )
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def _draw_images(subfig, labels, truth: np.ndarray, panels: dict, by_label: dict) -> None:
    grid = subfig.add_gridspec(len(_ROWS), len(labels) + 2, width_ratios=[1] * (len(labels) + 1) + [0.35])
    truth_parts = {"amplitude": np.abs(truth), "phase": np.angle(truth)}
    for row, (quantity, cmap, unit) in enumerate(_ROWS):
        images = [panels[lb][quantity] for lb in labels]
        first_col = 0 if quantity in truth_parts else 1
        if first_col == 0:
            images.insert(0, truth_parts[quantity])
        vmin, vmax = _limits(quantity, images)
        titles = ["Ground truth", *(_arm_title(lb, by_label.get(lb)) for lb in labels)][first_col:]
        for col, (image, name) in enumerate(zip(images, titles, strict=True), start=first_col):
            ax = subfig.add_subplot(grid[row, col])
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == first_col:
                ax.set_ylabel(unit.split(" (")[0], fontsize=11)
        bar = subfig.colorbar(shown, cax=ax.inset_axes([1.05, 0.0, 0.06, 1.0]))
        bar.set_label(unit, fontsize=9)


def _arm_title(label: str, result: ArmResult | None) -> str:
    if result is None or not result.registration:
        return label
    if result.registration == "registered" and result.offset is not None:
        return f"{label}\nregistered ({result.offset[0]:+.2f}, {result.offset[1]:+.2f}) px"
    return f"{label}\n{result.registration.split(':')[0]}"


def _curve(result: ArmResult | None, part: int, key: str = "frc") -> np.ndarray | None:
    if result is None or not result.metrics or key not in result.metrics:
        return None
    return np.asarray(result.metrics[key][part], dtype=np.float64)


def _check_curves(labels, by_label: dict, sides: dict) -> None:
    """Each arm's curves match its image side: corner-length plain curves, Nyquist-length windowed ones."""
    for label in labels:
        n = sides[label]
        for key, length in (("frc", frc_length(n)), ("frc_hann", n // 2 + 1)):
            for part in (0, 1):
                curve = _curve(by_label.get(label), part, key)
                if curve is not None and curve.size != length:
                    raise InvalidParameterError(
                        f"arm {label}: its {key} curve has {curve.size} rings, an image of side {n} gives "
                        f"{length}; pass the trim the arm was scored with"
                    )


def _thresholds(n: int) -> dict[str, np.ndarray]:
    """The half-bit and 1-bit thresholds of an n×n FRC, to Nyquist, from its rings' pixel counts."""
    counts = ring_counts(n)[: n // 2 + 1]
    return {"half-bit": half_bit_threshold(counts), "1-bit": one_bit_threshold(counts)}


def _fmt(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _rings(ring, n: int, entry: Metric) -> str:
    """A crossing in rings: compare_models' ``L`` (never crossed) reads ``≥ L``; a registered
    crossing that never happens (NaN) reads ``none``."""
    if ring is None:
        return "—"
    if not math.isfinite(ring):
        return "—" if entry.compare_models else "none"
    return f"≥{frc_length(n)}" if entry.compare_models and ring >= frc_length(n) else _fmt(ring)


def _nm(ring, n: int, pixel_size_m: float, entry: Metric) -> str:
    """A crossing as a period in nm; ``≤`` the finest period for compare_models' ``L``."""
    if ring is None or not math.isfinite(ring):
        return _rings(ring, n, entry)
    bound = entry.compare_models and ring >= frc_length(n)
    text = _fmt(resolution_m(min(ring, frc_length(n)), n, pixel_size_m) * 1e9)
    return f"≤{text}" if bound else text


_NONE = (None, None)


def _table_column(result: ArmResult | None, n: int, pixel_size_m) -> list[str]:
    """One arm's cells of the metrics table, in the order of :func:`_table_rows`."""
    metrics = result.metrics if result is not None and result.metrics else None
    entries = registry.metrics()
    crossings = [m for m in entries if m.unit == "rings"] if pixel_size_m else []
    if metrics is None:
        cells = ["—"] * (len(entries) + len(crossings))
    else:
        cells = [
            " / ".join(_rings(v, n, m) if m.unit == "rings" else _fmt(v) for v in metrics.get(m.name, _NONE))
            for m in entries
        ]
        cells += [
            " / ".join(_nm(v, n, pixel_size_m, m) for v in metrics.get(m.name, _NONE)) for m in crossings
        ]
    status = (result.registration.split(":")[0] if result is not None else "") or "—"
    return [*cells, status, _fmt(result.computation_time_s if result is not None else None)]


def _table_rows(pixel_size_m) -> list[str]:
    entries = registry.metrics()
    nm = [m.display.replace("(rings)", "(nm)") for m in entries if m.unit == "rings"] if pixel_size_m else []
    return [*(m.display for m in entries), *nm, "registration", "time (s)"]


def _draw_table(ax, labels, by_label: dict, sides: dict, pixel_size_m) -> None:
    columns = [_table_column(by_label.get(lb), sides[lb], pixel_size_m) for lb in labels]
    ax.axis("off")
    table = ax.table(
        cellText=[list(row) for row in zip(*columns, strict=True)],
        rowLabels=_table_rows(pixel_size_m),
        colLabels=labels,
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 1.15)
    ax.set_title("metrics (amplitude / phase)", fontsize=10)


def _crossing(result: ArmResult, name: str, part: int):
    values = (result.metrics or {}).get(name)
    return None if values is None else values[part]


def _draw_frc(ax, part: int, labels, by_label: dict, sides: dict, thresholds: dict, pixel_size_m) -> None:
    """Every arm's curves to Nyquist: the Hann-windowed one solid with its crossings, the plain one
    (compare_models') thin; the 0.5, 1/7, half-bit and 1-bit thresholds."""
    drawn = []
    for label in labels:
        result, n = by_label.get(label), sides[label]
        plain, hann = _curve(result, part), _curve(result, part, "frc_hann")
        nyquist = n // 2 + 1
        if plain is None and hann is None:
            continue
        if hann is not None:
            hann_entry = registry.metric("frc50_hann")
            r50, rhb = (_crossing(result, k, part) for k in ("frc50_hann", "frc_halfbit_hann"))
            detail = f"0.5 at {_rings(r50, n, hann_entry)}, ½-bit at {_rings(rhb, n, hann_entry)} rings"
            if pixel_size_m:
                nm = (_nm(r, n, pixel_size_m, hann_entry) for r in (r50, rhb))
                detail += " ({}, {} nm)".format(*nm)
            (line,) = ax.plot(np.arange(hann.size), hann, lw=1.4, label=f"{label}, Hann: {detail}")
            colour = line.get_color()
        else:
            colour = None
        if plain is not None:
            ax.plot(np.arange(nyquist), plain[:nyquist], lw=0.8, alpha=0.6, ls="--", color=colour,
                    label=f"{label}, no window (compare_models)")
        if n not in drawn:
            drawn.append(n)
    for n in drawn:
        suffix = f" (n={n})" if len(drawn) > 1 else ""
        for name, style in (("half-bit", "-."), ("1-bit", (0, (3, 1, 1, 1, 1, 1)))):
            curve = thresholds[n][name]
            ax.plot(np.arange(curve.size), curve, color="0.35", ls=style, lw=0.9, label=f"{name}{suffix}")
    ax.axhline(FRC50, color="k", ls="--", lw=0.8, label="0.5")
    ax.axhline(FRC1OVER7, color="k", ls=":", lw=0.8, label="1/7")
    ax.set_ylim(-0.05, 1.05)
    if drawn:
        ax.set_xlim(0, max(drawn) // 2)
    ax.set_xlabel("spatial frequency (rings, to Nyquist)")
    ax.set_ylabel("FRC")
    ax.set_title(f"{('amplitude', 'phase')[part]} FRC", fontsize=10)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1, frameon=False)
    if pixel_size_m and drawn:
        per_ring = 1.0 / (drawn[0] * pixel_size_m * 1e9)  # cycles per nm of one ring
        top = ax.secondary_xaxis("top", functions=(lambda r: r * per_ring, lambda f: f / per_ring))
        top.set_xlabel("spatial frequency (1/nm)", fontsize=8)


def write_objects_plot(
    path: str | os.PathLike, panels: Sequence[tuple[str, object]], p_min: float = 10.0, p_max: float = 90.0
) -> Path:
    """Phase over amplitude for each ``(title, complex 2-D array)`` panel, per-panel percentile limits:
    the plot of a scan without ground truth, which has no truth to set the arms beside.

    Arrays may be numpy, Zarr or dask; images larger than 2048 px are strided, so only that many
    pixels are read.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (title, array) in enumerate(panels):
        image = _strided(array, _step(array.shape, _MAX_SIDE))
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
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return Path(path)
