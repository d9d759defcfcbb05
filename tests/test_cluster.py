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

from ptychozarr.cluster import GPU_EXTRA, KINDS, Concurrency, SchedulerKind, concurrency, kind, scheduler
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


@pytest.mark.slow
def test_local_cluster_gives_the_threaded_results(client):
    on_cluster = dask.compute(*_workload())
    threaded = dask.compute(*_workload(), scheduler="threads")
    for a, b in zip(on_cluster, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
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


@pytest.mark.slow
def test_workers_get_the_tensorflow_thread_settings(client):
    expected = os.environ.get("TF_NUM_INTRAOP_THREADS", str(max(1, CPU_COUNT // 2)))
    assert set(client.run(_environ, "TF_NUM_INTRAOP_THREADS").values()) == {expected}
    assert set(client.run(_environ, "TF_NUM_INTEROP_THREADS").values()) == {expected}


def test_workers_start_with_the_fixed_mmap_threshold(client):
    # set before the worker process starts, when glibc reads it
    from ptychozarr.memory import MMAP_THRESHOLD

    assert set(client.run(_environ, "MALLOC_MMAP_THRESHOLD_").values()) == {str(MMAP_THRESHOLD)}


@pytest.mark.slow
def test_concurrency_of_each_scheduler(client):
    assert concurrency(client) == Concurrency(2, 1)
    with scheduler("threads", n_workers=3) as none:
        assert none is None and concurrency(none) == Concurrency(1, 3)
        assert dask.config.get("scheduler") == "threads"


@pytest.mark.slow
def test_an_existing_scheduler_address_connects(client):
    with scheduler(client.scheduler.address) as other:
        assert other is not client and concurrency(other) == Concurrency(2, 1)
        assert other.submit(_transform, np.ones((2, 2))).result()[0, 0] == np.sin(1) * 2 + 2


@pytest.mark.slow
def test_worker_peaks_reports_every_worker(client):
    peaks = worker_peaks(client)
    assert set(peaks) == set(client.scheduler_info()["workers"])
    assert all(p["host"] > 10 * 2**20 and p["device"] is None for p in peaks.values())


@pytest.mark.parametrize(
    "spec, name, local_workers, on_gpu, in_process",
    [
        ("threads", "threads", False, False, True),
        ("processes", "processes", True, False, False),
        ("cuda", "cuda", True, True, False),
        ("tcp://127.0.0.1:8786", "address", False, False, False),
        ("tls://scheduler:8786", "address", False, False, False),
    ],
)
def test_each_spec_names_one_kind_that_answers_the_engines_questions(
    spec, name, local_workers, on_gpu, in_process
):
    k = kind(spec)
    assert isinstance(k, SchedulerKind) and k.name == name and k.accepts(spec)
    assert (k.local_workers, k.on_gpu, k.in_process) == (local_workers, on_gpu, in_process)
    assert [other.name for other in KINDS if other.accepts(spec)][0] == name  # the first that accepts


def test_every_registered_kind_answers_every_question(client):
    assert len({k.name for k in KINDS}) == len(KINDS) >= 4
    for k in KINDS:
        assert callable(k.open) and callable(k.accepts) and k.usage
        assert all(isinstance(v, bool) for v in (k.local_workers, k.on_gpu, k.in_process))
        assert not (k.in_process and k.local_workers)  # tasks in this process have no worker children
        conc = k.concurrency(None if k.in_process else client)
        assert isinstance(conc, Concurrency) and conc.tasks >= 1
        with pytest.raises(AttributeError):  # frozen: the registry cannot be changed by a caller
            k.on_gpu = not k.on_gpu  # type: ignore[misc]
    assert kind("threads").concurrency(None) == concurrency(None)
    assert kind("processes").concurrency(client) == concurrency(client) == Concurrency(2, 1)


@pytest.mark.parametrize("spec", ["gpu", "", "Threads", "host:8786", None])
def test_an_unknown_spec_is_refused_in_one_line_naming_every_kind(spec):
    with pytest.raises(InvalidParameterError) as e:
        kind(spec)
    message = str(e.value)
    assert "\n" not in message and f"scheduler {spec!r} is not one of" in message
    assert all(k.usage in message for k in KINDS)


def test_no_module_but_cluster_compares_scheduler_names():
    import pathlib
    import re

    import ptychozarr

    names = "|".join(re.escape(k.name) for k in KINDS)
    compares = rf"scheduler\b[^\n]*(==|!=|\bin\b)\s*[(\[{{]?[^\n]*[\"']({names})[\"']"
    pattern = re.compile(compares + "|client is (not )?None")
    root = pathlib.Path(ptychozarr.__file__).parent
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "cluster.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "branch on cluster.kind(spec) instead:\n" + "\n".join(found)


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


# -- bounded waits: an address nobody listens on, a cluster that loses its last worker --------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nobody_listens_on_is_one_line_after_a_bounded_wait(monkeypatch):
    import time

    from ptychozarr import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1.0)
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError) as e, scheduler(address):
        pass
    assert time.monotonic() - t0 < 10
    message = str(e.value)
    assert f"no dask scheduler answers at {address} within 1.0 s" in message and "\n" not in message


def _slow(block: np.ndarray) -> np.ndarray:
    import time

    time.sleep(0.2)
    return block


def _lose_workers_while_computing(cluster_to_empty) -> None:
    """Compute a slow graph; half a second in, the cluster drops to no workers."""
    timer = threading.Timer(0.5, cluster_to_empty.scale, args=(0,))
    timer.start()
    try:
        da.ones(40, chunks=1).map_blocks(_slow, meta=np.empty(0)).sum().compute()
    finally:
        timer.join()


@pytest.mark.slow
def test_a_local_cluster_without_workers_ends_in_one_line(monkeypatch):
    import time

    from ptychozarr import cluster

    monkeypatch.setattr(cluster, "NO_WORKERS_TIMEOUT", 1.0)
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="has had no workers for 1 s") as e:
        with scheduler("processes", n_workers=1, processes=False) as c:
            _lose_workers_while_computing(c.cluster)
    assert time.monotonic() - t0 < 30 and "\n" not in str(e.value)


@pytest.mark.slow
def test_an_existing_cluster_without_workers_ends_in_one_line(monkeypatch):
    import time

    from distributed import LocalCluster

    from ptychozarr import cluster

    monkeypatch.setattr(cluster, "NO_WORKERS_TIMEOUT", 1.0)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as theirs:
        t0 = time.monotonic()
        with pytest.raises(cluster.ClusterError, match="has had no workers for 1 s"):
            with scheduler(theirs.scheduler_address):
                _lose_workers_while_computing(theirs)
        assert time.monotonic() - t0 < 30


def test_paths_of_a_comparison_are_absolute_before_any_graph_leaves(tmp_path, monkeypatch):
    from ptychozarr.config import CompareConfig

    monkeypatch.chdir(tmp_path)
    config = CompareConfig.from_options("scan.npz", {"PtychoPINN": "m/pinn.keras"}, "out", "../recon.npz")
    assert config.test_data == tmp_path / "scan.npz" and config.output_dir == tmp_path / "out"
    assert config.model_paths["PtychoPINN"] == tmp_path / "m" / "pinn.keras"
    assert config.ptychi_recon == tmp_path.parent / "recon.npz"


def test_compare_with_an_address_nobody_listens_on_exits_2_with_one_line(
    small_npz, tmp_path, capsys, monkeypatch
):
    from ptychozarr import cluster
    from ptychozarr.cli import main

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1.0)
    recon = tmp_path / "recon.npz"
    np.savez(recon, reconstructed_object=np.ones((160, 160), np.complex64))
    address = f"tcp://127.0.0.1:{_free_port()}"
    argv = ["compare", "--test-data", str(small_npz), "--ptychi-recon", str(recon), "--quiet",
            "--output-dir", str(tmp_path / "out"), "--scheduler", address]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"no dask scheduler answers at {address}" in lines[0], err
    assert "Traceback" not in err
    assert os.listdir(tmp_path / "out") == []  # the lock is released; nothing else was written
