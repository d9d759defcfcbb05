"""The whole comparison at the study's size, beside its speed limit and the in-memory way.

For each scale s (1 = the seed's size: 5216 positions, N=128, gridsize 2, both reference models) it
measures, each in a fresh process:

- **engine**: ``ptychozarr.compare`` on the NPZ (threaded scheduler, ``block_groups="auto"``): wall,
  patterns/s, peak RSS and per-stage times from ``run.json``;
- **bare**: the same models' forward passes over exactly the distinct inputs they need (one per group for
  the PINN, one per distinct pattern for the Baseline), inputs already in memory: the speed limit;
- **in-memory**: compare_models' way — the whole scan loaded, the whole grouped stack built, full N×N
  outputs kept for every group and for the flattened B·C Baseline stack, then cropped and stitched in
  memory — only where its projected size fits in RAM.

The models are the reference architectures with untrained weights: speed and memory do not depend on
the weights. Usage::

    python benchmarks/compare.py --scales 1 2 4 --json benchmarks/results/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import measure, ratio, table, write_json  # noqa: E402

SEED_POINTS, N, GRIDSIZE, CROP = 5216, 128, 2, 20


def make_models(folder: Path, n: int) -> dict[str, Path]:
    """Reference PINN (gridsize 2) and Baseline, untrained, saved as .keras + sidecar."""
    from ptychozarr.models import ModelSpec, build_baseline, build_pinn, save_keras

    pinn = ModelSpec("pinn", n, GRIDSIZE, False, None, "amp_phase", name="pinn-bench")
    base = ModelSpec("baseline", n, 1, False, None, "amp_phase", name="baseline-bench")
    return {
        "PtychoPINN": save_keras(build_pinn(n, GRIDSIZE), pinn, folder / "pinn"),
        "Baseline": save_keras(build_baseline(n), base, folder / "baseline"),
    }


def run_engine(npz: str, models: dict, out: str) -> dict:
    from ptychozarr.pipeline import compare

    t0 = time.perf_counter()
    result = compare(npz, models, output_dir=out, quiet=True, save_npz=False, save_npz_aligned=False)
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "stages": result.run["stages"],
        "errors": result.errors,
        "block_groups": result.run["memory"]["projected"]["params"]["block_groups"],
        "projected": result.run["memory"]["projected"]["peak"],
    }


def _grouped(npz: str):
    """Whole-scan inputs in memory: patterns, groups, normaliser (as compare_models builds them)."""
    from ptychozarr.grouping import neighbour_groups

    with np.load(npz) as f:
        diffraction, x, y = f["diffraction"], f["xcoords"], f["ycoords"]
    nn = neighbour_groups(x, y, GRIDSIZE)
    energy = (diffraction.astype(np.float64) ** 2).sum(axis=(1, 2))
    multiplicity = np.bincount(nn.ravel(), minlength=len(energy))
    scale = np.sqrt((diffraction.shape[-1] / 2) ** 2 * nn.size / (multiplicity @ energy))
    return diffraction, nn, np.float32(scale)


def _predict_all(model, stack: np.ndarray, batch: int = 32) -> tuple[np.ndarray, float]:
    """Model over a whole in-memory stack in fixed batches; full outputs kept; seconds in predict."""
    out = np.empty(stack.shape[:3], np.complex64)
    spent = 0.0
    for start in range(0, len(stack), batch):
        chunk = stack[start : start + batch]
        padded = np.zeros((batch, *stack.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        t0 = time.perf_counter()
        pred = model.predict_batch(padded, None)
        spent += time.perf_counter() - t0
        out[start : start + len(chunk)] = pred[: len(chunk)]
    return out, spent


def run_bare(npz: str, models: dict) -> dict:
    """Forward passes only, over the distinct inputs each model needs, inputs in memory."""
    from ptychozarr.models import load_model

    diffraction, nn, scale = _grouped(npz)
    pinn, base = load_model(models["PtychoPINN"]), load_model(models["Baseline"])
    for m in (pinn, base):  # trace once, outside the timing
        m.predict_batch(np.zeros((32, N, N, m.spec.channels), np.float32), None)
    seconds = 0.0
    for start in range(0, len(nn), 512):
        block = np.moveaxis(diffraction[nn[start : start + 512]], 1, -1) * scale
        seconds += _predict_all(pinn, block)[1]
    distinct = np.unique(nn)
    for start in range(0, len(distinct), 512):
        block = diffraction[distinct[start : start + 512], ..., None] * scale
        seconds += _predict_all(base, block)[1]
    return {"wall": seconds, "groups": len(nn), "distinct": len(distinct)}


def run_in_memory(npz: str, models: dict) -> dict:
    """Spec §7's way: whole grouped stack, full N×N outputs, flattened Baseline, in-memory stitch."""
    from ptychozarr.models import load_model

    t0 = time.perf_counter()
    diffraction, nn, scale = _grouped(npz)
    with np.load(npz) as f:
        xy = np.stack([f["xcoords"], f["ycoords"]], axis=1)
    stack = np.moveaxis(diffraction[nn], 1, -1) * scale  # (B, N, N, C)
    pinn_full, _ = _predict_all(load_model(models["PtychoPINN"]), stack)
    flat = stack.transpose(0, 3, 1, 2).reshape(-1, N, N, 1)  # (B·C, N, N, 1)
    base_full, _ = _predict_all(load_model(models["Baseline"]), flat)
    lo = N // 2 - CROP // 2
    objects = [
        _stitch(pinn_full[:, lo : lo + CROP, lo : lo + CROP], xy[nn].mean(axis=1)),
        _stitch(base_full[:, lo : lo + CROP, lo : lo + CROP], xy[nn.ravel()]),
    ]
    return {"wall": time.perf_counter() - t0, "shapes": [o.shape for o in objects]}


