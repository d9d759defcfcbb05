"""The comparison job: PtychoPINN's ``compare_models`` out of core, from a scan to scores and files.

:func:`compare` is a short sequence of stage calls (``ptychozarr.stages``), run by a
:class:`~ptychozarr.runtime.Runtime` inside the lock of the output directory::

    validate  config against the scan's header        (refuses before any work)
    ingest    input.npz → store.zarr/data              (skipped for a .zarr input)
    group     data → groups                            (global, seeded; reused when parameters match)
    infer     groups → arms/<arm>/patches              (per model arm; per-block completion)
    stitch    patches → arms/<arm>/object              (tile-owned partial sums)
    iterative NPZ → arms/<arm>/object                  (the iterative arm)
    score     object → arms/<arm>/aligned, aligned_gt  (alignment, registration, metrics)
    report    arms → comparison_metrics.csv, FRC CSVs, plot, NPZs, run.json

A stage whose output is complete and was made with the same parameters and inputs is reused, and an
inference stopped in the middle keeps its finished blocks, so a run killed at any point finishes on
the next call with the same outputs; ``force=True`` redoes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import psutil
import xarray as xr
import zarr

from ptychozarr import _tf, align, cluster, memory, report, stages
from ptychozarr.config import CompareConfig
from ptychozarr.errors import PtychozarrError
from ptychozarr.inference import cached_model, load_count, oom_events
from ptychozarr.io import consolidate
from ptychozarr.io.store import DamagedScanError
from ptychozarr.preflight import ScanHeader, validate
from ptychozarr.report import ArmResult
from ptychozarr.runtime import Runtime, output_lock
from ptychozarr.stages._common import arm_key, fingerprint, open_run_store, unconsolidate
from ptychozarr.stitch import CanvasFrame

__all__ = ["Comparison", "compare", "run_compare"]

log = logging.getLogger(__name__)

_MAX_BLOCK = 256  # groups per task at most: larger blocks add memory and no speed (batches are 32)
_ITERATIVE = ("PtyChi", "Tike")


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
    **options: Any,
) -> Comparison:
    """Run models on a scan, stitch, align and score them against the ground truth.

    Parameters
    ----------
    test_data : path
        The scan: an NPZ (ingested into ``output_dir/store.zarr``) or an ingested Zarr store (whose
        ``groups/`` the run writes or reuses; the arms always go to ``output_dir/store.zarr``).
    models : mapping of str to path
        Model arms, label → model path (``.keras`` with sidecar, or a PtychoPINN ``wts.h5.zip`` with
        ``trust_bundle=True``), in report order, e.g. ``{"PtychoPINN": p, "Baseline": b}``.
    output_dir : path
        Where the store and the report files go (one run at a time: a lock refuses a second).
    ptychi_recon : path, optional
        An iterative reconstruction NPZ (2-D complex ``reconstructed_object``, optional ``algorithm``,
        ``reconstruction_time``), imported as one more arm.
    **options
        Any option of :class:`ptychozarr.config.CompareConfig` by name (``stitch_crop_size``,
        ``block_groups``, ``skip_registration``, ``memory_budget``, ``quiet`` …; see
        ``ptychozarr compare --help``). An unknown name raises with the nearest valid one.

    Returns
    -------
    Comparison
    """
    config = CompareConfig.from_options(test_data, models, output_dir, ptychi_recon, options)
    return run_compare(config)


def run_compare(config: CompareConfig) -> Comparison:
    """Run the comparison a :class:`~ptychozarr.config.CompareConfig` describes (see :func:`compare`).

    A run whose every stage is complete with the same inputs and parameters costs only its checks: the
    memory plan recorded by the run that made it is reused (no model is loaded, TensorFlow is not
    imported) and so are the report's files. When the plan must be made without a memory budget to
    check it against, TensorFlow is imported while the scan is ingested and grouped.
    """
    rt = Runtime(quiet=config.run.quiet, force=config.run.force)
    with rt.timed("validate"):
        header = validate(config)
        if config.ptychi_recon is not None and header.has_truth:
            frame = stages.iterative.check_frame(
                config.ptychi_recon, config.test_data, config.infer.stitch_crop_size
            )
            log.info("iterative reconstruction %s: %s frame", config.ptychi_recon.name, frame)
    local = config.run.scheduler in ("processes", "cuda")
    with output_lock(config.output_dir), memory.PeakMemory(children=local) as peak:
        rt.memory = peak
        store = config.output_dir / "store.zarr"
        scheduler = cluster.scheduler(config.run.scheduler, n_workers=config.run.n_workers)
        with scheduler as client:
            unconsolidate(store)
            plan_key = _plan_key(config, header)
            plan = None if rt.force else _recorded_plan(store, plan_key)
            if plan is None and config.run.memory_budget is not None:  # refuse before any work
                with rt.timed("plan"):
                    plan = _memory_plan(config, header, client)
            with _tf.preloading(plan is None and bool(config.models)):
                ds = stages.ingest.run(rt, config.test_data, store)
                groups = stages.group.run(rt, ds, header.gridsize, config.group, config.scan)
                if plan is None:
                    with rt.timed("plan"):
                        plan = _memory_plan(config, header, client)
            root = open_run_store(store)
            root.attrs["plan"] = {"key": plan_key, "params": report.to_jsonable(plan.params)}
            arms, errors = _model_arms(rt, root, ds, groups, config, plan.params["block_groups"])
            if config.ptychi_recon is not None:
                key, label, seconds = stages.iterative.run(rt, root, config.ptychi_recon)
                arms.append(ArmResult(key, label, computation_time_s=seconds))
            if header.has_truth:
                _score_arms(rt, root, ds, groups, arms, errors, config)
            measured = {"peak": peak.peak, **rt.task_peaks}
            loads = {"client": load_count()}
            if client is not None:
                workers = memory.worker_peaks(client)
                measured["process"] = max(w["host"] for w in workers.values())
                loads |= client.run(load_count)
        with rt.timed("report"):
            written = _report(rt, root, arms, ds, config, header)
            provenance = {
                "inputs": _inputs(config, ds),
                "parameters": config.options(exclude=("quiet", "force")),
                "versions": _versions(),
            }
            root.attrs.update(report.to_jsonable(provenance))
            consolidate(store)
        measured["peak"] = peak.peak
        payload = {
            **provenance,
            "stages": rt.stage_record(),
            "stage_memory": rt.stage_memory(),
            "graphs": rt.graphs,
            "reused": rt.reused,
            "blocks": rt.blocks,
            "memory": memory.report(plan, measured),
            "model_loads": loads,
            "oom_retries": oom_events(),
            "errors": errors,
            "warnings": rt.warnings,
            "outputs": written,
        }
        report.write_json(config.output_dir / "run.json", payload)
    objects = {
        a.label: da.from_zarr(root[f"arms/{a.key}/object"]) for a in arms if f"arms/{a.key}/object" in root
    }
    return Comparison(config.output_dir, store, arms, errors, objects, payload)


def _model_arms(rt, root, ds, groups, config, block_groups) -> tuple[list[ArmResult], dict[str, str]]:
    """Infer and stitch every model arm; an arm that fails keeps empty rows and an error."""
    arms, errors = [], {}
    for label, path in config.models:
        arm = ArmResult(arm_key(label), label)
        node = root.require_group(f"arms/{arm.key}")
        try:
            patches = stages.infer.run(rt, node, ds, groups, path, config.infer, block_groups)
            arm.computation_time_s = patches.attrs["seconds"]
            stages.stitch.run(rt, node, config.stitch.tile)
        except DamagedScanError:  # the scan itself: every arm would fail, the run is refused
            raise
        except PtychozarrError as exc:
            errors[label] = str(exc)
            log.warning("arm %s: %s", label, exc)
        arms.append(arm)
    return arms, errors


def _score_arms(rt, root, ds, groups, arms, errors, config) -> None:
    """Align (and register) every arm that has an object, then score them all on one common box.

    The registration mode picks which arms are registered; each arm is marked registered,
    unregistered, or rejected (registration asked but its measurement not accepted, with the reason).
    """
    score = config.score
    mode = "none" if score.skip_registration else "ptychi-only" if score.register_ptychi_only else "all"
    registered = align.arms_to_register([a.label for a in arms], mode, iterative_arms=_ITERATIVE)
    gt = ds["objectGuess"].data
    centres = np.asarray(groups["centres"].values)
    scan = np.stack([ds["xcoords"].values, ds["ycoords"].values], axis=1)
    aligned = {}
    for arm in arms:
        node = root.get(f"arms/{arm.key}")
        if node is None or "object" not in node or not node["object"].attrs.get("complete"):
            errors.setdefault(arm.label, "no reconstruction")
            continue
        try:
            aligned[arm.label] = stages.score.align_arm(
                rt, node, gt, centres, scan, score, registered=arm.label in registered,
                crop=config.infer.stitch_crop_size,
            )  # fmt: skip
        except PtychozarrError as exc:
            errors[arm.label] = str(exc)
            log.warning("arm %s: scoring failed: %s", arm.label, exc)
    try:
        scored = stages.score.score_arms(rt, list(aligned.values()))
    except PtychozarrError as exc:  # e.g. no common box: no arm is scored
        errors.update(dict.fromkeys(aligned, f"scoring failed: {exc}"))
        log.warning("scoring failed: %s", exc)
        return
    by_label = {a.label: a for a in arms}
    for label, done in zip(aligned, scored, strict=True):
        arm, registration = by_label[label], aligned[label].registration
        arm.metrics = _nan_for_none(done.attrs["metrics"])
        arm.offset = aligned[label].offset
        arm.registered = arm.offset is not None
        if registration is not None and not registration["accepted"]:
            arm.registration_note = registration["reason"]


def _nan_for_none(value):
    """Metrics read back from JSON attrs, with NaN where JSON holds null."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return float("nan") if value is None else value


