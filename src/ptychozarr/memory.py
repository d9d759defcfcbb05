"""Projected and measured memory of the engine's tasks.

Projected, before anything runs (in the spirit of Cubed's ``calculate_projected_mem``): each task's host
memory is a sum of named buffers computed from block shapes, every figure in bytes. A process holds a
reserved baseline (interpreter, imported libraries, the loaded model) plus one task per thread::

    peak = processes × (reserved + threads × largest task over the stages)

:func:`check` refuses a plan whose peak exceeds the budget before any work starts, and names the knob to
turn; :func:`choose_block_groups` picks the largest inference block that fits. On a GPU the device side
is the measured probe of one batch (:func:`probe_model`), since each GPU worker runs one task at a time.

Measured, while running: :class:`PeakMemory` samples the RSS of this process and its children;
:class:`TaskMemoryCallback` attributes this process's RSS to the stage of each running task on the local
schedulers; :func:`worker_peaks` asks every distributed worker for its peak RSS and device peak.
:func:`report` puts the two side by side, with ratios, for ``run.json``.

The projection is a model, not a guarantee: Cubed measured ratios up to ~2.6 on some operations, which
is why every run records the measured figure beside it.
"""

from __future__ import annotations

import math
import resource
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import psutil
from dask.callbacks import Callback
from dask.utils import format_bytes, key_split, parse_bytes

from ptychozarr.errors import InvalidParameterError, MemoryBudgetError

__all__ = [
    "DEFAULT_RESERVED",
    "PeakMemory",
    "Plan",
    "TaskMemory",
    "TaskMemoryCallback",
    "check",
    "choose_block_groups",
    "measure_reserved",
    "parse_budget",
    "plan",
    "probe_model",
    "process_peaks",
    "project_inference",
    "project_metrics",
    "project_stitch",
    "report",
    "worker_peaks",
]

DEFAULT_RESERVED = 800 * 2**20
"""Per-process baseline in bytes when none is measured: ``import tensorflow`` alone leaves about 595 MB
resident (TF 2.21, reference/environment.md §3); dask, distributed, zarr, xarray and a loaded model bring
it to about 800 MiB."""

_F32, _F64, _C64, _C128 = 4, 8, 8, 16
# the flag that sets each knob: metric tasks work on the stitched object's tiles, so --tile sets both
_FLAGS = {"block_groups": "--block-groups", "tile": "--tile", "chunk": "--tile"}
_SMALLEST = {"tile": 64, "chunk": 64}


@dataclass(frozen=True)
class TaskMemory:
    """Projected host memory of one task of a stage.

    Attributes
    ----------
    stage : str
        The stage the task belongs to (``infer``, ``stitch-splat``, ``stitch-sum``, ``metrics``).
    parts : dict of str to int
        Bytes of each buffer the task holds at its peak, by name.
    knob : str
        The :func:`plan` parameter that sets the task's size (``block_groups``, ``tile``, ``chunk``).
    """

    stage: str
    parts: Mapping[str, int]
    knob: str

    @property
    def total(self) -> int:
        """Bytes of all the buffers together."""
        return sum(self.parts.values())


