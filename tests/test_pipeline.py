"""The compare pipeline end to end: outputs, equality with in-memory stages, resume, study, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.metrics import structural_similarity

from ptychozarr import inference
from ptychozarr.errors import InvalidParameterError, InvalidScanError, MemoryBudgetError, ModelMismatchError
from ptychozarr.io import open_dataset
from ptychozarr.metrics import registry
from ptychozarr.models import ModelSpec, build_pinn, save_keras
from ptychozarr.pipeline import compare
from ptychozarr.report import METRIC_ORDER
from ptychozarr.study import study

M = 8  # stitch crop of the small scan's 32×32 patterns
FLAGS = {"stitch_crop_size": M, "block_groups": 96, "skip_registration": True, "quiet": True}
CLI_FLAGS = ["--stitch-crop-size", str(M), "--block-groups", "96", "--skip-registration", "--quiet"]


@pytest.fixture(scope="module")
def models(tiny_models):
    """A tiny gridsize-2 PINN and a tiny Baseline for the 32×32 scan (untrained: fixed random weights)."""
    return {"PtychoPINN": tiny_models["pinn"], "Baseline": tiny_models["baseline"]}


@pytest.fixture(scope="module")
def reference(tiny_run, models):
    """One uninterrupted run with the flags the CLI tests use (shared with test_tree.py)."""
    assert {a.label for a in tiny_run.arms} == set(models)
    return tiny_run


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_metrics_csv_has_compare_models_schema_and_order(reference):
    rows = _rows(reference.output_dir / "comparison_metrics.csv")
    assert list(rows[0]) == ["model", "metric", "amplitude", "phase", "value", "registration"]
    assert {r["registration"] for r in rows} == {"unregistered"}  # --skip-registration
    expected = [(m, name) for m in ("PtychoPINN", "Baseline") for name in METRIC_ORDER]
    expected += [("PtychoPINN", "computation_time_s"), ("Baseline", "computation_time_s")]
    expected += [(m, name) for m in ("PtychoPINN", "Baseline") for name in registry.extra_names()]
    assert [(r["model"], r["metric"]) for r in rows] == expected  # compare_models' rows, then the engine's
    for r in rows[:14]:
        assert r["amplitude"] and r["phase"] and r["value"] == ""
    assert all(float(r["value"]) > 0 for r in rows[14:16])
    for key in ("pinn", "baseline"):
        frc = _rows(reference.output_dir / f"{key}_frc_curves.csv")
        assert list(frc[0]) == ["model", "frequency_bin", "amplitude_frc", "phase_frc"]
    with np.load(reference.output_dir / "reconstructions_aligned.npz") as npz:
        assert all(npz[k].dtype != object for k in npz.files)
        assert np.isnan(npz["pinn_offset_dy"])  # registration skipped: NaN, not None
    run = json.loads((reference.output_dir / "run.json").read_text())
    assert {"inputs", "parameters", "versions", "stages", "memory", "model_loads"} <= set(run)
    assert run["inputs"]["test_data"]["sha256"] == reference.run["inputs"]["test_data"]["sha256"]


def _splat(crops, positions, weights):
    """reassemble_position's bilinear splat written plainly with np.add.at, on the object's pixel grid:
    the canvas starts at the whole pixel below the first crop's corner and ends at the last tap."""
    m = crops.shape[1]
    corner = positions[:, ::-1].astype(np.float64) - m / 2  # (row, col) of each crop's first pixel
    origin = np.floor(corner.min(axis=0)).astype(int)
    shape = np.ceil(corner.max(axis=0)).astype(int) + m - origin
    num, den = np.zeros(shape, complex), np.zeros(shape)
    rel = corner - origin
    k = np.floor(rel).astype(int)
    f = rel - k
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        w = (f[:, 0] if dy else 1 - f[:, 0]) * (f[:, 1] if dx else 1 - f[:, 1]) * weights
        r = ii[None] + k[:, 0, None, None] + dy
        c = jj[None] + k[:, 1, None, None] + dx
        ok = (r < shape[0]) & (c < shape[1])  # only zero-weight taps fall outside
        np.add.at(num, (r[ok], c[ok]), (w[:, None, None] * crops)[ok])
        np.add.at(den, (r[ok], c[ok]), np.broadcast_to(w[:, None, None], r.shape)[ok])
    return num / (den + 1e-9), origin


