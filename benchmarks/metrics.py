"""Benchmark: PtychoPINN's metrics out of core (``ptychozarr.metrics.evaluate``) beside numpy/scikit-image.

For each square size, a synthetic complex ground truth and reconstruction are written to Zarr
(complex64, square chunks of ``--chunk``). The engine reads them with ``dask.array.from_zarr`` and runs
every metric (MAE, MSE, PSNR, SSIM, MS-SSIM, FRC curves and cut-offs, amplitude and phase). The in-memory
way loads both into numpy and applies PtychoPINN's evaluation with numpy, scipy, scikit-image where it fits
(``--max-in-memory``: about 170 bytes per pixel, 11 GB at 8192², so ~24 GB at 12,000²). Each variant runs in a
fresh process (benchmarks/_harness.py), so the peak RSS is its own; the engine's peak should stay near
one task per thread plus a row of chunks (targets: ≤ 1.5 GB at 12,000², ≤ 1 GB at 16,000²).

    .venv/bin/python benchmarks/metrics.py --sizes 12000 16000 8192 --json metrics.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import measure, ratio, table, write_json  # noqa: E402

__all__ = ["main"]

def _synthetic_block(shape, kind: str, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    rng = np.random.default_rng([r0, c0, kind == "recon"])
    amp = 0.6 + 0.3 * np.sin(cols / 17.0) * np.cos(rows / 23.0)
    phase = 0.8 * np.sin((rows + cols) / 41.0)
    if kind == "recon":
        amp = 1.3 * amp + rng.normal(0, 0.05, amp.shape)
        phase = phase + 1e-4 * cols - 2e-4 * rows + 0.3 + rng.normal(0, 0.2, amp.shape)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def _write_inputs(size: int, chunk: int, directory: Path) -> tuple[str, str]:
    import dask.array as da

    paths = []
    for kind in ("gt", "recon"):
        path = str(directory / f"{kind}_{size}.zarr")
        arr = da.map_blocks(_synthetic_block, (size, size), kind,
                            chunks=da.core.normalize_chunks(chunk, (size, size)), dtype=np.complex64,
                            meta=np.empty((0, 0), np.complex64))
        arr.to_zarr(path, overwrite=True)
        paths.append(path)
    return paths[1], paths[0]


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "frc"}


def run_engine(recon_path: str, gt_path: str, workdir: str) -> dict:
    """All metrics out of core, inputs streamed from Zarr."""
    import dask.array as da

    from ptychozarr.metrics import evaluate

    return _scalars(evaluate(da.from_zarr(recon_path), da.from_zarr(gt_path), workdir=workdir))


def _plane_removed(phase: np.ndarray) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(phase.shape[0]), np.arange(phase.shape[1]), indexing="ij")
    design = np.column_stack([cols.ravel(), rows.ravel(), np.ones(phase.size)])
    coef = np.linalg.lstsq(design, phase.ravel(), rcond=None)[0]
    return phase - (coef[0] * cols + coef[1] * rows + coef[2])


def _ms_ssim(a, b, sigma):
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    if sigma > 0:
        a, b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    data_range = max(np.ptp(a), np.ptp(b))
    value = 1.0
    for level, weight in enumerate((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
        s = structural_similarity(a, b, data_range=data_range)
        value *= (s if s >= 0 else 1e-4) ** weight
        if level < 4:
            a, b = a[::2, ::2], b[::2, ::2]
            if min(a.shape) < 7:
                break
    return value


def _frc(a, b):
    n = min(a.shape)
    f1, f2 = np.fft.fftshift(np.fft.fft2(a[:n, :n])), np.fft.fftshift(np.fft.fft2(b[:n, :n]))
    rr, cc = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    ring = np.round(np.sqrt(rr**2 + cc**2)).astype(np.intp).ravel()
    c12 = np.bincount(ring, (f1 * f2.conj()).real.ravel())
    c11, c22 = np.bincount(ring, (np.abs(f1) ** 2).ravel()), np.bincount(ring, (np.abs(f2) ** 2).ravel())
    return np.abs(c12) / np.sqrt(c11 * c22)


def _cutoff(curve, threshold):
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
        return float(len(curve))
    i = below[0]
    return 0.0 if i == 0 else float((i - 1) + (threshold - curve[i - 1]) / (curve[i] - curve[i - 1]))


def run_in_memory(recon_path: str, gt_path: str) -> dict:
    """Spec §5 applied plainly to whole numpy arrays (numpy, scipy, scikit-image)."""
    import zarr
    from skimage.metrics import structural_similarity

    recon, gt = zarr.open_array(recon_path)[...], zarr.open_array(gt_path)[...]
    t = np.abs(gt[2:-2, 2:-2]).astype(np.float64)
    p = np.abs(recon[2:-2, 2:-2]).astype(np.float64)
    p *= t.mean() / p.mean()
    phi_t, phi_p = _plane_removed(np.angle(gt[2:-2, 2:-2])), _plane_removed(np.angle(recon[2:-2, 2:-2]))
    del recon, gt
    s_t, s_p = (phi_t + np.pi) / (2 * np.pi), (phi_p + np.pi) / (2 * np.pi)
    eps = np.finfo(np.float64).eps
    pairs = ((t, p), (phi_t, phi_p))
    out = {
        "mae": tuple(float(np.mean(np.abs(a - b))) for a, b in pairs),
        "mse": tuple(float(np.mean((a - b) ** 2)) for a, b in pairs),
        "psnr": tuple(float(20 * np.log10(255 / (np.sqrt(np.mean((a - b) ** 2)) + eps))) for a, b in pairs),
    }
    out["ssim"] = (structural_similarity(t, p, data_range=np.ptp(t)),
                   structural_similarity(s_t, s_p, data_range=1.0))
    out["ms_ssim"] = (_ms_ssim(t, p, 1.0), _ms_ssim(s_t, s_p, 0.0))
    curves = _frc(t, p), _frc(phi_t, phi_p)
    out["frc50"] = tuple(_cutoff(c, 0.5) for c in curves)
    out["frc1over7"] = tuple(_cutoff(c, 1 / 7) for c in curves)
    return out


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[k][i] - b[k][i]) / max(abs(b[k][i]), 1e-300) for k in b for i in (0, 1))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12000, 16000, 8192])
    parser.add_argument("--max-in-memory", type=int, default=8192,
                        help="largest size run in memory (about 170 bytes per pixel)")
    parser.add_argument("--chunk", type=int, default=512,
                        help="edge of the stored square chunks")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs and FFT spill go")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="bench_metrics_", dir=args.workdir))
    rows = []
    try:
        for size in args.sizes:
            recon_path, gt_path = _write_inputs(size, args.chunk, directory)
            spill = directory / f"spill_{size}"
            spill.mkdir()
            engine = measure(run_engine, recon_path, gt_path, str(spill))
            shutil.rmtree(spill)
            mpix = size * size / 1e6
            row = {"size": f"{size}²", "chunk": args.chunk, "engine_s": engine.wall_s,
                   "engine_Mpx/s": mpix / engine.wall_s, "engine_RSS_MB": engine.peak_rss_mb}
            if size <= args.max_in_memory:
                memory = measure(run_in_memory, recon_path, gt_path)
                row |= {"in_memory_s": memory.wall_s, "in_memory_Mpx/s": mpix / memory.wall_s,
                        "in_memory_RSS_MB": memory.peak_rss_mb,
                        "time_ratio": ratio(engine.wall_s, memory.wall_s),
                        "RSS_ratio": ratio(engine.peak_rss_mb, memory.peak_rss_mb),
                        "max_rel_diff": f"{_max_rel_diff(engine.value, memory.value):.1e}"}
            rows.append(row)
            for path in (recon_path, gt_path):
                shutil.rmtree(path)
            print(table([row]), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(table(rows))
    if args.json:
        write_json(args.json, "metrics", rows)
    return rows


if __name__ == "__main__":
    main()