def project_inference(
    block_groups: int,
    batch_size: int,
    N: int,
    C: int,
    M: int,
    model_probe_bytes: int = 0,
    *,
    output: Literal["complex", "amp_phase"] = "complex",
    read_copies: int = 1,
) -> TaskMemory:
    """Project one inference task: a block of model inputs read, run through the model, cropped.

    Parameters
    ----------
    block_groups : int
        Model inputs per block (b): groups for a gridsize > 1 model, distinct patterns for a gridsize 1
        model (then C = 1), as ``ptychozarr.infer`` blocks them.
    batch_size : int
        Rows per model call (B); the last batch is padded to it.
    N : int
        Pattern side in pixels.
    C : int
        Channels of one model input (gridsize²).
    M : int
        Side of the crop kept from each predicted patch.
    model_probe_bytes : int
        Measured host memory one batch adds inside the model (:func:`probe_model`).
    output : {"complex", "amp_phase"}
        What the network returns; ``amp_phase`` adds the amplitude, phase and phasor buffers.
    read_copies : int
        Buffers the read holds besides its result (decoded chunks, selection copies), as Cubed's
        ``BufferCopies.read`` (1 for a local store, 2 for a cloud store).

    Returns
    -------
    TaskMemory
        Parts: ``gathered`` (1 + read_copies)·b·N²·C·4 (float32 diffraction read for the block, at most
        b·C distinct patterns, and the read's buffers), ``normalised`` 2·B·N²·C·4 (one batch gathered
        from the block and its scaled copy), ``offsets`` b·C·2·12 (float64 offsets and their float32
        cast), ``model_input`` B·N²·C·4 (the padded batch), ``model_output`` B·N²·8 (complex64 before
        the crop), ``amp_phase`` B·N²·16 or 0 (float32 amplitude and phase, complex64 phasor),
        ``crops`` b·M²·8 (complex64, the task's output), ``model_probe`` as measured.
    """
    _positive(block_groups=block_groups, batch_size=batch_size, N=N, C=C, M=M)
    if read_copies < 0:
        raise InvalidParameterError(f"read_copies is {read_copies}; give 0 or more buffers")
    pattern = N * N * C * _F32
    return TaskMemory(
        "infer",
        {
            "gathered": (1 + read_copies) * block_groups * pattern,
            "normalised": 2 * batch_size * pattern,
            "offsets": block_groups * C * 2 * (_F64 + _F32),
            "model_input": batch_size * pattern,
            "model_output": batch_size * N * N * _C64,
            "amp_phase": batch_size * N * N * (2 * _F32 + _C64) if output == "amp_phase" else 0,
            "crops": block_groups * M * M * _C64,
            "model_probe": int(model_probe_bytes),
        },
        "block_groups",
    )


