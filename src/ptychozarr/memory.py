"""Projected and measured memory of the engine's tasks.

Projected, before anything runs (in the spirit of Cubed's ``calculate_projected_mem``): every stage
projects its own tasks beside the constants it uses (``stages.<stage>.project_memory``), and a
:class:`Plan` puts them together. A process holds a reserved baseline (interpreter, imported libraries,
the loaded model), the buffers it keeps across tasks (the inference chunk cache), and one task per
thread::

    peak = processes × (reserved + held + threads × largest task over the stages)

:func:`check` refuses a plan whose peak exceeds the budget before any work starts, and names the flag to
turn; :func:`choose_block_groups` picks the largest inference block that fits. On a GPU the plan's
``device`` is the measured probe of one batch (:func:`probe_model`), since each GPU worker runs one task
at a time.

Measured, while running: :class:`PeakMemory` samples the RSS of this process and its children;
:class:`TaskMemoryCallback` attributes this process's RSS to the stage of each running task on the local
schedulers; :func:`worker_peaks` asks every distributed worker for its peak RSS and device peak.
:func:`report` puts the two side by side, with ratios, for ``run.json``.

The projection is a model, not a guarantee: Cubed measured ratios up to ~2.6 on some operations, which
is why every run records the measured figure beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from dask.callbacks import Callback
from dask.utils import format_bytes, key_split

from ptychozarr.config import check_positive, parse_budget
from ptychozarr.errors import InvalidParameterError, MemoryBudgetError

__all__ = [
    "DEFAULT_RESERVED",
    "MALLOC_ENV",
    "MMAP_THRESHOLD",
    "PeakMemory",
    "Plan",
    "TaskMemory",
    "TaskMemoryCallback",
    "check",
    "choose_block_groups",
    "map_large_blocks",
    "measure_reserved",
    "probe_model",
    "process_peaks",
    "report",
    "worker_peaks",
]

DEFAULT_RESERVED = 800 * 2**20
"""Per-process baseline in bytes when none is measured: ``import tensorflow`` alone leaves about 595 MB
resident (TF 2.21, reference/environment.md §3); dask, distributed, zarr, xarray and a loaded model bring
it to about 800 MiB."""

# the flag that sets each knob, and the smallest tile worth suggesting
_FLAGS = {"block_groups": "--block-groups", "tile": "--tile"}
_SMALLEST_TILE = 64


@dataclass(frozen=True)
class TaskMemory:
    """Projected host memory of one task of a stage.

    Attributes
    ----------
    stage : str
        The task's kind (``infer``, ``stitch-tile``, ``metrics``):
        the graph layer name its keys start with.
    parts : dict of str to int
        Bytes of each buffer the task holds at its peak, by name.
    knob : str
        The plan parameter that sets the task's size (``block_groups`` or ``tile``).
    """

    stage: str
    parts: Mapping[str, int]
    knob: str

    @property
    def total(self) -> int:
        """Bytes of all the buffers together."""
        return sum(self.parts.values())


@dataclass(frozen=True)
class Plan:
    """The projected memory of a run: its tasks, the baseline and how many run at once.

    Attributes
    ----------
    tasks : tuple of TaskMemory
        The projected tasks of every stage.
    reserved : int
        Bytes each process holds before any task (measured or :data:`DEFAULT_RESERVED`).
    threads : int
        Tasks running at once in one process.
    processes : int
        Processes (workers) on this machine, each with its own baseline.
    device : int or None
        Projected device bytes per GPU worker (the model probe on the GPU), or None on the CPU.
    held : dict of str to int
        Buffers each process keeps across its tasks (once per process, not per thread), by name.
    params : dict
        The arguments ``factory`` was called with, to project the same run at another block or tile.
    factory : callable, optional
        What made the plan from ``params``: :meth:`with_params`, :func:`choose_block_groups` and the
        advice of :func:`check` re-project through it.
    """

    tasks: tuple[TaskMemory, ...]
    reserved: int
    threads: int = 1
    processes: int = 1
    device: int | None = None
    held: Mapping[str, int] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[..., Plan] | None = field(default=None, compare=False, repr=False)

    def stage(self, name: str) -> TaskMemory:
        """The projected task of stage ``name``."""
        for task in self.tasks:
            if task.stage == name:
                return task
        raise InvalidParameterError(f"the plan has no stage {name!r}; it has {[t.stage for t in self.tasks]}")

    @property
    def largest(self) -> TaskMemory:
        """The task that needs the most memory."""
        return max(self.tasks, key=lambda t: t.total)

    def per_process(self, stage: str | None = None) -> int:
        """Bytes of one process running ``threads`` tasks of ``stage`` (default: the largest task)."""
        task = self.largest if stage is None else self.stage(stage)
        return self.reserved + sum(self.held.values()) + self.threads * task.total

    @property
    def peak(self) -> int:
        """Projected host peak of the whole run in bytes."""
        return self.processes * self.per_process()

    def with_params(self, **changes: Any) -> Plan:
        """The same run projected with some of its arguments changed."""
        if self.factory is None:
            raise InvalidParameterError("this plan was built by hand; give it a factory to re-project it")
        return self.factory(**{**self.params, **changes})

    def to_dict(self) -> dict:
        """The plan as JSON-able values (bytes as ints)."""
        return {
            "peak": self.peak,
            "per_process": self.per_process(),
            "reserved": self.reserved,
            "held": dict(self.held),
            "threads": self.threads,
            "processes": self.processes,
            "device": self.device,
            "stages": {
                t.stage: {"task": t.total, "per_process": self.per_process(t.stage), "parts": dict(t.parts)}
                for t in self.tasks
            },
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
        }


def check(plan: Plan, budget: int | str) -> Plan:
    """Refuse a plan whose projected host peak exceeds the budget, before any work starts.

    Parameters
    ----------
    plan : Plan
    budget : int or str
        Host budget of the whole run (all processes), in bytes or as a size string.

    Returns
    -------
    Plan
        ``plan`` itself, when it fits.

    Raises
    ------
    MemoryBudgetError
        With the projected figure, its breakdown, the budget and the flag that makes it fit.
    """
    budget = parse_budget(budget)
    if plan.peak > budget:
        task = plan.largest
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in task.parts.items() if v)
        held = f" + held {format_bytes(sum(plan.held.values()))}" if plan.held else ""
        raise MemoryBudgetError(
            f"projected host memory {format_bytes(plan.peak)} exceeds --memory-budget "
            f"{format_bytes(budget)}: {plan.processes} process(es) × (reserved "
            f"{format_bytes(plan.reserved)}{held} + {plan.threads} thread(s) × {task.stage} task "
            f"{format_bytes(task.total)} [{parts}]); {_suggest(plan, budget)}"
        )
    return plan


def choose_block_groups(
    budget: int | str, *, max_groups: int, factory: Callable[..., Plan], **plan_args: Any
) -> int:
    """The largest block of groups whose plan fits the budget.

    Candidates are ``max_groups`` (one block for the whole scan) and the batch size times a power of two
    below it.

    Parameters
    ----------
    budget : int or str
        Host budget of the whole run.
    max_groups : int
        Groups in the scan; no block is larger.
    factory : callable
        What projects a plan from ``block_groups`` and ``plan_args``.
    **plan_args
        Every other argument of ``factory`` (``batch_size`` among them).

    Returns
    -------
    int

    Raises
    ------
    MemoryBudgetError
        When even the smallest candidate (one batch, or ``max_groups`` if smaller) does not fit.
    """
    budget = parse_budget(budget)
    candidates = _block_candidates(plan_args["batch_size"], check_positive("max_groups", max_groups))
    fitting = _largest_fitting(
        factory(block_groups=candidates[0], **plan_args), "block_groups", candidates, budget
    )
    if fitting is None:
        smallest = factory(block_groups=candidates[-1], **plan_args)
        raise MemoryBudgetError(
            f"even --block-groups {candidates[-1]} projects {format_bytes(smallest.peak)}, over "
            f"--memory-budget {format_bytes(budget)}; {_fewer(smallest)}"
        )
    return fitting


def measure_reserved() -> int:
    """This process's RSS now, in bytes: the baseline to reserve once TF, dask and the model are loaded."""
    return psutil.Process().memory_info().rss


