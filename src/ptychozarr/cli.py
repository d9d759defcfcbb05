"""The ``ptychozarr`` command line: one subcommand per stage.

Each subcommand is a ``_cmd_<name>(args) -> int`` function registered in :func:`_build_parser`; add a
stage by adding both. Any :class:`~ptychozarr.errors.PtychozarrError` becomes one line on stderr and exit
code 2 (as argparse's own usage errors), with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptychozarr import __version__
from ptychozarr.errors import PtychozarrError
from ptychozarr.io.store import DEFAULT_CHUNK_BYTES
from ptychozarr.simulate import SPLITS

__all__ = ["describe", "main"]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ptychozarr.simulate import simulate

    path = simulate(
        args.output,
        n_points=args.n_points,
        patch_size=args.patch_size,
        object_size=args.object_size,
        dose=args.dose,
        seed=args.seed,
        split=args.split,
        stored=args.stored,
        legacy=args.legacy,
    )
    print(f"{path}: {args.n_points} patterns of {args.patch_size}×{args.patch_size}, dose {args.dose:g}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ptychozarr.io import ingest, open_dataset

    store = ingest(args.input, args.output, overwrite=args.overwrite, chunk_bytes=int(args.chunk_mb * 2**20))
    print(describe(open_dataset(store)))
    return 0


def _cmd_group(args: argparse.Namespace) -> int:
    from ptychozarr.grouping import group
    from ptychozarr.io import open_dataset

    groups = group(open_dataset(args.store), args.gridsize, k=args.k, seed=args.seed)
    print(
        f"{args.store}: {groups.sizes['group']} groups of {groups.sizes['member']} "
        f"(gridsize {args.gridsize}, k {args.k}, seed {args.seed}), "
        f"normaliser f = {groups.attrs['normaliser']:.6g}"
    )
    return 0


def describe(ds) -> str:
    """A few lines summarising an ingested dataset (as :func:`ptychozarr.open_dataset` returns it)."""
    diffraction = ds["diffraction"]
    n, size = diffraction.shape[0], diffraction.shape[-1]
    lines = [
        f"{ds.attrs['store']}: {n} patterns of {size}×{size} {diffraction.dtype} "
        f"in chunks of {diffraction.data.chunksize[0]} patterns",
        f"  from {ds.attrs['source']} ({ds.attrs['source_size'] / 2**20:.1f} MiB, "
        f"key {ds.attrs['diffraction_key']!r}, layout {ds.attrs['diffraction_layout']})",
        f"  x in [{float(ds.xcoords.min()):.1f}, {float(ds.xcoords.max()):.1f}], "
        f"y in [{float(ds.ycoords.min()):.1f}, {float(ds.ycoords.max()):.1f}] px",
    ]
    if "objectGuess" in ds:
        lines.append(f"  ground truth objectGuess {ds.sizes['obj_y']}×{ds.sizes['obj_x']}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptychozarr", description="Out-of-core comparison of ptychography reconstruction models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = commands.add_parser(
        "simulate",
        help="write a synthetic scan following the study's data contract",
        description="Simulate a scan (structured object, defocused probe, Poisson noise) into an NPZ file.",
    )
    simulate.add_argument("output", type=Path, help="NPZ file to write")
    simulate.add_argument("--n-points", type=int, default=5216, help="positions in the file (default 5216)")
    simulate.add_argument("--patch-size", type=int, default=128, help="pattern size N (default 128)")
    simulate.add_argument("--object-size", type=int, default=464, help="object side in pixels (default 464)")
    simulate.add_argument("--dose", type=float, default=1e3, help="photons per pattern (default 1000)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of positions and noise (default 0)")
    simulate.add_argument("--split", choices=SPLITS, default="none", help="half of the object, split by y")
    simulate.add_argument("--stored", action="store_true", help="store members uncompressed (np.savez)")
    simulate.add_argument("--legacy", action="store_true", help="legacy key diff3d, (N,N,M) uint16 counts")
    simulate.set_defaults(func=_cmd_simulate)

    ingest = commands.add_parser(
        "ingest",
        help="stream an NPZ scan into a Zarr store",
        description="Validate an NPZ scan and stream it into a new Zarr v3 store, one block at a time.",
    )
    ingest.add_argument("input", type=Path, help="NPZ scan")
    ingest.add_argument("output", type=Path, help="Zarr store to create")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ingest.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_BYTES / 2**20,
        help=f"target MiB of a diffraction chunk (default {DEFAULT_CHUNK_BYTES / 2**20:g})",
    )
    ingest.set_defaults(func=_cmd_ingest)

    group = commands.add_parser(
        "group",
        help="group scan points with their neighbours",
        description="Draw seeded neighbour groups over the whole scan and store them with the normaliser.",
    )
    group.add_argument("store", type=Path, help="store made by `ptychozarr ingest`")
    group.add_argument(
        "--gridsize", type=int, default=2, help="group side; C = gridsize² members (default 2)"
    )
    group.add_argument("--k", type=int, default=7, help="nearest neighbours to draw from (default 7)")
    group.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    group.set_defaults(func=_cmd_group)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptychozarr`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PtychozarrError as exc:
        print(f"ptychozarr {args.command}: error: {exc}", file=sys.stderr)
        return 2