def project_stitch(
    tile: int | Sequence[int],
    block_patches: int,
    M: int,
    *,
    split_every: int = 4,
    taps_per_batch: int = 2**22,
) -> tuple[TaskMemory, TaskMemory]:
    """Project the two kinds of stitching task: a block's splat onto one tile, and the tree sum.

    Parameters
    ----------
    tile : int or (int, int)
        Canvas tile shape in pixels (a square side, or rows and columns).
    block_patches : int
        Crops per block of the patches array.
    M : int
        Crop side in pixels.
    split_every : int
        Partial tiles a tree-sum step adds at once (``ptychozarr.stitch`` uses 4).
    taps_per_batch : int
        Bilinear taps a splat gathers at once (``ptychozarr.stitch`` uses 2²², whole patches of 4·M²).

    Returns
    -------
    splat, tree_sum : TaskMemory
        Stages named after the stitch layers. With A = tile area and T = the taps of one batch
        (min(block_patches, max(1, taps_per_batch // 4M²))·4M²), ``stitch-splat`` holds ``crops``
        block_patches·M²·8 (complex64 input), ``taps`` T·33 (int64 index, bool mask, complex128 value
        and float64 weight per tap) and ``partial_tile`` A·40 (three float64 accumulators and the
        complex128 numerator); ``stitch-sum`` holds ``partials`` split_every·A·24 (complex128
        numerator and float64 weight each) and ``sum`` A·24. The final division of a tile (A·56)
        needs less than a sum.
    """
    area = math.prod(_pair(tile))
    _positive(tile=area, block_patches=block_patches, M=M, split_every=split_every)
    per_patch = 4 * M * M
    taps = min(block_patches, max(1, taps_per_batch // per_patch)) * per_patch
    tile_sums = _C128 + _F64
    splat = {
        "crops": block_patches * M * M * _C64,
        "taps": taps * (8 + 1 + _C128 + _F64),
        "partial_tile": area * (3 * _F64 + _C128),
    }
    tree_sum = {"partials": split_every * area * tile_sums, "sum": area * tile_sums}
    return TaskMemory("stitch-splat", splat, "tile"), TaskMemory("stitch-sum", tree_sum, "tile")


def project_metrics(
    chunk: int | Sequence[int], halo: int = 0, *, temporaries: int = 16, itemsize: int = _F64
) -> TaskMemory:
    """Project one metric task: a block of the reconstruction and of the ground truth, with halo.

    Parameters
    ----------
    chunk : int or (int, int)
        Block shape in pixels (a square side, or rows and columns).
    halo : int
        Overlap added on every side (``map_overlap`` depth), in pixels.
    temporaries : int
        Full-block temporaries the metric makes; 16 covers scikit-image's SSIM (five filtered moments,
        their products and the map) with room to spare: ``evaluate`` on one 512² chunk peaks at about
        15.5 block-sized float64 buffers, inputs included (tests/test_memory.py).
    itemsize : int
        Bytes per element of the temporaries (8 for float64).

    Returns
    -------
    TaskMemory
        Parts, with A = (rows + 2·halo)·(cols + 2·halo): ``inputs`` 2·A·itemsize (both images),
        ``temporaries`` temporaries·A·itemsize.
    """
    rows, cols = _pair(chunk)
    _positive(chunk=rows * cols, temporaries=temporaries, itemsize=itemsize)
    if halo < 0:
        raise InvalidParameterError(f"halo is {halo}; give a non-negative overlap in pixels")
    area = (rows + 2 * halo) * (cols + 2 * halo)
    return TaskMemory(
        "metrics", {"inputs": 2 * area * itemsize, "temporaries": temporaries * area * itemsize}, "chunk"
    )


@dataclass(frozen=True)
class Plan:
    """The projected memory of a run: its tasks, the baseline and how many run at once.

    Attributes
    ----------
    tasks : tuple of TaskMemory
        One projected task per stage.
    reserved : int
        Bytes each process holds before any task (measured or :data:`DEFAULT_RESERVED`).
    threads : int
        Tasks running at once in one process.
    processes : int
        Processes (workers) on this machine, each with its own baseline.
    device : int or None
        Projected device bytes per GPU worker (the model probe on the GPU), or None on the CPU.
    params : dict
        The arguments :func:`plan` (or ``factory``) was called with, to project the same run at another
        block size.
    factory : callable, optional
        What made the plan from ``params`` (default :func:`plan`): a pipeline whose stages project their
        own tasks passes its own, and :meth:`with_params`, :func:`choose_block_groups` and the advice of
        :func:`check` re-project through it.
    """

    tasks: tuple[TaskMemory, ...]
    reserved: int
    threads: int = 1
    processes: int = 1
    device: int | None = None
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
        return self.reserved + self.threads * task.total

    @property
    def peak(self) -> int:
        """Projected host peak of the whole run in bytes."""
        return self.processes * self.per_process()

    def with_params(self, **changes: Any) -> Plan:
        """The same run projected with some of its arguments changed."""
        return (self.factory or plan)(**{**self.params, **changes})

    def to_dict(self) -> dict:
        """The plan as JSON-able values (bytes as ints)."""
        return {
            "peak": self.peak,
            "per_process": self.per_process(),
            "reserved": self.reserved,
            "threads": self.threads,
            "processes": self.processes,
            "device": self.device,
            "stages": {
                t.stage: {"task": t.total, "per_process": self.per_process(t.stage), "parts": dict(t.parts)}
                for t in self.tasks
            },
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
        }


def plan(
    *,
    block_groups: int,
    batch_size: int,
    N: int,
    C: int,
    M: int,
    model_probe: int = 0,
    output: Literal["complex", "amp_phase"] = "complex",
    read_copies: int = 1,
    tile: int | tuple[int, int] | None = None,
    split_every: int = 4,
    chunk: int | tuple[int, int] | None = None,
    halo: int = 0,
    temporaries: int = 16,
    reserved: int | None = None,
    threads: int = 1,
    processes: int = 1,
    device: int | None = None,
) -> Plan:
    """Project a run's memory from its block shapes.

    Inference is always projected; stitching when ``tile`` is given, metrics when ``chunk`` is given.
    The arguments are those of :func:`project_inference`, :func:`project_stitch` (whose blocks are the
    inference blocks) and :func:`project_metrics`, plus:

    Parameters
    ----------
    model_probe : int
        Host bytes of one batch through the model (:func:`probe_model` on the CPU; 0 on a GPU, where
        the activations live on the device).
    reserved : int, optional
        Per-process baseline in bytes; :data:`DEFAULT_RESERVED` when None.
    threads, processes : int
        Concurrent tasks per process, and processes (see ``cluster.concurrency``).
    device : int, optional
        Device bytes of one batch (:func:`probe_model` on the GPU).

    Returns
    -------
    Plan
    """
    params = dict(locals())
    _positive(threads=threads, processes=processes)
    tasks = [
        project_inference(
            block_groups, batch_size, N, C, M, model_probe, output=output, read_copies=read_copies
        )
    ]
    if tile is not None:
        tasks.extend(project_stitch(tile, block_groups, M, split_every=split_every))
    if chunk is not None:
        tasks.append(project_metrics(chunk, halo, temporaries=temporaries))
    reserved = DEFAULT_RESERVED if reserved is None else int(reserved)
    return Plan(tuple(tasks), reserved, threads, processes, device, params)


def parse_budget(value: str | int | None, *, flag: str = "--memory-budget") -> int | None:
    """Bytes from a budget such as ``"2GB"``, ``"1.5GiB"`` or an int; None stays None.

    Uses :func:`dask.utils.parse_bytes`: ``GB`` is 10⁹ bytes, ``GiB`` 2³⁰.
    """
    if value is None:
        return None
    try:
        n = int(value) if isinstance(value, int) else parse_bytes(value)
    except (ValueError, TypeError) as e:
        raise InvalidParameterError(f"{flag} {value!r} is not a size; give e.g. '2GB' or '1.5GiB'") from e
    if n <= 0:
        raise InvalidParameterError(f"{flag} {value!r} is not positive; give e.g. '2GB' or '1.5GiB'")
    return n


def check(plan: Plan, budget: int | str, device_budget: int | str | None = None) -> Plan:
    """Refuse a plan whose projected peak exceeds the budget, before any work starts.

    Parameters
    ----------
    plan : Plan
    budget : int or str
        Host budget of the whole run (all processes), in bytes or as a size string.
    device_budget : int or str, optional
        Budget of each GPU, checked against ``plan.device`` when both are set.

    Returns
    -------
    Plan
        ``plan`` itself, when it fits.

    Raises
    ------
    MemoryBudgetError
        With the projected figure, its breakdown, the budget and the knob that makes it fit.
    """
    budget = parse_budget(budget)
    if plan.peak > budget:
        task = plan.largest
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in task.parts.items() if v)
        raise MemoryBudgetError(
            f"projected host memory {format_bytes(plan.peak)} exceeds --memory-budget "
            f"{format_bytes(budget)}: {plan.processes} process(es) × (reserved "
            f"{format_bytes(plan.reserved)} + {plan.threads} thread(s) × {task.stage} task "
            f"{format_bytes(task.total)} [{parts}]); {_suggest(plan, budget)}"
        )
    device_budget = parse_budget(device_budget, flag="--device-memory-budget")
    if device_budget is not None and plan.device is not None and plan.device > device_budget:
        raise MemoryBudgetError(
            f"projected device memory {format_bytes(plan.device)} per GPU (one batch of "
            f"{plan.params.get('batch_size')} through the model) exceeds --device-memory-budget "
            f"{format_bytes(device_budget)}; lower --batch-size"
        )
    return plan


def choose_block_groups(
    budget: int | str, *, max_groups: int, factory: Callable[..., Plan] | None = None, **plan_args: Any
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
    factory : callable, optional
        What projects a plan from its arguments (default :func:`plan`).
    **plan_args
        Every other argument of :func:`plan` (``batch_size``, ``N``, ``C``, ``M`` …).

    Returns
    -------
    int

    Raises
    ------
    MemoryBudgetError
        When even the smallest candidate (one batch, or ``max_groups`` if smaller) does not fit.
    """
    budget = parse_budget(budget)
    _positive(max_groups=max_groups)
    candidates = _block_candidates(plan_args["batch_size"], max_groups)
    fitting = _largest_fitting(
        (factory or plan)(block_groups=candidates[0], **plan_args), "block_groups", candidates, budget
    )
    if fitting is None:
        smallest = (factory or plan)(block_groups=candidates[-1], **plan_args)
        raise MemoryBudgetError(
            f"even --block-groups {candidates[-1]} projects {format_bytes(smallest.peak)}, over "
            f"--memory-budget {format_bytes(budget)}; lower --batch-size, use fewer workers or threads "
            f"(now {smallest.processes} × {smallest.threads}), or raise --memory-budget"
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
        ``"cpu"``, or a TensorFlow device such as ``"GPU:0"``.
    warmup : bool
        Call ``predict_fn`` once before measuring, so that one-time costs (tracing, runtime start)
        stay out of the probe.

    Returns
    -------
    int
        On the CPU, the rise of this process's RSS during the measured call above its RSS before it
        (inputs already allocated, output included), sampled every 5 ms: a call lasting only a few
        samples under-measures its transients. On a GPU, TensorFlow's peak device memory during the
        measured call (weights included).
    """
    inputs = [np.ones(tuple(s), np.float32) for s in (batch_shape, *more_shapes)]
    if warmup:
        predict_fn(*inputs)
    if device.lower() == "cpu":
        with PeakMemory(interval=0.005, children=False) as pm:
            output = predict_fn(*inputs)  # alive until the last sample, so the output counts
        del output
        return pm.increase
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats(device)
    predict_fn(*inputs)
    return int(tf.config.experimental.get_memory_info(device)["peak"])


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

    Examples
    --------
    >>> with PeakMemory() as pm:
    ...     result.compute()
    >>> pm.peak, pm.increase
    """

    def __init__(self, interval: float = 0.02, children: bool = True):
        self.interval, self.children = interval, children
        self.baseline = self.peak = 0

    def _update(self, rss: int) -> None:
        self.peak = max(self.peak, rss)

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
    ``array-stitch-splat-stitch-tile`` count as ``stitch-splat``). Name graph layers
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
    >>> with TaskMemoryCallback(stages=("infer", "stitch-splat", "stitch-sum")) as cb:
    ...     dask.compute(patches, obj)
    >>> cb.peaks()
    {'infer': 1342177280, 'stitch-splat': 905969664, 'stitch-sum': 805306368}
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
        (:meth:`TaskMemoryCallback.peaks`).

    Returns
    -------
    dict
        ``projected`` (:meth:`Plan.to_dict`), ``measured`` and ``ratio`` = measured / projected for every
        key with both figures (``peak`` ↔ ``Plan.peak``, ``process`` ↔ ``Plan.per_process()``,
        ``device`` ↔ ``Plan.device``, a stage ↔ ``Plan.per_process(stage)``).
    """
    stages = {t.stage for t in plan.tasks}
    projected = {"peak": plan.peak, "process": plan.per_process(), "device": plan.device}
    projected |= {s: plan.per_process(s) for s in stages}
    ratio = {k: round(v / projected[k], 3) for k, v in measured.items() if v is not None and projected.get(k)}
    return {"projected": plan.to_dict(), "measured": dict(measured), "ratio": ratio}


def _pair(shape: int | Sequence[int]) -> tuple[int, int]:
    rows, cols = (shape, shape) if isinstance(shape, int) else tuple(shape)
    return int(rows), int(cols)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InvalidParameterError(f"{name} is {value}; it must be a positive integer")


def _block_candidates(batch_size: int, max_groups: int) -> list[int]:
    """Block sizes to try, largest first: ``max_groups``, then batch·2^k below it."""
    _positive(batch_size=batch_size)
    below = [batch_size << k for k in range(max_groups.bit_length()) if batch_size << k < max_groups]
    return [max_groups, *reversed(below)]


def _shrink(value: int | tuple[int, int], floor: int) -> Iterator[int | tuple[int, int]]:
    """``value`` halved repeatedly, no side below ``floor``."""
    while True:
        value = value // 2 if isinstance(value, int) else (value[0] // 2, value[1] // 2)
        if min(_pair(value)) < floor:
            return
        yield value


def _changes(p: Plan, knob: str, value: Any) -> dict[str, Any]:
    """The plan arguments a knob's value sets: tile and metric chunk together when they are one."""
    if knob in ("tile", "chunk") and p.params.get("tile") == p.params.get("chunk"):
        return {"tile": value, "chunk": value}
    return {knob: value}


def _largest_fitting(p: Plan, knob: str, candidates: Sequence, budget: int) -> Any:
    """The first of ``candidates`` (largest first) for ``knob`` whose plan fits, or None."""
    return next((c for c in candidates if p.with_params(**_changes(p, knob, c)).peak <= budget), None)


def _suggest(p: Plan, budget: int) -> str:
    """The knob to turn for an over-budget plan, with a value that fits when there is one."""
    knob = p.largest.knob
    current, flag = p.params.get(knob), _FLAGS[knob]
    if current is None:  # a Plan built by hand: nothing to re-project
        return f"lower {flag}"
    if knob == "block_groups":
        candidates = [c for c in _block_candidates(p.params["batch_size"], current) if c < current]
    else:
        candidates = list(_shrink(current, _SMALLEST[knob]))
    value = _largest_fitting(p, knob, candidates, budget)
    if value is None:
        return (
            f"no smaller {flag} fits; lower --batch-size, use fewer workers or threads "
            f"(now {p.processes} × {p.threads}), or raise --memory-budget"
        )
    shown = value if isinstance(value, int) else "x".join(map(str, value))
    return f"{flag} {shown} fits (projected {format_bytes(p.with_params(**_changes(p, knob, value)).peak)})"