def probe_model(
    predict_fn: Callable[..., Any],
    batch_shape: Sequence[int],
    *more_shapes: Sequence[int],
    device: str = "cpu",
    warmup: bool = True,
    model: Any = None,
) -> int:
    """Measure the memory one batch through the model takes.

    Call it before computing anything else in this process, and then :func:`measure_reserved`: the
    baseline then holds the model and its one-time tracing, and the probe what every batch adds.

    Parameters
    ----------
    predict_fn : callable
        Called with float32 arrays of ones of ``batch_shape`` and each of ``more_shapes``
        (e.g. ``model.predict_batch`` with diffraction ``(b, N, N, C)`` and offsets ``(b, 1, 2, C)``).
    batch_shape, *more_shapes : tuple of int
        Shapes of the inputs.
    device : str
        ``"cpu"``, or a device such as ``"GPU:0"``.
    warmup : bool
        Call ``predict_fn`` once before measuring, so that one-time costs (tracing, runtime start)
        stay out of the probe.
    model : Model, optional
        The model ``predict_fn`` calls, whose format entry measures the device
        (:meth:`ptychozarr.models.ModelFormat.device_peak`); by default the object ``predict_fn`` is a
        bound method of, and TensorFlow's probe for a model of no known format.

    Returns
    -------
    int
        On the CPU, the rise of this process's RSS during the measured call above its RSS before it
        (inputs already allocated, output included), sampled every 5 ms: a call lasting only a few
        samples under-measures its transients. On a GPU, what the model's format entry measures for the
        call: TensorFlow's peak device memory (weights included); for ONNX Runtime, the device's memory
        in use after the call.
    """
    inputs = [np.ones(tuple(s), np.float32) for s in (batch_shape, *more_shapes)]
    if warmup:
        predict_fn(*inputs)
    if device.lower() == "cpu":
        with PeakMemory(interval=0.005, children=False) as pm:
            output = predict_fn(*inputs)  # alive until the last sample, so the output counts
        del output
        return pm.increase
    from ptychozarr.models.formats import format_named, format_of_model

    fmt = format_of_model(model if model is not None else getattr(predict_fn, "__self__", None))
    fmt = fmt or format_named("keras")
    return int(fmt.device_peak(lambda: predict_fn(*inputs), device))


