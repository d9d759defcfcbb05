"""The report package: CSV schema and registration marking, NPZ round trips, study files, JSON (the figure:
test_figure.py)."""

import csv
import json
import math
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

from ptychozarr.metrics import frc, frc_cutoff, registry
from ptychozarr.report import (
    CSV_COLUMNS,
    METRIC_ORDER,
    ArmResult,
    StudyRun,
    condition_stats,
    deltas,
    format_study_table,
    format_table,
    half_bit_threshold,
    metrics_rows,
    ring_counts,
    run_dir,
    threshold_crossing,
    to_jsonable,
    write_aligned_npz,
    write_frc_curves,
    write_json,
    write_metrics_csv,
    write_reconstructions_npz,
    write_study_outputs,
)
from ptychozarr.report._files import replacing


def _metrics(seed: float) -> dict:
    """A metrics dict shaped like :func:`ptychozarr.metrics.evaluate` output, distinct per seed."""
    names = [m.name for m in registry.metrics()]
    values = {name: (seed + i / 10, seed + i / 10 + 0.05) for i, name in enumerate(names)}
    return values | {"frc": (np.linspace(1, 0, 5), np.linspace(1, 0.2, 5))}


@pytest.fixture
def arms() -> list[ArmResult]:
    return [
        ArmResult("pinn", "PtychoPINN", _metrics(1.0), computation_time_s=2.5),
        ArmResult(
            "baseline", "Baseline", _metrics(2.0), registered=False, registration_note="weak peak (2.1)"
        ),
        ArmResult("ptychi", "PtyChi", _metrics(3.0), offset=(0.4, -1.2), computation_time_s=7.0),
        ArmResult("tike", "Tike"),  # missing: explicit empty rows, not scored
    ]


# --- comparison_metrics.csv, FRC CSVs, console table -------------------------------------------------


def test_metrics_csv_keeps_compare_models_rows_and_marks_registration(arms, tmp_path):
    path = write_metrics_csv(tmp_path / "comparison_metrics.csv", arms)
    frame = pd.read_csv(path, keep_default_na=False)
    assert tuple(frame.columns) == CSV_COLUMNS
    labels = [a.label for a in arms]
    expected = [(lb, m) for lb in labels for m in METRIC_ORDER]
    expected += [("PtyChi", "registration_offset_dy"), ("PtyChi", "registration_offset_dx")]
    expected += [(lb, "computation_time_s") for lb in labels]
    expected += [(lb, m) for lb in labels for m in registry.extra_names()]  # the engine's, after
    hann = ("frc50_hann", "frc1over7_hann", "frc_halfbit_hann", "frc_onebit_hann")
    assert registry.extra_names()[:4] == hann
    assert list(zip(frame["model"], frame["metric"], strict=True)) == expected
    status = dict(zip(frame["model"], frame["registration"], strict=False))
    assert status == {
        "PtychoPINN": "unregistered",
        "Baseline": "rejected: weak peak (2.1)",
        "PtyChi": "registered",
        "Tike": "",
    }
    ssim = frame[(frame["model"] == "PtyChi") & (frame["metric"] == "ssim")].iloc[0]
    assert float(ssim["amplitude"]) == pytest.approx(arms[2].metrics["ssim"][0], abs=1e-6)
    dx = frame[frame["metric"] == "registration_offset_dx"].iloc[0]
    assert float(dx["value"]) == pytest.approx(-1.2) and dx["amplitude"] == ""
    assert (frame[frame["model"] == "Tike"][["amplitude", "phase", "value"]] == "").all().all()


def test_metrics_csv_reads_back_as_ptychopinn_study_summariser_reads_it(arms, tmp_path):
    """Its summariser takes amplitude + phase when both are set, else ``float(value)``: all must parse."""
    path = write_metrics_csv(tmp_path / "comparison_metrics.csv", arms)
    parsed = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["amplitude"].strip() and row["phase"].strip():
                parsed.append((float(row["amplitude"]), float(row["phase"])))
            elif row["value"].strip():
                parsed.append(float(row["value"]))
    # three scored arms, two offsets, two timings
    assert len(parsed) == 3 * len(registry.metrics()) + 2 + 2


def test_frc_curves_csv_pads_the_shorter_curve(tmp_path):
    path = write_frc_curves(tmp_path / "pinn_frc_curves.csv", "PtychoPINN", ([1.0, 0.5, 0.2], [0.9, 0.4]))
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["model", "frequency_bin", "amplitude_frc", "phase_frc"]
    np.testing.assert_allclose(frame["amplitude_frc"], [1.0, 0.5, 0.2])
    assert frame["phase_frc"].isna().tolist() == [False, False, True]


