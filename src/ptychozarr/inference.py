"""Blockwise inference: one Dask task per block of model inputs, only cropped patches leave a task.

Each task reads the diffraction patterns its block needs straight from the Zarr array (an orthogonal
selection: only the chunks holding them are read), normalises them (``f`` of the grouping, then the
model's ``intensity_scale``), runs the model in fixed-shape batches (the last one padded, the padding
dropped) and keeps only the central ``M×M`` of each output. Models are loaded once per process through
the cache of this module.

Two arms:

- **per group** (a model of gridsize > 1): one output per group, at the group centre, weight 1.
- **distinct patterns** (a model of gridsize 1 on groups of any gridsize): every pattern that appears in
  ``nn_indices`` is predicted once, with zero offsets, at its true position, and carries as weight the
  number of times it appears. Stitching with these weights gives exactly what predicting the flattened
  ``B·C`` stack would, for ``1/C`` of the compute. PtychoPINN's ``compare_models`` instead predicts the
  flattened stack and stitches it at point-reflected positions ``2·centre − position`` (spec §0.4).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ptychozarr.errors import InvalidParameterError, MemoryBudgetError
from ptychozarr.models import Model, ModelSpec, check_compatible, load_model, model_file, read_spec

__all__ = [
    "cached_model",
    "infer",
    "load_count",
    "oom_events",
    "predict_patches",
    "set_fault_hook",
]

_log = logging.getLogger(__name__)

_MODELS: dict[str, Model] = {}
_LOCK = threading.Lock()
_STATE = {"loads": 0, "tf_configured": False}
_OOM_EVENTS: list[dict] = []
_FAULT_HOOK: list[Callable[[int], None] | None] = [None]


def _configure_tf(threads: int | None) -> None:
    """Set TF thread pools and GPU memory growth once per process, before TF initialises."""
    if _STATE["tf_configured"]:
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the runtime is already initialised: keep what it has
            _log.warning("GPU memory growth could not be set: TensorFlow is already initialised")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            _log.warning("TF threads could not be set to %d: TensorFlow is already initialised", threads)
    _STATE["tf_configured"] = True


def cached_model(path: str | Path, tf_threads: int | None = None) -> Model:
    """The model at ``path``, loaded at most once per process.

    Parameters
    ----------
    path : str or Path
    tf_threads : int, optional
        TensorFlow intra- and inter-op threads for this process (applied before the first load only).
    """
    key = str(model_file(path).resolve())
    model = _MODELS.get(key)
    if model is None:
        with _LOCK:
            model = _MODELS.get(key)
            if model is None:
                _configure_tf(tf_threads)
                model = load_model(key)
                _MODELS[key] = model
                _STATE["loads"] += 1
    return model


def load_count() -> int:
    """How many models this process has loaded through :func:`cached_model`."""
    return _STATE["loads"]


def oom_events() -> list[dict]:
    """Out-of-memory retries seen in this process: ``{"batch": failed size, "retry": new size}`` each."""
    return list(_OOM_EVENTS)


def set_fault_hook(hook: Callable[[int], None] | None) -> None:
    """Install (or remove, with None) a hook called with the batch size before every model call.

    The hook may raise ``tf.errors.ResourceExhaustedError`` to simulate a device out of memory.
    """
    _FAULT_HOOK[0] = hook


@dataclass(frozen=True)
class _ModelRef:
    """A model as a task argument: a path (loaded through the cache) or a loaded model."""

    path: str | None = None
    model: Model | None = None
    tf_threads: int | None = None

    def get(self) -> Model:
        return self.model if self.model is not None else cached_model(self.path, self.tf_threads)

    def spec(self) -> ModelSpec:
        """The model's spec, read from a ``.keras`` sidecar without loading the network when possible."""
        if self.model is None and model_file(self.path).suffix == ".keras":
            return read_spec(model_file(self.path))[0]
        return self.get().spec

    def __dask_tokenize__(self):
        return ("ptychozarr-model", self.path if self.path is not None else id(self.model))


