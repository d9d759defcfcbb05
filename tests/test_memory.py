"""Tests of ptychozarr.memory: plans, budgets, measured peaks, and a run's projection against its
measurement (each stage's own projection is tested against tracemalloc in its module's tests)."""

import json
import time

import dask
import dask.threaded
import numpy as np
import psutil
import pytest
from dask.utils import format_bytes

from ptychozarr.config import parse_budget
from ptychozarr.errors import InvalidParameterError, MemoryBudgetError
from ptychozarr.memory import (
    PeakMemory,
    Plan,
    TaskMemory,
    TaskMemoryCallback,
    check,
    choose_block_groups,
    probe_model,
    process_peaks,
    report,
)
from ptychozarr.stages import stitch as stitch_stage
from ptychozarr.stitch import task_memory as stitch_task_memory

MB = 10**6
ARGS = dict(batch_size=64, tile=1024, threads=2, processes=1)


def _toy(*, block_groups, batch_size, tile, threads, processes):
    """A plan whose inference task grows with the block (1 MB a group) and whose tile task with the tile
    (100 B a pixel), with a 10 MB cache held once per process."""
    tasks = (
        TaskMemory("infer", {"block": block_groups * MB}, "block_groups"),
        TaskMemory("tile", {"sums": 100 * tile * tile}, "tile"),
    )
    params = dict(
        block_groups=block_groups, batch_size=batch_size, tile=tile, threads=threads, processes=processes
    )
    return Plan(tasks, 500 * MB, threads, processes, None, {"cache": 10 * MB}, params, _toy)


def test_plan_peak_is_processes_times_baseline_held_and_threads_times_largest_task():
    p = _toy(block_groups=512, **{**ARGS, "processes": 3})
    assert p.largest.stage == "infer"
    assert p.peak == 3 * (500 * MB + 10 * MB + 2 * 512 * MB)
    assert p.per_process("tile") == 510 * MB + 2 * 100 * 1024**2
    json.dumps(p.to_dict())


def test_check_refuses_with_the_figure_the_budget_and_a_block_size_that_fits():
    p = _toy(block_groups=4096, **ARGS)
    budget = 2 * 10**9
    with pytest.raises(MemoryBudgetError) as e:
        check(p, "2GB")
    fits = choose_block_groups(budget, max_groups=4096, factory=_toy, **ARGS)
    message = str(e.value)
    assert format_bytes(p.peak) in message and format_bytes(budget) in message
    assert f"--block-groups {fits} fits" in message
    assert check(p.with_params(block_groups=fits), budget).peak <= budget
    assert p.with_params(block_groups=2 * fits).peak > budget


def test_check_names_the_tile_when_the_tile_task_is_the_largest():
    p = _toy(block_groups=64, **{**ARGS, "tile": 4096})
    assert p.largest.stage == "tile"
    with pytest.raises(MemoryBudgetError, match="--tile 1024 fits"):
        check(p, p.with_params(tile=1024).peak)
    with pytest.raises(MemoryBudgetError, match="lower --tile"):
        check(Plan(p.tasks, p.reserved), 1)


def test_choose_block_groups_returns_the_largest_fitting_candidate():
    peak = {b: _toy(block_groups=b, **ARGS).peak for b in (512, 1024, 2048, 5216)}
    budget = (peak[1024] + peak[2048]) // 2
    assert choose_block_groups(budget, max_groups=5216, factory=_toy, **ARGS) == 1024
    assert choose_block_groups(peak[5216], max_groups=5216, factory=_toy, **ARGS) == 5216
    assert choose_block_groups(peak[5216] - 1, max_groups=5216, factory=_toy, **ARGS) == 4096
    with pytest.raises(InvalidParameterError, match="max-groups"):
        choose_block_groups(budget, max_groups=0, factory=_toy, **ARGS)


def test_choose_block_groups_refuses_when_one_batch_does_not_fit():
    one_batch = _toy(block_groups=64, **ARGS).peak
    with pytest.raises(MemoryBudgetError, match="raise --memory-budget") as e:
        choose_block_groups(one_batch - 1, max_groups=5216, factory=_toy, **ARGS)
    assert "--block-groups 64" in str(e.value) and "--n-workers" in str(e.value)


def test_stitch_stage_projects_the_task_kinds_of_the_stitch_graph():
    kinds = set(stitch_task_memory(patch_size=8, tile=64, block_patches=16))
    projected = stitch_stage.project_memory(patch_size=8, tile=64, block_patches=16)
    assert set(stitch_stage.TASK_KINDS) == kinds == {t.stage for t in projected}