def test_console_table_says_how_each_arm_was_scored(arms):
    text = format_table(arms)
    lines = text.splitlines()
    assert lines[0].split()[-4:] == ["PtychoPINN", "Baseline", "PtyChi", "Tike"]
    registration = next(line for line in lines if line.startswith("registration"))
    assert "unregistered" in registration and "registered (+0.40, -1.20) px" in registration
    assert "rejected" in registration
    assert "Baseline: rejected: weak peak (2.1)" in lines
    ssim = next(line for line in lines if line.startswith("SSIM"))
    assert ssim.split()[-4:] == ["3.3", "/", "3.35", "—"]  # PtyChi amplitude / phase; Tike none
    arms[0].metrics["frc_halfbit_hann"] = (math.nan, 21.5)
    halfbit = next(line for line in format_table(arms).splitlines() if line.startswith("FRC ½-bit, Hann"))
    assert "none / 21.5" in halfbit  # never crosses: none, not the curve's length nor 1e-16


def test_registration_status_is_derived_from_the_offset_when_not_given():
    assert ArmResult("a", "A", {}, offset=(0.0, 0.0)).registration == "registered"
    assert ArmResult("a", "A", {}).registration == "unregistered"
    assert ArmResult("a", "A").registration == ""
    assert ArmResult("a", "A", {}, offset=(1.0, 1.0), registered=True).registration == "registered"


# --- FRC thresholds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 64, 65])
def test_ring_counts_match_the_fftshift_grid_of_the_frc_definition(n):
    """Spec §5.5: ring = round(sqrt(R² + C²)), R, C = arange(n) − floor(n/2), on the whole n×n grid."""
    r = np.arange(n) - n // 2
    rings = np.round(np.sqrt(r[:, None] ** 2 + r[None, :] ** 2)).astype(int)
    counts = ring_counts(n)
    image = np.random.default_rng(n).random((n, n))
    assert counts.size == frc(image, image).size
    np.testing.assert_array_equal(counts, np.bincount(rings.ravel(), minlength=counts.size))


def test_half_bit_threshold_is_one_for_one_pixel_and_tends_to_its_asymptote():
    t = half_bit_threshold([1, 4, 1e12, 0])
    assert t[0] == pytest.approx(1.0, abs=1e-4)
    assert t[1] == pytest.approx((0.2071 + 1.9102 / 2) / (1.2071 + 0.9102 / 2))
    assert t[2] == pytest.approx(0.2071 / 1.2071, abs=1e-5)
    assert np.isnan(t[3])


@pytest.mark.parametrize(
    "curve", [[0.95, 0.72, 0.55, 0.45, 0.20], [0.8, 0.4, 0.2, 0.1], [1.0, 0.9, 0.8], [1.0, 0.6, 0.6, 0.3]]
)
def test_a_constant_threshold_crosses_where_frc_cutoff_does(curve):
    for level in (0.5, 1 / 7):
        assert threshold_crossing(curve, np.full(len(curve), level)) == pytest.approx(
            frc_cutoff(curve, level)
        )


# --- NPZ files ----------------------------------------------------------------------------------------


