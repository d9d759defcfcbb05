"""Shared helpers of the benchmark scripts: isolated measurement and one markdown table.

Each variant runs in a fresh spawned process, so that its peak RSS is its own (the parent's imports and
earlier variants do not count) and its wall time includes nothing but the work.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import queue as queue_module
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["Measurement", "machine", "measure", "ratio", "table", "write_json"]


@dataclass
class Measurement:
    """What one isolated run took."""

    wall_s: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    value: Any = None

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 2**20


def _child(queue, func, args, kwargs):
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    value = func(*args, **kwargs)
    wall = time.perf_counter() - t0
    peak = _high_water_mark()
    queue.put((wall, peak, base, value))


def _high_water_mark() -> int:
    """Peak RSS of this process in bytes (``VmHWM``: unlike ``ru_maxrss`` it restarts at ``exec``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(func: Callable, *args, **kwargs) -> Measurement:
    """Run ``func(*args, **kwargs)`` in a fresh spawned process and measure it.

    ``func`` must be importable (defined at module level of an importable module). Its return value
    must be picklable and small.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, func, args, kwargs))
    proc.start()
    while True:  # a child that dies never puts its result: stop waiting when it is gone
        try:
            wall, peak, base, value = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # a result put just before the end
                    wall, peak, base, value = queue.get(timeout=5.0)
                    break
                except queue_module.Empty:
                    died = f"benchmark variant {func.__name__} died with {proc.exitcode}"
                    raise RuntimeError(died) from None
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark variant {func.__name__} exited with {proc.exitcode}")
    return Measurement(wall, peak, base, value)


def ratio(a: float, b: float) -> str:
    """``a / b`` formatted for a table, or ``–`` when undefined."""
    return f"{a / b:.2f}×" if b else "–"


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts), columns in first-seen order unless given."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def machine() -> dict:
    """The machine and versions a result was measured on."""
    import dask
    import numpy
    import zarr

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
    }


def write_json(path: str, name: str, rows: list[dict]) -> None:
    """Write ``rows`` with the machine description to ``path``."""
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "machine": machine(), "rows": rows}, fh, indent=2, default=str)
