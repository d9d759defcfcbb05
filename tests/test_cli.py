"""The command line: the three foundation subcommands, their help, and errors as exit code 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptychozarr.cli import main
from ptychozarr.io import open_dataset

SCRIPT = Path(sys.executable).with_name("ptychozarr")


@pytest.mark.parametrize("command", ["simulate", "ingest", "group"])
def test_help_on_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: ptychozarr {command}" in capsys.readouterr().out


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
    _one_line_error(capsys, ["ingest", str(small_npz), str(small_store)], "already exists")
    _one_line_error(capsys, ["group", str(small_store), "--gridsize", "2", "--k", "3"], "k=3")
    _one_line_error(capsys, ["group", str(tmp_path / "none.zarr")], "no Zarr store")
    _one_line_error(capsys, ["simulate", str(tmp_path / "x.npz"), "--patch-size", "33"], "patch_size=33")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.npz"]


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
