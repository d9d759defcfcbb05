"""compare_models' command line, as written, runs ``ptychozarr compare`` and leaves its files and keys."""

import json
import logging
import shutil

import numpy as np
import pytest

from ptychozarr.cli import _build_parser, _console_level, _models, main
from ptychozarr.config import CompareConfig, ScanOptions, given_options

# every flag of compare_models' argparse (PtychoPINN scripts/compare_models.py parse_args), with a value
COMPARE_MODELS_ARGV = [
    "--pinn_dir", "gs2", "--baseline_dir", "gs1", "--test_data", "patched_test.npz", "--output_dir", "out",
    "--p_min", "5", "--p_max", "95",
    "--pinn_phase_vmin", "-3", "--pinn_phase_vmax", "3",
    "--baseline_phase_vmin", "-2", "--baseline_phase_vmax", "2",
    "--skip-registration", "--register-ptychi-only", "--save-npz", "--no-save-npz-aligned",
    "--phase-align-method", "mean", "--frc-sigma", "0.5", "--save-debug-images", "--ms-ssim-sigma", "1.0",
    "--n-test-groups", "64", "--n-test-subsample", "64", "--test-subsample-seed", "7",
    "--tike_recon_path", "ptychi_reconstruction.npz", "--stitch-crop-size", "8", "--fixed-canvas",
    "--baseline-debug-limit", "10", "--baseline-debug-dir", "dbg",
    "--baseline-chunk-size", "256", "--baseline-predict-batch-size", "16",
    "--pinn-chunk-size", "128", "--pinn-predict-batch-size", "15",
    "--quiet", "--console-level", "WARNING",
]  # fmt: skip
# the study's command (fly64 dose/overlap Phase G), on tiny data
STUDY_ARGV = [
    "compare", "--pinn_dir", "gs2", "--baseline_dir", "gs1", "--test_data", "patched_test.npz",
    "--output_dir", "out", "--ms-ssim-sigma", "1.0", "--tike_recon_path", "ptychi_reconstruction.npz",
    "--register-ptychi-only", "--baseline-chunk-size", "256", "--baseline-predict-batch-size", "16",
]  # fmt: skip


def _config(argv):
    args = _build_parser().parse_args(["compare", *argv])
    return args, CompareConfig.from_options(
        args.test_data, _models(args), args.output_dir, args.ptychi_recon, given_options(args), where="flag"
    )


def test_every_compare_models_flag_is_accepted_with_its_meaning():
    args, config = _config(COMPARE_MODELS_ARGV)
    assert [p.name for _, p in config.models] == ["gs2", "gs1"]
    assert config.test_data.name == "patched_test.npz" and config.output_dir.name == "out"
    assert config.ptychi_recon.name == "ptychi_reconstruction.npz"
    assert (config.scan.n_test_groups, config.scan.n_test_subsample, config.scan.subsample_seed) == (
        64,
        64,
        7,
    )
    out = config.output
    assert (out.p_min, out.p_max) == (5.0, 95.0)
    assert (out.pinn_phase_vmin, out.pinn_phase_vmax, out.baseline_phase_vmin, out.baseline_phase_vmax) == (
        -3.0, 3.0, -2.0, 2.0,
    )  # fmt: skip
    assert out.save_npz and not out.save_npz_aligned
    score = config.score
    assert score.skip_registration and score.register_ptychi_only and score.fixed_canvas
    assert (score.phase_align_method, score.frc_sigma, score.ms_ssim_sigma) == ("mean", 0.5, 1.0)
    assert config.infer.stitch_crop_size == 8 and config.run.quiet
    assert args.save_debug_images and args.baseline_debug_limit == 10 and args.baseline_chunk_size == 256
    assert _console_level(args) == logging.ERROR  # --quiet wins, as in compare_models