def _complex(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _parts(npz, prefix, expected):
    np.testing.assert_array_equal(npz[f"{prefix}_complex"], expected)
    np.testing.assert_array_equal(npz[f"{prefix}_amplitude"], np.abs(expected).astype(np.float32))
    np.testing.assert_array_equal(npz[f"{prefix}_phase"], np.angle(expected).astype(np.float32))


def test_reconstructions_npz_holds_canvases_with_their_origin(tmp_path):
    pinn, ptychi, gt = _complex((37, 41), 0), _complex((30, 30), 1), _complex((50, 52), 2)
    stored = zarr.create_array(
        store=str(tmp_path / "a.zarr"), shape=pinn.shape, dtype=pinn.dtype, chunks=(8, 8)
    )
    stored[...] = pinn
    path = write_reconstructions_npz(
        tmp_path / "reconstructions.npz",
        {"pinn": stored, "ptychi": da.from_array(ptychi, chunks=7)},
        {"pinn": (3.5, -2.0)},
        ground_truth=gt,
        slab_bytes=41 * 8 * 3,  # three rows per slab
    )
    with np.load(path) as npz:
        assert not any(npz[k].dtype.hasobject for k in npz.files)
        _parts(npz, "ptychopinn", pinn)
        _parts(npz, "ptychi", ptychi)
        _parts(npz, "ground_truth", gt)
        np.testing.assert_array_equal(npz["ptychopinn_origin"], [3.5, -2.0])
        assert np.isnan(npz["ptychi_origin"]).all()
        np.testing.assert_array_equal(npz["ground_truth_origin"], [0.0, 0.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.zarr",
        "reconstructions.npz",
        "reconstructions_metadata.txt",
    ]


def test_aligned_npz_keeps_each_arms_truth_when_the_crops_differ(tmp_path):
    a, b = _complex((20, 20), 3), _complex((18, 20), 4)
    gt_a, gt_b = _complex((20, 20), 5), _complex((18, 20), 6)
    path = write_aligned_npz(
        tmp_path / "reconstructions_aligned.npz",
        {"pinn": a, "ptychi": b},
        {"pinn": gt_a, "ptychi": gt_b},
        offsets={"ptychi": (0.5, -1.5)},
        origins={"pinn": (4, 4), "ptychi": (5, 4)},
        slab_bytes=20 * 8 * 4,
    )
    with np.load(path) as npz:
        _parts(npz, "ground_truth", gt_a)  # compare_models' key: the first arm's crop
        _parts(npz, "ground_truth_ptychopinn", gt_a)
        _parts(npz, "ground_truth_ptychi", gt_b)
        _parts(npz, "ptychi", b)
        assert np.isnan(npz["pinn_offset_dy"]) and np.isnan(npz["pinn_offset_dx"])
        assert (float(npz["ptychi_offset_dy"]), float(npz["ptychi_offset_dx"])) == (0.5, -1.5)
        np.testing.assert_array_equal(npz["ptychi_origin"], [5, 4])


def test_aligned_npz_writes_one_truth_when_the_crops_are_equal(tmp_path):
    a, b, gt = _complex((20, 20), 3), _complex((20, 20), 4), _complex((20, 20), 5)
    path = write_aligned_npz(
        tmp_path / "aligned.npz",
        {"pinn": a, "baseline": b},
        {"pinn": gt, "baseline": gt.copy()},
        slab_bytes=800,
    )
    with np.load(path) as npz:
        _parts(npz, "ground_truth", gt)
        assert not [
            k for k in npz.files if k.startswith(("ground_truth_ptychopinn", "ground_truth_baseline"))
        ]


def test_temporary_names_are_unique_and_cleaned_up_on_failure(tmp_path):
    target = tmp_path / "x.npz"
    with replacing(target) as one, replacing(target) as two:
        assert one != two and one.suffix == two.suffix == ".npz"
        one.write_text("1")
        two.write_text("2")
    assert target.read_text() == "1"  # the last rename wins; no temporary file is left
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"] and target.read_text() == "1"


# --- study files --------------------------------------------------------------------------------------


def _arm_set(pinn: float, base: float, it: float, *, baseline_scored: bool = True) -> list[ArmResult]:
    """Arms whose every metric is ``value`` (tuple metrics equal in amplitude and phase)."""

    def scores(v):
        return {m: (v, v + 0.01) for m in METRIC_ORDER}

    return [
        ArmResult("pinn", "PtychoPINN", scores(pinn), computation_time_s=1.0),
        ArmResult("baseline", "Baseline", scores(base) if baseline_scored else None),
        ArmResult("ptychi", "PtyChi", scores(it), offset=(0.1, 0.2)),
    ]


@pytest.fixture
def runs(tmp_path) -> list[StudyRun]:
    cond = {"dose": 1000, "view": "dense", "split": "test"}
    return [
        StudyRun(**cond, returncode=0, arms=_arm_set(0.9, 0.5, 0.7), name="s1", repeat="seed1",
                 output_dir=run_dir(tmp_path, 1000, "dense", "test", "seed1")),
        StudyRun(**cond, returncode=0, arms=_arm_set(0.8, 0.6, 0.7), name="s2", repeat="seed2"),
        StudyRun(dose=1000, view="sparse", split="test", returncode=1, name="bad", error="model missing"),
        StudyRun(dose=1e4, view="dense", split="train", returncode=0, arms=_arm_set(0.3, 0.0, 0.4,
                 baseline_scored=False), name="partial"),
    ]  # fmt: skip


def test_run_dir_follows_the_study_layout(tmp_path):
    assert run_dir(tmp_path, 1000, "dense", "test") == tmp_path / "dose_1000" / "dense" / "test"
    assert run_dir(tmp_path, 1e4, "sparse", "train") == tmp_path / "dose_10000" / "sparse" / "train"
    assert (
        run_dir(tmp_path, 500, "dense", "test", "seed2") == tmp_path / "dose_500" / "dense" / "test" / "seed2"
    )


def test_study_manifest_and_summary_follow_ptychopinns_schema(runs, tmp_path):
    written = write_study_outputs(tmp_path, runs)
    manifest = json.loads(written["comparison_manifest"].read_text())
    assert (manifest["n_jobs"], manifest["n_success"], manifest["n_failed"]) == (4, 3, 1)
    assert all(isinstance(manifest[k], int) for k in ("n_jobs", "n_success", "n_failed"))
    for entry, run in zip(manifest["execution_results"], runs, strict=True):
        assert (entry["dose"], entry["view"], entry["split"]) == (run.dose, run.view, run.split)
        assert isinstance(entry["returncode"], int) and entry["returncode"] == run.returncode
    assert manifest["execution_results"][2]["error"] == "model missing"
    assert manifest["execution_results"][0]["output_dir"] == "dose_1000/dense/test/seed1"

    summary = json.loads(written["metrics_summary"].read_text())
    assert (summary["n_jobs"], summary["n_success"], summary["n_failed"]) == (4, 3, 1)
    assert [(j["dose"], j["view"], j["split"]) for j in summary["jobs"]] == [
        (1000, "dense", "test"), (1000, "dense", "test"), (10000.0, "dense", "train")
    ]  # fmt: skip
    for job in summary["jobs"]:
        for row in job["metrics"]:
            assert {"model", "metric"} <= row.keys() <= {"model", "metric", "amplitude", "phase", "value"}
            assert all(isinstance(row[k], float) for k in row.keys() - {"model", "metric"})
    empty = [r for r in summary["jobs"][2]["metrics"] if r["model"] == "Baseline" and r["metric"] == "ssim"]
    assert empty == [{"model": "Baseline", "metric": "ssim"}]
    assert summary["jobs"][0]["registration"]["PtyChi"] == "registered"
    aggregate = summary["aggregate_metrics"]
    assert set(aggregate) == {"PtychoPINN", "Baseline", "PtyChi"}
    pinn_ms = aggregate["PtychoPINN"]["ms_ssim"]
    assert pinn_ms["mean_amplitude"] == pytest.approx(np.mean([0.9, 0.8, 0.3]))
    assert pinn_ms["best_phase"] == pytest.approx(np.max([0.91, 0.81, 0.31]))
    assert set(aggregate["Baseline"]["mae"]) == {"mean_amplitude", "mean_phase"}
    assert aggregate["Baseline"]["mae"]["mean_amplitude"] == pytest.approx(np.mean([0.5, 0.6]))
    markdown = written["metrics_summary_md"].read_text()
    assert "**Total Jobs:** 4" in markdown and "## Aggregate Metrics" in markdown
    assert {p.name for p in tmp_path.iterdir()} >= {"study_deltas.csv", "study_conditions.csv"}


def test_deltas_say_which_side_is_better_for_each_metric():
    names = [m.name for m in registry.metrics()]
    pinn_better = {m: (0.2, 0.2) if m in ("mae", "mse") else (0.9, 0.9) for m in names}
    pinn_worse = {m: (0.9, 0.9) if m in ("mae", "mse") else (0.2, 0.2) for m in names}
    middle = {m: (0.5, 0.5) for m in names}
    run = StudyRun(1, "dense", "test", 0, [
        ArmResult("pinn", "PtychoPINN", pinn_better), ArmResult("baseline", "Baseline", middle),
        ArmResult("tike", "Tike", middle),
    ])  # fmt: skip
    table = deltas([run])
    assert list(dict.fromkeys(table["metric"])) == names
    assert set(table["vs_baseline"]) == {"better"} and set(table["vs_iterative"]) == {"better"}
    assert set(table["iterative_label"]) == {"Tike"}
    lower = table["metric"].isin(["mae", "mse"])
    assert (table.loc[lower, "pinn_minus_baseline"] < 0).all()
    assert (table.loc[~lower, "pinn_minus_baseline"] > 0).all()
    run.arms[0].metrics = pinn_worse
    assert set(deltas([run])["vs_baseline"]) == {"worse"}


def test_condition_stats_are_numpys_mean_and_sample_spread(runs):
    stats = condition_stats(deltas(runs))
    pick = stats[(stats["view"] == "dense") & (stats["split"] == "test") & (stats["metric"] == "ssim")]
    row = pick[(pick["part"] == "amplitude") & (pick["quantity"] == "pinn_minus_baseline")].iloc[0]
    values = np.array([0.9 - 0.5, 0.8 - 0.6])
    assert row["n"] == 2
    assert row["mean"] == pytest.approx(np.mean(values))
    assert row["std"] == pytest.approx(np.std(values, ddof=1))
    assert row["verdict"] == "better"
    single = stats[(stats["split"] == "train") & (stats["quantity"] == "PtychoPINN")].iloc[0]
    assert single["n"] == 1 and math.isnan(single["std"])
    failed = stats[(stats["view"] == "sparse") & (stats["quantity"] == "PtychoPINN")]
    assert (failed["n"] == 0).all()


def test_study_table_shows_spread_verdicts_and_failures(runs):
    lines = format_study_table(runs).splitlines()
    assert lines[0].split()[:4] == ["condition", "runs", "metric", "part"]
    rows = {tuple(line.split()[:4]): line for line in lines[2:] if line.startswith("dose_")}
    repeated = rows[("dose_1000/dense/test", "2", "ms_ssim", "amplitude")]
    # PINN 0.9 and 0.8 against Baseline 0.5 and 0.6: +0.3 ± 0.14 better
    assert repeated.split()[4:] == [
        "0.85",
        "±",
        "0.071",
        "+0.3",
        "±",
        "0.14",
        "better",
        "+0.15",
        "±",
        "0.071",
        "better",
    ]
    single = rows[("dose_10000/dense/train", "1", "mae", "phase")]
    assert single.split()[4:] == ["0.31", "—", "-0.1", "better"]  # no Baseline scores; MAE 0.31 < 0.41
    assert ("dose_10000/dense/train", "1", "ms_ssim", "phase") in rows and len(rows) == 2 * 3 * 2
    assert "2 ok, 1 partial, 1 failed of 4 runs" in lines
    assert "failed: dose_1000/sparse/test bad: model missing" in lines
    only_failed = format_study_table([runs[2]]).splitlines()  # nothing to tabulate: no error
    assert only_failed[-2:] == [
        "0 ok, 0 partial, 1 failed of 1 runs",
        "failed: dose_1000/sparse/test bad: model missing",
    ]


# --- run.json -----------------------------------------------------------------------------------------


def test_write_json_normalises_numpy_paths_nan_and_dataclasses(tmp_path):
    payload = {
        "n": np.int64(3),
        "x": np.float32(0.5),
        "bad": float("nan"),
        "curve": np.array([1.0, np.inf]),
        "path": Path("/a/b"),
        "arm": ArmResult("pinn", "PtychoPINN", offset=(1, 2)),
        1: {"s": {2, 1}},
    }
    path = write_json(tmp_path / "run.json", payload)
    loaded = json.loads(path.read_text())
    assert loaded["n"] == 3 and loaded["x"] == 0.5 and loaded["bad"] is None
    assert loaded["curve"] == [1.0, None] and loaded["path"] == "/a/b" and loaded["1"] == {"s": [1, 2]}
    assert loaded["arm"]["offset"] == [1, 2] and loaded["arm"]["label"] == "PtychoPINN"
    assert to_jsonable(metrics_rows([ArmResult("a", "A")]))[0]["amplitude"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def _slab_peak(workdir: Path, width: int) -> int:
    """tracemalloc's peak while streaming a 512-row Zarr object of ``width`` columns (256² chunks) into
    the NPZ in 1 MiB slabs (after one untraced pass)."""
    import tracemalloc

    from ptychozarr.report.npz import _slabs

    rng = np.random.default_rng(width)
    array = zarr.create_array(store=str(workdir / f"w{width}.zarr"), shape=(512, width), chunks=(256, 256),
                              dtype=np.complex64)  # fmt: skip
    array[:] = (rng.random((512, width)) + 1j * rng.random((512, width))).astype(np.complex64)
    for _ in _slabs(array, 2**20):
        pass
    tracemalloc.start()
    try:
        for _ in _slabs(array, 2**20):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_npz_slabs_of_a_wide_object_hold_one_chunk_not_a_row_of_them(tmp_path):
    # 4× the width: whole chunk rows read at once held a row of decoded chunks (measured 8.2 → 24.8 MB,
    # 3.0×); slabs read one chunk at a time hold one slab and one chunk (3.4 → 3.2 MB)
    narrow, wide = _slab_peak(tmp_path, 1024), _slab_peak(tmp_path, 4096)
    assert wide <= 1.5 * narrow, (narrow, wide)
