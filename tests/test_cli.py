"""The command line: the three foundation subcommands, their help, and errors as exit code 2."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from ptychozarr.cli import main
from ptychozarr.io import open_dataset

SCRIPT = Path(sys.executable).with_name("ptychozarr")


@pytest.mark.parametrize("command", ["simulate", "ingest", "group"])
def test_help_on_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: ptychozarr {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_simulate_ingest_group_through_the_console_script(tmp_path):
    npz, store = tmp_path / "scan.npz", tmp_path / "scan.zarr"
    run = lambda *args: subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, check=True)  # noqa: E731
    run(
        "simulate",
        npz,
        "--n-points",
        60,
        "--patch-size",
        32,
        "--object-size",
        96,
        "--split",
        "test",
        "--stored",
    )
    assert "60 patterns" in run("ingest", npz, store, "--chunk-mb", 0.05).stdout
    out = run("group", store, "--gridsize", 2, "--seed", 3).stdout
    assert "60 groups of 4" in out and "normaliser" in out
    ds = open_dataset(store)
    assert ds.diffraction.data.chunksize[0] == 12  # 0.05 MiB / 4 KiB per pattern
    assert (ds.ycoords.values >= 48).all()


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err
    return err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys, small_npz, small_store):
    (tmp_path / "text.npz").write_text("not a zip")
    _one_line_error(
        capsys, ["ingest", str(tmp_path / "text.npz"), str(tmp_path / "a.zarr")], "not a readable NPZ"
    )
    zarr.open_group(tmp_path / "other.zarr", mode="w")  # a store of something else
    _one_line_error(capsys, ["ingest", str(small_npz), str(tmp_path / "other.zarr")], "already exists")
    _one_line_error(capsys, ["group", str(small_store), "--gridsize", "2", "--k", "3"], "k=3")
    _one_line_error(capsys, ["group", str(tmp_path / "none.zarr")], "no Zarr store")
    _one_line_error(capsys, ["simulate", str(tmp_path / "x.npz"), "--patch-size", "33"], "patch_size=33")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.zarr", "text.npz"]


@pytest.mark.slow
def test_bad_scan_through_the_console_script_leaves_no_store(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        diffraction=np.zeros((4, 8, 8), np.float32),
        xcoords=np.zeros(4),
        ycoords=np.zeros(3),
        probeGuess=np.ones((8, 8), np.complex64),
    )
    done = subprocess.run([SCRIPT, "ingest", bad, tmp_path / "bad.zarr"], capture_output=True, text=True)
    assert done.returncode == 2
    assert (
        done.stderr.strip().count("\n") == 0 and "'ycoords'" in done.stderr and "Traceback" not in done.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_compare_flags_and_study_keys_come_from_one_definition(tmp_path, capsys):
    import dataclasses

    from ptychozarr.cli import _build_parser
    from ptychozarr.config import CompareConfig, given_options, option_names

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in option_names():
        assert "--" + name.replace("_", "-") in help_text
    assert help_text.count("(default:") >= len(option_names())
    argv = ["compare", "--test-data", "s.npz", "--output-dir", "o", "--stitch-crop-size", "12",
            "--block-groups", "64", "--skip-registration", "--no-save-npz",
            "--memory-budget", "2GB"]  # fmt: skip
    args = _build_parser().parse_args(argv)
    from_flags = CompareConfig.from_options("s.npz", {}, "o", options=given_options(args))
    from_toml = CompareConfig.from_options(
        "s.npz", {}, "o",
        options={"stitch_crop_size": 12, "block_groups": 64, "skip_registration": True, "save_npz": False,
                 "memory_budget": "2GB"},
    )  # fmt: skip
    assert from_flags == from_toml
    assert from_toml.infer.stitch_crop_size == 12 and from_toml.run.memory_budget == 2 * 10**9
    assert dataclasses.replace(from_toml.infer, stitch_crop_size=20) == CompareConfig.from_options(
        "s.npz", {}, "o", options={"block_groups": 64}
    ).infer


def test_unknown_keys_and_bad_values_name_the_nearest_valid_one():
    from ptychozarr.config import CompareConfig
    from ptychozarr.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="'block_group'.*did you mean 'block_groups'"):
        CompareConfig.from_options("s.npz", {}, "o", options={"block_group": 8})
    with pytest.raises(InvalidParameterError, match="--phase-align-method 'plan'.*did you mean 'plane'"):
        CompareConfig.from_options("s.npz", {}, "o", options={"phase_align_method": "plan"})
    for key, value in (("batch_size", 0), ("tile", True), ("stitch_crop_size", 7), ("quiet", "yes")):
        with pytest.raises(InvalidParameterError, match="--" + key.replace("_", "-")):
            CompareConfig.from_options("s.npz", {}, "o", options={key: value})


def test_study_help_shows_an_example_toml(capsys):
    import tomllib

    from ptychozarr.study import EXAMPLE

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert EXAMPLE in capsys.readouterr().out
    assert tomllib.loads(EXAMPLE)["compare"]["stitch_crop_size"] == 20


@pytest.mark.slow
def test_import_is_light():
    """``import ptychozarr`` loads none of the heavy libraries (dask, zarr, xarray, pandas, TensorFlow)."""
    code = (
        "import sys, ptychozarr; heavy = {'dask', 'zarr', 'xarray', 'pandas', 'tensorflow'}; "
        "print(sorted(heavy & set(sys.modules))); print(ptychozarr.compare.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[]", "ptychozarr.pipeline"]


def test_every_flag_has_help():
    from ptychozarr.cli import _COMMANDS, _build_parser

    _build_parser()
    for name, command in _COMMANDS.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.fixture
def recon(tmp_path) -> Path:
    """An iterative reconstruction of ``small_npz``'s whole object (a compare without models is fast)."""
    path = tmp_path / "recon.npz"
    np.savez(path, reconstructed_object=np.ones((160, 160), np.complex64))
    return path