def predict_patches(
    model: Model,
    patterns: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray | None,
    scale: float,
    crop: int,
    batch_size: int,
) -> np.ndarray:
    """Run ``model`` over groups of ``patterns`` in fixed-shape batches and keep the centre crops.

    Parameters
    ----------
    model : Model
    patterns : ndarray, (u, N, N) float32
        Raw diffraction amplitudes.
    members : ndarray, (b, C) int
        Rows of ``patterns`` forming each model input.
    offsets : ndarray, (b, C, 2) float, or None
        Members' offsets (x, y); None gives zeros.
    scale : float
        Factor applied to the patterns (normaliser times the model's intensity scale).
    crop : int
        Side M of the kept centre.
    batch_size : int
        Batch the model is called with; halved on ``ResourceExhaustedError`` down to 1.

    Returns
    -------
    ndarray, (b, M, M) complex64
    """
    import tensorflow as tf

    spec = model.spec
    n, channels = members.shape
    lo = spec.N // 2 - crop // 2
    out = np.empty((n, crop, crop), np.complex64)
    if spec.max_batch:
        batch_size = min(batch_size, spec.max_batch)
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        x = np.zeros((batch_size, spec.N, spec.N, channels), np.float32)
        x[: stop - start] = np.moveaxis(patterns[members[start:stop]], 1, -1) * np.float32(scale)
        pos = None
        if spec.takes_positions:
            pos = np.zeros((batch_size, 1, 2, channels), np.float32)
            if offsets is not None:
                pos[: stop - start, 0] = np.swapaxes(offsets[start:stop], 1, 2)
        try:
            if _FAULT_HOOK[0] is not None:
                _FAULT_HOOK[0](batch_size)
            pred = model.predict_batch(x, pos)
        except tf.errors.ResourceExhaustedError as exc:
            if batch_size == 1:
                raise MemoryBudgetError(
                    f"model {spec.name!r} runs out of device memory on a batch of 1 ({spec.N}×{spec.N}×"
                    f"{channels}); use a device with more memory or a smaller model"
                ) from exc
            _OOM_EVENTS.append({"batch": batch_size, "retry": batch_size // 2})
            _log.warning("out of memory at batch %d; retrying with %d", batch_size, batch_size // 2)
            batch_size //= 2
            continue
        out[start:stop] = pred[: stop - start, lo : lo + crop, lo : lo + crop]
        start = stop
    return out


def _infer_block(members, offsets, *, store, model, scale, crop, batch_size):
    """Task body: read a block's patterns from Zarr, predict, return crops ``(b, M, M)``."""
    if members.shape[0] == 0:
        return np.empty((0, crop, crop), np.complex64)
    m = model.get()
    needed, rows = np.unique(members, return_inverse=True)
    diffraction = zarr.open_array(store, path="data/diffraction", mode="r")
    patterns = diffraction.get_orthogonal_selection((needed, slice(None), slice(None)))
    rows = rows.reshape(members.shape)
    return predict_patches(
        m, patterns, rows, offsets, scale * (m.spec.intensity_scale or 1.0), crop, batch_size
    )


def infer(
    ds: xr.Dataset,
    groups: xr.Dataset,
    model: str | Path | Model,
    crop: int = 20,
    block_groups: int = 256,
    batch_size: int = 32,
    tf_threads: int | None = None,
) -> xr.Dataset:
    """Lazy blockwise prediction of cropped object patches.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`ptychozarr.open_dataset` (``attrs["store"]`` names the store).
    groups : xarray.Dataset
        From :func:`ptychozarr.group` / :func:`ptychozarr.open_groups`.
    model : str, Path or Model
        A model path (loaded once per worker process through the cache; preferred) or a loaded model.
    crop : int
        Side M of the kept centre of each predicted patch (even, ``0 < M ≤ N``).
    block_groups : int
        Model inputs per task: groups for a gridsize > 1 model, distinct patterns for a gridsize 1 model.
    batch_size : int
        Fixed batch the model is called with (capped by ``spec.max_batch``).
    tf_threads : int, optional
        TensorFlow threads per process.

    Returns
    -------
    xarray.Dataset
        ``patches`` (dask, (B', M, M) complex64, chunked by block), ``positions`` ((B', 2) float64,
        (x, y)), ``weights`` ((B',) float64). B' is the number of groups, or of distinct patterns for a
        gridsize 1 model (see the module docstring).
    """
    ref = (
        _ModelRef(model=model)
        if isinstance(model, Model)
        else _ModelRef(path=str(model), tf_threads=tf_threads)
    )
    if "store" not in ds.attrs:
        raise InvalidParameterError("ds has no attrs['store']; open the scan with ptychozarr.open_dataset")
    spec = ref.spec()
    n_pix = int(ds.sizes["det_y"])
    gridsize = int(groups.attrs["gridsize"])
    check_compatible(spec, n_pix, gridsize)
    if crop <= 0 or crop > n_pix or crop % 2:
        raise InvalidParameterError(f"crop={crop}: must be even and in (0, N={n_pix}]")
    for name, value in (("block_groups", block_groups), ("batch_size", batch_size)):
        if value < 1:
            raise InvalidParameterError(f"{name}={value}: must be at least 1")

    if spec.gridsize == 1:
        distinct, counts = np.unique(groups["nn_indices"].values, return_counts=True)
        members = da.from_array(distinct[:, None], chunks=(block_groups, 1))
        offsets = da.zeros((len(distinct), 1, 2), chunks=(block_groups, 1, 2))
        positions = np.stack([ds["xcoords"].values[distinct], ds["ycoords"].values[distinct]], axis=1)
        weights = counts.astype(np.float64)
        mode = "distinct_patterns"
    else:
        members = da.asarray(groups["nn_indices"].data).rechunk((block_groups, -1))
        offsets = da.asarray(groups["offsets"].data).rechunk((block_groups, -1, -1))
        positions = groups["centres"].values.astype(np.float64)
        weights = np.ones(len(positions))
        mode = "per_group"
    f = float(groups.attrs["normaliser"])
    patches = da.blockwise(
        _infer_block,
        "bij",
        members,
        "bc",
        offsets,
        "bcx",
        new_axes={"i": crop, "j": crop},
        concatenate=True,
        dtype=np.complex64,
        meta=np.empty((0, 0, 0), np.complex64),
        store=str(ds.attrs["store"]),
        model=ref,
        scale=f,
        crop=crop,
        batch_size=batch_size,
    )
    return xr.Dataset(
        {
            "patches": (("patch", "crop_y", "crop_x"), patches),
            "positions": (("patch", "xy"), np.asarray(positions, np.float64)),
            "weights": (("patch",), weights),
        },
        coords={"xy": ["x", "y"]},
        attrs={
            "mode": mode,
            "crop": crop,
            "model": spec.to_dict(),
            "normaliser": float(groups.attrs["normaliser"]),
        },
    )