class _Sampler:
    """A daemon thread calling ``on_sample(rss)`` every ``interval`` seconds until stopped."""

    def __init__(self, rss: Callable[[], int], on_sample: Callable[[int], None], interval: float):
        self._rss, self._on_sample, self._interval = rss, on_sample, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ptychozarr-rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._on_sample(self._rss())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._on_sample(self._rss())


def _rss(children: bool) -> int:
    proc = psutil.Process()
    total = proc.memory_info().rss
    if children:
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return total


def release_freed() -> None:
    """Return the heap memory this process has freed to the operating system (glibc's ``malloc_trim``;
    nothing elsewhere), so that what one stage freed does not stay in the RSS of the next."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


MMAP_THRESHOLD = 2**20
"""Bytes from which glibc maps an allocation apart, to unmap it when it is freed. By default glibc raises
its threshold (up to 32 MiB) each time a mapped block is freed; image-sized temporaries then come from
the malloc arenas of the threads that made them (dask's, Zarr's I/O loop, TensorFlow's), where what is
freed stays in the RSS, more of it the more chunks a run has passed through."""
#: Environment that sets the same threshold in a process started with it (local cluster workers).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def map_large_blocks() -> None:
    """Fix glibc's mmap threshold of this process at :data:`MMAP_THRESHOLD` (``mallopt``; nothing
    elsewhere), so that every block from that size is returned to the operating system when freed."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