def test_legacy_spellings_and_the_dashed_ones_are_the_same_options():
    _, legacy = _config(["--test-data", "a.npz", "--output-dir", "o", "--n-test-images", "30",
                         "--subsample-seed", "3"])  # fmt: skip
    assert (legacy.scan.n_test_groups, legacy.scan.n_test_subsample, legacy.scan.subsample_seed) == (
        30,
        None,
        3,
    )
    _, legacy = _config(["--test-data", "a.npz", "--output-dir", "o", "--n-subsample", "30"])
    assert (legacy.scan.n_test_groups, legacy.scan.n_test_subsample) == (30, 30)
    _, dashed = _config(["--test-data", "a.npz", "--output-dir", "o", "--pinn-dir", "p", "--tike-recon-path",
                         "r.npz", "--p-min", "1"])  # fmt: skip
    assert (
        dashed.models[0][1].name == "p" and dashed.ptychi_recon.name == "r.npz" and dashed.output.p_min == 1
    )


def test_n_test_subsample_and_n_test_groups_stay_apart():
    assert ScanOptions(n_test_groups=40).points == 40  # alone: draws 40 points, one group each
    only = ScanOptions(n_test_subsample=40, subsample_seed=1)
    assert (only.points, only.n_test_groups, only.subsample_seed) == (40, 40, 1)
    assert ScanOptions(n_test_subsample=40, n_test_groups=40).points == 40
    fewer = ScanOptions(n_test_subsample=40, n_test_groups=20)  # 20 groups seeded among 40 points
    assert (fewer.points, fewer.n_test_groups) == (40, 20)
    assert ScanOptions(n_test_subsample=20, n_test_groups=40).points == 20  # more groups: see test_grouping
    assert ScanOptions().points is None


