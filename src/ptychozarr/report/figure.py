"""``comparison_plot.png``: every arm beside the truth as it was scored, errors, metrics and FRC curves.

Layout (landscape; one column per image, the ground truth first)::

    amplitude  | truth | arm 1 | arm 2 | …  ║  amplitude FRC | phase FRC
    phase      | truth | arm 1 | arm 2 | …  ║     one legend for both
    |Δ ampl.|  | (def) | arm 1 | arm 2 | …  ║  metrics table
    Δ phase    | (def) | arm 1 | arm 2 | …  ║  (amplitude / phase)

The images are the scored region (the arm's aligned crop less ``trim`` pixels per side) as
:func:`ptychozarr.metrics.evaluate` sees it: amplitude scaled to the truth's mean, phase with each
image's own least-squares plane (``phase_align="plane"``) or mean (``"mean"``) removed. The error maps
are ``|p' − t|`` and ``φ_arm − φ_truth`` as scored, one colour scale per row (99th percentile). The
amplitude and phase panels follow compare_models' ``create_comparison_plot``: each panel its own colour
limits, the ``p_min`` and ``p_max`` percentiles of the image it shows (10 and 90 by default), except a
phase panel whose arm has manual limits (compare_models' ``--pinn_phase_vmin/--pinn_phase_vmax`` …,
used when both are given). Percentiles are taken over the displayed pixels: images larger than
``max_side`` are strided, so only that many pixels are read.

The column titles and the title of the image block say how each arm was aligned: the phase method,
and per arm whether registration was applied, with its shift, or rejected (the CSV's word). The table
has one row per registered metric (:mod:`ptychozarr.metrics.registry`). The FRC panels draw, to
Nyquist, every arm's curve of the Hann-windowed images (solid) and compare_models' unwindowed curve
(dashed), with the 0.5, 1/7, half-bit and 1-bit thresholds (the last two from the ring pixel counts,
:mod:`ptychozarr.report.resolution`); given a pixel size, crossings are also given in nm and a top
axis shows spatial frequency. compare_models' crossing ``L`` (never crossed) reads ``≥ L`` rings
(``≤`` the finest period in nm); a windowed curve that never crosses reads ``none``.
Built with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``, constrained layout): no pyplot
state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptychozarr.errors import InvalidParameterError
from ptychozarr.io.store import read_by_chunk
from ptychozarr.metrics import (
    FRC1OVER7,
    FRC50,
    frc_length,
    one_bit_threshold,
    registry,
    remove_phase_mean,
    remove_phase_plane,
)
from ptychozarr.metrics.registry import Metric
from ptychozarr.report._files import replacing
from ptychozarr.report.resolution import frc_side, half_bit_threshold, resolution_m, ring_counts
from ptychozarr.report.tables import ArmResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

__all__ = ["comparison_figure", "write_comparison_figure", "write_objects_plot"]

_MAX_SIDE = 600  # larger images are strided: a 3-inch panel at 150 dpi shows 450 pixels
_PHASE_ALIGN = {
    "plane": (remove_phase_plane, "phase less its own least-squares plane"),
    "mean": (remove_phase_mean, "phase less its own mean"),
}
# slide sizes (points): read from the back of a room at 16 in wide
_FONT = {"title": 17, "subtitle": 11.5, "column": 13, "row": 13, "label": 11.5, "tick": 10, "table": 10}
# the page, in inches: four rows of images beside the FRC panels over the table, as tall as they are
_FRC_IN = 4.2  # height of the FRC panels with their legend
_ROW_IN = 0.22  # a table row
_NAMES_IN, _ARM_IN, _CURVES_MIN_IN = 2.1, 2.0, 6.2  # table: metric names, one arm; least width
_GAP_IN, _CELL_SLACK = 0.12, 1.15  # space between image rows; cell width over image width
_BAR_IN, _BAR_WIDTH_IN = 0.6, 0.12  # a panel's colour bar with its tick labels; the bar alone
_IMAGES_MIN_IN = 6.5  # narrowest image block (its title's lines)


@dataclass(frozen=True)
class _Row:
    quantity: str
    cmap: str
    label: str
    definition: str = ""  # error rows: what the map shows, written in the truth's column


_ROWS = (
    _Row("amplitude", "gray", "amplitude"),
    _Row("phase", "viridis", "phase (rad)"),
    _Row("amplitude_error", "magma", "|Δ amplitude|", "|arm − truth|,\nas scored;\none scale\nper row"),
    _Row("phase_error", "RdBu_r", "Δ phase (rad)", "arm − truth,\nas scored;\none scale\nper row"),
)


def _step(shape, max_side: int) -> int:
    return max(1, -(-max(shape) // max_side))


def _strided(array, step: int, trim: int = 0) -> np.ndarray:
    """``array`` less ``trim`` pixels per side, one pixel in ``step`` per axis, read as complex128 (one
    chunk at a time: :func:`~ptychozarr.io.store.read_by_chunk`)."""
    rows, cols = (slice(trim, n - trim, step) for n in array.shape)
    return read_by_chunk(array, rows, cols).astype(np.complex128)


def _phase_remover(phase_align: str):
    if phase_align not in _PHASE_ALIGN:
        raise InvalidParameterError(
            f"phase_align {phase_align!r}: give one of {sorted(_PHASE_ALIGN)} (the run's phase_align_method)"
        )
    return _PHASE_ALIGN[phase_align][0]


def _truth_panels(truth: np.ndarray, remove) -> dict[str, np.ndarray]:
    return {"amplitude": np.abs(truth), "phase": remove(np.angle(truth))}


def _as_scored(recon: np.ndarray, truth: dict[str, np.ndarray], remove) -> dict[str, np.ndarray]:
    """An arm as :func:`~ptychozarr.metrics.evaluate` scores it against ``truth`` (its
    :func:`_truth_panels`), and the two error maps."""
    amp = np.abs(recon)
    scale = np.nanmean(truth["amplitude"]) / np.nanmean(amp) if np.nanmean(amp) > 0 else 1.0
    amp = amp * scale
    phase = remove(np.angle(recon))
    return {
        "amplitude": amp,
        "phase": phase,
        "amplitude_error": np.abs(amp - truth["amplitude"]),
        "phase_error": phase - truth["phase"],
    }


def _row_limits(quantity: str, images: list[np.ndarray]) -> tuple[float, float]:
    """One colour scale for an error row, to the 99th percentile of its magnitudes."""
    values = np.abs(np.concatenate([im[np.isfinite(im)].ravel() for im in images]))
    bound = float(np.percentile(values, 99)) if values.size else 0.0
    bound = bound or 1.0
    return (0.0, bound) if quantity == "amplitude_error" else (-bound, bound)


def _panel_limits(
    quantity: str, image: np.ndarray, manual: tuple[float, float] | None, p_min: float, p_max: float
) -> tuple[float, float]:
    """compare_models' colour limits of an amplitude or phase panel: its arm's manual phase limits when it
    has them, else the ``p_min`` and ``p_max`` percentiles of the panel's own image."""
    if quantity == "phase" and manual is not None:
        return float(manual[0]), float(manual[1])
    values = image[np.isfinite(image)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [p_min, p_max])
    return float(lo), float(hi)


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
    phase_align: str = "plane",
    p_min: float = 10.0,
    p_max: float = 90.0,
    phase_limits: Mapping[str, tuple[float, float]] | None = None,
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
        Scores for the table and FRC curves (``metrics["frc"]``) and each arm's registration, matched
        to ``arms`` by label.
    title : str
        Figure title (e.g. the test data's name and size).
    phase_align : {"plane", "mean"}
        The phase alignment the arms were scored with (the run's ``phase_align_method``).
    p_min, p_max : float
        Percentiles of each amplitude and phase panel's own image that set its colour limits
        (compare_models' ``--p_min``, ``--p_max``).
    phase_limits : mapping of arm label to (vmin, vmax), optional
        Manual colour limits of an arm's phase panel, in radians (compare_models'
        ``--pinn_phase_vmin/--pinn_phase_vmax``, …); other panels use the percentiles.
    pixel_size_m : float, optional
        Object pixel size in metres; adds resolutions in nm and a spatial-frequency axis.
    trim : int
        Pixels trimmed per side before scoring (:func:`ptychozarr.metrics.evaluate`): the images show
        the region scored, and it sets the FRC's image side and so its rings' pixel counts.
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
    remove = _phase_remover(phase_align)
    by_label = {r.label: r for r in results}
    scored_shape = tuple(n - 2 * trim for n in arms[labels[0]].shape)
    step = _step(scored_shape, max_side)
    # each distinct truth is read and aligned once
    read = {id(t): _truth_panels(_strided(t, step, trim), remove) for t in truths.values()}
    columns = {"Ground truth": read[id(truths[labels[0]])]}
    columns |= {lb: _as_scored(_strided(arms[lb], step, trim), read[id(truths[lb])], remove) for lb in labels}
    sides = {lb: frc_side(tuple(arms[lb].shape), trim) for lb in labels}
    _check_curves(labels, by_label, sides)

    limits = (p_min, p_max, {lb: v for lb, v in (phase_limits or {}).items() if lb in arms})
    said = _alignment_lines(phase_align, scored_shape, step, labels, by_label, limits)
    rows, cols = columns["Ground truth"]["amplitude"].shape
    fig, images, curves, said = _canvas(len(columns), rows / cols, len(_table_rows(pixel_size_m)), said)
    fig.suptitle(title, fontsize=_FONT["title"])
    images.suptitle(said, fontsize=_FONT["subtitle"])
    titles = {"Ground truth": "Ground truth"} | {lb: _arm_title(lb, by_label.get(lb)) for lb in labels}
    _draw_images(images, columns, titles, limits)
    _draw_curves(curves, labels, by_label, sides, pixel_size_m)
    return fig


def write_comparison_figure(path: str | os.PathLike, *args, dpi: int = 150, **kwargs) -> Path:
    """Build the comparison figure (:func:`comparison_figure`, same arguments) and write it as PNG,
    atomically."""
    fig = comparison_figure(*args, **kwargs)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def _canvas(
    ncols: int, aspect: float, table_rows: int, subtitle: Sequence[str]
) -> tuple[Figure, SubFigure, SubFigure, str]:
    """A landscape figure sized to its content, and ``subtitle`` wrapped to its image block.

    On the right the FRC panels over a table of ``table_rows`` and ``ncols − 1`` arms set the height; on
    the left four rows of ``ncols`` image panels of height/width ``aspect`` fill it under the titles, in
    cells a little wider than the images so that each image is as tall as its cell and its colour bar.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = _FRC_IN + _ROW_IN * (table_rows + 1)

    def block(lines: int) -> float:  # the image block's width under a subtitle of so many lines
        header = (_FONT["title"] * 1.5 + _FONT["subtitle"] * 1.25 * lines + _FONT["column"] * 2.5) / 72 + 0.5
        panel_w = ((height - header) / 4 - _GAP_IN) / aspect * _CELL_SLACK
        return max(_IMAGES_MIN_IN, 0.5 + ncols * (panel_w + _BAR_IN))

    # wrapped to the block under four lines; fewer would make it wider, more only narrower and shorter
    wrapped = _wrap(subtitle, block(4) - 0.4, _FONT["subtitle"])
    left = block(len(wrapped))
    right = max(_CURVES_MIN_IN, _NAMES_IN + (ncols - 1) * _ARM_IN)
    fig = Figure(figsize=(left + right, height))
    # a wider pad than the default 3 pt: an image anchored to its bar moves its row label with it
    fig.set_layout_engine("constrained", w_pad=0.08)
    FigureCanvasAgg(fig)
    images, curves = fig.subfigures(1, 2, width_ratios=[left, right], wspace=0.02)
    curves.subfigures(2, 1, height_ratios=[_FRC_IN, height - _FRC_IN])
    return fig, images, curves, "\n".join(wrapped)


def _wrap(lines: Sequence[str], width_in: float, size: float) -> list[str]:
    """``lines`` broken at spaces so that each fits ``width_in`` inches in the figure's font at ``size``."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer, font = RendererAgg(1, 1, 72), FontProperties(size=size)  # at 72 dpi a pixel is a point

    def fits(text: str) -> bool:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0] <= width_in * 72

    out = []
    for line in lines:
        current, *rest = line.split(" ")
        for word in rest:
            if fits(f"{current} {word}"):
                current = f"{current} {word}"
            else:
                out.append(current)
                current = word
        out.append(current)
    return out


def _alignment_lines(phase_align: str, shape, step: int, labels, by_label: dict, limits: tuple) -> tuple:
    """How the arms are shown: the scored region, amplitude scaling and phase method; each arm's
    registration and the colour limits."""
    p_min, p_max, phase_limits = limits
    shown = f", 1 pixel in {step} per axis shown" if step > 1 else ""
    manual = "".join(f"; {lb} phase [{lo:g}, {hi:g}] rad" for lb, (lo, hi) in phase_limits.items())
    registration = "; ".join(f"{lb} {_registration(by_label.get(lb))}" for lb in labels)
    return (
        f"As scored ({shape[0]}×{shape[1]} px{shown}): amplitude scaled to the truth's mean, "
        f"{_PHASE_ALIGN[phase_align][1]} (phase_align_method = {phase_align})",
        f"Registration: {registration}",
        f"Colour limits: percentiles {p_min:g}–{p_max:g} of each panel{manual}",
    )


def _registration(result: ArmResult | None) -> str:
    """``shifted (dy, dx) px``, ``rejected``, ``not applied`` or ``not scored``."""
    status = result.registration if result is not None else ""
    if status == "registered" and result.offset is not None:
        return f"shifted ({result.offset[0]:+.2f}, {result.offset[1]:+.2f}) px"
    if status.startswith("rejected"):
        return "rejected (scored unregistered)"
    return "not applied" if status else "not scored"


def _arm_title(label: str, result: ArmResult | None) -> str:
    status = result.registration if result is not None else ""
    if status == "registered" and result.offset is not None:
        return f"{label}\nshift ({result.offset[0]:+.2f}, {result.offset[1]:+.2f}) px"
    return f"{label}\n" + ("registration rejected" if status.startswith("rejected") else "unregistered")


def _draw_images(subfig, columns: dict[str, dict], titles: dict[str, str], limits: tuple) -> None:
    """Four rows of panels, each with its colour bar: amplitude and phase panels with compare_models'
    limits, error panels with their row's one scale."""
    from matplotlib.ticker import MaxNLocator

    p_min, p_max, phase_limits = limits
    names = list(columns)
    cell_in = subfig.bbox.width / subfig.get_figure(root=True).dpi / len(names)
    grid = subfig.add_gridspec(len(_ROWS), len(names))
    for r, row in enumerate(_ROWS):
        errors = [columns[n][row.quantity] for n in names[1:]] if row.definition else None
        shared = _row_limits(row.quantity, errors) if errors else None
        for c, name in enumerate(names):
            ax = subfig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[name], fontsize=_FONT["column"])
            image = columns[name].get(row.quantity)
            if image is None:  # the truth's cell of an error row: the row's name and definition
                ax.axis("off")
                ax.text(0.5, 0.5, f"{row.label}", ha="center", va="bottom", fontsize=_FONT["row"],
                        transform=ax.transAxes)
                ax.text(0.5, 0.45, row.definition, ha="center", va="top", fontsize=_FONT["label"],
                        transform=ax.transAxes, color="0.3")
                continue
            if c == 0:
                ax.set_ylabel(row.label, fontsize=_FONT["row"])
            vmin, vmax = shared or _panel_limits(row.quantity, image, phase_limits.get(name), p_min, p_max)
            shown = ax.imshow(image, cmap=row.cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_anchor("E")  # against its colour bar: any spare width of the cell goes to the left
            # no box aspect: the bar is as tall as the cell, which the image fills (see _canvas)
            bar = subfig.colorbar(shown, ax=ax, fraction=_BAR_WIDTH_IN / cell_in, pad=0.02, aspect=None)
            bar.ax.yaxis.set_major_locator(MaxNLocator(4))
            bar.ax.tick_params(labelsize=_FONT["tick"])


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


def _draw_curves(subfig, labels, by_label: dict, sides: dict, pixel_size_m) -> None:
    """The amplitude and phase FRC side by side with one legend below them, the table under it."""
    top, bottom = subfig.subfigs  # made by _canvas
    axes = top.subplots(1, 2, sharey=True)
    thresholds = {n: _thresholds(n) for n in set(sides.values())}
    for part, ax in enumerate(axes):
        _draw_frc(ax, part, labels, by_label, sides, thresholds, pixel_size_m)
    axes[1].tick_params(labelleft=False)
    axes[1].set_ylabel("")
    top.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3,
               fontsize=_FONT["tick"], frameon=False, title_fontsize=_FONT["tick"],
               title="solid: Hann-windowed images; dashed: no window (compare_models)")  # fmt: skip
    _draw_table(bottom.add_subplot(), labels, by_label, sides, pixel_size_m)


