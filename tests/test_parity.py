"""The parity benchmark's tables, on synthetic ``comparison_metrics.csv`` files (no PtychoPINN needed)."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ptychozarr.cli import _build_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import parity  # noqa: E402

ARMS = ("PtychoPINN", "Baseline", "PtyChi")
SCORED = ("mae", "mse", "psnr", "ssim", "ms_ssim", "frc50")


def _scores(seed: int) -> dict:
    """Random scores for every scored cell: ``{(arm, metric, part): value}``."""
    rng = np.random.default_rng(seed)
    return {(arm, m, part): float(rng.uniform(0.1, 80)) for arm in ARMS for m in SCORED
            for part in ("amplitude", "phase")}  # fmt: skip


def _write(path: Path, scores: dict, *, ptychozarr: bool = False) -> Path:
    """A ``comparison_metrics.csv`` as compare_models writes it (or with ptychozarr's trailing column and
    extra rows): the scored rows, then ``frc1over7``, offsets and times, which the benchmark leaves out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["model", "metric", "amplitude", "phase", "value"] + (["registration"] if ptychozarr else [])
    rows = []
    for arm in ARMS:
        for m in SCORED:
            amp, phase = (scores[(arm, m, part)] for part in ("amplitude", "phase"))
            rows.append({"model": arm, "metric": m, "amplitude": "" if math.isnan(amp) else f"{amp:.6f}",
                         "phase": "" if math.isnan(phase) else f"{phase:.6f}", "value": ""})  # fmt: skip
        rows.append({"model": arm, "metric": "frc1over7", "amplitude": "999", "phase": "999", "value": ""})
        rows.append({"model": arm, "metric": "computation_time_s", "amplitude": "", "phase": "",
                     "value": "12"})  # fmt: skip
        if ptychozarr:
            rows.append({"model": arm, "metric": "frc50_hann", "amplitude": "3", "phase": "4", "value": ""})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row | {"registration": "unregistered"})
    return path


def test_only_the_scored_cells_are_read(tmp_path):
    scores = _scores(0)
    theirs = parity.read_metrics(_write(tmp_path / "a.csv", scores))
    ours = parity.read_metrics(_write(tmp_path / "b.csv", scores, ptychozarr=True))
    assert theirs.keys() == ours.keys() == scores.keys()  # 3 arms × 6 metrics × amplitude/phase
    for cell, value in scores.items():
        assert theirs[cell] == pytest.approx(value, abs=1e-6) and ours[cell] == theirs[cell]


def test_identical_files_differ_nowhere_and_one_changed_cell_only_there(tmp_path):
    scores = _scores(1)
    a = parity.read_metrics(_write(tmp_path / "a.csv", scores))
    assert set(parity.cell_differences(a, dict(a)).values()) == {0.0}
    changed = ("Baseline", "ssim", "phase")
    b = parity.read_metrics(_write(tmp_path / "b.csv", scores | {changed: scores[changed] / 2}))
    differences = parity.cell_differences(b, a)
    assert differences == parity.cell_differences(a, b)  # symmetric
    assert {cell for cell, d in differences.items() if d} == {changed}
    assert differences[changed] == pytest.approx(0.5)  # half the value: half of the larger one
    ten = parity.read_metrics(_write(tmp_path / "c.csv", {c: 10 * v for c, v in scores.items()}))
    tenfold = parity.read_metrics(_write(tmp_path / "d.csv", {c: 10 * v for c, v in b.items()}))
    assert parity.cell_differences(tenfold, ten)[changed] == pytest.approx(0.5, rel=1e-5)  # relative

    summary = parity.summarise(differences)
    assert summary["Baseline"]["median"] == 0 and summary["Baseline"]["max"] == pytest.approx(0.5)
    assert summary["PtychoPINN"] == {"median": 0.0, "max": 0.0, "cells": 12, "missing": 0}


