"""Ingestion throughput and peak memory: the streamed NPZ → Zarr ingestion against np.load + one write.

Inputs: N×N patterns (default 128) at dose 1000. A base of ``--base`` patterns is simulated once with
:func:`ptychozarr.simulate.simulate` and repeated up to each size with the streaming NPZ writer, so that
large inputs are quick to make yet as sparse and compressible as simulated ones. Each size is written
stored (``np.savez`` layout) and deflated (``np.savez_compressed`` layout).

Variants, each in a fresh process (``_harness.measure``):

- ``engine``: :func:`ptychozarr.io.ingest`: members streamed block by block, validated (finite, not
  negative), SHA-256 of the source, zstd chunks of whole patterns (32 MiB target).
- ``np.load``: the in-memory way: ``np.load`` of every member, then one ``zarr.create_array(data=…)``
  per member with the same chunks and compressor (no validation, no hash).

Peak RSS is each variant's own ``VmHWM``. Throughput is the diffraction data volume (n·N²·4 bytes)
divided by the wall time. Run from the repository root::

    python -m benchmarks.ingest --sizes 1000 5000 20000 --json ingest.json
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
    args = ap.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
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