def _stitch(crops: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Plain in-memory bilinear scatter-add (``reassemble_position``)."""
    m = crops.shape[1]
    pos = positions.astype(np.float32)
    rel = pos - pos.mean(axis=0)
    pad = int(np.ceil(np.abs(rel).max()))
    pad += pad % 2
    size = m + 2 * pad
    num, den = np.zeros((size, size), np.complex128), np.zeros((size, size))
    k = np.floor(rel).astype(int)
    f = rel - k
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        wy = f[:, 1] if dy else 1 - f[:, 1]
        wx = f[:, 0] if dx else 1 - f[:, 0]
        w = (wy * wx)[:, None, None]
        r = ii[None] + pad + k[:, 1, None, None] + dy
        c = jj[None] + pad + k[:, 0, None, None] + dx
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        np.add.at(num, (r[ok], c[ok]), np.broadcast_to(w * crops, r.shape)[ok])
        np.add.at(den, (r[ok], c[ok]), np.broadcast_to(w, r.shape)[ok])
    return (num / (den + 1e-9)).astype(np.complex64)


def in_memory_bytes(points: int) -> int:
    """Projected peak of the in-memory way: stack, flattened copy, full outputs of both arms."""
    stack = points * N * N * GRIDSIZE**2 * 4
    return 2 * stack + points * N * N * 8 + points * GRIDSIZE**2 * N * N * 8 + points * N * N * 4


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json")
    parser.add_argument("--skip-in-memory", action="store_true", help="measure the engine and bare only")
    parser.add_argument("--workdir", help="where to keep data (default: a temporary folder)")
    args = parser.parse_args(argv)
    from ptychozarr.simulate import simulate

    rows = []
    with tempfile.TemporaryDirectory(prefix="ptychozarr-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        models = {k: str(v) for k, v in measure(make_models, work, N).value.items()}
        for scale in args.scales:
            points = int(round(SEED_POINTS * scale))
            npz = work / f"scan_{points}.npz"
            simulate(npz, n_points=points, patch_size=N, split="test", seed=1)
            engine = measure(run_engine, str(npz), models, str(work / f"out_{points}"))
            bare = measure(run_bare, str(npz), models)
            fits = (
                in_memory_bytes(points) < 0.8 * psutil.virtual_memory().available and not args.skip_in_memory
            )
            memory = measure(run_in_memory, str(npz), models) if fits else None
            patterns = points  # every pattern is predicted once per arm by the engine
            rows.append(
                {
                    "positions": points,
                    "engine wall s": engine.value["wall"],
                    "engine patterns/s": patterns / engine.value["wall"],
                    "engine peak RSS MB": engine.peak_rss_mb,
                    "block groups": engine.value["block_groups"],
                    "bare forward s": bare.value["wall"],
                    "engine / bare wall": ratio(engine.value["wall"], bare.value["wall"]),
                    "in-memory wall s": memory.value["wall"] if memory else "not run",
                    "in-memory peak RSS MB": memory.peak_rss_mb if memory else "–",
                    "in-memory / engine RSS": ratio(memory.peak_rss_mb, engine.peak_rss_mb)
                    if memory
                    else "–",
                    "stages": json.dumps(engine.value["stages"]),
                }
            )
    print(table(rows))
    if args.json:
        write_json(args.json, "compare", rows)
    return rows


if __name__ == "__main__":
    main()
