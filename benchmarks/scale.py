"""Flat at any scale: memory, wall, disk and graph size from 8k to 128k positions, projected to 10 M.

Random-order simulated scans at N=64 (``ptychozarr simulate --patch-size 64 --dose 1e6 --stored``),
the object's side growing with √n so that the density of positions stays the same. Each size runs the
whole ``ptychozarr compare`` in a fresh process with the two near-zero-cost 1×1-convolution models of
:mod:`benchmarks.fastpath` (``--shipped`` adds the shipped N=64 models at the sizes it names), then once
more over the finished run. Printed per size: the process's peak RSS and wall, both per position, every
stage's seconds and peak RSS (``run.json``), the tasks the graphs ran and the seconds spent before their
first task, the store's bytes and files, and the finished run's wall.

The projection to 1 M and 10 M positions is a least-squares line through the measured sizes (memory,
disk, wall, tasks, files) — a flat memory line projects flat — with the bare forward passes of one GPU
when ``--gpu-patterns-per-s`` gives their measured rate. Usage::

    python -m benchmarks.scale --json benchmarks/results/scale.json
    python -m benchmarks.scale --points 8000 32000 --shipped 8000 32000
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._harness import measure, ratio, table, write_json

__all__ = ["main"]

N = 64
DOSE = 1e6
SIDE_PER_ROOT = 10.0  # object side = 10·√n pixels: 894² at 8k, 3578² at 128k
PROJECT_TO = (1_000_000, 10_000_000)


def simulate_scan(path: str, points: int) -> str:
    """A random-order scan of ``points`` positions at N=64 on an object of side 10·√n."""
    from ptychozarr.simulate import simulate

    side = int(SIDE_PER_ROOT * math.sqrt(points))
    return str(simulate(path, n_points=points, patch_size=N, object_size=side, dose=DOSE, stored=True))


def fast_models(folder: str) -> dict[str, str]:
    """The 1×1-convolution models of the fast-path benchmark, at N=64."""
    from benchmarks.fastpath import make_models

    return make_models(Path(folder), n=N)


def shipped_models() -> dict[str, str]:
    """The shipped N=64 PINN and Baseline."""
    from ptychozarr.models import demo_weights

    return {"PtychoPINN": str(demo_weights("pinn_gs2_n64")), "Baseline": str(demo_weights("baseline_n64"))}


def run_compare(npz: str, models: dict[str, str], output: str) -> dict:
    """The whole comparison in this process, as the CLI runs it; what ``run.json`` recorded."""
    from ptychozarr.pipeline import compare

    compare(npz, models, output_dir=output, quiet=True)
    run = json.loads((Path(output) / "run.json").read_text())
    return {k: run[k] for k in ("stages", "stage_memory", "graphs")}


def finished_wall(npz: str, models: dict[str, str], output: str) -> float:
    """Wall seconds of ``ptychozarr compare`` over a finished run, from the command's start."""
    command = [sys.executable, "-m", "ptychozarr", "compare", "--test-data", npz, "--output-dir", output]
    for label, path in models.items():
        command += ["--model", f"{label}={path}"]
    t0 = time.perf_counter()
    subprocess.run([*command, "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - t0


def _tree(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def measure_size(work: Path, points: int, models: dict[str, str], kind: str) -> dict:
    """One size: the compare in a fresh process, its store, and the finished re-run."""
    npz = str(work / f"scan-{points}.npz")
    if not Path(npz).exists():
        measure(simulate_scan, npz, points)
    output = work / f"{kind}-{points}"
    run = measure(run_compare, npz, models, str(output))
    store_bytes, files = _tree(output / "store.zarr")
    stages = run.value["stages"]
    graphs = run.value["graphs"]
    return {
        "models": kind,
        "positions": points,
        "peak RSS MB": run.peak_rss_mb,
        "KB / position": run.peak_rss_bytes / points / 1e3,
        "wall s": run.wall_s,
        "ms / position": 1e3 * run.wall_s / points,
        "tasks": sum(g["tasks"] for g in graphs.values()),
        "before first task s": sum(g["graph_s"] for g in graphs.values()),
        "store MB": store_bytes / 2**20,
        "store files": files,
        "finished re-run s": finished_wall(npz, models, str(output)),
        "stages": stages,
        "stage MB": {k: v / 2**20 for k, v in run.value["stage_memory"].items()},
    }


def _fit(xs, ys, at: int) -> float:
    """The least-squares line through ``(xs, ys)`` at ``at`` (the value itself for one point)."""
    if len(xs) < 2:
        return float(ys[0]) * at / xs[0]
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope * at + intercept)


def projection(rows: list[dict], gpu_rate: float | None) -> list[dict]:
    """Memory, disk, wall, tasks and files at :data:`PROJECT_TO` positions from the fast-model rows."""
    rows = [r for r in rows if r["models"] == "1x1"]
    xs = [r["positions"] for r in rows]
    out = []
    for n in PROJECT_TO:
        wall = _fit(xs, [r["wall s"] for r in rows], n)
        infer = _fit(xs, [sum(v for k, v in r["stages"].items() if k.startswith("infer:")) for r in rows], n)
        row = {
            "positions": n,
            "peak RSS MB": _fit(xs, [r["peak RSS MB"] for r in rows], n),
            "store GB": _fit(xs, [r["store MB"] for r in rows], n) / 2**10,
            "store files": _fit(xs, [r["store files"] for r in rows], n),
            "tasks": _fit(xs, [r["tasks"] for r in rows], n),
            "wall h (this machine)": wall / 3600,
        }
        if gpu_rate:
            row["wall h (one GPU)"] = (wall - infer + 2 * n / gpu_rate) / 3600
        out.append(row)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[8000, 16000, 32000, 64000, 128000])
    parser.add_argument("--shipped", type=int, nargs="*", default=[], help="sizes for the shipped models")
    parser.add_argument("--gpu-patterns-per-s", type=float, help="bare forward passes of one GPU")
    parser.add_argument("--json")
    parser.add_argument("--workdir", help="where to keep data (default: a temporary folder)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptychozarr-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        fast = measure(fast_models, str(work / "models")).value
        for points in args.points:
            rows.append(measure_size(work, points, fast, "1x1"))
            print(f"{points}: {rows[-1]['peak RSS MB']:.0f} MB, {rows[-1]['wall s']:.1f} s", flush=True)
        for points in args.shipped:
            rows.append(measure_size(work, points, shipped_models(), "shipped"))
    summary = [{k: v for k, v in r.items() if k not in ("stages", "stage MB")} for r in rows]
    print(table(summary))
    names = list(dict.fromkeys(k for r in rows for k in r["stages"]))
    print("\nper stage: seconds / peak RSS MB")
    print(
        table(
            [
                {"models": r["models"], "positions": r["positions"]}
                | {k: f"{r['stages'].get(k, 0):.2f} / {r['stage MB'].get(k, 0):.0f}" for k in names}
                for r in rows
            ]
        )
    )
    for kind in ("1x1", "shipped"):
        sized = [r for r in rows if r["models"] == kind]
        if len(sized) > 1:
            first, last = sized[0], sized[-1]
            print(
                f"\n{kind} {first['positions']} → {last['positions']}: peak RSS "
                f"{ratio(last['peak RSS MB'], first['peak RSS MB'])}, wall per position "
                f"{ratio(last['ms / position'], first['ms / position'])}"
            )
    projected = projection(rows, args.gpu_patterns_per_s)
    if projected:
        print("\nprojected (least squares through the 1x1 rows):")
        print(table(projected))
    print("\ntargets: peak RSS 8k → 128k ≤ 1.1× and ≤ 1.2 GB at 128k; wall per position ≤ 1.2×; re-run ≤ 2 s")
    if args.json:
        write_json(args.json, "scale", rows + projected)
    return rows + projected


if __name__ == "__main__":
    main()
