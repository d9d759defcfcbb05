"""Where the graph runs: threads, local processes, one worker per GPU, or an existing cluster.

The stages build lazy graphs and know nothing of this module; the pipeline enters :func:`scheduler`
once and computes inside it::

    with scheduler("processes", n_workers=2) as client:
        conc = concurrency(client)              # processes × threads, for the memory plan
        dask.compute(...)

Each kind of scheduler is one :class:`SchedulerKind` in :data:`KINDS` (threads, processes, cuda, an
address): how to open it and what the rest of the engine asks of it (whether its workers are child
processes of this one, whether models run on a GPU, whether this process's RSS is the per-process
baseline, how many tasks run at once). The pipeline and the memory plan ask :func:`kind` and never
compare scheduler names, so a new kind of scheduler is one entry here.

TensorFlow reads ``TF_NUM_INTRAOP_THREADS`` and ``TF_NUM_INTEROP_THREADS`` when its runtime starts, and
``TF_FORCE_GPU_ALLOW_GROWTH`` when it first touches a GPU, so this module sets them in each worker's
environment (dask's ``distributed.nanny.environ``) and every worker gets them before any task imports
TensorFlow. Variables already set in this process's environment win over these defaults, as
``distributed`` documents. Models are loaded once per worker by the per-process cache of
``ptychozarr.inference``, which workers import like any module.

Waits are bounded: a scheduler address that does not answer within :data:`CONNECT_TIMEOUT` seconds,
and a cluster left without workers for :data:`NO_WORKERS_TIMEOUT` seconds while the block runs, end
the run with one line (:class:`ClusterError`). A local cluster's scheduler has this bound in its own
configuration (``distributed.scheduler.no-workers-timeout``: tasks waiting without workers fail); an
existing scheduler is watched from here (its worker count, every :data:`_WATCH_EVERY` seconds), and
this client's work is cancelled when it has had no workers that long. The paths a graph carries are
absolute (:class:`ptychozarr.config.CompareConfig` makes them so), since workers elsewhere resolve a
relative path against their own folder.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import dask
from dask.system import CPU_COUNT

from ptychozarr import memory
from ptychozarr.errors import InvalidParameterError, PtychozarrError

__all__ = [
    "CONNECT_TIMEOUT", "GPU_EXTRA", "KINDS", "NO_WORKERS_TIMEOUT", "ClusterError", "Concurrency",
    "SchedulerKind", "concurrency", "kind", "scheduler",
]  # fmt: skip

GPU_EXTRA = "pip install 'ptychozarr[gpu]'"
"""The command that installs what ``scheduler("cuda")`` needs (dask-cuda and TensorFlow with CUDA)."""

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a scheduler address to answer (``Client(timeout=...)`` given wins)."""

NO_WORKERS_TIMEOUT = 60.0
"""Seconds a cluster may have no worker while a run uses it before the run ends (one line)."""

_WATCH_EVERY = 0.5  # seconds between worker counts of an existing scheduler


class ClusterError(PtychozarrError, RuntimeError):
    """The cluster cannot run the graph: its scheduler does not answer, or it has no workers left."""


@dataclass(frozen=True)
class Concurrency:
    """How many tasks run at once: ``processes`` × ``threads`` (per process)."""

    processes: int
    threads: int

    @property
    def tasks(self) -> int:
        """Tasks running at once over all processes."""
        return self.processes * self.threads


def concurrency(client: Any = None) -> Concurrency:
    """Processes and threads per process the graph runs on, for the memory plan (``memory.Plan``).

    Parameters
    ----------
    client : distributed.Client, optional
        The client :func:`scheduler` yielded; None for the threaded scheduler (one process with dask's
        ``num_workers`` threads, all cores by default).
    """
    return _threads_concurrency(client) if client is None else _workers_concurrency(client)


def _threads_concurrency(client: None = None) -> Concurrency:
    """One process with dask's ``num_workers`` threads (all cores by default)."""
    return Concurrency(1, dask.config.get("num_workers", None) or CPU_COUNT)


