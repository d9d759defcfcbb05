"""Blockwise inference against the speed limit and against the in-memory way of compare_models.

Three variants over the same simulated scan, grouped with gridsize 2, and the same reference PINN
(random weights), each in a fresh process:

- ``engine``: :func:`ptychozarr.infer` on the threaded scheduler, crops computed into memory;
- ``bare``: the grouped stack held in memory, ``predict_on_batch`` over it (the speed limit);
- ``in-memory``: compare_models' way — the whole grouped stack, its scaled copy, full N×N outputs of every
  group, cropped at the end (the memory anchor).

Throughput counts diffraction patterns (groups × C) per second of the work itself (TensorFlow import,
model load and the first, tracing call excluded; the RSS after them is ``ready RSS``). Peak RSS is the
process's; ``above ready`` is what the work itself added.

Full size (the study's dense test split)::

    .venv/bin/python -m benchmarks.inference --groups 5216 --n 128 --json bench_inference.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks._harness import measure, ratio, table, write_json

__all__ = ["main"]


def _prepare(workdir: Path, groups: int, n: int, gridsize: int, filters: int, depth: int) -> tuple[str, str]:
    """Simulate, ingest and group a scan; save a random-weight reference PINN. Returns (store, model)."""
    from ptychozarr.grouping import group
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.models import ModelSpec, build_pinn, save_keras
    from ptychozarr.simulate import simulate

    npz = simulate(workdir / "scan.npz", n_points=groups, patch_size=n, object_size=max(464, 3 * n), seed=0)
    store = ingest(npz, workdir / "scan.zarr")
    group(open_dataset(store), gridsize=gridsize, seed=0)
    spec = ModelSpec("pinn", n, gridsize, False, None, "amp_phase", name="bench-pinn")
    model = save_keras(build_pinn(n, gridsize, filters=filters, depth=depth), spec, workdir / "pinn")
    return str(store), str(model)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _grouped_stack(store: str) -> np.ndarray:
    """The whole grouped, normalised stack (B, N, N, C) float32, as the in-memory ways hold it."""
    from ptychozarr.grouping import open_groups
    from ptychozarr.io import open_dataset

    ds, groups = open_dataset(store), open_groups(store)
    diffraction = ds["diffraction"].values
    nn = groups["nn_indices"].values
    return np.moveaxis(diffraction[nn], 1, -1) * np.float32(groups.attrs["normaliser"])


def run_engine(store: str, model: str, block_groups: int, batch_size: int, crop: int) -> dict:
    """The engine: blockwise inference on the threaded scheduler."""
    import dask

    from ptychozarr.grouping import open_groups
    from ptychozarr.inference import cached_model, infer
    from ptychozarr.io import open_dataset

    loaded = cached_model(model)
    spec = loaded.spec
    loaded.predict_batch(
        np.zeros((batch_size, spec.N, spec.N, spec.channels), np.float32), None
    )  # trace once
    ready = _rss()
    t0 = time.perf_counter()
    out = infer(
        open_dataset(store),
        open_groups(store),
        model,
        crop=crop,
        block_groups=block_groups,
        batch_size=batch_size,
    )
    with dask.config.set(scheduler="threads"):
        patches = out.patches.values
    return {"work_s": time.perf_counter() - t0, "ready_rss": ready, "outputs": len(patches)}


def run_bare(store: str, model: str, batch_size: int) -> dict:
    """The speed limit: predict_on_batch over the grouped stack held in memory."""
    from ptychozarr.inference import cached_model

    network = cached_model(model).network
    x = _grouped_stack(store)
    n = len(x) - len(x) % batch_size
    network.predict_on_batch(x[:batch_size])
    ready = _rss()
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        network.predict_on_batch(x[start : start + batch_size])
    return {"work_s": time.perf_counter() - t0, "ready_rss": ready, "outputs": n}


def run_in_memory(store: str, model: str, batch_size: int, crop: int) -> dict:
    """Spec §7: whole stack, its scaled copy, full N×N complex outputs, cropped at the end."""
    from ptychozarr.inference import cached_model

    network = cached_model(model).network
    ready = _rss()
    t0 = time.perf_counter()
    x = _grouped_stack(store)
    scaled = x * np.float32(1.0)  # compare_models feeds X · intensity_scale, a second full copy
    outs = [network.predict_on_batch(scaled[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    amp = np.concatenate([o[0] for o in outs])[..., 0]
    phase = np.concatenate([o[1] for o in outs])[..., 0]
    full = (amp * np.exp(1j * phase)).astype(np.complex64)
    lo = x.shape[1] // 2 - crop // 2
    patches = full[:, lo : lo + crop, lo : lo + crop].copy()
    return {"work_s": time.perf_counter() - t0, "ready_rss": ready, "outputs": len(patches)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print a markdown table; return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=5216, help="scan points = groups")
    parser.add_argument("--n", type=int, default=128, help="pattern side N")
    parser.add_argument("--gridsize", type=int, default=2)
    parser.add_argument("--filters", type=int, default=16, help="reference PINN first-stage filters")
    parser.add_argument("--depth", type=int, default=3, help="reference PINN pooling stages")
    parser.add_argument("--block-groups", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=20)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ptychozarr-bench-") as tmp:
        store, model = _prepare(Path(tmp), args.groups, args.n, args.gridsize, args.filters, args.depth)
        runs = {
            "engine": measure(run_engine, store, model, args.block_groups, args.batch_size, args.crop),
            "bare predict_on_batch": measure(run_bare, store, model, args.batch_size),
            "in-memory (as compare_models)": measure(run_in_memory, store, model, args.batch_size, args.crop),
        }
    channels = args.gridsize**2
    bare = runs["bare predict_on_batch"]
    anchor = runs["in-memory (as compare_models)"]
    rows = []
    for name, m in runs.items():
        rate = m.value["outputs"] * channels / m.value["work_s"]
        rows.append(
            {
                "variant": name,
                "groups": args.groups,
                "N": args.n,
                "work s": m.value["work_s"],
                "patterns/s": rate,
                "vs bare": ratio(rate, bare.value["outputs"] * channels / bare.value["work_s"]),
                "ready RSS MiB": m.value["ready_rss"] / 2**20,
                "peak RSS MiB": m.peak_rss_mb,
                "in-memory peak / peak": ratio(anchor.peak_rss_mb, m.peak_rss_mb),
                "above ready MiB": (m.peak_rss_bytes - m.value["ready_rss"]) / 2**20,
            }
        )
    print(table(rows))
    if args.json:
        write_json(args.json, "inference", rows)
    return rows


if __name__ == "__main__":
    main()
