"""``make bench``: run every benchmark and write ``benchmarks/RESULTS.md`` with tables and plots.

Each benchmark module exposes ``main(argv)`` and writes its rows as JSON with ``--json``; this runner
calls them in turn (each variant inside measures itself in a fresh process), then writes the machine,
the versions and one table per benchmark, plus ``benchmarks/results/<name>.png`` where a size column
makes a curve. Pass benchmark names to run a subset, ``--quick`` for small sizes, and ``--reuse`` to
tabulate results already measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks._harness import machine, table  # noqa: E402

FULL = {
    "ingest": [],
    "stitch": [],
    "metrics": ["--sizes", "2048", "8192", "16384"],
    "inference": [],
    "compare": ["--scales", "1", "2", "4"],
    "schedulers": [],
    "scale": ["--points", "8000", "32000", "128000", "--shipped", "8000", "32000"],
}
QUICK = {
    "ingest": ["--sizes", "1000"],
    "stitch": ["--sizes", "512", "2048"],
    "metrics": ["--sizes", "2048"],
    "inference": ["--groups", "512"],
    "compare": ["--scales", "0.1"],
    "schedulers": ["--points", "500"],
    "scale": ["--points", "2000", "4000"],
}


def _plot(name: str, rows: list[dict], out: Path) -> Path | None:
    """Peak RSS (and wall time) against the first numeric column, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next(iter(rows[0]))
    numeric = [k for k in rows[0] if k != x_key and all(isinstance(r.get(k), int | float) for r in rows)]
    panels = [[k for k in numeric if "RSS" in k], [k for k in numeric if k.endswith(" s")]]
    panels = [p for p in panels if p]
    if len(rows) < 2 or not panels or not all(isinstance(r[x_key], int | float) for r in rows):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            ax.plot([r[x_key] for r in rows], [r[key] for r in rows], marker="o", label=key)
        ax.set_xlabel(x_key)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    axes[0][0].set_title(name)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(FULL))
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument("--reuse", action="store_true", help="tabulate results/<name>.json already there")
    args = parser.parse_args(argv)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    sections = []
    for name in args.names:
        result = out / f"{name}.json"
        extra = (QUICK if args.quick else FULL)[name]
        if not (args.reuse and result.exists()):
            print(f"== {name} {' '.join(extra)}", flush=True)
            importlib.import_module(f"benchmarks.{name}").main([*extra, "--json", str(result)])
        rows = json.loads(result.read_text())["rows"]
        plot = _plot(name, rows, out)
        command = f"python benchmarks/{name}.py {' '.join(extra)}".strip()
        sections.append(
            f"## {name}\n\n`{command}`\n\n{table(rows)}\n"
            + (f"\n![{name}](results/{plot.name})\n" if plot else "")
        )
    info = machine()
    header = [
        "# Benchmark results",
        "",
        "Machine and versions: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(header + sections))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
