"""Tests of ptychozarr.cluster on a 2-worker LocalCluster (started once for the module).

The block functions and the per-process cache below live in this importable module, so workers import
them by reference (as they will ``ptychozarr.inference``) instead of receiving pickled copies.
"""

import importlib.util
import os
import threading

import dask
import dask.array as da
import numpy as np
import pytest
from dask.system import CPU_COUNT

from ptychozarr.cluster import GPU_EXTRA, Concurrency, concurrency, scheduler
from ptychozarr.errors import InvalidParameterError
from ptychozarr.memory import worker_peaks

_CACHE: dict[str, np.ndarray] = {}
_LOCK = threading.Lock()
_INITS = 0


def _resource() -> np.ndarray:
    """A per-process resource built once (the pattern of the model cache)."""
    global _INITS
    with _LOCK:
        if "r" not in _CACHE:
            _INITS += 1
            _CACHE["r"] = np.arange(3.0)
    return _CACHE["r"]


def _init_count() -> int:
    return _INITS


def _environ(name: str) -> str | None:
    return os.environ.get(name)  # run in the worker (os.environ.get itself would pickle our environ)


def _pid_block(block: np.ndarray) -> np.ndarray:
    return np.full(block.shape, os.getpid() + _resource()[0], dtype=np.int64)


def _transform(block: np.ndarray) -> np.ndarray:
    return np.sin(block) * block.sum(axis=0, keepdims=True) + _resource()[2]


@pytest.fixture(scope="module")
def client():
    with scheduler("processes", n_workers=2) as c:
        yield c


def _workload():
    x = da.from_array(np.random.default_rng(0).random((400, 300)), chunks=(100, 100))
    y = x.map_blocks(_transform, dtype=np.float64, meta=np.empty((0, 0), np.float64))
    return y, y.sum(), y.mean(axis=0), (y**2).sum(axis=1)


def test_local_cluster_gives_the_threaded_results(client):
    on_cluster = dask.compute(*_workload())
    threaded = dask.compute(*_workload(), scheduler="threads")
    for a, b in zip(on_cluster, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_each_worker_initialises_once_however_many_tasks(client):
    pids = da.zeros((40, 2), chunks=(1, 2), dtype=np.int64).map_blocks(
        _pid_block, dtype=np.int64, meta=np.empty((0, 0), np.int64)
    )
    used = set(np.unique(pids.compute()))
    worker_pid = client.run(os.getpid)
    inits = client.run(_init_count)
    assert os.getpid() not in used and used <= set(worker_pid.values())
    for address, pid in worker_pid.items():
        assert inits[address] == (1 if pid in used else 0)


def test_workers_get_the_tensorflow_thread_settings(client):
    expected = os.environ.get("TF_NUM_INTRAOP_THREADS", str(max(1, CPU_COUNT // 2)))
    assert set(client.run(_environ, "TF_NUM_INTRAOP_THREADS").values()) == {expected}
    assert set(client.run(_environ, "TF_NUM_INTEROP_THREADS").values()) == {expected}


def test_concurrency_of_each_scheduler(client):
    assert concurrency(client) == Concurrency(2, 1)
    with scheduler("threads", n_workers=3) as none:
        assert none is None and concurrency(none) == Concurrency(1, 3)
        assert dask.config.get("scheduler") == "threads"


def test_an_existing_scheduler_address_connects(client):
    with scheduler(client.scheduler.address) as other:
        assert other is not client and concurrency(other) == Concurrency(2, 1)
        assert other.submit(_transform, np.ones((2, 2))).result()[0, 0] == np.sin(1) * 2 + 2


def test_worker_peaks_reports_every_worker(client):
    peaks = worker_peaks(client)
    assert set(peaks) == set(client.scheduler_info()["workers"])
    assert all(p["host"] > 10 * 2**20 and p["device"] is None for p in peaks.values())


def test_threads_sets_tf_threads_only_inside_the_block():
    before = os.environ.get("TF_NUM_INTRAOP_THREADS")
    with scheduler("threads", tf_threads=3):
        assert os.environ["TF_NUM_INTRAOP_THREADS"] == "3"
    assert os.environ.get("TF_NUM_INTRAOP_THREADS") == before


def _gpu_present() -> bool:
    try:
        from dask_cuda.utils import get_gpu_count

        return get_gpu_count() > 0
    except Exception:
        return False


def test_cuda_without_gpu_names_what_is_missing():
    has_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    if has_dask_cuda and _gpu_present():
        pytest.skip("a GPU and dask-cuda are present")
    with pytest.raises(InvalidParameterError) as e, scheduler("cuda"):
        pass
    assert ("no GPU" if has_dask_cuda else GPU_EXTRA) in str(e.value)


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("gpu", {}, "not one of"),
        ("threads", {"n_workers": 0}, "n_workers is 0"),
        ("processes", {"tf_threads": -1}, "tf_threads is -1"),
        ("tcp://127.0.0.1:1", {"n_workers": 2}, "apply to local clusters"),
    ],
)
def test_bad_scheduler_arguments_are_refused(spec, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match), scheduler(spec, **kwargs):
        pass
