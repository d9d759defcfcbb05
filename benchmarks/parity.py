"""PtychoPINN's compare_models and ptychozarr on the same data and bundles: how closely their scores agree.

For registration off and on, it runs compare_models twice (its grouping is unseeded, so two runs give its
own run-to-run spread) at its workaround batch sizes (``--pinn-predict-batch-size 15``: larger calls merge
groups into shared canvases; ``--baseline-predict-batch-size 1``: larger calls shift the Baseline's
content out of its canvas), and ptychozarr once with ``--compatibility compare_models``. It then compares
their ``comparison_metrics.csv`` cell by cell — MAE, MSE, PSNR, SSIM, MS-SSIM and FRC50, amplitude and
phase, per arm — and prints, per arm, the median and largest relative difference of ptychozarr against
compare_models beside compare_models against itself, then every cell.

The relative difference of two values is ``|a − b| / max(|a|, |b|)`` (0 when both are 0; at most 100 %);
an empty cell (a metric that was not computed) is counted as missing, not as a difference. Usage::

    python -m benchmarks.parity --test-data test.npz --pinn-dir gs2 --baseline-dir gs1 \\
        [--ptychi-recon recon.npz] [--work parity_runs] [--json benchmarks/results/parity.json]

Each run writes ``<work>/registration_<off|on>/<run>/``; a run whose ``comparison_metrics.csv`` is there is
not run again, so a finished folder rebuilds the tables without PtychoPINN. Without PtychoPINN (the
``ptycho`` package) and with runs missing, it prints one line saying how to install it and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import machine, table  # noqa: E402

__all__ = ["cell_differences", "read_metrics", "summarise", "cell_rows", "summary_rows", "main"]

METRICS = ("mae", "mse", "psnr", "ssim", "ms_ssim", "frc50")
PARTS = ("amplitude", "phase")
COMPARE_MODELS_FLAGS = ("--pinn-predict-batch-size", "15", "--baseline-predict-batch-size", "1")
RUNS = ("compare_models", "compare_models_again", "ptychozarr")
PAIRS = {
    "ptychozarr vs compare_models": ("ptychozarr", "compare_models"),
    "compare_models vs itself": ("compare_models_again", "compare_models"),
}
INSTALL = (
    "no PtychoPINN scripts/compare_models.py (the `ptycho` package is not importable, or --ptychopinn-root "
    "has none): take its HEAD as an archive, add its ptycho/FRC "
    "submodule (github.com/hoidn/FRC), pip install tensorflow-probability tf-keras dill imageio "
    "opencv-python-headless scikit-learn pandas h5py pyyaml pathos ujson, and put its root on the path "
    "with a .pth file (README: Relation to compare_models); nothing was run"
)

Cell = tuple[str, str, str]
"""(arm, metric, part): one score of ``comparison_metrics.csv``."""


# -- the tables (no PtychoPINN needed) -------------------------------------------------------------


def read_metrics(path: str | Path) -> dict[Cell, float]:
    """The scores of a ``comparison_metrics.csv`` (compare_models' or ptychozarr's) by cell.

    Only ``METRICS`` × amplitude/phase are read; other rows (FRC1/7, offsets, times, ptychozarr's extra
    metrics) and columns (ptychozarr's ``registration``) are left out. An empty cell is NaN.
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        (row["model"], row["metric"], part): float(row[part]) if row[part] else math.nan
        for row in rows
        if row["metric"] in METRICS
        for part in PARTS
    }


def relative_difference(a: float, b: float) -> float:
    """``|a − b| / max(|a|, |b|)``: 0 for equal values, 1 for opposite signs or one value 0."""
    largest = max(abs(a), abs(b))
    return 0.0 if largest == 0 else abs(a - b) / largest


def cell_differences(a: dict[Cell, float], b: dict[Cell, float]) -> dict[Cell, float]:
    """The relative difference of every cell in both ``a`` and ``b`` (NaN where either is empty)."""
    return {cell: relative_difference(a[cell], b[cell]) for cell in a if cell in b}


def summarise(differences: dict[Cell, float]) -> dict[str, dict]:
    """Per arm: ``median`` and ``max`` relative difference over its cells with both values, the number of
    those ``cells`` and of ``missing`` ones (empty in either file)."""
    arms: dict[str, list[float]] = {}
    for (arm, _, _), value in differences.items():
        arms.setdefault(arm, []).append(value)
    out = {}
    for arm, values in arms.items():
        known = [v for v in values if not math.isnan(v)]
        out[arm] = {
            "median": statistics.median(known) if known else math.nan,
            "max": max(known) if known else math.nan,
            "cells": len(known),
            "missing": len(values) - len(known),
        }
    return out


def summary_rows(scores: dict[str, dict[str, dict[Cell, float]]]) -> list[dict]:
    """One row per registration mode and arm: each pair's median / max relative difference in %.

    ``scores`` holds, per registration mode (``"off"``, ``"on"``), each run's :func:`read_metrics`.
    """
    rows = []
    for mode, runs in scores.items():
        summaries = {name: summarise(cell_differences(runs[a], runs[b])) for name, (a, b) in PAIRS.items()}
        for arm in summaries["ptychozarr vs compare_models"]:
            row = {"registration": mode, "arm": arm}
            for name, summary in summaries.items():
                s = summary.get(arm, {"median": math.nan, "max": math.nan, "cells": 0})
                row[f"{name}: median %"] = 100 * s["median"]
                row[f"{name}: max %"] = 100 * s["max"]
            row["cells"] = summaries["ptychozarr vs compare_models"][arm]["cells"]
            rows.append(row)
    return rows


