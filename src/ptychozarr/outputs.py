"""``comparison_plot.png`` of a scan without ground truth: the reconstructions alone.

Every other output of a run is written by :mod:`ptychozarr.report`, whose figure sets each arm beside
the truth; this module only remains for the run that has none to set them beside.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ptychozarr.report._files import replacing

__all__ = ["write_objects_plot"]

_MAX_SIDE = 2048  # largest side of a shown image; larger ones are strided


def write_objects_plot(
    path: str | os.PathLike, panels: Sequence[tuple[str, object]], p_min: float = 10.0, p_max: float = 90.0
) -> Path:
    """Phase over amplitude for each ``(title, complex 2-D array)`` panel, per-panel percentile limits.

    Arrays may be numpy, Zarr or dask; images larger than 2048 px are strided, so only that many
    pixels are read.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (title, array) in enumerate(panels):
        step = max(1, -(-max(array.shape) // _MAX_SIDE))
        image = np.asarray(array[::step, ::step])
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
