"""Reconstruction metrics with PtychoPINN's conventions, computed out of core on dask arrays.

One function per metric (:func:`mae`, :func:`mse`, :func:`psnr`, :func:`ssim`, :func:`ms_ssim`,
:func:`frc` and :func:`frc_cutoff`), phase-plane removal, and :func:`evaluate`, which composes them like
PtychoPINN's ``eval_reconstruction``, plus every metric registered in :mod:`.registry` (one entry per
metric, read by evaluate and every report: :func:`metrics`, :func:`register`); :func:`task_memory`
projects the host memory of one of its
tasks. Each metric takes numpy or dask 2-D arrays; dask in gives dask out. Submodules are imported on
first use.
"""

import importlib

__all__ = [
    "FRC50",
    "FRC1OVER7",
    "MS_SSIM_WEIGHTS",
    "Metric",
    "Scored",
    "evaluate",
    "frc",
    "frc_crossing",
    "frc_cutoff",
    "frc_length",
    "frc_rings",
    "gaussian_prefilter",
    "half_bit_threshold",
    "mae",
    "ms_ssim",
    "metric",
    "metrics",
    "mse",
    "one_bit_threshold",
    "phase_plane",
    "register",
    "psnr",
    "remove_phase_mean",
    "remove_phase_plane",
    "ssim",
    "task_memory",
    "unregister",
]

_HOME = {
    "evaluate": "evaluation",
    "FRC50": "fourier",
    "FRC1OVER7": "fourier",
    "frc": "fourier",
    "frc_cutoff": "fourier",
    "frc_length": "fourier",
    "frc_rings": "fourier",
    "frc_crossing": "fourier",
    "half_bit_threshold": "fourier",
    "one_bit_threshold": "fourier",
    "Metric": "registry",
    "Scored": "registry",
    "metric": "registry",
    "metrics": "registry",
    "register": "registry",
    "unregister": "registry",
    "MS_SSIM_WEIGHTS": "multiscale",
    "gaussian_prefilter": "multiscale",
    "ms_ssim": "multiscale",
    "mae": "pointwise",
    "mse": "pointwise",
    "psnr": "pointwise",
    "phase_plane": "pointwise",
    "remove_phase_mean": "pointwise",
    "remove_phase_plane": "pointwise",
    "ssim": "structural",
    "task_memory": "evaluation",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'ptychozarr.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ptychozarr.metrics.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