def _plane_removed(phase):
    rows, cols = np.indices(phase.shape)
    design = np.column_stack([cols.ravel(), rows.ravel(), np.ones(phase.size)])
    coef, *_ = np.linalg.lstsq(design, phase.ravel(), rcond=None)
    return phase - (design @ coef).reshape(phase.shape)


def test_results_equal_the_in_memory_composition_of_the_stages(reference, small_npz, models):
    """Inference, stitching, placement and pointwise/SSIM scores redone in memory with numpy/skimage."""
    import keras

    store = zarr.open_group(str(reference.store), mode="r")
    with np.load(small_npz) as f:
        stored = store["data/input_index"][:]  # the store holds the patterns in curve order
        d, x, y = (f[key][stored] for key in ("diffraction", "xcoords", "ycoords"))
        gt_full = f["objectGuess"]
    nn = store["groups/nn_indices"][:]
    f_norm = np.sqrt(
        16**2 * nn.size / (np.bincount(nn.ravel(), minlength=len(d)) @ (d.astype(float) ** 2).sum((1, 2)))
    )
    network = keras.models.load_model(models["PtychoPINN"], compile=False)
    amp, phase = (np.asarray(o)[..., 0] for o in network(np.moveaxis(d[nn], 1, -1) * np.float32(f_norm)))
    lo = 16 - M // 2
    crops = (amp * np.exp(1j * phase))[:, lo : lo + M, lo : lo + M]
    centres = np.stack([x, y], axis=1)[nn].mean(axis=1)
    obj, origin = _splat(crops, centres, np.ones(len(nn)))
    np.testing.assert_allclose(store["arms/pinn/object"][:], obj, rtol=1e-5, atol=1e-6)

    # placement on the ground-truth grid, limited to the scan box with an M//2 margin
    y0, x0 = origin
    rows = slice(
        max(y0, int(centres[:, 1].min()) - M // 2), min(y0 + obj.shape[0], int(centres[:, 1].max()) + M // 2)
    )
    cols = slice(
        max(x0, int(centres[:, 0].min()) - M // 2), min(x0 + obj.shape[1], int(centres[:, 0].max()) + M // 2)
    )
    recon = obj[rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0][2:-2, 2:-2]
    truth = gt_full[rows, cols][2:-2, 2:-2]
    np.testing.assert_allclose(store["scores/pinn/aligned"][:][2:-2, 2:-2], recon, rtol=1e-5, atol=1e-6)

    t, p = np.abs(truth).astype(np.float64), np.abs(recon).astype(np.float64)
    p = p * t.mean() / p.mean()
    pt, pp = _plane_removed(np.angle(truth)), _plane_removed(np.angle(recon))
    got = reference.arms[0].metrics
    eps = np.finfo(np.float64).eps
    for (a, b), part in (((t, p), 0), ((pt, pp), 1)):
        assert got["mae"][part] == pytest.approx(np.mean(np.abs(a - b)), rel=1e-5)
        assert got["mse"][part] == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)
        assert got["psnr"][part] == pytest.approx(
            20 * np.log10(255 / (np.sqrt(np.mean((a - b) ** 2)) + eps)), rel=1e-6
        )
    assert got["ssim"][0] == pytest.approx(
        structural_similarity(t, p, data_range=t.max() - t.min()), rel=1e-5
    )
    to_unit = lambda v: (v + np.pi) / (2 * np.pi)  # noqa: E731
    assert got["ssim"][1] == pytest.approx(
        structural_similarity(to_unit(pt), to_unit(pp), data_range=1.0), rel=1e-5
    )


def test_covered_pixels_are_those_a_crop_reaches(reference):
    """The scored crop's covered pixels equal the union of the crops' footprints, from the group centres."""
    from ptychozarr.models.demo import covered_pixels

    store = zarr.open_group(str(reference.store), mode="r")
    corner = store["groups/centres"][:][:, ::-1] - M / 2  # (row, col) of each crop's first pixel
    rows, cols = store["scores/pinn/object_y"][:], store["scores/pinn/object_x"][:]
    want = np.zeros((len(rows), len(cols)), bool)
    for first, last in zip(np.floor(corner).astype(int), np.ceil(corner).astype(int) + M - 1, strict=True):
        want[np.ix_((rows >= first[0]) & (rows <= last[0]), (cols >= first[1]) & (cols <= last[1]))] = True
    got = covered_pixels(reference.store, "pinn")
    np.testing.assert_array_equal(got, want)
    assert not got.all()  # the scan box has corners no crop reaches


def test_baseline_predicts_each_distinct_pattern_once(reference):
    store = zarr.open_group(str(reference.store), mode="r")
    weights = store["arms/baseline/patches/weights"][:]
    nn = store["groups/nn_indices"][:]
    assert len(weights) == len(np.unique(nn))
    assert weights.sum() == nn.size


def _cli(args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ptychozarr", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _compare_args(npz, models, out):
    return ["compare", "--test-data", npz, "--pinn-model", models["PtychoPINN"],
            "--baseline-model", models["Baseline"], "--output-dir", out, *CLI_FLAGS]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 30, 90])