def cell_rows(scores: dict[str, dict[str, dict[Cell, float]]]) -> list[dict]:
    """One row per registration mode and cell: the three runs' values and each pair's difference in %."""
    rows = []
    for mode, runs in scores.items():
        differences = {name: cell_differences(runs[a], runs[b]) for name, (a, b) in PAIRS.items()}
        for cell in runs["compare_models"]:
            arm, metric, part = cell
            row = {"registration": mode, "arm": arm, "metric": metric, "part": part}
            row |= {run: runs[run].get(cell, math.nan) for run in RUNS}
            row |= {f"{name} %": 100 * d.get(cell, math.nan) for name, d in differences.items()}
            rows.append(row)
    return rows


# -- the runs --------------------------------------------------------------------------------------


def compare_models_script(root: str | None) -> Path | None:
    """compare_models.py of the importable PtychoPINN (``<root>/scripts/``), or of ``root`` when given."""
    if root is None:
        spec = importlib.util.find_spec("ptycho")
        if spec is None or spec.origin is None:
            return None
        root = Path(spec.origin).parents[1]
    return Path(root) / "scripts" / "compare_models.py"


def run_commands(args: argparse.Namespace, script: Path | None, mode: str, folder: Path) -> dict[str, list]:
    """The command of each run of one registration mode, writing into ``folder/<run>``."""
    common = ["--pinn_dir", str(args.pinn_dir), "--baseline_dir", str(args.baseline_dir),
              "--test_data", str(args.test_data)]  # fmt: skip
    if args.ptychi_recon is not None:
        common += ["--tike_recon_path", str(args.ptychi_recon)]
    if mode == "off":
        common.append("--skip-registration")
    theirs = [sys.executable, str(script), *common, *COMPARE_MODELS_FLAGS]
    ours = [sys.executable, "-m", "ptychozarr", "compare", *common, "--compatibility", "compare_models",
            "--trust-bundle", "--quiet"]  # fmt: skip
    return {
        "compare_models": [*theirs, "--output_dir", str(folder / "compare_models")],
        "compare_models_again": [*theirs, "--output_dir", str(folder / "compare_models_again")],
        "ptychozarr": [*ours, "--output_dir", str(folder / "ptychozarr")],
    }


def _run(command: list[str], folder: Path) -> float:
    """Run ``command``, its output in ``folder/run.log``; the wall seconds. A failure ends the benchmark."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} … failed ({done.returncode}); see {folder / 'run.log'}")
    return time.perf_counter() - started


def _versions(script: Path | None) -> dict:
    """ptychozarr's version and commit, and PtychoPINN's commit when its root is a git checkout."""
    import ptychozarr

    def commit(folder: Path) -> str | None:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        return done.stdout.strip() or None

    here = Path(__file__).resolve().parents[1]
    return {
        "ptychozarr": ptychozarr.__version__,
        "ptychozarr_commit": commit(here),
        "ptychopinn_commit": None if script is None else commit(script.parents[1]),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--test-data", type=Path, help="the scan NPZ (PtychoPINN's format, with objectGuess)")
    p.add_argument("--pinn-dir", type=Path, help="the gridsize-2 PINN bundle's folder (wts.h5.zip)")
    p.add_argument("--baseline-dir", type=Path, help="the gridsize-1 Baseline bundle's folder")
    p.add_argument("--ptychi-recon", type=Path, help="an iterative reconstruction NPZ (optional)")
    p.add_argument("--ptychopinn-root", help="PtychoPINN's folder (default: the importable ptycho's)")
    p.add_argument("--work", type=Path, default=Path("parity_runs"), help="the runs' folders")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/parity.json"), help="result file")
    return p


def _missing(folders: dict[str, Path]) -> dict[str, list[str]]:
    """Per registration mode, the runs without a ``comparison_metrics.csv``."""
    done = lambda folder, run: (folder / run / "comparison_metrics.csv").is_file()  # noqa: E731
    return {mode: [run for run in RUNS if not done(folder, run)] for mode, folder in folders.items()}


def _printable(summary: list[dict]) -> list[dict]:
    """The summary rows with each pair's median and max in one column, ``median / max`` in %."""
    return [
        {"registration": row["registration"], "arm": row["arm"]}
        | {f"{name}, median / max %": f"{row[f'{name}: median %']:.2g} / {row[f'{name}: max %']:.2g}"
           for name in PAIRS}
        | {"cells": row["cells"]}
        for row in summary
    ]  # fmt: skip


def _finite(value):
    """``value`` with every NaN as None (JSON's null)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    """Run what is missing, print the tables and write the JSON; exit code 0 also without PtychoPINN."""
    parser = _parser()
    args = parser.parse_args(argv)
    folders = {mode: args.work / f"registration_{mode}" for mode in ("off", "on")}
    missing = _missing(folders)
    script = compare_models_script(args.ptychopinn_root)
    if any(missing.values()):
        if script is None or not script.is_file():
            print(INSTALL)
            return 0
        if args.test_data is None or args.pinn_dir is None or args.baseline_dir is None:
            parser.error("give --test-data, --pinn-dir and --baseline-dir: runs are missing in --work")
    walls = {}
    for mode, folder in folders.items():
        commands = run_commands(args, script, mode, folder) if missing[mode] else {}
        for run in missing[mode]:
            walls[f"{mode}/{run}"] = round(_run(commands[run], folder / run), 1)
    scores = {
        mode: {run: read_metrics(folder / run / "comparison_metrics.csv") for run in RUNS}
        for mode, folder in folders.items()
    }
    summary, cells = summary_rows(scores), cell_rows(scores)
    print(table(_printable(summary)), table(cells), sep="\n\n")
    result = {
        "benchmark": "parity",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": _versions(script),
        "compare_models_flags": list(COMPARE_MODELS_FLAGS),
        "run_seconds": walls,
        "summary": summary,
        "cells": cells,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(result), indent=2, default=str))
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
