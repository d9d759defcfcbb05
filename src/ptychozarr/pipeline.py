"""The comparison job: PtychoPINN's ``compare_models`` out of core, from a scan to scores and files.

Stages, each reading only what the previous one wrote and each marked complete only after its last chunk::

    ingest   input.npz → store.zarr/data                    (skipped for a .zarr input)
    group    data → groups                                   (global, seeded; reused when parameters match)
    infer    groups → arms/<arm>/patches                     (per model arm; crops only)
    stitch   patches → arms/<arm>/object                     (tile-owned partial sums)
    import   iterative NPZ → arms/<arm>/object               (the iterative arm)
    score    object → arms/<arm>/aligned, aligned_gt, attrs  (alignment, registration, metrics)
    report   arms → comparison_metrics.csv, FRC CSVs, plot, NPZs, run.json

A stage whose output is complete and was made with the same parameters and inputs is reused, so a run
killed at any point finishes on the next call with the same outputs; ``force=True`` redoes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import zarr
from dask.callbacks import Callback

from ptychozarr import align, cluster, memory
from ptychozarr.errors import InvalidParameterError, InvalidScanError, PtychozarrError
from ptychozarr.grouping import group
from ptychozarr.inference import cached_model, infer, load_count, oom_events
from ptychozarr.io import ingest, is_complete, mark_complete, open_dataset, open_store
from ptychozarr.io.npz import NpzReader, NpzWriter
from ptychozarr.io.validate import diffraction_key, diffraction_layout
from ptychozarr.metrics import evaluate
from ptychozarr.models import check_compatible
from ptychozarr.models.keras_model import sidecar_path
from ptychozarr.outputs import (
    ArmResult,
    write_comparison_plot,
    write_frc_curves,
    write_json,
    write_metrics_csv,
)
from ptychozarr.stitch import CanvasFrame, stitch_to_zarr

__all__ = ["Comparison", "compare"]

log = logging.getLogger(__name__)

_ARM_KEYS = {"PtychoPINN": "pinn", "Baseline": "baseline", "PtyChi": "ptychi", "Tike": "tike"}
_STITCH_STAGES = ("stitch-splat", "stitch-sum")  # task kinds of the stitch graph, as memory.plan names them
_MAX_BLOCK = 256  # groups per task at most: larger blocks add memory and no speed (batches are 32)
_PLOT_SIDE = 2048  # largest side of an image in comparison_plot.png (larger ones are strided)
_KILL_ENV = "PTYCHOZARR_KILL_AFTER_TASKS"  # fault injection for resume tests: SIGKILL after n tasks


@dataclass
class Comparison:
    """What :func:`compare` made.

    Attributes
    ----------
    output_dir, store : Path
        The output folder and the run's Zarr store.
    arms : list of ArmResult
        Scores per arm, in report order (a missing or failed arm has ``metrics`` None).
    errors : dict of str to str
        Why an arm has no scores, by label.
    objects : dict of str to dask.array.Array
        The stitched (or imported) objects, lazily read from the store, by label.
    run : dict
        The content of ``run.json``.
    """

    output_dir: Path
    store: Path
    arms: list[ArmResult]
    errors: dict[str, str] = field(default_factory=dict)
    objects: dict[str, da.Array] = field(default_factory=dict)
    run: dict = field(default_factory=dict)


def compare(
    test_data: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    *,
    output_dir: str | os.PathLike,
    ptychi_recon: str | os.PathLike | None = None,
    stitch_crop_size: int = 20,
    phase_align_method: str = "plane",
    register_ptychi_only: bool = False,
    skip_registration: bool = False,
    fixed_canvas: bool = False,
    alignment: str = "placement",
    max_registration_shift: float = 10.0,
    ms_ssim_sigma: float = 1.0,
    frc_sigma: float = 0.0,
    n_test_groups: int | None = None,
    subsample_seed: int | None = None,
    save_npz: bool = True,
    save_npz_aligned: bool = True,
    scheduler: str = "threads",
    n_workers: int | None = None,
    block_groups: int | str = "auto",
    batch_size: int = 32,
    memory_budget: str | int | None = None,
    tile: int = 1024,
    group_seed: int = 0,
    neighbours: int = 7,
    quiet: bool = False,
    force: bool = False,
) -> Comparison:
    """Run models on a scan, stitch, align and score them against the ground truth.

    Parameters
    ----------
    test_data : path
        The scan: an NPZ (ingested into ``output_dir/store.zarr``) or an ingested Zarr store (whose
        ``groups/`` the run writes or reuses; the arms always go to ``output_dir/store.zarr``).
    models : mapping of str to path
        Model arms, label → model path (``.keras`` with sidecar, or a PtychoPINN ``wts.h5.zip``), in
        report order, e.g. ``{"PtychoPINN": p, "Baseline": b}``. A path that does not exist gives the
        arm empty rows and an error, not a failed run.
    output_dir : path
        Where the store and the report files go.
    ptychi_recon : path, optional
        An iterative reconstruction NPZ (``reconstructed_object``, optional ``algorithm``,
        ``reconstruction_time``), imported as one more arm.
    stitch_crop_size : int
        Side M of the kept centre of each predicted patch (even, ``0 < M ≤ N``).
    phase_align_method : {"plane", "mean"}
        Phase alignment before the phase metrics.
    register_ptychi_only, skip_registration : bool
        Registration modes of compare_models (spec §4.2).
    fixed_canvas : bool
        Align on the bounding box of all scan coordinates (spec §4.1).
    alignment : {"placement", "coordinates"}
        How a stitched object meets the ground-truth grid: ``placement`` cuts both to the same object
        pixels from the stitcher's canvas frame (exact); ``coordinates`` is compare_models' centre-crop,
        which assumes the canvas centre is the scan box centre (spec §4.1). The iterative arm, which
        has no canvas frame, is always centre-cropped.
    max_registration_shift : float
        A registration shift larger than this (pixels, either axis) is taken for a failed registration
        (e.g. on a reconstruction without fine structure): the arm is scored unregistered, with a warning
        in ``run.json``, instead of being wrapped around by a bogus Fourier shift.
    ms_ssim_sigma, frc_sigma : float
        Gaussian pre-filter of the amplitude MS-SSIM, smoothing of the FRC curves.
    n_test_groups : int, optional
        Use a random subsample of this many scan points (seeded by ``subsample_seed``).
    save_npz, save_npz_aligned : bool
        Write ``reconstructions.npz`` / ``reconstructions_aligned.npz``.
    scheduler : str
        ``threads``, ``processes``, ``cuda`` or a scheduler address (:func:`ptychozarr.cluster.scheduler`).
    n_workers : int, optional
        Workers of a ``processes`` or ``cuda`` cluster.
    block_groups : int or "auto"
        Model inputs per task; ``auto`` picks the largest block the memory budget allows.
    batch_size : int
        Fixed batch of each model call.
    memory_budget : str or int, optional
        Host budget of the run (``"2GB"``); a plan over it is refused before any work.
    tile : int
        Side of the stitched object's tiles (Zarr chunks).
    group_seed, neighbours : int
        Seed and K of the neighbour grouping.
    quiet : bool
        No progress bars.
    force : bool
        Redo every stage.

    Returns
    -------
    Comparison
    """
    output_dir = Path(output_dir)
    test_data = Path(test_data)
    _check_parameters(
        test_data,
        models,
        ptychi_recon,
        stitch_crop_size,
        phase_align_method,
        alignment,
        block_groups,
        batch_size,
        tile,
        n_test_groups,
    )
    budget = memory.parse_budget(memory_budget)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(output_dir / "store.zarr", quiet=quiet, force=force)
    params = {k: v for k, v in locals().items() if k in _PARAMETER_NAMES}

    with cluster.scheduler(scheduler, n_workers=n_workers) as client, memory.PeakMemory() as peak:
        n_points, n_pix = _scan_shape(test_data)
        plan = _memory_plan(
            min(n_points, n_test_groups or n_points),
            n_pix,
            models,
            stitch_crop_size,
            block_groups,
            batch_size,
            tile,
            budget,
            client,
        )
        ds = run.stage_ingest(test_data)
        gridsize = max((cached_model(p).spec.gridsize for p in models.values()), default=1)
        groups = run.stage_group(ds, gridsize, neighbours, group_seed, n_test_groups, subsample_seed)
        arms, errors = [], {}
        for label, path in models.items():
            arm = ArmResult(_arm_key(label), label)
            try:
                run.stage_model_arm(
                    arm,
                    ds,
                    groups,
                    Path(path),
                    crop=stitch_crop_size,
                    block_groups=plan.params["block_groups"],
                    batch_size=batch_size,
                    tile=tile,
                )
            except PtychozarrError as exc:
                errors[label] = str(exc)
                log.warning("arm %s: %s", label, exc)
            arms.append(arm)
        if ptychi_recon is not None:
            arm = run.stage_iterative_arm(Path(ptychi_recon))
            arms.append(arm)
        run.stage_score(
            arms,
            ds,
            groups,
            errors,
            crop=stitch_crop_size,
            phase_align=phase_align_method,
            register_ptychi_only=register_ptychi_only,
            skip_registration=skip_registration,
            fixed_canvas=fixed_canvas,
            alignment=alignment,
            max_registration_shift=max_registration_shift,
            ms_ssim_sigma=ms_ssim_sigma,
            frc_sigma=frc_sigma,
        )
        measured = {"peak": peak.peak, **run.task_peaks}
        loads = {"client": load_count()}
        if client is not None:
            workers = memory.worker_peaks(client)
            measured["process"] = max(w["host"] for w in workers.values())
            loads |= client.run(load_count)

    report = _report(run, arms, ds, save_npz=save_npz, save_npz_aligned=save_npz_aligned)
    payload = {
        "inputs": _inputs(test_data, models, ptychi_recon, ds),
        "parameters": params,
        "versions": _versions(),
        "stages": run.timings,
        "reused": run.reused,
        "memory": memory.report(plan, measured),
        "model_loads": loads,
        "oom_retries": oom_events(),
        "errors": errors,
        "warnings": run.warnings,
        "outputs": report,
    }
    write_json(output_dir / "run.json", payload)
    return Comparison(output_dir, run.path, arms, errors, run.objects(arms), payload)


_PARAMETER_NAMES = (
    "stitch_crop_size",
    "phase_align_method",
    "register_ptychi_only",
    "skip_registration",
    "fixed_canvas",
    "alignment",
    "max_registration_shift",
    "ms_ssim_sigma",
    "frc_sigma",
    "n_test_groups",
    "subsample_seed",
    "scheduler",
    "n_workers",
    "block_groups",
    "batch_size",
    "memory_budget",
    "tile",
    "group_seed",
    "neighbours",
)


def _check_parameters(
    test_data, models, recon, crop, phase_align, alignment, block_groups, batch_size, tile, n_test_groups
) -> None:
    if not test_data.exists():
        raise InvalidParameterError(f"--test-data {test_data}: no such file or store")
    if not models and recon is None:
        raise InvalidParameterError(
            "nothing to compare: give --pinn-model, --baseline-model, --model or --ptychi-recon"
        )
    if crop <= 0 or crop % 2:
        raise InvalidParameterError(f"--stitch-crop-size {crop}: must be even and positive")
    if phase_align not in ("plane", "mean"):
        raise InvalidParameterError(f"--phase-align-method {phase_align!r}: use 'plane' or 'mean'")
    if alignment not in ("placement", "coordinates"):
        raise InvalidParameterError(f"--alignment {alignment!r}: use 'placement' or 'coordinates'")
    if block_groups != "auto" and (not isinstance(block_groups, int) or block_groups < 1):
        raise InvalidParameterError(f"--block-groups {block_groups!r}: a positive integer or 'auto'")
    for flag, value in (("--batch-size", batch_size), ("--tile", tile)):
        if value < 1:
            raise InvalidParameterError(f"{flag} {value}: must be at least 1")
    if n_test_groups is not None and n_test_groups < 1:
        raise InvalidParameterError(f"--n-test-groups {n_test_groups}: must be at least 1")
    for label, path in models.items():
        if not Path(path).exists():
            raise InvalidParameterError(
                f"model {label!r}: {path} does not exist; give an existing model path"
            )
    if recon is not None and not Path(recon).is_file():
        raise InvalidParameterError(f"--ptychi-recon {recon}: no such file")


def _arm_key(label: str) -> str:
    return _ARM_KEYS.get(label) or "".join(c if c.isalnum() else "_" for c in label.lower())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict:
    """Name, size and hash of a file (with a ``.keras`` model's sidecar) or of a directory's files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path, *(p for p in [sidecar_path(path)] if path.suffix == ".keras" and p.exists())]
    digest = hashlib.sha256()
    for f in files:
        digest.update(_sha256(f).encode())
    return {"name": path.name, "size": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


class _KillAfter(Callback):
    """Fault injection: SIGKILL this process after ``n`` tasks (``PTYCHOZARR_KILL_AFTER_TASKS``)."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def _posttask(self, key, result, dsk, state, worker_id):
        self.left -= 1
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


class _Run:
    """One run's store, stage bookkeeping (timings, reuse) and dask callbacks."""

    def __init__(self, path: Path, *, quiet: bool, force: bool):
        self.path, self.quiet, self.force = path, quiet, force
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.warnings: list[str] = []
        self.task_peaks: dict[str, int] = {}
        kill = os.environ.get(_KILL_ENV)
        self._callbacks = [_KillAfter(int(kill))] if kill else []

    # -- bookkeeping -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)

    def _reuse(self, name: str) -> None:
        self.reused.append(name)
        log.info("stage %s: reusing the complete result in %s", name, self.path)

    def compute(self, stage: str, func, *args, **kwargs):
        """Run a dask computation with this run's memory and fault callbacks, and a progress bar for the
        stages whose work grows with the scan (metrics make many short passes, logged instead)."""
        callbacks = [memory.TaskMemoryCallback(stages=_STITCH_STAGES), *self._callbacks]
        if not self.quiet and stage in ("infer", "stitch"):
            from tqdm.dask import TqdmCallback

            callbacks.append(TqdmCallback(desc=stage, leave=False))
        with contextlib.ExitStack() as stack:
            for cb in callbacks:
                stack.enter_context(cb)
            result = func(*args, **kwargs)
        peaks = callbacks[0].peaks()
        if stage == "stitch":
            peaks = {k: v for k, v in peaks.items() if k in _STITCH_STAGES}
        else:
            peaks = {stage: max(peaks.values(), default=0)}
        for name, value in peaks.items():
            self.task_peaks[name] = max(self.task_peaks.get(name, 0), value)
        return result

    def root(self) -> zarr.Group:
        return open_store(self.path, mode="r+")

    # -- stages ----------------------------------------------------------------------------------

    def stage_ingest(self, test_data: Path):
        if test_data.suffix != ".npz":
            return open_dataset(test_data)
        with self._timed("ingest"):
            if not self.force and self._ingested(test_data):
                self._reuse("ingest")
            else:
                log.info("stage ingest: %s → %s", test_data, self.path)
                ingest(test_data, self.path, overwrite=True)
        return open_dataset(self.path)

    def _ingested(self, source: Path) -> bool:
        try:
            data = open_store(self.path)["data"]
        except (PtychozarrError, KeyError):
            return False
        attrs = data.attrs
        return (
            is_complete(data)
            and attrs.get("source_size") == source.stat().st_size
            and attrs.get("source_sha256") == _sha256(source)
        )

    def stage_group(self, ds, gridsize, k, seed, n_subsample, subsample_seed):
        with self._timed("group"):
            points = None
            if n_subsample is not None and n_subsample < ds.sizes["pattern"]:
                rng = np.random.default_rng(subsample_seed)
                points = np.sort(rng.choice(ds.sizes["pattern"], n_subsample, replace=False))
            return group(ds, gridsize, k=k, seed=seed, points=points)

    def stage_model_arm(
        self, arm: ArmResult, ds, groups, path: Path, *, crop, block_groups, batch_size, tile
    ) -> None:
        root = self.root()
        params = {
            "model": _fingerprint(path),
            "crop": crop,
            "block_groups": block_groups,
            "batch_size": batch_size,
            "groups": _groups_key(groups),
        }
        node = root.require_group(f"arms/{arm.key}")
        patches = node.get("patches")
        with self._timed(f"infer:{arm.key}"):
            if not self.force and _matches(patches, params):
                self._reuse(f"infer:{arm.key}")
            else:
                log.info("stage infer: %s with %s", arm.key, path.name)
                result = infer(
                    ds, groups, str(path), crop=crop, block_groups=block_groups, batch_size=batch_size
                )
                patches = _write_patches(self, node, result, params)
        arm.computation_time_s = patches.attrs["seconds"]
        stitch_params = {"patches": params, "tile": tile}
        obj = node.get("object")
        with self._timed(f"stitch:{arm.key}"):
            if not self.force and _matches(obj, stitch_params):
                self._reuse(f"stitch:{arm.key}")
            else:
                source = da.from_zarr(patches["patches"])
                self.compute(
                    "stitch",
                    stitch_to_zarr,
                    node,
                    "object",
                    source,
                    patches["positions"][:],
                    patches["weights"][:],
                    tile=tile,
                    attrs={"params": stitch_params},
                    overwrite=True,
                )

    def stage_iterative_arm(self, path: Path) -> ArmResult:
        obj, seconds, label = read_reconstruction(path)
        arm = ArmResult(_arm_key(label), label, computation_time_s=seconds)
        node = self.root().require_group(f"arms/{arm.key}")
        params = {"recon": _fingerprint(path)}
        with self._timed(f"import:{arm.key}"):
            if not self.force and _matches(node.get("object"), params):
                self._reuse(f"import:{arm.key}")
            else:
                out = node.create_array(
                    "object",
                    shape=obj.shape,
                    dtype=np.complex64,
                    chunks=obj.shape,
                    overwrite=True,
                    attributes={"complete": False},
                )
                out[...] = obj
                mark_complete(out, params=params, label=label, seconds=seconds)
        return arm

    def stage_score(self, arms, ds, groups, errors, **options) -> None:
        gt = ds["objectGuess"].data if "objectGuess" in ds else None
        if gt is None:
            log.warning("the scan has no objectGuess: no metrics (as compare_models, no CSV rows)")
            return
        mode = (
            "none"
            if options.pop("skip_registration")
            else "ptychi-only"
            if options.pop("register_ptychi_only")
            else "all"
        )
        registered = align.arms_to_register([a.label for a in arms], mode, iterative_arms=("PtyChi", "Tike"))
        centres = np.asarray(groups["centres"].values)
        scan = np.stack([ds["xcoords"].values, ds["ycoords"].values], axis=1)
        for arm in arms:
            node = self.root().get(f"arms/{arm.key}")
            if node is None or "object" not in node or not is_complete(node["object"]):
                errors.setdefault(arm.label, "no reconstruction")
                continue
            params = options | {"object": dict(node["object"].attrs), "registered": arm.label in registered}
            with self._timed(f"score:{arm.key}"):
                if not self.force and _matches(node.get("aligned"), params):
                    self._reuse(f"score:{arm.key}")
                else:
                    try:
                        self._score(node, gt, centres, scan, params)
                    except PtychozarrError as exc:
                        errors[arm.label] = str(exc)
                        log.warning("arm %s: scoring failed: %s", arm.label, exc)
                        continue
            aligned = node["aligned"]
            arm.metrics = aligned.attrs["metrics"]
            arm.offset = tuple(aligned.attrs["offset"]) if aligned.attrs["offset"] is not None else None

    def _score(self, node, gt, centres, scan, params) -> None:
        """Align one arm's object to the ground truth, register it if asked, score it, store both."""
        log.info("stage score: aligning and scoring %s", node.basename)
        source = node["object"]
        recon = da.from_zarr(source)
        crop = params["crop"]
        if params["fixed_canvas"]:
            recon, truth = align.align_fixed_canvas(recon, gt, scan, crop)
        elif params["alignment"] == "placement" and "canvas" in source.attrs:
            origin = CanvasFrame.from_attrs(source.attrs["canvas"]).origin
            recon, truth = align.align_by_placement(recon, gt, origin, positions_xy=centres, patch_size=crop)
        else:
            recon, truth = align.align_by_coordinates(recon, gt, centres, crop)
        offset = None
        if params["registered"]:
            found = align.find_offset(recon, truth)
            if max(map(abs, found.offset)) <= params["max_registration_shift"]:
                recon, truth = align.shift_and_crop(recon, truth, found.offset)
                offset = found.offset
            else:
                self.warnings.append(
                    f"{node.basename}: registration found a shift of {found.offset} px, more than "
                    f"--max-registration-shift {params['max_registration_shift']}; scored unregistered"
                )
                log.warning(self.warnings[-1])
        metrics = self.compute(
            "metrics",
            evaluate,
            recon,
            truth,
            phase_align=params["phase_align"],
            ms_ssim_sigma=params["ms_ssim_sigma"],
            frc_sigma=params["frc_sigma"],
        )
        for name, image in (("aligned_gt", truth), ("aligned", recon)):
            out = node.create_array(
                name,
                shape=image.shape,
                dtype=np.complex64,
                chunks=_chunks(image.shape, 1024),
                overwrite=True,
                attributes={"complete": False},
            )
            self.compute("metrics", da.store, da.asarray(image).astype(np.complex64), out, lock=False)
        mark_complete(node["aligned_gt"])
        mark_complete(
            node["aligned"],
            params=_to_json(params),
            metrics=_to_json(metrics),
            offset=None if offset is None else [float(v) for v in offset],
        )

    def objects(self, arms) -> dict[str, da.Array]:
        root = open_store(self.path)
        return {
            a.label: da.from_zarr(root[f"arms/{a.key}/object"])
            for a in arms
            if f"arms/{a.key}/object" in root
        }


def _chunks(shape, side):
    return tuple(min(s, side) for s in shape)


def _groups_key(groups) -> dict:
    return {k: groups.attrs.get(k) for k in ("gridsize", "k", "seed", "input", "points")}


def _matches(node, params: dict) -> bool:
    """Whether ``node`` is a complete stage output made with ``params``."""
    return node is not None and is_complete(node) and node.attrs.get("params") == _to_json(params)


def _write_patches(run: _Run, node: zarr.Group, result, params: dict) -> zarr.Group:
    """Store an arm's crops, positions and weights; one writer per chunk; complete last."""
    if "patches" in node:
        del node["patches"]
    out = node.create_group("patches", attributes={"complete": False})
    patches = result["patches"].data
    target = out.create_array(
        "patches", shape=patches.shape, dtype=np.complex64, chunks=(patches.chunks[0][0], *patches.shape[1:])
    )
    out.create_array("positions", data=result["positions"].values)
    out.create_array("weights", data=result["weights"].values)
    t0 = time.perf_counter()
    run.compute("infer", da.store, patches, target, lock=False)
    mark_complete(
        out,
        params=params,
        seconds=round(time.perf_counter() - t0, 3),
        mode=result.attrs["mode"],
        model_spec=result.attrs["model"],
    )
    return out


def _to_json(value):
    """Metric dicts and parameters as JSON-able values (tuples → lists, numpy → python)."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def read_reconstruction(path: Path) -> tuple[np.ndarray, float | None, str]:
    """An iterative reconstruction NPZ: (complex object, computation time or None, label).

    Reads ``reconstructed_object`` (2-D complex), ``algorithm`` (label ``Tike`` for ``tike``, else
    ``PtyChi``, as compare_models) and ``reconstruction_time``. Members stored as pickled objects (e.g.
    a ``metadata`` dict) are never unpickled.
    """
    try:
        reader = NpzReader(path)
    except PtychozarrError as exc:
        raise InvalidScanError(f"--ptychi-recon {path}: {exc}") from None
    with reader:
        if "reconstructed_object" not in reader.members:
            raise InvalidScanError(
                f"--ptychi-recon {path}: no 'reconstructed_object' key (has "
                f"{sorted(reader.members)}); save the object under that key"
            )
        obj = reader.read("reconstructed_object")
        if obj.ndim != 2 or not np.iscomplexobj(obj):
            raise InvalidScanError(
                f"--ptychi-recon {path}: 'reconstructed_object' must be a 2-D complex "
                f"array, got {obj.dtype} {obj.shape}"
            )
        if not np.isfinite(obj).all():
            raise InvalidScanError(f"--ptychi-recon {path}: 'reconstructed_object' holds NaN or inf")
        algorithm = _scalar(reader, "algorithm")
        seconds = _scalar(reader, "reconstruction_time")
    label = "Tike" if str(algorithm).lower() == "tike" else "PtyChi"
    return obj, (float(seconds) if seconds is not None else None), label


def _scalar(reader: NpzReader, key: str):
    member = reader.members.get(key)
    if member is None or member.dtype.hasobject:
        return None
    return reader.read(key).item()


def _scan_shape(test_data: Path) -> tuple[int, int]:
    """Patterns and pattern side of a scan, from the NPZ header or the store, reading no data."""
    if test_data.suffix != ".npz":
        ds = open_dataset(test_data)
        return int(ds.sizes["pattern"]), int(ds.sizes["det_y"])
    with NpzReader(test_data) as npz:
        if "xcoords" not in npz.members:
            raise InvalidScanError(f"{test_data}: missing required key 'xcoords'")
        n_points = npz.members["xcoords"].shape[0] if npz.members["xcoords"].shape else 0
        layout = diffraction_layout(npz.members[diffraction_key(npz.members)], n_points)
    return layout.n_patterns, layout.size


def _memory_plan(n_points, n_pix, models, crop, block_groups, batch_size, tile, budget, client):
    """Project the run's memory, pick ``auto`` blocks, and refuse an over-budget plan before any work.

    The models' working memory is probed with one batch each (the largest counts); the per-process
    baseline is this process's RSS now on the threaded scheduler, the default on a cluster.
    """
    conc = cluster.concurrency(client)
    loaded = [cached_model(p) for p in models.values()]
    gridsize = max((m.spec.gridsize for m in loaded), default=1)
    for m in loaded:
        check_compatible(m.spec, n_pix, gridsize)
    channels = max((m.spec.channels for m in loaded), default=1)
    probe = max((_probe(m, batch_size) for m in loaded), default=0)
    args = dict(
        batch_size=batch_size,
        N=n_pix,
        C=channels,
        M=crop,
        model_probe=probe,
        output=loaded[0].spec.output if loaded else "complex",
        tile=tile,
        threads=conc.threads,
        processes=conc.processes,
        reserved=memory.measure_reserved() if client is None else None,
    )
    if block_groups == "auto":
        auto_budget = budget or int(0.5 * psutil.virtual_memory().available)
        block_groups = min(memory.choose_block_groups(auto_budget, max_groups=n_points, **args), _MAX_BLOCK)
    plan = memory.plan(block_groups=block_groups, **args)
    if budget is not None:
        memory.check(plan, budget)
    return plan


def _probe(model, batch_size: int) -> int:
    """Host bytes of one batch through ``model`` (:func:`ptychozarr.memory.probe_model`)."""
    spec = model.spec
    shape = (min(batch_size, spec.max_batch or batch_size), spec.N, spec.N, spec.channels)
    if spec.takes_positions:
        return memory.probe_model(model.predict_batch, shape, (shape[0], 1, 2, spec.channels))
    return memory.probe_model(lambda x: model.predict_batch(x, None), shape)


def _report(run: _Run, arms, ds, *, save_npz, save_npz_aligned) -> dict:
    out = run.path.parent
    root = open_store(run.path)
    written = {"metrics_csv": str(write_metrics_csv(out / "comparison_metrics.csv", arms))}
    for arm in arms:
        if arm.metrics is not None:
            write_frc_curves(out / f"{arm.key}_frc_curves.csv", arm.label, arm.metrics["frc"])
    panels = []
    for arm in arms:
        if f"arms/{arm.key}/aligned" in root:
            title = (
                arm.label
                if arm.offset is None
                else (f"{arm.label}\n(offset: ({arm.offset[0]:.2f}, {arm.offset[1]:.2f}))")
            )
            panels.append((title, _for_plot(root[f"arms/{arm.key}/aligned"])))
    gt_source = next(
        (root[f"arms/{a.key}/aligned_gt"] for a in arms if f"arms/{a.key}/aligned_gt" in root), None
    )
    if panels and gt_source is not None:
        panels.append(("Ground Truth", _for_plot(gt_source)))
        written["plot"] = str(write_comparison_plot(out / "comparison_plot.png", panels))
    if save_npz:
        written["reconstructions"] = str(_save_npz(out / "reconstructions.npz", root, arms, "object", ds))
    if save_npz_aligned:
        written["reconstructions_aligned"] = str(
            _save_npz(out / "reconstructions_aligned.npz", root, arms, "aligned", ds)
        )
    return written


def _for_plot(array: zarr.Array) -> np.ndarray:
    step = max(1, -(-max(array.shape) // _PLOT_SIDE))
    return np.asarray(array[::step, ::step])


def _save_npz(path: Path, root, arms, name: str, ds) -> Path:
    """Amplitude, phase and complex of each arm's ``name`` array (and the ground truth), row by row."""
    tmp = path.with_suffix(".tmp.npz")
    with NpzWriter(tmp, compress=True) as npz:
        for arm in arms:
            key = f"arms/{arm.key}/{name}"
            if key not in root:
                continue
            _stream_parts(npz, arm.key if arm.key != "pinn" else "ptychopinn", root[key])
            if name == "aligned":
                offset = arm.offset if arm.offset is not None else (np.nan, np.nan)
                npz.write(f"{arm.key}_offset_dy", np.float64(offset[0]))
                npz.write(f"{arm.key}_offset_dx", np.float64(offset[1]))
        if name == "object" and "objectGuess" in ds:
            _stream_parts(npz, "ground_truth", ds["objectGuess"].data)
        elif name == "aligned":
            gt = next(
                (root[f"arms/{a.key}/aligned_gt"] for a in arms if f"arms/{a.key}/aligned_gt" in root), None
            )
            if gt is not None:
                _stream_parts(npz, "ground_truth", gt)
    tmp.replace(path)
    return path


def _stream_parts(npz: NpzWriter, prefix: str, array) -> None:
    rows = max(1, 2**24 // max(1, array.shape[1] * 8))
    for part, func, dtype in (
        ("amplitude", np.abs, np.float32),
        ("phase", np.angle, np.float32),
        ("complex", np.asarray, np.complex64),
    ):
        with npz.stream(f"{prefix}_{part}", array.shape, dtype) as append:
            for start in range(0, array.shape[0], rows):
                append(func(np.asarray(array[start : start + rows])).astype(dtype))


def _inputs(test_data, models, recon, ds) -> dict:
    return {
        "test_data": {
            "path": str(test_data),
            "source": ds.attrs.get("source"),
            "size": ds.attrs.get("source_size"),
            "sha256": ds.attrs.get("source_sha256"),
            "patterns": int(ds.sizes["pattern"]),
            "N": int(ds.sizes["det_y"]),
        },
        "models": {
            label: (_fingerprint(Path(p)) | {"path": str(p)})
            if Path(p).exists()
            else {"path": str(p), "missing": True}
            for label, p in models.items()
        },
        "ptychi_recon": None if recon is None else _fingerprint(Path(recon)) | {"path": str(recon)},
    }


def _versions() -> dict:
    import importlib.metadata as md

    names = (
        "ptychozarr",
        "dask",
        "distributed",
        "zarr",
        "numpy",
        "xarray",
        "scikit-image",
        "scipy",
        "tensorflow",
        "keras",
    )
    found = {}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found
