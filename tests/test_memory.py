"""Tests of ptychozarr.memory: projections, budgets and measured peaks."""

import json
import time

import dask
import dask.array as da
import dask.threaded
import numpy as np
import psutil
import pytest
from dask.utils import format_bytes

from ptychozarr.errors import InvalidParameterError, MemoryBudgetError
from ptychozarr.memory import (
    DEFAULT_RESERVED,
    PeakMemory,
    TaskMemoryCallback,
    check,
    choose_block_groups,
    parse_budget,
    plan,
    probe_model,
    process_peaks,
    project_inference,
    project_metrics,
    project_stitch,
    report,
)
from ptychozarr.metrics import evaluate
from ptychozarr.stages.score import HALO
from ptychozarr.stitch import stitch

MB = 10**6
ARGS = dict(batch_size=64, N=128, C=4, M=20, model_probe=50 * MB, reserved=500 * MB, threads=2)


def _traced_peak(func, *args, **kwargs) -> int:
    """Peak bytes numpy allocates while ``func`` runs on dask's synchronous scheduler (tracemalloc), on
    a second call, so that one-time imports and caches stay out of the figure."""
    import tracemalloc

    with dask.config.set(scheduler="synchronous"):
        func(*args, **kwargs)
        tracemalloc.start()
        try:
            func(*args, **kwargs)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def test_metric_projection_covers_a_measured_evaluation():
    """One 512² chunk scored with every metric: the projection is above the measured peak, within 1.5×."""
    rng = np.random.default_rng(0)
    a = (rng.random((512, 512)) * np.exp(1j * rng.random((512, 512)))).astype(np.complex64)
    b = (a + 0.1 * rng.random((512, 512))).astype(np.complex64)
    measured = _traced_peak(evaluate, da.from_array(a, chunks=512), da.from_array(b, chunks=512))
    projected = project_metrics(512, HALO).total
    assert measured <= projected <= 1.5 * measured


def test_stitch_projection_covers_a_measured_one_tile_stitch():
    """One block of 256 crops onto one 256² tile: projected ≥ measured, within 3×."""
    rng = np.random.default_rng(0)
    crops = (rng.random((256, 20, 20)) + 1j * rng.random((256, 20, 20))).astype(np.complex64)
    positions = rng.uniform(0, 200, (256, 2))
    obj = stitch(crops, positions, tile=256, block=256)[0]
    assert obj.numblocks == (1, 1)
    measured = _traced_peak(obj.compute)
    projected = max(t.total for t in project_stitch(256, 256, 20))
    assert measured <= projected <= 3 * measured


def test_projections_grow_with_their_knobs():
    small, big = project_inference(64, 32, 64, 4, 20), project_inference(128, 32, 64, 4, 20)
    assert big.total > small.total and big.knob == "block_groups"
    assert project_stitch(512, 64, 20)[1].total > project_stitch(256, 64, 20)[1].total
    assert project_metrics(512, 5).total > project_metrics(256, 5).total


def test_plan_peak_is_processes_times_baseline_plus_threads_times_largest_task():
    p = plan(block_groups=512, tile=1024, chunk=512, halo=5, processes=3, **ARGS)
    totals = {t.stage: t.total for t in p.tasks}
    assert set(totals) == {"infer", "stitch-splat", "stitch-sum", "metrics"}
    assert p.peak == 3 * (500 * MB + 2 * max(totals.values()))
    assert p.per_process("stitch-sum") == 500 * MB + 2 * totals["stitch-sum"]
    assert plan(block_groups=8, batch_size=8, N=64, C=1, M=16).reserved == DEFAULT_RESERVED
    json.dumps(p.to_dict())


def test_check_refuses_with_the_figure_the_budget_and_a_block_size_that_fits():
    p = plan(block_groups=4096, **ARGS)
    budget = 2 * 10**9
    assert p.peak > budget
    with pytest.raises(MemoryBudgetError) as e:
        check(p, "2GB")
    fits = choose_block_groups(budget, max_groups=4096, **ARGS)
    message = str(e.value)
    assert format_bytes(p.peak) in message and format_bytes(budget) in message
    assert f"--block-groups {fits} fits" in message
    assert plan(block_groups=fits, **ARGS).peak <= budget
    assert check(plan(block_groups=fits, **ARGS), budget).params["block_groups"] == fits


def test_check_names_the_tile_when_stitching_is_the_largest_task():
    p = plan(block_groups=64, tile=4096, **ARGS)
    assert p.largest.stage == "stitch-sum"
    budget = plan(block_groups=64, tile=1024, **ARGS).peak
    with pytest.raises(MemoryBudgetError, match="--tile 1024 fits"):
        check(p, budget)


def test_check_refuses_device_memory_over_its_budget():
    p = plan(block_groups=64, device=3 * 10**9, **ARGS)
    with pytest.raises(MemoryBudgetError, match="lower --batch-size"):
        check(p, "100GB", device_budget="2GB")
    assert check(p, "100GB", device_budget="4GB") is p


def test_choose_block_groups_returns_the_largest_fitting_candidate():
    peak = {b: plan(block_groups=b, **ARGS).peak for b in (512, 1024, 2048, 5216)}
    budget = (peak[1024] + peak[2048]) // 2
    assert choose_block_groups(budget, max_groups=5216, **ARGS) == 1024
    assert choose_block_groups(peak[5216], max_groups=5216, **ARGS) == 5216
    assert choose_block_groups(peak[5216] - 1, max_groups=5216, **ARGS) == 4096


def test_choose_block_groups_refuses_when_one_batch_does_not_fit():
    one_batch = plan(block_groups=64, **ARGS).peak
    with pytest.raises(MemoryBudgetError, match="raise --memory-budget") as e:
        choose_block_groups(one_batch - 1, max_groups=5216, **ARGS)
    assert "--block-groups 64" in str(e.value)


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
    p = plan(block_groups=256, tile=512, **ARGS)
    measured = {"peak": p.peak // 2, "infer": p.per_process("infer"), "device": None, "other": 5}
    r = report(p, measured)
    assert r["ratio"] == {"peak": 0.5, "infer": 1.0}
    assert r["projected"]["stages"]["stitch-splat"]["task"] == p.stage("stitch-splat").total
    json.dumps(r)


def test_process_peaks_reports_host_peak_and_no_device_without_tensorflow_gpu():
    peaks = process_peaks()
    assert peaks["host"] >= 0.99 * psutil.Process().memory_info().rss
    assert peaks["device"] is None or peaks["device"] >= 0