def test_plot_limits_are_checked(capsys):
    for argv, needle in (
        (["--p_min", "90", "--p_max", "10"], "p_min < p_max"),
        (["--p_max", "120"], "[0, 100]"),
        (["--pinn_phase_vmin", "1", "--pinn_phase_vmax", "-1"], "vmin < vmax"),
    ):
        assert main(["compare", "--test_data", "a.npz", "--output_dir", "o", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err


def test_verbose_and_console_level():
    parse = lambda *a: _build_parser().parse_args(["compare", "--test-data", "a", "--output-dir", "o", *a])  # noqa: E731
    assert _console_level(parse()) == logging.INFO
    assert _console_level(parse("--verbose")) == logging.DEBUG
    assert _console_level(parse("--console-level", "WARNING")) == logging.WARNING


def _model_dir(model, folder):
    """A model directory as compare_models takes them: one model file and its sidecar."""
    folder.mkdir()
    for part in model.parent.glob(f"{model.stem}.*"):
        shutil.copy(part, folder / part.name)
    return folder


@pytest.mark.slow
def test_the_study_command_line_runs_as_written(small_npz, tiny_models, tmp_path, monkeypatch, caplog):
    from ptychozarr.models.formats import resolve

    monkeypatch.chdir(tmp_path)
    shutil.copy(small_npz, "patched_test.npz")
    _model_dir(tiny_models["pinn"], tmp_path / "gs2")
    _model_dir(tiny_models["baseline"], tmp_path / "gs1")
    assert resolve(tmp_path / "gs2")[1].suffix == ".keras"
    with np.load(small_npz) as f:
        gt = f["objectGuess"]
    rng = np.random.default_rng(0)
    noisy = gt + 0.05 * (rng.standard_normal(gt.shape) + 1j * rng.standard_normal(gt.shape))
    np.savez(
        "ptychi_reconstruction.npz",
        reconstructed_object=np.roll(noisy, (1, -1), axis=(0, 1)).astype(np.complex64),
        algorithm=np.array("pty-chi"),
        reconstruction_time=np.float64(3.5),
    )
    with caplog.at_level(logging.WARNING, logger="ptychozarr"):
        assert main(STUDY_ARGV) == 0
    said = caplog.text
    assert (
        "--baseline-chunk-size is not needed" in said
        and "--baseline-predict-batch-size is not needed" in said
    )

    out = tmp_path / "out"
    for name in (
        "comparison_metrics.csv", "comparison_plot.png", "pinn_frc_curves.csv", "baseline_frc_curves.csv",
        "reconstructions.npz", "reconstructions_metadata.txt",
        "reconstructions_aligned.npz", "reconstructions_aligned_metadata.txt",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    parts = ("amplitude", "phase", "complex")
    with np.load(out / "reconstructions_aligned.npz") as npz:  # as compare_models' readers load it
        for prefix in ("ptychopinn", "baseline", "ground_truth"):
            for part in parts:
                assert f"{prefix}_{part}" in npz.files, f"{prefix}_{part}"
        for key in ("pinn_offset_dy", "pinn_offset_dx", "baseline_offset_dy", "baseline_offset_dx"):
            assert np.isnan(npz[key])  # --register-ptychi-only: the model arms are not registered
        assert npz["ground_truth_complex"].shape == npz["ptychopinn_complex"].shape
    with np.load(out / "reconstructions.npz") as npz:
        for prefix in ("ptychopinn", "baseline", "ground_truth"):
            for part in parts:
                assert f"{prefix}_{part}" in npz.files
        np.testing.assert_array_equal(npz["ground_truth_complex"], gt.astype(np.complex64))
    rows = (out / "comparison_metrics.csv").read_text()
    assert "PtychoPINN" in rows and "Baseline" in rows and "PtyChi" in rows
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["register_ptychi_only"] is True and run["parameters"]["ms_ssim_sigma"] == 1.0
    assert run["parameters"]["p_min"] == 10.0 and run["parameters"]["p_max"] == 90.0  # recorded

    aligned = (out / "reconstructions_aligned_metadata.txt").read_text()
    assert aligned.startswith("Aligned NPZ File Contents:\n")
    assert "Arrays saved in reconstructions_aligned.npz:" in aligned
    for key in ("ptychopinn_amplitude", "baseline_complex", "ground_truth_phase"):
        assert f"- {key}: (" in aligned
    assert "- pinn_offset_dy: None (not available)" in aligned
    assert "Data saved AFTER registration correction and alignment" in aligned
    before = (out / "reconstructions_metadata.txt").read_text()
    assert before.startswith("NPZ File Contents:\n") and "Arrays saved in reconstructions.npz:" in before
    assert f"- ground_truth_complex: {gt.shape} complex64" in before
    assert "Data saved BEFORE registration correction" in before


def test_aligned_npz_of_differing_crops_has_compare_models_truth_and_each_arms(tmp_path):
    from ptychozarr.report import write_aligned_npz
    from ptychozarr.report.npz import metadata_path

    rng = np.random.default_rng(0)
    a, b, gt_a, gt_b = (rng.standard_normal(s).astype(np.complex64) for s in [(20, 20), (18, 20)] * 2)
    path = write_aligned_npz(tmp_path / "reconstructions_aligned.npz", {"pinn": a, "baseline": b},
                             {"pinn": gt_a, "baseline": gt_b}, offsets={"baseline": (0.5, -1.5)})  # fmt: skip
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["ground_truth_complex"], gt_a)  # the PINN's crop, as compare_models
        np.testing.assert_array_equal(npz["ground_truth_ptychopinn_complex"], gt_a)
        np.testing.assert_array_equal(npz["ground_truth_baseline_complex"], gt_b)
    text = metadata_path(path).read_text()
    assert metadata_path(path).name == "reconstructions_aligned_metadata.txt"
    assert "- ground_truth_amplitude: (20, 20) float32" in text
    assert "- ground_truth_baseline_phase: (18, 20) float32" in text
    assert "- baseline_offset_dy: 0.5 (scalar)" in text and "- pinn_offset_dx: None (not available)" in text


@pytest.mark.slow
def test_n_test_subsample_and_its_seed_draw_the_scan_points(small_npz, tiny_models, tmp_path):
    import zarr

    def run(out, *flags):
        argv = ["compare", "--pinn_dir", str(_model_dir(tiny_models["pinn"], tmp_path / f"{out}-gs2")),
                "--test_data", str(small_npz), "--output_dir", str(tmp_path / out), "--stitch-crop-size", "8",
                "--skip-registration", "--quiet", *flags]  # fmt: skip
        assert main(argv) == 0
        run = json.loads((tmp_path / out / "run.json").read_text())
        centres = zarr.open_group(str(tmp_path / out / "store.zarr"), mode="r")["groups/centres"][:]
        return run["parameters"], centres

    params, one = run("a", "--n-test-subsample", "100", "--test-subsample-seed", "3")
    assert (params["n_test_subsample"], params["n_test_groups"], params["subsample_seed"]) == (100, 100, 3)
    assert len(one) == 100
    _, same = run("b", "--n-subsample", "100", "--subsample-seed", "3")
    np.testing.assert_array_equal(one, same)
    _, other = run("c", "--n-test-subsample", "100", "--test-subsample-seed", "4")
    assert len(other) == 100 and not np.array_equal(one, other)


# compare_models' defaults, as its argparse and its registration state them (reference spec §3.1, §4, §5)
COMPARE_MODELS_DEFAULTS = {
    ("infer", "stitch_crop_size"): 20,
    ("stitch", "canvas"): "ptychopinn",  # reassemble_position's square canvas, a sub-pixel origin
    ("score", "alignment"): "coordinates",  # it centre-crops the canvas and the truth
    ("score", "ms_ssim_sigma"): 1.0,
    ("score", "frc_sigma"): 0.0,
    ("score", "phase_align_method"): "plane",
}


def test_compatibility_mode_sets_compare_models_defaults_and_given_flags_win():
    base = ["--test-data", "s.npz", "--output-dir", "o"]
    _, plain = _config(base)
    _, compat = _config([*base, "--compatibility", "compare_models"])
    for (section, name), value in COMPARE_MODELS_DEFAULTS.items():
        assert getattr(getattr(compat, section), name) == value, name
    assert plain.score.alignment == "placement" and plain.score.max_registration_shift == 10.0
    assert plain.stitch.canvas == "object"
    assert compat.score.max_registration_shift >= 1000  # compare_models applies any shift it measures
    assert compat.options()["compatibility"] == "compare_models"  # what run.json's parameters record

    _, given = _config([*base, "--compatibility", "compare_models", "--alignment", "placement",
                        "--stitch-crop-size", "8", "--max-registration-shift", "3"])  # fmt: skip
    assert (given.score.alignment, given.infer.stitch_crop_size, given.score.max_registration_shift) == (
        "placement", 8, 3.0,
    )  # fmt: skip
    assert given.score.ms_ssim_sigma == 1.0 and given.score.phase_align_method == "plane"
    toml = CompareConfig.from_options("s.npz", {}, "o", options={"compatibility": "compare_models",
                                                                 "frc_sigma": 2})  # fmt: skip
    assert toml.score.frc_sigma == 2.0 and toml.score.alignment == "coordinates"


def test_an_unknown_compatibility_mode_is_one_line(capsys):
    argv = ["compare", "--test-data", "s.npz", "--output-dir", "o", "--compatibility", "compare-model"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compatibility" in err and "'compare_models'" in err


def _scaled_copy(model, folder, scale):
    """A copy of a tiny model whose sidecar gives it an ``intensity_scale``."""
    import dataclasses

    from ptychozarr.models import write_sidecar
    from ptychozarr.models.keras_model import read_sidecar

    folder.mkdir()
    copy = shutil.copy(model, folder / model.name)
    spec, _ = read_sidecar(model)
    write_sidecar(copy, dataclasses.replace(spec, intensity_scale=scale))
    return copy


def _recorded_inputs(monkeypatch):
    """``{model name: [batch, …]}`` of the diffraction every model call of inference receives."""
    from ptychozarr import inference

    calls, original = {}, inference.predict_patches

    class Recording:
        def __init__(self, model):
            self._model, self.spec = model, model.spec

        def predict_batch(self, x, *args, **kwargs):
            calls.setdefault(self.spec.name, []).append(np.array(x))
            return self._model.predict_batch(x, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_patches", lambda m, *a, **k: original(Recording(m), *a, **k))
    return calls


def _as_multiples(batches, raw):
    """Each non-padding pattern the model received, divided by the raw pattern it is (nearest raw pattern
    of the NPZ, after scaling both to unit norm); returns the ratios, one per pattern."""
    fed = np.moveaxis(np.concatenate(batches), -1, 1).reshape(-1, raw.shape[1] * raw.shape[2])
    fed = fed[np.abs(fed).sum(axis=1) > 0]  # the zero rows padding the last batch
    flat = raw.reshape(len(raw), -1).astype(np.float64)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    match = np.argmax(unit(fed) @ unit(flat).T, axis=1)
    ratio = np.linalg.norm(fed, axis=1) / np.linalg.norm(flat[match], axis=1)
    np.testing.assert_allclose(fed, ratio[:, None] * flat[match], rtol=1e-5, atol=1e-6)
    return ratio


@pytest.mark.slow
def test_compatibility_feeds_the_baseline_unscaled_and_recomputes_only_its_inference(
    small_npz, tiny_models, tmp_path, monkeypatch
):
    import zarr

    from ptychozarr.pipeline import compare

    scale = 2.0
    models = {"PtychoPINN": _scaled_copy(tiny_models["pinn"], tmp_path / "pinn", scale),
              "Baseline": _scaled_copy(tiny_models["baseline"], tmp_path / "baseline", scale)}  # fmt: skip
    with np.load(small_npz) as npz:
        raw = npz["diffraction"]
    out = tmp_path / "out"

    def run(**options):
        calls = _recorded_inputs(monkeypatch)
        compare(small_npz, models, output_dir=out, stitch_crop_size=8, skip_registration=True, quiet=True,
                **options)  # fmt: skip
        f = zarr.open_group(str(out / "store.zarr"), mode="r")["groups"].attrs["normaliser"]
        return {name: _as_multiples(batches, raw) / f for name, batches in calls.items()}, json.loads(
            (out / "run.json").read_text()
        )

    def canvas():
        return zarr.open_group(str(out / "store.zarr"), mode="r")["arms/pinn/object"].attrs["canvas"]

    fed, record = run(compatibility="compare_models")
    np.testing.assert_allclose(fed["tiny-baseline"], 1.0, rtol=1e-5)  # the normalised patterns as they are
    np.testing.assert_allclose(fed["tiny-pinn"], scale, rtol=1e-5)  # the PINN keeps its intensity_scale
    assert record["parameters"]["compatibility"] == "compare_models"
    square = canvas()  # reassemble_position's canvas: square, its origin where the positions' mean puts it
    assert square["shape"][0] == square["shape"][1]
    assert not all(float(v).is_integer() for v in square["origin_yx"])

    fed, record = run()
    assert set(fed) == {"tiny-baseline"}  # the PINN's patches are reused, only the Baseline is inferred
    np.testing.assert_allclose(fed["tiny-baseline"], scale, rtol=1e-5)
    blocks = record["blocks"]
    assert blocks["infer:pinn"]["computed"] == 0 and blocks["infer:baseline"]["computed"] > 0
    assert "infer:pinn" in record["reused"]  # its patches; its object is stitched again on the object grid
    assert not {"stitch:pinn", "infer:baseline", "stitch:baseline"} & set(record["reused"])
    assert all(float(v).is_integer() for v in canvas()["origin_yx"])
