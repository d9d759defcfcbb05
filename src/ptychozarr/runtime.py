"""How a run executes: the lock on its output directory, dask callbacks, progress, timings, reuse
records, per-block completion and fault hooks. The stages know nothing of this module's machinery:
they hand it lazy graphs (:meth:`Runtime.compute`, :meth:`Runtime.store_blocks`) and it runs them.

Per-block completion::

    arms/<arm>/patches/patches   (B', M, M) c64, one Zarr chunk per block
    arms/<arm>/patches/done      (blocks,) bool, one chunk per block: set after the block's chunk

A run killed in the middle of a stage finds the blocks already done and computes only the others, so
at most the blocks in flight are redone. ``run.json`` records ``blocks`` (computed and reused per
stage) and ``stages`` with an ``other`` entry, so that the stages and ``other`` add up to ``total``.

The tests inject faults from outside (``tests/faults``): they wrap :meth:`Runtime.compute` and
``_BlockWriter.__setitem__``; nothing here reads a fault setting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import psutil
import zarr
from dask.callbacks import Callback

from ptychozarr import memory
from ptychozarr.errors import StoreError
from ptychozarr.io.store import holds_result
from ptychozarr.report.runjson import to_jsonable

__all__ = ["LOCK_NAME", "Runtime", "output_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".ptychozarr.lock"
"""File in the output directory naming the process that runs there."""

_LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


# -- the lock --------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Own ``output_dir`` for the duration of a run.

    The lock is one atomic operation: this process writes its record (host, process id, start time)
    into a file of its own beside the lock, then hard-links that file to ``.ptychozarr.lock``; the link
    fails when the name exists, so exactly one process wins and a reader never sees a partial record.

    A lock whose holder is gone is stale and taken over only when it names this host and its process
    no longer runs here. Takers on this host take turns (an advisory ``flock`` on
    ``.ptychozarr.lock.takeover``, released by the kernel if a taker dies), re-read the lock inside
    their turn and remove it only if it is still the same stale record, so two takers never both win.
    A lock of another host is never taken over: the error says which host and how to clear it. A
    record without a host (written by an earlier version) counts as this host's.

    Raises
    ------
    StoreError
        When another live process holds the directory, when another host's run holds it, or when the
        directory or the lock cannot be used (one line naming it and what to do).
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(_in_the_way(output_dir)) from None
    except OSError as exc:
        raise StoreError(f"cannot create the output dir {output_dir}: {exc.strerror or exc}") from None
    path = output_dir / LOCK_NAME
    me = _record()
    tmp = output_dir / f"{LOCK_NAME}.{me['host']}.{me['pid']}.{me['token']}.tmp"
    try:
        with open(tmp, "x") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise StoreError(f"cannot write the lock of {output_dir}: {exc.strerror or exc}") from None
    try:
        _acquire(output_dir, path, tmp, me)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield path
    finally:
        if _holder(path) == me:
            path.unlink()


def _in_the_way(output_dir: Path) -> str:
    """The message for an output dir that cannot be a folder: it, or the folder above it, is a file."""
    blocking = next(
        (p for p in (output_dir, *output_dir.parents) if p.exists() or p.is_symlink()), output_dir
    )
    if blocking == output_dir:
        return f"output dir {output_dir} is a file, not a folder; give another --output-dir"
    return (
        f"output dir {output_dir}: {blocking} is a file, not a folder; remove it or give another --output-dir"
    )


_TRIES = 8  # attempts to link the lock (each either wins, refuses, or removed a stale lock first)


def _acquire(output_dir: Path, path: Path, tmp: Path, me: dict) -> None:
    for _ in range(_TRIES):
        _check_regular(path)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            if os.stat(tmp).st_nlink > 1 and _holder(path) == me:
                return  # the link was made (a retried request on a network filesystem)
        except OSError as exc:
            raise StoreError(f"cannot take the lock {path}: {exc.strerror or exc}") from None
        holder = _holder(path)
        if holder is None:
            if not os.path.lexists(path):
                continue  # released or removed meanwhile: try again
            _check_regular(path)
            raise StoreError(
                f"{path} holds no lock record; remove it if no run uses {output_dir} (on any host)"
            )
        _refuse_live(output_dir, path, holder)
        _take_over_stale(output_dir, path, holder)
    raise StoreError(f"{path}: could not take the lock; remove the file if no run uses {output_dir}")


def _record() -> dict:
    """This process's lock record: host, pid, start time and a token unique to this attempt."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }


def _check_regular(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise StoreError(f"the lock {path} is {kind}; remove it if no run uses {path.parent}")


def _refuse_live(output_dir: Path, path: Path, holder: dict) -> None:
    """Raise unless ``holder`` is a process of this host that no longer runs."""
    host = holder.get("host")
    if host is not None and host != socket.gethostname():
        raise StoreError(
            f"{output_dir} is in use by process {holder['pid']} on host {host} (started "
            f"{holder.get('started')}); if no run uses it on {host}, remove {path}"
        )
    if _alive(holder):
        raise StoreError(
            f"{output_dir} is in use by process {holder['pid']} (started {holder.get('started')}); "
            "wait for it to finish or give another --output-dir"
        )


def _take_over_stale(output_dir: Path, path: Path, stale: dict) -> None:
    """Remove the stale lock ``stale`` if it is still the lock, one taker of this host at a time."""
    try:
        fd = os.open(output_dir / f"{LOCK_NAME}.takeover", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot take over the stale lock {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks
            raise StoreError(
                f"cannot take over the stale lock {path} ({exc.strerror or exc}); process "
                f"{stale['pid']} is gone: remove the file if no other run uses {output_dir}"
            ) from None
        if _holder(path) == stale:  # nobody took it over before our turn (takers are serialised)
            log.info("taking over the stale lock of %s (process %s is gone)", output_dir, stale.get("pid"))
            path.unlink()
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process that wrote the lock still runs (its id may have been reused since)."""
    try:
        proc = psutil.Process(holder["pid"])
        started = datetime.fromisoformat(holder["started"]).timestamp()
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started + 1
    except (psutil.NoSuchProcess, ValueError, KeyError, TypeError):
        return False
    except psutil.AccessDenied:
        return True


# -- callbacks -------------------------------------------------------------------------------------


class _LogProgress(Callback):
    """A log line every ``_LOG_EVERY`` seconds with the tasks done (for a stderr that is not a terminal)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage, self.done, self.total, self.last = stage, 0, 0, time.monotonic()
        self._lock = threading.Lock()

    def _start_state(self, dsk, state):
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "running")) + len(state["finished"])

    def _posttask(self, key, result, dsk, state, worker_id):
        with self._lock:
            self.done += 1
            if time.monotonic() - self.last >= _LOG_EVERY:
                self.last = time.monotonic()
                log.info("%s: %d/%d tasks", self.stage, self.done, self.total)


def _progress(stage: str) -> Callback:
    if sys.stderr.isatty():
        from tqdm.dask import TqdmCallback

        return TqdmCallback(desc=stage, leave=False)
    return _LogProgress(stage)


class _BlockWriter:
    """A ``da.store`` target that writes a block's rows, then records the block done."""

    def __init__(self, target: zarr.Array, done: zarr.Array, starts: Sequence[int]):
        self.target, self.done, self.starts = target, done, list(starts)

    def __setitem__(self, region: tuple[slice, ...], value: np.ndarray) -> None:
        self.target[region] = value
        self.done[self.starts.index(region[0].start)] = True


class _GraphStats(Callback):
    """Tasks a computation ran, the seconds before its first task started (graph building, optimisation
    and scheduling) and the seconds from then to its end."""

    def __init__(self):
        super().__init__()
        self.called = time.perf_counter()
        self.first = self.ended = None
        self.tasks = 0

    def _pretask(self, key, dsk, state):
        if self.first is None:
            self.first = time.perf_counter()

    def _posttask(self, key, result, dsk, state, worker_id):
        self.tasks += 1

    def _finish(self, dsk, state, errored):
        self.ended = time.perf_counter()

    def record(self) -> dict[str, float | int]:
        first = self.first or self.ended or self.called
        return {
            "tasks": self.tasks,
            "graph_s": round(first - self.called, 3),
            "run_s": round((self.ended or first) - first, 3),
        }


# -- the runtime -----------------------------------------------------------------------------------


class Runtime:
    """One run's execution record: timings, reuse, blocks, warnings and measured task peaks.

    Parameters
    ----------
    quiet : bool
        No progress bars or progress lines.
    force : bool
        Redo every stage (reuse nothing).

    Attributes
    ----------
    memory : PeakMemory or None
        The run's RSS sampler, set by the caller that starts it; each :meth:`timed` stage is labelled
        in it.
    graphs : dict of str to dict
        Per computed stage: ``tasks`` run, ``graph_s`` from the call to the first task (building,
        optimising and scheduling the graph) and ``run_s`` from the first task to the end, summed
        over the stage's computations.
    """

    def __init__(self, *, quiet: bool = False, force: bool = False):
        self.quiet, self.force = quiet, force
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.blocks: dict[str, dict[str, int]] = {}
        self.warnings: list[str] = []
        self.task_peaks: dict[str, int] = {}
        self.memory: memory.PeakMemory | None = None
        self.graphs: dict[str, dict[str, float | int]] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to stage ``name`` (and its peak RSS, while :attr:`memory`
        samples the run, to :meth:`stage_memory`)."""
        t0 = time.perf_counter()
        try:
            with self.memory.label(name) if self.memory is not None else contextlib.nullcontext():
                yield
        finally:
            memory.release_freed()
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)

    def reusable(self, name: str, node: Any, params: dict, where: Any = "") -> bool:
        """The one reuse rule of every stage: ``node`` is reused (and the reuse recorded) when the run is
        not forced and ``node`` is complete with ``params`` — the stage's parameters with the content
        fingerprints of what it read, never paths — holding every chunk it wrote
        (:func:`ptychozarr.io.store.holds_result`)."""
        if self.force or not holds_result(node, to_jsonable(params)):
            return False
        self.reuse(name, where)
        return True

    def reuse(self, name: str, where: Any = "") -> None:
        """Record that stage ``name`` reused a complete result."""
        self.reused.append(name)
        log.info("stage %s: reusing the complete result %s", name, where)

    def warn(self, message: str) -> None:
        """A warning kept for ``run.json`` and logged."""
        self.warnings.append(message)
        log.warning(message)

    def compute(
        self,
        stage: str,
        func: Callable,
        *args: Any,
        task_kinds: Sequence[str] = (),
        progress: bool = True,
        **kwargs,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` (a dask computation) with this run's callbacks.

        ``task_kinds`` are the layer names whose memory is recorded apart (else the whole stage);
        ``progress`` shows a bar (a terminal) or periodic log lines (otherwise) unless quiet.
        """
        watch, stats = memory.TaskMemoryCallback(stages=task_kinds), _GraphStats()
        callbacks = [watch, stats]
        if progress and not self.quiet:
            callbacks.append(_progress(stage))
        with contextlib.ExitStack() as stack:
            for cb in callbacks:
                stack.enter_context(cb)
            result = func(*args, **kwargs)
        peaks = watch.peaks()
        peaks = (
            {k: v for k, v in peaks.items() if k in task_kinds}
            if task_kinds
            else {stage: max(peaks.values(), default=0)}
        )
        for name, value in peaks.items():
            self.task_peaks[name] = max(self.task_peaks.get(name, 0), value)
        record = stats.record()
        total = self.graphs.setdefault(stage, dict.fromkeys(record, 0))
        for name, value in record.items():
            total[name] = round(total[name] + value, 3)
        return result

    def store_blocks(self, stage: str, source: da.Array, target: zarr.Array, done: zarr.Array) -> None:
        """Store ``source`` into ``target`` block by block along axis 0, skipping blocks already done.

        ``done`` holds one bool per block of ``source`` (one chunk each); block ``i`` is set after its
        rows are written. The counts go to :attr:`blocks` under ``stage``.
        """
        starts = np.cumsum((0, *source.chunks[0])).tolist()
        finished = np.asarray(done[:], bool)
        todo = [i for i in range(len(source.chunks[0])) if not finished[i]]
        self.blocks[stage] = {"computed": len(todo), "reused": len(finished) - len(todo)}
        if not todo:
            return
        writer = _BlockWriter(target, done, starts)
        self.compute(
            stage,
            da.store,
            [source.blocks[i] for i in todo],
            [writer] * len(todo),
            regions=[(slice(starts[i], starts[i + 1]),) for i in todo],
            lock=False,
        )

    def stage_memory(self) -> dict[str, int]:
        """Peak RSS in bytes while each stage ran (the stages timed while :attr:`memory` sampled)."""
        return dict(self.memory.labelled) if self.memory is not None else {}

    def stage_record(self) -> dict[str, float]:
        """Seconds per stage, with ``other`` (the rest of the wall time) and ``total``."""
        total = round(time.perf_counter() - self.started, 3)
        staged = sum(self.timings.values())
        return {**self.timings, "other": round(max(0.0, total - staged), 3), "total": total}