def _plan_key(config: CompareConfig, header: ScanHeader) -> str:
    """Digest of everything the memory plan depends on: the models' contents, the scan's shape and the
    options of inference, stitching and the scheduler (the probes measured then are kept with it)."""
    return _digest(
        {
            "models": [fingerprint(path) for _, path in config.models],
            "scan": [header.patterns, header.N, config.scan.n_test_groups],
            "infer": config.infer.__dict__,
            "stitch": config.stitch.__dict__,
            "run": [config.run.scheduler, config.run.n_workers, config.run.memory_budget],
        }
    )


def _recorded_plan(store: Path, key: str) -> memory.Plan | None:
    """The plan an earlier run in ``store`` made under the same :func:`_plan_key`, re-projected from
    its recorded parameters (no model is loaded); None when there is none."""
    if not (store / "zarr.json").is_file():
        return None
    recorded = open_run_store(store).attrs.get("plan")
    if not isinstance(recorded, dict) or recorded.get("key") != key:
        return None
    return _project(**recorded["params"])


def _digest(value) -> str:
    """SHA-256 of a JSON-able value (keys sorted)."""
    text = json.dumps(report.to_jsonable(value), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _memory_plan(config: CompareConfig, header: ScanHeader, client) -> memory.Plan:
    """Project the run's memory, pick ``auto`` blocks, and refuse an over-budget plan before any work.

    The models' working memory is probed with one batch each (the largest counts); the per-process
    baseline is this process's RSS now on the threaded scheduler, the default on a cluster. On the
    ``cuda`` scheduler the device side is the models' probe on the GPU.
    """
    infer, budget = config.infer, config.run.memory_budget
    n_points = min(header.patterns, config.scan.n_test_groups or header.patterns)
    conc = cluster.concurrency(client)
    loaded = [cached_model(p, trust_bundle=infer.trust_bundle) for _, p in config.models]
    on_gpu = config.run.scheduler == "cuda"
    args = dict(
        batch_size=infer.batch_size,
        N=header.N,
        channels=max((m.spec.channels for m in loaded), default=1),
        crop=infer.stitch_crop_size,
        model_probe=max((_probe(m, infer.batch_size) for m in loaded), default=0),
        device=max((_probe(m, infer.batch_size, "GPU:0") for m in loaded), default=0) if on_gpu else None,
        tile=config.stitch.tile,
        threads=conc.threads,
        processes=conc.processes,
        reserved=memory.measure_reserved() if client is None else None,
    )
    block_groups = infer.block_groups
    if block_groups == "auto":
        auto_budget = budget or int(0.5 * psutil.virtual_memory().available)
        block_groups = memory.choose_block_groups(auto_budget, max_groups=n_points, factory=_project, **args)
        block_groups = min(block_groups, _MAX_BLOCK)
    plan = _project(block_groups=block_groups, **args)
    if budget is not None:
        memory.check(plan, budget)
    return plan


def _project(
    *, block_groups, batch_size, N, channels, crop, model_probe, device, tile, threads, processes, reserved
) -> memory.Plan:
    """The run's plan from each stage's own projection: inference, stitching, metrics on the tiles."""
    params = dict(locals())
    infer, held = stages.infer.project_memory(
        block_groups=block_groups, batch_size=batch_size, N=N, channels=channels, crop=crop,
        model_probe=model_probe,
    )  # fmt: skip
    tasks = (
        infer,
        *stages.stitch.project_memory(patch_size=crop, tile=tile, block_patches=block_groups),
        stages.score.project_memory(tile=tile),
    )
    return memory.Plan(
        tasks,
        memory.DEFAULT_RESERVED if reserved is None else int(reserved),
        threads,
        processes,
        device,
        held,
        params=params,
        factory=_project,
    )


def _probe(model, batch_size: int, device: str = "cpu") -> int:
    """Bytes of one batch through ``model`` on ``device`` (:func:`ptychozarr.memory.probe_model`)."""
    spec = model.spec
    shape = (min(batch_size, spec.max_batch or batch_size), spec.N, spec.N, spec.channels)
    if spec.takes_positions:
        return memory.probe_model(
            model.predict_batch, shape, (shape[0], 1, 2, spec.channels), device=device, model=model
        )
    return memory.probe_model(lambda x: model.predict_batch(x, None), shape, device=device, model=model)


def _report(
    rt: Runtime, root: zarr.Group, arms: list[ArmResult], ds, config: CompareConfig, header: ScanHeader
) -> dict:
    """The files beside the store, reused when an earlier report wrote them from the same results.

    The results are the arms' scores and the attributes of every array the files are drawn from
    (which carry each stage's parameters and inputs), with the options of the report.
    """
    sources = {
        a.key: {name: dict(node.attrs) for name, node in root[f"arms/{a.key}"].arrays()}
        for a in arms
        if f"arms/{a.key}" in root
    }
    key = _digest(
        {
            "arms": [a.__dict__ for a in arms],
            "sources": sources,
            "output": config.output.__dict__,
            "title": _title(config, ds),
            "truth": header.has_truth,
        }
    )
    recorded = root.attrs.get("report")
    if (
        not rt.force
        and isinstance(recorded, dict)
        and recorded.get("key") == key
        and all(Path(f).is_file() for f in recorded["outputs"].values())
    ):
        rt.reuse("report", config.output_dir)
        return dict(recorded["outputs"])
    written = _write_report(root, arms, ds, config, header)
    root.attrs["report"] = {"key": key, "outputs": written}
    return written


def _write_report(
    root: zarr.Group, arms: list[ArmResult], ds, config: CompareConfig, header: ScanHeader
) -> dict:
    """The files beside the store (:mod:`ptychozarr.report`); without ground truth no CSV and no
    aligned NPZ, and a plot of the reconstructions alone."""
    out = config.output_dir
    written: dict[str, str] = {}
    objects = {a.key: root[f"arms/{a.key}/object"] for a in arms if f"arms/{a.key}/object" in root}
    scored = [a for a in arms if a.metrics is not None]
    if header.has_truth:
        written["metrics_csv"] = str(report.write_metrics_csv(out / "comparison_metrics.csv", arms))
        for arm in scored:
            report.write_frc_curves(out / f"{arm.key}_frc_curves.csv", arm.label, arm.metrics["frc"])
    else:
        log.warning(
            "the scan has no objectGuess (ground truth): reconstructions and plot only, no "
            "comparison_metrics.csv (as compare_models)"
        )
    if scored:
        aligned = {a.key: root[f"arms/{a.key}/aligned"] for a in scored}
        truths = {a.key: root[f"arms/{a.key}/aligned_gt"] for a in scored}
        written["plot"] = str(
            report.write_comparison_figure(
                out / "comparison_plot.png", {a.label: truths[a.key] for a in scored},
                {a.label: aligned[a.key] for a in scored}, arms, title=_title(config, ds),
                pixel_size_m=config.output.pixel_size or ds.attrs.get("pixel_size_m"),
            )
        )  # fmt: skip
        if config.output.save_npz_aligned:
            offsets = {a.key: a.offset for a in scored}
            written["reconstructions_aligned"] = str(
                report.write_aligned_npz(
                    out / "reconstructions_aligned.npz", aligned, truths, offsets=offsets
                )
            )
    elif objects and not header.has_truth:
        panels = [(a.label, root[f"arms/{a.key}/object"]) for a in arms if a.key in objects]
        written["plot"] = str(report.write_objects_plot(out / "comparison_plot.png", panels))
    if config.output.save_npz:
        truth = ds["objectGuess"].data if header.has_truth else None
        origins = {key: _origin(root[f"arms/{key}"]) for key in objects}
        written["reconstructions"] = str(
            report.write_reconstructions_npz(
                out / "reconstructions.npz", objects, origins, ground_truth=truth
            )
        )
    return written


def _title(config: CompareConfig, ds: xr.Dataset) -> str:
    """The figure's title: the scan's name, its size and the crop."""
    return (
        f"{Path(config.test_data).name}: {ds.sizes['pattern']} patterns of {ds.sizes['det_y']}², "
        f"crop M = {config.infer.stitch_crop_size}"
    )


def _origin(node: zarr.Group) -> tuple[float, float] | None:
    """Object pixel of an object's pixel (0, 0): the canvas frame's origin for a stitched object,
    (0, 0) for an iterative object in the whole-object frame, None when unknown."""
    source = node["object"]
    if "canvas" in source.attrs:
        return tuple(CanvasFrame.from_attrs(source.attrs["canvas"]).origin)
    aligned = node.get("aligned")
    return (0.0, 0.0) if aligned is not None and aligned.attrs.get("frame") == "object" else None


def _inputs(config: CompareConfig, ds: xr.Dataset) -> dict:
    recon = config.ptychi_recon
    return {
        "test_data": {
            "path": str(config.test_data),
            "source": ds.attrs.get("source"),
            "size": ds.attrs.get("source_size"),
            "sha256": ds.attrs.get("source_sha256"),
            "patterns": int(ds.sizes["pattern"]),
            "N": int(ds.sizes["det_y"]),
        },
        "models": {label: fingerprint(p) | {"path": str(p)} for label, p in config.models},
        "ptychi_recon": None if recon is None else fingerprint(recon) | {"path": str(recon)},
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