def test_a_run_measures_each_stage_under_its_projection(small_npz, tmp_path):
    """A threaded compare with one small model: the measured peak RSS of each stage (the whole process
    while its tasks run) and of the run is at most its projection, and at least half of it (the
    reserved baseline, measured, is most of both on so small a scan)."""
    import keras

    from ptychozarr.models import ModelSpec, build_baseline, save_keras
    from ptychozarr.pipeline import compare

    keras.utils.set_random_seed(0)
    spec = ModelSpec("baseline", 32, 1, False, None, "amp_phase", name="tiny-baseline")
    model = save_keras(build_baseline(32, filters=4, depth=2), spec, tmp_path / "baseline")
    result = compare(
        small_npz, {"Baseline": model}, output_dir=tmp_path / "run", stitch_crop_size=8, block_groups=96,
        skip_registration=True, quiet=True,
    )  # fmt: skip
    memory = result.run["memory"]
    ratio = memory["ratio"]  # measured / projected, per stage (inference per arm) and for the run
    assert {"peak", "infer:baseline", *stitch_stage.TASK_KINDS, "metrics"} <= set(ratio)
    assert all(0.5 <= r <= 1 for r in ratio.values()), ratio


def test_parse_budget():
    assert parse_budget("2GB") == 2 * 10**9
    assert parse_budget("1.5GiB") == 3 * 2**29
    assert parse_budget(123) == 123 and parse_budget(None) is None
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(InvalidParameterError, match="--memory-budget"):
            parse_budget(bad)


def test_peak_memory_sees_a_deliberate_allocation():
    with PeakMemory() as pm:
        block = np.ones(200 * MB // 8)
        deadline = time.monotonic() + 20  # wait for the sampler to see it; not a timing assertion
        while pm.peak - pm.baseline < 190 * MB and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert pm.increase >= 190 * MB


def test_probe_model_measures_what_one_call_allocates():
    def predict(x, offsets):
        assert x.shape == (4, 64, 64, 4) and offsets.shape == (4, 1, 2, 4)
        return np.ones(120 * MB // 8)

    assert probe_model(predict, (4, 64, 64, 4), (4, 1, 2, 4)) >= 115 * MB


def test_probe_model_measures_a_keras_model_on_the_cpu():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((64, 64, 4)), keras.layers.Conv2D(64, 3, padding="same")])

    def predict(x):
        return model(x, training=False).numpy()

    output_bytes = 64 * 64 * 64 * 64 * 4  # (64, 64, 64, 64) float32, 64 MiB
    assert probe_model(predict, (64, 64, 64, 4)) >= 0.9 * output_bytes


def _hold(nbytes):
    return np.ones(int(nbytes) // 8)


def _small():
    return 1


def _combine(a, b):
    return a.size + b


def test_task_callback_attributes_memory_to_the_task_stage():
    big = "alloc-block-" + "0123456789abcdef" * 2  # key_split drops the token: "alloc-block"
    fused = "array-stage-two-" + "fedcba9876543210" * 2  # a fused layer holding stage "stage-two"
    dsk = {big: (_hold, 150 * MB), "small-1": (_small,), fused: (_combine, big, "small-1")}
    with TaskMemoryCallback(stages=("alloc", "stage-two")) as cb:
        dask.threaded.get(dsk, fused, num_workers=1)
    assert set(cb.by_stage) == {"alloc", "small", "stage-two"}
    assert cb.by_stage["alloc"]["increase"] >= 145 * MB
    assert cb.by_stage["small"]["increase"] < 50 * MB
    assert cb.peaks()["alloc"] >= cb.by_stage["alloc"]["increase"]
    assert all(r["tasks"] == 1 for r in cb.by_stage.values())


def test_report_puts_measured_beside_projected():
    p = _toy(block_groups=256, **ARGS)
    measured = {"peak": p.peak // 2, "infer:a": p.per_process("infer"), "device": None, "other": 5}
    r = report(p, measured)
    assert r["ratio"] == {"peak": 0.5, "infer:a": 1.0}
    assert r["projected"]["stages"]["tile"]["task"] == p.stage("tile").total
    assert r["projected"]["held"] == {"cache": 10 * MB}
    json.dumps(r)


def test_process_peaks_reports_host_peak_and_no_device_without_tensorflow_gpu():
    peaks = process_peaks()
    assert peaks["host"] >= 0.99 * psutil.Process().memory_info().rss
    assert peaks["device"] is None or peaks["device"] >= 0