def _workers_concurrency(client: Any) -> Concurrency:
    """The client's workers × the most threads any one of them has."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not workers:
        raise InvalidParameterError(f"the cluster at {client.scheduler.address} has no workers; start some")
    return Concurrency(len(workers), max(w["nthreads"] for w in workers))


Opener = Callable[[str, "int | None", int, "int | None", dict[str, Any]], AbstractContextManager[Any]]
"""How a kind opens its scheduler: ``(spec, n_workers, threads_per_worker, tf_threads, cluster_kwargs)``
→ a context manager yielding the client (None for dask's threads)."""


@dataclass(frozen=True)
class SchedulerKind:
    """One kind of scheduler: how to open it and what the engine needs to know about it.

    Attributes
    ----------
    name : str
        The kind's name (``threads``, ``processes``, ``cuda``, ``address``).
    usage : str
        How a ``--scheduler`` value names it, for messages (e.g. ``'tcp://host:8786'``).
    accepts : callable
        Whether a scheduler spec names this kind.
    open : callable
        :data:`Opener`: the context manager :func:`scheduler` enters.
    local_workers : bool
        Its workers are child processes of this one, so this process's peak RSS samples its children.
    on_gpu : bool
        Models run on a GPU device, so the memory plan probes their device memory.
    in_process : bool
        Tasks run in this process (no workers): this process's RSS now is the per-process baseline of
        the memory plan, and there are no worker peaks or model loads to collect from workers.
    count : callable
        How many processes and threads per process run tasks, given the client :func:`scheduler`
        yielded (see :func:`concurrency`).
    """

    name: str
    usage: str
    accepts: Callable[[str], bool]
    open: Opener
    local_workers: bool
    on_gpu: bool
    in_process: bool
    count: Callable[[Any], Concurrency]

    def concurrency(self, client: Any = None) -> Concurrency:
        """Processes and threads per process this kind's ``client`` runs tasks on."""
        return self.count(client)


def kind(spec: str) -> SchedulerKind:
    """The :class:`SchedulerKind` a scheduler spec names; one line naming the valid ones otherwise.

    Raises
    ------
    InvalidParameterError
        No kind in :data:`KINDS` accepts ``spec``.
    """
    for k in KINDS:
        if isinstance(spec, str) and k.accepts(spec):
            return k
    raise InvalidParameterError(
        f"scheduler {spec!r} is not one of {', '.join(k.usage for k in KINDS[:-1])} or an address such as "
        f"{KINDS[-1].usage}"
    )


@contextmanager
def scheduler(
    spec: str = "threads",
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    tf_threads: int | None = None,
    **cluster_kwargs: Any,
) -> Iterator[Any]:
    """Run the dask computations inside the block on the scheduler ``spec`` names.

    Parameters
    ----------
    spec : str
        ``"threads"`` (default): dask's threaded scheduler in this process, nothing started.
        ``"processes"``: a ``distributed.LocalCluster`` of ``n_workers`` processes.
        ``"cuda"``: a ``dask_cuda.LocalCUDACluster``, one worker per visible GPU (``gpu`` extra), TF
        memory growth on and no RMM pool (TensorFlow keeps its own allocator).
        An address such as ``"tcp://host:8786"``: an existing scheduler (e.g. ``dask cuda worker``
        on other nodes), whose workers are configured by whoever started them.
    n_workers : int, optional
        Threads (``threads``), worker processes (``processes``; default one per core) or GPU workers
        (``cuda``; default one per GPU).
    threads_per_worker : int
        Threads in each worker process (``processes``, ``cuda``).
    tf_threads : int, optional
        TensorFlow intra- and inter-op threads per worker; default cores // workers for ``processes``
        and ``cuda``. With ``threads`` it sets this process's environment for the block, which matters
        only if TensorFlow has not started yet (default: TensorFlow's own, all cores).
    **cluster_kwargs
        Passed to ``LocalCluster``, ``LocalCUDACluster`` or ``Client`` (e.g. ``memory_limit``).

    Yields
    ------
    distributed.Client or None
        The client, set as dask's default inside the block; None for ``threads``.

    Raises
    ------
    InvalidParameterError
        An unknown ``spec``, counts below 1, worker options given with an address, or ``cuda`` without
        dask-cuda or a visible GPU.
    """
    for name, value in (
        ("n_workers", n_workers),
        ("threads_per_worker", threads_per_worker),
        ("tf_threads", tf_threads),
    ):
        if value is not None and value < 1:
            raise InvalidParameterError(f"{name} is {value}; give a positive integer or leave it unset")
    with kind(spec).open(spec, n_workers, threads_per_worker, tf_threads, cluster_kwargs) as client:
        yield client


@contextmanager
def _open_threads(
    spec: str, n_workers: int | None, threads_per_worker: int, tf_threads: int | None, kwargs: dict
) -> Iterator[None]:
    """dask's threaded scheduler in this process, ``n_workers`` threads; TF threads set for the block."""
    env = _tf_env(tf_threads) if tf_threads else {}
    config = {"scheduler": "threads"} | ({"num_workers": n_workers} if n_workers else {})
    with dask.config.set(config), _environ(env):
        yield None


def _open_local(gpu: bool) -> Opener:
    """Opens a local cluster of processes (``gpu``: one per GPU) and a client of it."""

    @contextmanager
    def open_local(
        spec: str, n_workers: int | None, threads_per_worker: int, tf_threads: int | None, kwargs: dict
    ) -> Iterator[Any]:
        with _local_cluster(gpu, n_workers, threads_per_worker, tf_threads, kwargs) as cluster:
            from distributed import Client

            with Client(cluster) as client, _bounded(client, watch=False):
                yield client

    return open_local


@contextmanager
def _open_address(
    spec: str, n_workers: int | None, threads_per_worker: int, tf_threads: int | None, kwargs: dict
) -> Iterator[Any]:
    """A client of the existing scheduler at ``spec``, watched for losing all its workers."""
    if n_workers is not None or tf_threads is not None:
        raise InvalidParameterError(
            f"n_workers and tf_threads apply to local clusters, not to the scheduler at {spec}; "
            "configure its workers where they are started"
        )
    with _connect(spec, kwargs) as client, _bounded(client, watch=True):
        yield client


KINDS: tuple[SchedulerKind, ...] = (
    SchedulerKind(
        "threads", "'threads'", lambda s: s == "threads", _open_threads,
        local_workers=False, on_gpu=False, in_process=True, count=_threads_concurrency,
    ),
    SchedulerKind(
        "processes", "'processes'", lambda s: s == "processes", _open_local(gpu=False),
        local_workers=True, on_gpu=False, in_process=False, count=_workers_concurrency,
    ),
    SchedulerKind(
        "cuda", "'cuda'", lambda s: s == "cuda", _open_local(gpu=True),
        local_workers=True, on_gpu=True, in_process=False, count=_workers_concurrency,
    ),
    SchedulerKind(  # last: messages name it as the address form
        "address", "'tcp://host:8786'", lambda s: "://" in s, _open_address,
        local_workers=False, on_gpu=False, in_process=False, count=_workers_concurrency,
    ),
)  # fmt: skip
"""Every kind of scheduler, in the order :func:`kind` tries them; the first that accepts a spec wins."""


def _connect(address: str, kwargs: dict[str, Any]) -> Any:
    """A client of the scheduler at ``address``, or one line when it does not answer in time."""
    from distributed import Client

    kwargs = {"timeout": CONNECT_TIMEOUT} | kwargs
    try:
        return Client(address, **kwargs)
    except (OSError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(
            f"no dask scheduler answers at {address} within {kwargs['timeout']} s ({reason}); start one "
            "there or give another --scheduler"
        ) from None
    except ValueError as exc:
        raise InvalidParameterError(f"scheduler address {address!r}: {exc}") from None


def _no_workers(address: str, seconds: float) -> ClusterError:
    return ClusterError(
        f"the cluster at {address} has had no workers for {seconds:g} s, so the run stops; finished "
        "blocks are kept: start workers and run the same command to resume"
    )


@contextmanager
def _bounded(client: Any, *, watch: bool) -> Iterator[None]:
    """End the block with :class:`ClusterError` when the cluster stays without workers too long.

    A local cluster's scheduler fails waiting tasks itself (configured in :func:`_local_cluster`);
    with ``watch`` a thread counts the workers of an existing scheduler and cancels this client's
    work once it has had none for :data:`NO_WORKERS_TIMEOUT` seconds.
    """
    from distributed.scheduler import NoValidWorkerError, NoWorkerError

    address = client.scheduler.address
    dog = _Watchdog(client, NO_WORKERS_TIMEOUT) if watch else None
    if dog is not None:
        dog.start()
    try:
        yield
    except (NoWorkerError, NoValidWorkerError):
        raise _no_workers(address, NO_WORKERS_TIMEOUT) from None
    except Exception:
        if dog is not None and dog.fired.is_set():
            raise _no_workers(address, dog.timeout) from None
        raise
    finally:
        if dog is not None:
            dog.stop()


class _Watchdog(threading.Thread):
    """Counts an existing scheduler's workers; after ``timeout`` seconds with none, cancels the work."""

    def __init__(self, client: Any, timeout: float):
        super().__init__(name="ptychozarr-no-workers-watchdog", daemon=True)
        self.client, self.timeout = client, timeout
        self.fired, self._halt = threading.Event(), threading.Event()

    def run(self) -> None:
        from distributed import Future

        since = None
        while not self._halt.wait(_WATCH_EVERY):
            try:
                workers = len(self.client.scheduler_info(n_workers=-1)["workers"])
            except Exception:  # the scheduler itself is gone: the computation fails by itself
                continue
            if workers:
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= self.timeout:
                self.fired.set()
                keys = list(self.client.futures)
                if keys:
                    self.client.cancel([Future(k, self.client) for k in keys])

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _tf_env(threads: int) -> dict[str, str]:
    return {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process's environment for the block, then restore it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _local_cluster(
    gpu: bool,
    n_workers: int | None,
    threads_per_worker: int,
    tf_threads: int | None,
    cluster_kwargs: dict[str, Any],
) -> Iterator[Any]:
    """A LocalCluster (processes) or, with ``gpu``, a LocalCUDACluster whose workers carry the TF env."""
    from distributed import LocalCluster  # also loads distributed's configuration defaults

    if gpu:
        n_gpus = _visible_gpus()
        n_workers = n_workers or n_gpus
        env = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    else:
        n_workers = n_workers or CPU_COUNT
        env = {}
    env |= _tf_env(tf_threads or max(1, CPU_COUNT // n_workers))
    environ = {**dask.config.get("distributed.nanny.environ"), **env}
    kwargs = {"n_workers": n_workers, "threads_per_worker": threads_per_worker, "dashboard_address": None}
    bounded = {"distributed.scheduler.no-workers-timeout": f"{NO_WORKERS_TIMEOUT}s"}
    before_start = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **memory.MALLOC_ENV}
    settings = {"distributed.nanny.environ": environ, "distributed.nanny.pre-spawn-environ": before_start}
    with dask.config.set(settings | bounded):
        if gpu:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(**(kwargs | {"rmm_pool_size": None} | cluster_kwargs))
        else:
            cluster = LocalCluster(**(kwargs | {"processes": True} | cluster_kwargs))
    with cluster:
        yield cluster


def _visible_gpus() -> int:
    """GPUs dask-cuda would use; raises the error naming the ``gpu`` extra when it cannot run."""
    try:
        from dask_cuda.utils import get_gpu_count
    except ImportError as e:
        raise InvalidParameterError(
            f"scheduler 'cuda' needs dask-cuda, which is not installed ({e}); install the gpu extra: "
            f"{GPU_EXTRA}"
        ) from e
    try:
        n = get_gpu_count()
    except Exception as e:  # NVML absent or failing: no usable GPU or driver
        raise InvalidParameterError(
            f"scheduler 'cuda' sees no GPU (NVML: {e}); run on a machine with a GPU and its driver, "
            "or use scheduler 'processes'"
        ) from e
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip()]))
    if n < 1:
        raise InvalidParameterError(
            f"scheduler 'cuda' sees no GPU (CUDA_VISIBLE_DEVICES={visible!r}); make one visible or use "
            "scheduler 'processes'"
        )
    return n