def _draw_table(ax, labels, by_label: dict, sides: dict, pixel_size_m) -> None:
    """The metrics table filling its axes (row names as the first column, so nothing spills out)."""
    columns = [_table_column(by_label.get(lb), sides[lb], pixel_size_m) for lb in labels]
    rows = _table_rows(pixel_size_m)
    ax.axis("off")
    name_width = _NAMES_IN / (ax.bbox.width / ax.get_figure(root=True).dpi)
    table = ax.table(
        cellText=[[name, *cells] for name, *cells in zip(rows, *columns, strict=True)],
        colLabels=["amplitude / phase", *labels],
        colWidths=[name_width, *[(1 - name_width) / len(labels)] * len(labels)],
        cellLoc="center",
        bbox=(0.0, 0.0, 1.0, 1.0),
    )
    table.auto_set_font_size(False)
    table.set_fontsize(_FONT["table"])
    for (r, c), cell in table.get_celld().items():
        cell.set_linewidth(0.4)
        if c == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.02
        if r == 0:
            cell.set_text_props(weight="bold")


def _draw_frc(ax, part: int, labels, by_label: dict, sides: dict, thresholds: dict, pixel_size_m) -> None:
    """Every arm's curves to Nyquist: the Hann-windowed one solid, the plain one (compare_models')
    dashed in the same colour; the 0.5, 1/7, half-bit and 1-bit thresholds."""
    drawn = []
    for label in labels:
        result, n = by_label.get(label), sides[label]
        plain, hann = _curve(result, part), _curve(result, part, "frc_hann")
        if plain is None and hann is None:
            continue
        colour = None
        if hann is not None:
            (line,) = ax.plot(np.arange(hann.size), hann, lw=2.0, label=label)
            colour = line.get_color()
        if plain is not None:
            nyquist = n // 2 + 1
            shown = f"_{label}, no window" if hann is not None else f"{label}, no window"  # "_": no entry
            ax.plot(np.arange(nyquist), plain[:nyquist], lw=1.0, alpha=0.7, ls="--", color=colour,
                    label=shown)  # fmt: skip
        if n not in drawn:
            drawn.append(n)
    for n in drawn:
        suffix = f" (n={n})" if len(drawn) > 1 else ""
        for name, style in (("half-bit", "-."), ("1-bit", (0, (3, 1, 1, 1, 1, 1)))):
            curve = thresholds[n][name]
            ax.plot(np.arange(curve.size), curve, color="0.35", ls=style, lw=1.0, label=f"{name}{suffix}")
    ax.axhline(FRC50, color="k", ls="--", lw=0.9, label="0.5")
    ax.axhline(FRC1OVER7, color="k", ls=":", lw=0.9, label="1/7")
    ax.set_ylim(-0.05, 1.05)
    if drawn:
        ax.set_xlim(0, max(drawn) // 2)
    ax.set_xlabel("rings (to Nyquist)", fontsize=_FONT["label"])
    ax.set_ylabel("FRC", fontsize=_FONT["label"])
    ax.tick_params(labelsize=_FONT["tick"])
    ax.set_title(f"{('amplitude', 'phase')[part]} FRC", fontsize=_FONT["column"])
    if pixel_size_m and drawn:
        per_ring = 1.0 / (drawn[0] * pixel_size_m * 1e9)  # cycles per nm of one ring
        top = ax.secondary_xaxis("top", functions=(lambda r: r * per_ring, lambda f: f / per_ring))
        top.set_xlabel("1/nm", fontsize=_FONT["tick"])
        top.tick_params(labelsize=_FONT["tick"] - 1)


def write_objects_plot(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, object]],
    p_min: float = 10.0,
    p_max: float = 90.0,
    phase_limits: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Phase over amplitude for each ``(title, complex 2-D array)`` panel, with compare_models' colour
    limits (:func:`comparison_figure`'s ``p_min``, ``p_max`` and ``phase_limits``): the plot of a scan
    without ground truth, which has no truth to set the arms beside.

    Arrays may be numpy, Zarr or dask; images larger than ``_MAX_SIDE`` px are strided, so only that
    many pixels are read.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    limits = dict(phase_limits or {})
    fig = Figure(figsize=(4.5 * len(panels), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (title, array) in enumerate(panels):
        image = _strided(array, _step(array.shape, _MAX_SIDE))
        parts = (("phase", np.angle, "viridis"), ("amplitude", np.abs, "gray"))
        for row, (quantity, part, cmap) in enumerate(parts):
            values = part(image)
            lo, hi = _panel_limits(quantity, values, limits.get(title), p_min, p_max)
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
