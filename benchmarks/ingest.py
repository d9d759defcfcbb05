"""Ingestion throughput and peak memory: the streamed NPZ → Zarr ingestion against np.load + one write.

Inputs: N×N patterns (default 128) at dose 1000. A base of ``--base`` patterns is simulated once with
:func:`ptychozarr.simulate.simulate` and repeated up to each size with the streaming NPZ writer, so that
large inputs are quick to make yet as sparse and compressible as simulated ones. Each size is written
stored (``np.savez`` layout) and deflated (``np.savez_compressed`` layout).

Variants, each in a fresh process (``_harness.measure``):

- ``engine``: :func:`ptychozarr.io.ingest`: members streamed block by block, validated (finite, not
  negative), SHA-256 of the source, zstd chunks of whole patterns (4 MiB target).
- ``np.load``: the in-memory way: ``np.load`` of every member, then one ``zarr.create_array(data=…)``
  per member with the same chunks and compressor (no validation, no hash).

Peak RSS is each variant's own ``VmHWM``. Throughput is the diffraction data volume (n·N²·4 bytes)
divided by the wall time. Run from the repository root::

    python -m benchmarks.ingest --sizes 1000 5000 20000 --json ingest.json

``--locality`` measures what the store's curve order buys instead, on one simulated scan (``--points``
positions, random order as ``ptychozarr simulate`` writes them) and a raster-order copy of it:

- ingestion wall and peak RSS for each input order, stored and deflated;
- the time to gather the patterns of every block of ``--block`` consecutive groups (gridsize 2) from
  ``data/diffraction`` (each block's distinct patterns in one orthogonal selection, each chunk decoded
  once per block), in the input's order (a store laid out as the file, groups seeded in file order, as
  before the curve order) and in the store's curve order, beside one in-order read of the whole array::

    python -m benchmarks.ingest --locality --points 5216 --chunk-mib 32 4
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from benchmarks._harness import measure, ratio, table, write_json

__all__ = ["main"]

_BLOCK = 500  # patterns per block written to the generated inputs


def _peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``).

    ``ru_maxrss`` is not used: Linux carries it across ``exec``, so a spawned child would report at
    least the RSS of the parent that forked it.
    """
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_engine(npz: str, store: str) -> int:
    """The engine's streamed ingestion; returns the peak RSS."""
    from ptychozarr.io import ingest

    ingest(npz, store)
    return _peak_rss_bytes()