def test_a_killed_run_resumes_to_identical_outputs(kill_after, reference, small_npz, models, tmp_path):
    killed = _cli(
        _compare_args(small_npz, models, tmp_path), env={"PTYCHOZARR_KILL_AFTER_TASKS": str(kill_after)}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "comparison_metrics.csv").exists()
    resumed = _cli(_compare_args(small_npz, models, tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert "ingest" in run["reused"]
    strip = lambda rows: [r for r in rows if r["metric"] != "computation_time_s"]  # noqa: E731
    assert strip(_rows(tmp_path / "comparison_metrics.csv")) == strip(
        _rows(reference.output_dir / "comparison_metrics.csv")
    )
    ours, theirs = (
        zarr.open_group(str(p / "store.zarr"), mode="r") for p in (tmp_path, reference.output_dir)
    )
    for arm in ("pinn", "baseline"):
        for name in (f"arms/{arm}/object", f"scores/{arm}/aligned"):
            np.testing.assert_array_equal(ours[name][:], theirs[name][:])


def test_decoded_chunks_are_freed_once_the_arms_are_inferred(small_npz, models, tmp_path, monkeypatch):
    # blocks of 8 groups read parts of chunks, through the cache; nothing of it is left for later stages
    cache = inference._ChunkCache(inference.CHUNK_CACHE_BYTES)
    monkeypatch.setattr(inference, "_CHUNKS", cache)
    compare(small_npz, models, output_dir=tmp_path, **{**FLAGS, "block_groups": 8})
    assert cache.decoded > 0
    assert not cache._items


@pytest.mark.slow
def test_a_finished_run_imports_no_tensorflow_and_redraws_nothing(small_npz, models, tmp_path):
    first = _cli(_compare_args(small_npz, models, tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    plot = tmp_path / "comparison_plot.png"
    drawn = plot.stat().st_mtime_ns
    measured = json.loads((tmp_path / "run.json").read_text())["stage_memory"]
    assert {"ingest", "plan", "infer:pinn", "stitch:pinn", "score:pinn", "report"} <= set(measured)
    args = map(str, _compare_args(small_npz, models, tmp_path))
    again = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ptychozarr", *args], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [line for line in again.stderr.splitlines() if "|" in line]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in lines}
    assert "ptychozarr" in imported and not {"tensorflow", "keras"} & imported
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["model_loads"] == {"client": 0}
    assert {"infer:pinn", "stitch:baseline", "score:pinn", "report"} <= set(run["reused"])
    assert plot.stat().st_mtime_ns == drawn


@pytest.mark.slow
def test_bad_flags_exit_2_with_one_line(small_npz, models, tmp_path):
    cases = [
        (["--stitch-crop-size", "7"], "--stitch-crop-size"),
        (["--block-groups", "many"], "--block-groups"),
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--ptychi-recon", tmp_path / "absent.npz"], "--ptychi-recon"),
    ]
    for extra, needle in cases:
        out = tmp_path / needle.strip("-")
        done = _cli([*_compare_args(small_npz, models, out), *extra])
        assert done.returncode == 2, done.stderr
        message = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(message) == 1 and needle in message[0], done.stderr
        assert not (out / "store.zarr" / "arms").exists()
    missing = _cli(["compare", "--test-data", tmp_path / "none.npz", "--output-dir", tmp_path / "x"])
    assert missing.returncode == 2 and "--test-data" in missing.stderr


def test_model_of_other_patch_size_is_refused_before_any_work(small_npz, tmp_path):
    spec = ModelSpec("pinn", 64, 2, False, None, "amp_phase", name="n64")
    wrong = save_keras(build_pinn(64, 2, filters=2, depth=1), spec, tmp_path / "n64")
    with pytest.raises(ModelMismatchError, match="64×64"):
        compare(small_npz, {"PtychoPINN": wrong}, output_dir=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "store.zarr").exists()
    with pytest.raises(InvalidParameterError, match="does not exist"):
        compare(small_npz, {"PtychoPINN": tmp_path / "nope.keras"}, output_dir=tmp_path / "out", quiet=True)


@pytest.mark.slow
def test_memory_budget_refuses_before_writing_and_a_fitting_one_holds(small_npz, models, reference, tmp_path):
    with pytest.raises(MemoryBudgetError, match="--memory-budget"):
        compare(small_npz, models, output_dir=tmp_path / "small", memory_budget="50MB", **FLAGS)
    assert not (tmp_path / "small" / "store.zarr").exists()
    projected = reference.run["memory"]["projected"]["peak"]
    budget = int(projected * 1.1)
    done = _cli([*_compare_args(small_npz, models, tmp_path / "fits"), "--memory-budget", str(budget)])
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "fits" / "run.json").read_text())
    assert run["memory"]["measured"]["peak"] < budget


@pytest.mark.slow
def test_iterative_arm_is_imported_aligned_and_reported(small_npz, models, reference, tmp_path):
    gt = open_dataset(reference.store)["objectGuess"].values
    recon = np.roll(gt, (1, -2), axis=(0, 1)).astype(np.complex64)
    path = tmp_path / "ptychi.npz"
    np.savez(
        path, reconstructed_object=recon, algorithm=np.array("ePIE"), reconstruction_time=np.float64(12.5)
    )
    result = compare(small_npz, models, output_dir=tmp_path / "out", ptychi_recon=path,
                     **(FLAGS | {"skip_registration": False, "register_ptychi_only": True}))  # fmt: skip
    labels = [a.label for a in result.arms]
    assert labels == ["PtychoPINN", "Baseline", "PtyChi"]
    rows = _rows(tmp_path / "out" / "comparison_metrics.csv")
    offsets = {r["metric"]: float(r["value"]) for r in rows if r["metric"].startswith("registration_")}
    # an object of objectGuess's shape is in the whole-object frame: placed pixel for pixel, so the
    # registration measures the roll alone (the offset that undoes it)
    assert offsets == pytest.approx({"registration_offset_dy": -1.0, "registration_offset_dx": 2.0}, abs=0.05)
    assert [a.registration for a in result.arms] == ["unregistered", "unregistered", "registered"]
    assert {r["registration"] for r in rows if r["model"] == "PtyChi"} == {"registered"}
    store = zarr.open_group(str(result.store), mode="r")
    boxes = {store[f"scores/{a.key}/{name}"].shape for a in result.arms for name in ("aligned", "aligned_gt")}
    assert len(boxes) == 1  # registered and unregistered arms scored on one box
    assert [r["model"] for r in rows if r["metric"].startswith("registration_")] == ["PtyChi", "PtyChi"]
    times = {r["model"]: r["value"] for r in rows if r["metric"] == "computation_time_s"}
    assert float(times["PtyChi"]) == 12.5
    assert (tmp_path / "out" / "ptychi_frc_curves.csv").exists()
    assert result.arms[2].metrics["ssim"][0] > 0.95  # a shifted copy of the truth, registered back


@pytest.mark.slow
def test_an_iterative_arm_in_the_whole_object_frame_scores_like_one_in_the_scan_frame(small_npz, tmp_path):
    from ptychozarr.align import gt_crop_box

    with np.load(small_npz) as f:
        gt = f["objectGuess"]
    rng = np.random.default_rng(3)
    noisy = (gt + 0.05 * (rng.standard_normal(gt.shape) + 1j * rng.standard_normal(gt.shape))).astype(
        np.complex64
    )
    flags = FLAGS | {"save_npz": False, "save_npz_aligned": False}
    np.savez(tmp_path / "whole.npz", reconstructed_object=noisy)
    whole = compare(
        small_npz, {}, output_dir=tmp_path / "whole", ptychi_recon=tmp_path / "whole.npz", **flags
    )
    centres = zarr.open_group(str(whole.store), mode="r")["groups/centres"][:]
    rows, cols = gt_crop_box(centres, M, gt.shape)
    np.savez(tmp_path / "scan.npz", reconstructed_object=noisy[rows, cols])
    scan = compare(small_npz, {}, output_dir=tmp_path / "scan", ptychi_recon=tmp_path / "scan.npz", **flags)
    got, want = whole.arms[0].metrics, scan.arms[0].metrics
    for name in METRIC_ORDER:
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    assert 0.1 < got["ssim"][0] < 0.99  # scored on the truth's own pixels, not a trivial copy
    stores = [zarr.open_group(str(r.store), mode="r")["scores/ptychi/aligned"] for r in (whole, scan)]
    assert [s.attrs["frame"] for s in stores] == ["object", "scan"]
    np.testing.assert_array_equal(stores[0][:], stores[1][:])

    np.savez(tmp_path / "neither.npz", reconstructed_object=noisy[: gt.shape[0] // 3, : gt.shape[1] // 3])
    with pytest.raises(InvalidScanError, match="fits neither"):
        compare(
            small_npz, {}, output_dir=tmp_path / "neither", ptychi_recon=tmp_path / "neither.npz", **flags
        )
    assert not (tmp_path / "neither" / "store.zarr").exists()  # refused before any work


@pytest.mark.slow
def test_a_registration_without_a_clear_peak_is_refused_and_the_arm_scored_unregistered(small_npz, tmp_path):
    with np.load(small_npz) as f:
        shape = f["objectGuess"].shape
    rng = np.random.default_rng(5)
    noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    np.savez(tmp_path / "noise.npz", reconstructed_object=noise)
    flags = FLAGS | {"skip_registration": False, "save_npz": False, "save_npz_aligned": False}
    result = compare(small_npz, {}, output_dir=tmp_path / "out", ptychi_recon=tmp_path / "noise.npz", **flags)
    (arm,) = result.arms
    assert arm.registration.startswith("rejected: ") and arm.offset is None and arm.metrics is not None
    rows = _rows(tmp_path / "out" / "comparison_metrics.csv")
    assert {r["registration"] for r in rows} == {arm.registration}
    assert not [r for r in rows if r["metric"].startswith("registration_")]
    assert [w for w in result.run["warnings"] if "registration refused" in w]
    aligned = zarr.open_group(str(result.store), mode="r")["scores/ptychi/aligned"]
    assert aligned.attrs["registration"]["accepted"] is False
    assert aligned.attrs["registration"]["confidence"] < 0.6


@pytest.mark.slow
def test_study_keeps_rows_of_a_missing_arm_and_reuses_finished_runs(small_npz, models, tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(
        f"""
output_dir = "out"
[compare]
stitch_crop_size = {M}
block_groups = 96
skip_registration = true

[[run]]
name = "full"
dose = 1000
view = "dense"
split = "test"
test_data = "{small_npz}"
pinn_model = "{models["PtychoPINN"]}"
baseline_model = "{models["Baseline"]}"

[[run]]
name = "no-baseline"
dose = 1000
view = "sparse"
split = "test"
test_data = "{small_npz}"
pinn_model = "{models["PtychoPINN"]}"
baseline_model = "{tmp_path / "missing.keras"}"
"""
    )
    assert tomllib.loads(config.read_text())["run"][1]["name"] == "no-baseline"
    runs = {r.name: r for r in study(config, quiet=True)}
    assert runs["full"].status == "ok"
    assert runs["no-baseline"].status == "partial"
    out = tmp_path / "out"
    summary = json.loads((out / "metrics_summary.json").read_text())
    jobs = {
        (j["view"], j["split"]): {(m["model"], m["metric"]): m for m in j["metrics"]} for j in summary["jobs"]
    }
    assert jobs["sparse", "test"]["Baseline", "mae"] == {
        "model": "Baseline",
        "metric": "mae",
    }  # empty row kept
    assert jobs["sparse", "test"]["PtychoPINN", "mae"]["amplitude"] > 0
    deltas = _rows(out / "study_deltas.csv")
    assert len(deltas) == 2 * len(registry.metrics()) * 2
    full = [r for r in deltas if r["run"] == "full" and r["metric"] == "mae" and r["part"] == "amplitude"][0]
    pinn, base = (jobs["dense", "test"][k, "mae"]["amplitude"] for k in ("PtychoPINN", "Baseline"))
    assert float(full["pinn_minus_baseline"]) == pytest.approx(pinn - base, abs=1e-6)
    assert all(r["pinn_minus_baseline"] == "" for r in deltas if r["run"] == "no-baseline")
    assert (out / "study_deltas.md").read_text().startswith("| run |")
    manifest = json.loads((out / "comparison_manifest.json").read_text())
    assert [e["returncode"] for e in manifest["execution_results"]] == [0, 0]
    study(config, quiet=True)
    rerun = json.loads((out / "dose_1000" / "dense" / "test" / "run.json").read_text())
    assert {"ingest", "infer:pinn", "stitch:pinn", "score:pinn"} <= set(rerun["reused"])


@pytest.mark.slow
def test_local_cluster_gives_identical_objects_and_loads_each_model_once_per_worker(
    small_npz, models, reference, tmp_path
):
    result = compare(small_npz, models, output_dir=tmp_path, scheduler="processes", n_workers=2, **FLAGS)
    ours, theirs = (zarr.open_group(str(p), mode="r") for p in (result.store, reference.store))
    for arm in ("pinn", "baseline"):
        np.testing.assert_array_equal(ours[f"arms/{arm}/object"][:], theirs[f"arms/{arm}/object"][:])
    workers = {k: v for k, v in result.run["model_loads"].items() if k != "client"}
    assert len(workers) == 2
    assert all(1 <= loads <= len(models) for loads in workers.values())


# -- one configuration, early refusals, the lock, per-block resume, Ctrl-C --------------------------


def _one_error_line(capsys, argv, needle) -> str:
    from ptychozarr.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ptychozarr")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_early_refusals_exit_2_before_any_work(small_npz, models, tmp_path, capsys):
    out = tmp_path / "out"
    base = _compare_args(small_npz, models, out)
    _one_error_line(capsys, [*base, "--stitch-crop-size", "40"], "--stitch-crop-size 40")  # M > N = 32
    no_key, real = tmp_path / "no_key.npz", tmp_path / "real.npz"
    np.savez(no_key, object=np.ones((4, 4), np.complex64))
    np.savez(real, reconstructed_object=np.ones((4, 4), np.float32))
    _one_error_line(capsys, [*base, "--ptychi-recon", no_key], "no 'reconstructed_object'")
    _one_error_line(capsys, [*base, "--ptychi-recon", real], "2-D complex")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "wts.h5.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    line = _one_error_line(capsys, [*base, "--model", f"Other={bundle}"], "--trust-bundle")
    assert "unpickl" in line
    hint = _one_error_line(capsys, [*base, "--stich-crop-size", "8"], "--stich-crop-size")
    assert "'--stitch-crop-size'" in hint
    assert not (out / "store.zarr").exists()

    out.mkdir()
    (out / ".ptychozarr.lock").write_text(
        json.dumps({"pid": os.getpid(), "started": "2999-01-01T00:00:00+00:00"})
    )
    _one_error_line(capsys, base, f"in use by process {os.getpid()}")
    assert not (out / "store.zarr").exists()

    config = tmp_path / "study.toml"
    config.write_text(
        f'[compare]\nstich_crop_size = {M}\n[[run]]\nname = "a"\ndose = 1000\nview = "dense"\n'
        f'split = "test"\ntest_data = "{small_npz}"\n'
        f'pinn_model = "{models["PtychoPINN"]}"\n'
    )
    line = _one_error_line(capsys, ["study", config], "'stich_crop_size'")
    assert "did you mean 'stitch_crop_size'" in line
    assert not (tmp_path / "study_out").exists()


@pytest.mark.slow
def test_an_inference_killed_mid_way_redoes_only_the_unfinished_blocks(
    reference, small_npz, models, tmp_path
):
    args = _compare_args(small_npz, models, tmp_path)
    killed = _cli(args, env={"PTYCHOZARR_KILL_AFTER_BLOCKS": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")["arms/pinn/patches/done"][:]
    assert 2 <= done.sum() < len(done)
    resumed = _cli(args)  # the dead run's lock is stale and taken over
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not [line for line in resumed.stderr.splitlines() if line.startswith("ptychozarr")]  # --quiet
    run = json.loads((tmp_path / "run.json").read_text())
    blocks = run["blocks"]["infer:pinn"]
    assert blocks == {"computed": len(done) - done.sum(), "reused": done.sum()}
    assert run["blocks"]["infer:baseline"]["reused"] == 0
    assert {"ingest", "group"} <= set(run["reused"])
    stages = run["stages"]
    assert sum(v for k, v in stages.items() if k != "total") == pytest.approx(stages["total"], abs=0.01)
    ours, theirs = (
        zarr.open_group(str(p / "store.zarr"), mode="r") for p in (tmp_path, reference.output_dir)
    )
    for arm in ("pinn", "baseline"):
        for name in (f"arms/{arm}/patches/patches", f"arms/{arm}/object", f"scores/{arm}/aligned"):
            np.testing.assert_array_equal(ours[name][:], theirs[name][:])
    assert not (tmp_path / ".ptychozarr.lock").exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130_with_the_lock_released(small_npz, models, tmp_path):
    import time

    args = ["compare", "--test-data", small_npz, "--pinn-model", models["PtychoPINN"],
            "--output-dir", tmp_path, *CLI_FLAGS]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptychozarr", *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    started = tmp_path / "store.zarr" / "arms" / "pinn" / "patches"
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("ptychozarr")]
    assert lines == ["ptychozarr compare: interrupted; run the same command to resume"], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / ".ptychozarr.lock").exists()
    assert "comparison_metrics.csv" not in os.listdir(tmp_path)


@pytest.mark.slow
def test_an_ingested_store_gives_the_csv_of_its_npz(reference, small_store, models, tmp_path):
    import shutil

    store = shutil.copytree(small_store, tmp_path / "scan.zarr")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / ".ptychozarr.lock").write_text(
        json.dumps({"pid": int(dead.stdout), "started": "2000-01-01T00:00:00+00:00"})
    )  # a stale lock, taken over
    result = compare(store, models, output_dir=out, **FLAGS)
    strip = lambda rows: [r for r in rows if r["metric"] != "computation_time_s"]  # noqa: E731
    assert strip(_rows(out / "comparison_metrics.csv")) == strip(
        _rows(reference.output_dir / "comparison_metrics.csv")
    )
    assert result.store == out / "store.zarr"


def test_without_ground_truth_a_run_writes_reconstructions_and_plot_but_no_csv(
    small_npz, models, tmp_path, caplog
):
    with np.load(small_npz) as f:
        members = {k: f[k] for k in f.files if k != "objectGuess"}
    scan = tmp_path / "no_truth.npz"
    np.savez(scan, **members)
    with caplog.at_level("WARNING", logger="ptychozarr"):
        result = compare(scan, models, output_dir=tmp_path / "out", **FLAGS)
    names = set(os.listdir(tmp_path / "out"))
    assert "comparison_metrics.csv" not in names and "reconstructions_aligned.npz" not in names
    assert {"comparison_plot.png", "reconstructions.npz", "run.json"} <= names
    assert [r for r in caplog.records if "no objectGuess" in r.getMessage()]
    assert set(result.objects) == {"PtychoPINN", "Baseline"}


def test_the_store_has_named_dimensions_and_consolidated_metadata(reference):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_consolidated(str(reference.store), mode="r")
    for arm in ("pinn", "baseline"):
        for name, dims in (
            (f"arms/{arm}/patches/patches", ("patch", "crop_y", "crop_x")),
            (f"arms/{arm}/patches/done", ("block",)),
            (f"arms/{arm}/object", ("object_y", "object_x")),
            (f"scores/{arm}/aligned", ("object_y", "object_x")),
            (f"scores/{arm}/aligned_gt", ("object_y", "object_x")),
        ):
            assert root[name].metadata.dimension_names == dims