def test_quiet_compare_prints_nothing_and_errors_stay_one_line(small_npz, recon, tmp_path, capsys, caplog):
    argv = ["compare", "--test-data", str(small_npz), "--ptychi-recon", str(recon), "--stitch-crop-size", "8",
            "--skip-registration", "--pinn-chunk-size", "64"]  # fmt: skip
    assert main([*argv, "--output-dir", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert "MS-SSIM" in loud.out and "--pinn-chunk-size" in caplog.text  # what --quiet must hold back
    caplog.clear()
    assert main([*argv, "--output-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records if r.levelno < logging.ERROR] == []
    assert (tmp_path / "quiet" / "comparison_metrics.csv").exists()
    bad = [*argv, "--output-dir", str(tmp_path / "bad"), "--quiet", "--tile", "0"]
    _one_line_error(capsys, bad, "--tile")


def _table_cells(out: str, row: str) -> list[tuple[float, float]]:
    """The (amplitude, phase) cells of one row of the printed metrics table, one per arm."""
    line = next(line for line in out.splitlines() if line.startswith(row + "  "))
    cells = re.findall(r"(-?[\d.]+) / (-?[\d.]+)", line[len(row) :])
    return [(float(a), float(p)) for a, p in cells]


@pytest.mark.slow
def test_the_demo_header_names_its_scores_apart_from_the_table(tmp_path, capsys):
    """The header's SSIM (recorded, scikit-image's plain SSIM) is not the table's (compare_models', this run):
    the header gives its own numbers from the file it names, and never calls them the table's "SSIM"."""
    import json

    from ptychozarr.models.demo import SCORES_FILE

    assert main(["demo", "--output-dir", str(tmp_path), "--n-points", "100"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("models:"))
    recorded = json.loads(SCORES_FILE.read_text())
    n = recorded["scan"]["n_points"]
    assert f"recorded in weights/scores.json for the default {n}-point scan" in header
    assert "not the table's compare_models SSIM" in header
    assert header.count("SSIM") == header.count("plain SSIM") + 1  # + the one naming the table's
    pairs = re.findall(r"plain SSIM (\d\.\d\d) / (-?\d\.\d\d)", header)
    printed = [tuple(map(float, pair)) for pair in pairs]
    scores = recorded["scores"]
    assert printed == [
        (round(scores[arm]["ssim_amplitude"], 2), round(scores[arm]["ssim_phase"], 2))
        for arm in ("PtychoPINN", "Baseline", "constant")
    ]
    csv = pd.read_csv(tmp_path / "compare" / "comparison_metrics.csv").query("metric == 'ssim'")
    table = _table_cells(out, "SSIM")  # this run's compare_models SSIM, as its CSV has it
    np.testing.assert_allclose(table, csv[["amplitude", "phase"]].to_numpy(), rtol=5e-4)