class PeakMemory:
    """Peak RSS while a block of code runs, sampled in a background thread.

    Parameters
    ----------
    interval : float
        Seconds between samples.
    children : bool
        Add the RSS of child processes (local cluster workers).

    Attributes
    ----------
    baseline : int
        RSS in bytes on entry.
    peak : int
        Largest RSS sampled, in bytes (on entry, every ``interval`` and on exit).
    labelled : dict of str to int
        Largest RSS sampled inside each :meth:`label` block, by its name.

    Examples
    --------
    >>> with PeakMemory() as pm:
    ...     with pm.label("stitch"):
    ...         result.compute()
    >>> pm.peak, pm.increase, pm.labelled["stitch"]
    """

    def __init__(self, interval: float = 0.02, children: bool = True):
        self.interval, self.children = interval, children
        self.baseline = self.peak = 0
        self.labelled: dict[str, int] = {}
        self._current: str | None = None

    def _update(self, rss: int) -> None:
        self.peak = max(self.peak, rss)
        name = self._current
        if name is not None:
            self.labelled[name] = max(self.labelled.get(name, 0), rss)

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Attribute the samples taken inside the block (and one on entry and exit) to ``name``."""
        outer, self._current = self._current, name
        self._update(_rss(self.children))
        try:
            yield
        finally:
            self._update(_rss(self.children))
            self._current = outer

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = _rss(self.children)
        self._sampler = _Sampler(lambda: _rss(self.children), self._update, self.interval)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sampler.stop()

    @property
    def increase(self) -> int:
        """Bytes of the peak above the baseline."""
        return self.peak - self.baseline


class TaskMemoryCallback(Callback):
    """Peak RSS of this process while the tasks of each stage run, on dask's local schedulers.

    Each task's peak is the largest RSS sampled between its start and its end (sampled every
    ``interval`` and at both ends); tasks are grouped by their key prefix (:func:`dask.utils.key_split`),
    mapped to the first of ``stages`` that is a run of its dash-separated words (so fused layers such as
    ``array-metrics-store`` count as ``metrics``). Name graph layers
    ``f"{stage}-{token}"`` so their tasks land in the right stage. Tasks of several stages running at
    once share one RSS, so each is charged with the whole process: compare with
    ``Plan.per_process(stage)``.

    Parameters
    ----------
    stages : sequence of str
        Stage names to group key prefixes under; other prefixes are kept as they are.
    interval : float
        Seconds between samples.

    Attributes
    ----------
    by_stage : dict of str to dict
        Per stage: ``peak`` (bytes of RSS), ``increase`` (largest rise over a task's starting RSS) and
        ``tasks`` (how many ran).

    Examples
    --------
    >>> with TaskMemoryCallback(stages=("infer", "stitch-tile")) as cb:
    ...     dask.compute(patches, obj)
    >>> cb.peaks()
    {'infer': 1342177280, 'stitch-tile': 805306368}
    """

    def __init__(self, stages: Sequence[str] = (), interval: float = 0.02):
        super().__init__()
        self.stages, self.interval = tuple(stages), interval
        self.by_stage: dict[str, dict[str, int]] = {}
        self._running: dict[Hashable, list[int]] = {}
        self._lock = threading.Lock()

    def _stage(self, key: Hashable) -> str:
        prefix = key_split(key)
        return next((s for s in self.stages if f"-{s}-" in f"-{prefix}-"), prefix)

    def _update(self, rss: int) -> None:
        with self._lock:
            for span in self._running.values():
                span[1] = max(span[1], rss)

    def _start(self, dsk) -> None:
        self._sampler = _Sampler(lambda: _rss(False), self._update, self.interval)
        self._sampler.start()

    def _pretask(self, key, dsk, state) -> None:
        rss = _rss(False)
        with self._lock:
            self._running[key] = [rss, rss]

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        rss = _rss(False)
        with self._lock:
            start, peak = self._running.pop(key)
            peak = max(peak, rss)
            record = self.by_stage.setdefault(self._stage(key), {"peak": 0, "increase": 0, "tasks": 0})
            record["peak"] = max(record["peak"], peak)
            record["increase"] = max(record["increase"], peak - start)
            record["tasks"] += 1

    def _finish(self, dsk, state, errored) -> None:
        self._sampler.stop()
        self._running.clear()

    def peaks(self) -> dict[str, int]:
        """Peak RSS in bytes per stage."""
        return {stage: record["peak"] for stage, record in self.by_stage.items()}


def process_peaks() -> dict[str, int | None]:
    """Peak memory of this process over its life, in bytes.

    Returns
    -------
    dict
        ``host``: peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``); ``device``: the largest TensorFlow
        peak over the visible GPUs, or None when TensorFlow is not imported here or sees no GPU.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = maxrss if sys.platform == "darwin" else maxrss * 1024
    tf = sys.modules.get("tensorflow")
    gpus = tf.config.list_logical_devices("GPU") if tf is not None else []
    device = max(
        (tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] for i in range(len(gpus))), default=None
    )
    return {"host": host, "device": device}


