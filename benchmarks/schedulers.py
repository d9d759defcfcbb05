"""The same comparison on the threaded scheduler and on a local cluster of processes.

Usage::

    python benchmarks/schedulers.py --points 5216 --json benchmarks/results/schedulers.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import measure, ratio, table, write_json  # noqa: E402
from benchmarks.compare import N, make_models  # noqa: E402


def run(npz: str, models: dict, out: str, scheduler: str) -> dict:
    from ptychozarr.pipeline import compare

    t0 = time.perf_counter()
    result = compare(
        npz, models, output_dir=out, quiet=True, scheduler=scheduler, save_npz=False, save_npz_aligned=False
    )
    return {
        "wall": time.perf_counter() - t0,
        "memory": result.run["memory"]["measured"],
        "loads": result.run["model_loads"],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--points", type=int, default=5216)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from ptychozarr.simulate import simulate

    rows = []
    with tempfile.TemporaryDirectory(prefix="ptychozarr-bench-") as tmp:
        work = Path(tmp)
        models = {k: str(v) for k, v in measure(make_models, work, N).value.items()}
        npz = work / "scan.npz"
        simulate(npz, n_points=args.points, patch_size=N, split="test", seed=1)
        threads = None
        for scheduler in ("threads", "processes"):
            m = measure(run, str(npz), models, str(work / scheduler), scheduler)
            threads = threads or m
            rows.append(
                {
                    "scheduler": scheduler,
                    "positions": args.points,
                    "wall s": m.value["wall"],
                    "patterns/s": args.points / m.value["wall"],
                    "peak RSS MB (all processes)": (m.value["memory"].get("peak") or 0) / 2**20,
                    "wall vs threads": ratio(m.value["wall"], threads.value["wall"]),
                }
            )
    print(table(rows))
    if args.json:
        write_json(args.json, "schedulers", rows)
    return rows


if __name__ == "__main__":
    main()