def run_numpy(npz: str, store: str) -> int:
    """The in-memory way: every member loaded whole, then written whole, same chunks and codec; peak RSS."""
    import zarr
    from zarr.codecs import ZstdCodec

    from ptychozarr.io.store import DEFAULT_CHUNK_BYTES

    with np.load(npz) as z:
        arrays = {key: z[key] for key in z.files}
    data = zarr.open_group(store, mode="w", zarr_format=3).create_group("data")
    for key, value in arrays.items():
        rows = max(1, DEFAULT_CHUNK_BYTES // max(1, value[0].nbytes)) if value.ndim == 3 else len(value)
        chunks = (min(rows, len(value)), *value.shape[1:]) if value.ndim else ()
        data.create_array(key, data=value, chunks=chunks, compressors=ZstdCodec(level=3))
    return _peak_rss_bytes()


def _gather_blocks(store: str, nn: np.ndarray, block: int) -> tuple[float, int, float]:
    """Seconds to read every block's distinct patterns, chunks decoded, seconds to read the array once."""
    import time

    import zarr

    array = zarr.open_array(store, path="data/diffraction", mode="r")
    per_chunk = array.chunks[0]
    array[:1]  # opening costs (codec pipeline, first chunk) are not part of either timing
    t0 = time.perf_counter()
    decoded = 0
    for start in range(0, len(nn), block):
        rows = np.unique(nn[start : start + block])
        array.oindex[rows]
        decoded += len(np.unique(rows // per_chunk))
    gather = time.perf_counter() - t0
    t0 = time.perf_counter()
    array[...]
    return gather, decoded, time.perf_counter() - t0


def _store_in_input_order(store: Path, diffraction: np.ndarray, chunk_bytes: int) -> None:
    """``data/diffraction`` laid out as the file holds it, with the ingested store's chunks and codec."""
    import zarr

    from ptychozarr.io.store import _COMPRESSOR

    per_chunk = max(1, chunk_bytes // diffraction[0].nbytes)
    group = zarr.open_group(store, mode="w", zarr_format=3).create_group("data")
    group.create_array(
        "diffraction", data=diffraction, chunks=(per_chunk, *diffraction.shape[1:]), compressors=_COMPRESSOR
    )


def locality(args: argparse.Namespace) -> list[dict]:
    """The ``--locality`` measurements: two tables, ingestion by input order and gathers by layout."""
    from ptychozarr.grouping import group, neighbour_groups
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.simulate import simulate

    work = args.workdir
    random_path = simulate(work / "random.npz", n_points=args.points, patch_size=args.patch_size)
    with np.load(random_path) as z:
        arrays = {key: z[key] for key in z.files}
    raster = np.lexsort((arrays["xcoords"], arrays["ycoords"]))
    per_pattern = {k for k, v in arrays.items() if v.shape[:1] == (args.points,) and k != "objectGuess"}
    raster_arrays = {k: v[raster] if k in per_pattern else v for k, v in arrays.items()}
    ingest_rows = []
    for compress in (False, True):
        for order, values in (("random", arrays), ("raster", raster_arrays)):
            npz, store = work / f"{order}-in.npz", work / "out.zarr"
            (np.savez_compressed if compress else np.savez)(npz, **values)
            shutil.rmtree(store, ignore_errors=True)
            m = measure(run_engine, str(npz), str(store))
            ingest_rows.append(
                {
                    "positions": args.points,
                    "npz": "deflated" if compress else "stored",
                    "input order": order,
                    "ingest s": m.wall_s,
                    "peak RSS MB": m.peak_rss_mb,
                }
            )
            npz.unlink()
    for row in ingest_rows[1::2]:
        row["raster/random s"] = ratio(row["ingest s"], ingest_rows[ingest_rows.index(row) - 1]["ingest s"])
    gather_rows = []
    for mib in args.chunk_mib:
        chunk_bytes = int(mib * 2**20)
        before, after = work / "input-order.zarr", work / "curve-order.zarr"
        _store_in_input_order(before, arrays["diffraction"], chunk_bytes)
        ingest(random_path, after, overwrite=True, chunk_bytes=chunk_bytes)
        layouts = {
            "input order (before)": (before, neighbour_groups(arrays["xcoords"], arrays["ycoords"], 2)),
            "curve order (store)": (after, group(open_dataset(after).drop_attrs(), 2).nn_indices.values),
        }
        for name, (store, nn) in layouts.items():
            gather, decoded, whole = _gather_blocks(str(store), nn, args.block)
            gather_rows.append(
                {
                    "chunk MiB": mib,
                    "layout": name,
                    "blocks": -(-len(nn) // args.block),
                    "chunks decoded": decoded,
                    "gather all blocks s": gather,
                    "read whole array once s": whole,
                    "gather / whole read": ratio(gather, whole),
                }
            )
        before_s = gather_rows[-2]["gather all blocks s"]
        gather_rows[-1]["speed-up"] = ratio(before_s, gather_rows[-1]["gather all blocks s"])
        shutil.rmtree(before, ignore_errors=True)
        shutil.rmtree(after, ignore_errors=True)
    random_path.unlink()
    print(table(ingest_rows))
    print()
    print(table(gather_rows))
    return ingest_rows + gather_rows


def _make_input(path: Path, base: dict, n: int, compress: bool) -> None:
    """Repeat the base scan's patterns up to ``n``, streaming them into a new NPZ."""
    from ptychozarr.io import NpzWriter

    patterns = base["diffraction"]
    repeats = np.arange(n) % len(patterns)
    jitter = np.random.default_rng(0).uniform(-0.5, 0.5, (2, n))
    with NpzWriter(path, compress=compress) as npz:
        with npz.stream("diffraction", (n, *patterns.shape[1:]), np.float32) as append:
            for start in range(0, n, _BLOCK):
                append(patterns[repeats[start : start + _BLOCK]])
        for axis, key in enumerate(("xcoords", "ycoords")):
            values = base[key][repeats] + jitter[axis]
            npz.write(key, values)
            npz.write(f"{key}_start", values)
        npz.write("scan_index", np.zeros(n, np.int64))
        npz.write("probeGuess", base["probeGuess"])
        npz.write("objectGuess", base["objectGuess"])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print one markdown table and return its rows."""
    from ptychozarr.simulate import simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="pattern counts")
    ap.add_argument("--patch-size", type=int, default=128)
    ap.add_argument("--base", type=int, default=1000, help="patterns simulated, then repeated")
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/_work/ingest"))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--locality", action="store_true", help="measure the curve order instead (see above)")
    ap.add_argument("--points", type=int, default=5216, help="--locality: scan positions")
    ap.add_argument("--block", type=int, default=256, help="--locality: groups per block")
    ap.add_argument("--chunk-mib", type=float, nargs="+", default=[32], help="--locality: chunk sizes")
    args = ap.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.locality:
        rows = locality(args)
        if args.json:
            write_json(args.json, "ingest-locality", rows)
        return rows
    base_path = simulate(
        args.workdir / "base.npz", n_points=args.base, patch_size=args.patch_size, stored=True
    )
    with np.load(base_path) as z:
        base = {key: z[key] for key in z.files}
    rows = []
    try:
        for n in args.sizes:
            for compress in (False, True):
                npz, store = args.workdir / f"scan-{n}.npz", args.workdir / "out.zarr"
                _make_input(npz, base, n, compress)
                megabytes = n * args.patch_size**2 * 4 / 1e6
                row = {"patterns": n, "npz": "deflated" if compress else "stored"}
                row["file MB"] = npz.stat().st_size / 1e6
                results = {}
                for name, func in (("engine", run_engine), ("np.load", run_numpy)):
                    shutil.rmtree(store, ignore_errors=True)
                    results[name] = m = measure(func, str(npz), str(store))
                    row |= {
                        f"{name} s": m.wall_s,
                        f"{name} MB/s": megabytes / m.wall_s,
                        f"{name} RSS MB": m.peak_rss_mb,
                    }
                engine, numpy_way = results["engine"], results["np.load"]
                row["speed engine/np.load"] = ratio(numpy_way.wall_s, engine.wall_s)
                row["RSS np.load/engine"] = ratio(numpy_way.peak_rss_mb, engine.peak_rss_mb)
                rows.append(row)
                shutil.rmtree(store, ignore_errors=True)
                npz.unlink()
                print(f"done {n} {row['npz']}", file=sys.stderr)
    finally:
        base_path.unlink(missing_ok=True)
    print(table(rows))
    if args.json:
        write_json(args.json, "ingest", rows)
    return rows


if __name__ == "__main__":
    main()
