"""Infer stage: a model over the groups, blockwise; only the cropped M×M centres are stored.

Writes ``arms/<arm>/patches`` with ``patches`` (B', M, M) complex64 (one chunk per block),
``positions``, ``weights`` and ``done`` (one bool per block, set once the block's chunk is stored), so
that a run killed in the middle redoes only the blocks that were not done.

Computation time counts every attempt. Each attempt appends its start (wall-clock seconds) to the
group's ``attempts`` attribute, and each block records when it was stored in ``block_end`` (one float
per block, written just before its ``done``). An attempt lasted from its start to the last block it
stored (the current one: to its end), so a run killed after some blocks and resumed reports
``seconds`` = the sum of its attempts' seconds (``attempt_seconds``), not the last attempt's alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ptychozarr import memory
from ptychozarr.config import InferOptions
from ptychozarr.inference import infer, task_memory
from ptychozarr.io import mark_complete
from ptychozarr.io.store import DamagedScanError, array_options, missing_chunks, read_errors, writable
from ptychozarr.report import to_jsonable
from ptychozarr.runtime import Runtime
from ptychozarr.stages._common import arm_key, fingerprint, groups_key

__all__ = ["project_memory", "run"]

log = logging.getLogger(__name__)

DIMS = {"patches": ("patch", "crop_y", "crop_x"), "positions": ("patch", "xy"), "weights": ("patch",)}


def project_memory(
    *, block_groups: int, batch_size: int, N: int, channels: int, crop: int, model_probe: int
) -> tuple[memory.TaskMemory, dict[str, int]]:
    """Projected host memory of inference (:func:`ptychozarr.inference.task_memory`).

    Returns
    -------
    task : TaskMemory
        One task, sized by ``block_groups``.
    held : dict of str to int
        What each process keeps across its tasks: the decoded-chunk cache, once per process.
    """
    projected = task_memory(
        block_groups=block_groups, batch_size=batch_size, N=N, channels=channels, crop=crop,
        model_probe=model_probe,
    )  # fmt: skip
    task = memory.TaskMemory("infer", {"block": projected["infer"]}, "block_groups")
    return task, {"chunk_cache": projected["chunk_cache"]}


def run(
    rt: Runtime,
    node: zarr.Group,
    ds: xr.Dataset,
    groups: xr.Dataset,
    model: Path,
    options: InferOptions,
    block_groups: int,
) -> zarr.Group:
    """Predict one arm's patches into ``node/patches``; returns the complete group.

    A complete group made with the same model, crop, blocks, groups and input scale is reused; an
    incomplete one made with them keeps the blocks it has done.
    """
    name = f"infer:{node.basename}"
    scaled = _unscaled_arm(options) != node.basename
    params = {
        "model": fingerprint(model),
        "crop": options.stitch_crop_size,
        "block_groups": block_groups,
        "batch_size": options.batch_size,
        "groups": groups_key(groups),
        **({} if scaled else {"intensity_scale": False}),
    }
    with rt.timed(name):
        out = node.get("patches")
        if rt.reusable(name, out, params, model.name):
            rt.blocks[name] = {"computed": 0, "reused": int(out["patches"].cdata_shape[0])}
            return out
        log.info("stage infer: %s with %s", node.basename, model.name)
        result = infer(
            ds, groups, str(model), crop=options.stitch_crop_size, block_groups=block_groups,
            batch_size=options.batch_size, trust_bundle=options.trust_bundle, intensity_scale=scaled,
        )  # fmt: skip
        out = _prepare(node, result, to_jsonable(params), keep=not rt.force)
        started = time.time()
        out.attrs["attempts"] = [*out.attrs.get("attempts", []), started]
        source = f"{ds.attrs['store']}/data/diffraction"
        fix = "re-ingest the scan from its NPZ (`ptychozarr ingest IN.npz STORE --overwrite`)"
        done = _TimedDone(writable(out["done"]), writable(out["block_end"]))
        with read_errors(source, fix, DamagedScanError):
            rt.store_blocks(name, result["patches"].data, writable(out["patches"]), done)
        attempts = attempt_seconds(out.attrs["attempts"], out["block_end"][:], now=time.time())
        mark_complete(
            out, seconds=round(sum(attempts), 3), attempt_seconds=[round(a, 3) for a in attempts],
            mode=result.attrs["mode"], model_spec=result.attrs["model"],
            input_scale=result.attrs["input_scale"],
        )  # fmt: skip
    return out


def _unscaled_arm(options: InferOptions) -> str | None:
    """The key of the arm fed the normalised diffraction without its model's ``intensity_scale``: the
    Baseline under ``--compatibility compare_models`` (compare_models scales only its PINN's input), else
    none."""
    return arm_key("Baseline") if options.compatibility == "compare_models" else None


def attempt_seconds(starts: list[float], block_end: np.ndarray, *, now: float) -> list[float]:
    """Seconds of each attempt: from its start to the last block it stored (the last one: to ``now``).

    Parameters
    ----------
    starts : list of float
        Wall-clock start of each attempt, in order.
    block_end : ndarray of float
        Wall-clock time each block was stored (NaN: not stored).
    now : float
        Wall-clock end of the last attempt.
    """
    ends = np.sort(block_end[np.isfinite(block_end)])
    seconds = []
    for k, start in enumerate(starts):
        if k == len(starts) - 1:
            seconds.append(max(0.0, now - start))
            continue
        inside = ends[(ends >= start) & (ends < starts[k + 1])]
        seconds.append(float(inside[-1] - start) if len(inside) else 0.0)
    return seconds


class _TimedDone:
    """The ``done`` array as :meth:`Runtime.store_blocks` uses it: marking a block done first records
    the time in ``block_end``, so that a killed attempt's seconds survive it."""

    def __init__(self, done: zarr.Array, block_end: zarr.Array):
        self.done, self.block_end = done, block_end

    def __getitem__(self, key):
        return self.done[key]

    def __setitem__(self, key, value) -> None:
        self.block_end[key] = time.time()
        self.done[key] = value


def _prepare(node: zarr.Group, result: xr.Dataset, params: dict, *, keep: bool) -> zarr.Group:
    """The patches group to write into: an unfinished one with these parameters, or a new one.

    An unfinished (or complete) group is kept only with all of its ``positions`` and ``weights``; a block
    marked done whose patches chunk is missing (lost or deleted) is marked not done, so it is computed
    again rather than read as zeros.
    """
    patches = result["patches"].data
    old = node.get("patches")
    if keep and old is not None and old.attrs.get("params") == params and _resumable(old, patches):
        lost = [c[0] for c in missing_chunks(old["patches"])]
        done = writable(old["done"])
        redo = [i for i in lost if done[i]]
        if redo:
            log.warning("stage infer: %s: %d block(s) marked done lost their patches (first: block %d); "
                        "recomputing them", node.basename, len(redo), redo[0])  # fmt: skip
            for i in redo:
                done[i] = False
        log.info("stage infer: %s resumes, %d of %d blocks done", node.basename,
                 int(np.sum(done[:])), patches.numblocks[0])  # fmt: skip
        if "block_end" not in old:  # made before blocks recorded their time
            _block_end(old, patches.numblocks[0])
        return old
    if old is not None:
        del node["patches"]
    out = node.create_group("patches", attributes={"complete": False, "params": params})
    out.create_array(
        "patches", shape=patches.shape, dtype=np.complex64, chunks=(patches.chunks[0][0], *patches.shape[1:]),
        dimension_names=DIMS["patches"], **array_options(),
    )  # fmt: skip
    for name in ("positions", "weights"):
        out.create_array(name, data=result[name].values, dimension_names=DIMS[name], **array_options())
    done = out.create_array(
        "done", shape=(patches.numblocks[0],), dtype=bool, chunks=(1,), fill_value=False,
        dimension_names=("block",), **array_options(),
    )  # fmt: skip
    done[:] = False  # every chunk stored: a missing one is a lost one
    _block_end(out, patches.numblocks[0])
    return out


def _block_end(group: zarr.Group, blocks: int) -> None:
    """When each block was stored (wall-clock seconds; NaN until then), one chunk per block, every chunk
    stored (a missing one reads as NaN: no time known)."""
    block_end = group.create_array(
        "block_end", shape=(blocks,), dtype=np.float64, chunks=(1,), fill_value=np.nan,
        dimension_names=("block",), **array_options(),
    )  # fmt: skip
    block_end[:] = np.nan


def _resumable(old: zarr.Group, patches) -> bool:
    """Whether ``old`` has the arrays and shapes of ``patches``' blocks, with its positions and weights all
    stored (a missing ``done`` chunk reads as not done)."""
    if not all(name in old for name in ("patches", "positions", "weights", "done")):
        return False
    if old["patches"].shape != patches.shape or old["done"].shape != (patches.numblocks[0],):
        return False
    return not any(missing_chunks(old[name]) for name in ("positions", "weights"))