def worker_peaks(client) -> dict[str, dict[str, int | None]]:
    """:func:`process_peaks` of every worker of a ``distributed.Client``, by worker address."""
    return client.run(process_peaks)


def report(plan: Plan, measured: Mapping[str, int | None]) -> dict:
    """Projected against measured memory, as JSON-able values for ``run.json``.

    Parameters
    ----------
    plan : Plan
    measured : mapping of str to int
        Measured bytes under these keys (any subset): ``peak`` (the whole run, e.g.
        :class:`PeakMemory` with children), ``process`` (the largest single process, e.g. the largest
        ``host`` of :func:`worker_peaks`), ``device`` (the largest device peak), and stage names
        (:meth:`TaskMemoryCallback.peaks`), alone or with a label (``infer:pinn``, one arm's).

    Returns
    -------
    dict
        ``projected`` (:meth:`Plan.to_dict`), ``measured`` and ``ratio`` = measured / projected for every
        key with both figures (``peak`` ↔ ``Plan.peak``, ``process`` ↔ ``Plan.per_process()``,
        ``device`` ↔ ``Plan.device``, a stage or ``stage:label`` ↔ ``Plan.per_process(stage)``).
    """
    projected = {"peak": plan.peak, "process": plan.per_process(), "device": plan.device}
    projected |= {t.stage: plan.per_process(t.stage) for t in plan.tasks}
    ratio = {
        k: round(v / projected[stage], 3)
        for k, v in measured.items()
        if v is not None and projected.get(stage := k.split(":")[0])
    }
    return {"projected": plan.to_dict(), "measured": dict(measured), "ratio": ratio}


def _block_candidates(batch_size: int, max_groups: int) -> list[int]:
    """Block sizes to try, largest first: ``max_groups``, then batch·2^k below it."""
    batch_size = check_positive("batch_size", batch_size)
    below = [batch_size << k for k in range(max_groups.bit_length()) if batch_size << k < max_groups]
    return [max_groups, *reversed(below)]


def _halved(tile: int) -> Iterator[int]:
    """``tile`` halved repeatedly, down to :data:`_SMALLEST_TILE`."""
    while (tile := tile // 2) >= _SMALLEST_TILE:
        yield tile


def _largest_fitting(p: Plan, knob: str, candidates: Sequence, budget: int) -> Any:
    """The first of ``candidates`` (largest first) for ``knob`` whose plan fits, or None."""
    return next((c for c in candidates if p.with_params(**{knob: c}).peak <= budget), None)


def _fewer(p: Plan) -> str:
    """The advice when no smaller block or tile fits."""
    return (
        f"lower --batch-size or --n-workers (now {p.processes} process(es) × {p.threads} thread(s)), "
        "or raise --memory-budget"
    )


def _suggest(p: Plan, budget: int) -> str:
    """The flag to turn for an over-budget plan, with a value that fits when there is one."""
    knob = p.largest.knob
    current, flag = p.params.get(knob), _FLAGS[knob]
    if current is None or p.factory is None:  # a Plan built by hand: nothing to re-project
        return f"lower {flag}"
    if knob == "block_groups":
        candidates = [c for c in _block_candidates(p.params["batch_size"], current) if c < current]
    else:
        candidates = list(_halved(current))
    value = _largest_fitting(p, knob, candidates, budget)
    if value is None:
        return f"no smaller {flag} fits; {_fewer(p)}"
    return f"{flag} {value} fits (projected {format_bytes(p.with_params(**{knob: value}).peak)})"