def test_an_empty_cell_is_missing_not_a_difference(tmp_path):
    scores = _scores(2)
    a = parity.read_metrics(_write(tmp_path / "a.csv", scores))
    b = parity.read_metrics(_write(tmp_path / "b.csv", scores | {("PtyChi", "frc50", "amplitude"): math.nan}))
    summary = parity.summarise(parity.cell_differences(b, a))
    assert summary["PtyChi"] == {"median": 0.0, "max": 0.0, "cells": 11, "missing": 1}


def _work(folder: Path, scores: dict, ptychozarr: dict, again: dict) -> Path:
    for mode in ("off", "on"):
        _write(folder / f"registration_{mode}" / "compare_models" / "comparison_metrics.csv", scores)
        _write(folder / f"registration_{mode}" / "compare_models_again" / "comparison_metrics.csv", again)
        _write(folder / f"registration_{mode}" / "ptychozarr" / "comparison_metrics.csv", ptychozarr,
               ptychozarr=True)  # fmt: skip
    return folder


def test_a_finished_work_folder_gives_the_tables_and_the_json(tmp_path, capsys):
    scores = _scores(3)
    cell = ("PtychoPINN", "psnr", "amplitude")
    work = _work(tmp_path / "work", scores, scores | {cell: scores[cell] * 0.8}, scores)
    out = tmp_path / "parity.json"
    assert parity.main(["--work", str(work), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ptychozarr vs compare_models, median / max %" in printed and "| PtyChi |" in printed
    result = json.loads(out.read_text())
    summary = {(r["registration"], r["arm"]): r for r in result["summary"]}
    assert set(summary) == {(mode, arm) for mode in ("off", "on") for arm in ARMS}
    pinn = summary[("off", "PtychoPINN")]
    assert pinn["ptychozarr vs compare_models: max %"] == pytest.approx(20.0, rel=1e-5)  # 1 − 0.8
    assert pinn["ptychozarr vs compare_models: median %"] == 0 and pinn["cells"] == 12
    assert pinn["compare_models vs itself: max %"] == 0
    assert len(result["cells"]) == 2 * len(scores) and result["run_seconds"] == {}


def test_without_ptychopinn_it_says_what_to_install_and_exits_0(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    absent = lambda name, *a: None if name == "ptycho" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    out = tmp_path / "parity.json"
    assert parity.main(["--work", str(tmp_path / "empty"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "ptycho" in printed and "pip install" in printed
    assert not out.exists() and not (tmp_path / "empty").exists()


def test_the_runs_are_compare_models_at_its_workaround_batches_and_ptychozarr_in_its_mode(tmp_path):
    args = parity._parser().parse_args(["--test-data", "t.npz", "--pinn-dir", "gs2", "--baseline-dir", "gs1"])
    script = tmp_path / "scripts" / "compare_models.py"
    off = parity.run_commands(args, script, "off", tmp_path / "off")
    on = parity.run_commands(args, script, "on", tmp_path / "on")
    for commands, skip in ((off, True), (on, False)):
        theirs, again, ours = (commands[run] for run in parity.RUNS)
        for command in commands.values():
            assert ("--skip-registration" in command) is skip and "--tike_recon_path" not in command
            assert command[command.index("--test_data") + 1] == "t.npz"
        for command in (theirs, again):
            assert command[1] == str(script)
            assert command[command.index("--pinn-predict-batch-size") + 1] == "15"
            assert command[command.index("--baseline-predict-batch-size") + 1] == "1"
        assert ours[1:4] == ["-m", "ptychozarr", "compare"]
        assert ours[ours.index("--compatibility") + 1] == "compare_models" and "--trust-bundle" in ours
        parsed = _build_parser().parse_args(ours[3:])  # ptychozarr's own command line takes it
        assert parsed.compatibility == "compare_models"
        assert parsed.skip_registration is (True if skip else None)
        outputs = {command[command.index("--output_dir") + 1] for command in commands.values()}
        assert len(outputs) == 3  # every run into its own folder
