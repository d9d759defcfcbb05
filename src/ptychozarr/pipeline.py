"""The comparison job: PtychoPINN's ``compare_models`` out of core, from a scan to scores and files.

:func:`compare` is a short sequence of stage calls (``ptychozarr.stages``), run by a
:class:`~ptychozarr.runtime.Runtime` inside the lock of the output directory::

    validate  config against the scan's header        (refuses before any work)
    ingest    input.npz → store.zarr/data              (skipped for a .zarr input)
    group     data → groups                            (global, seeded; reused when parameters match)
    infer     groups → arms/<arm>/patches              (per model arm; per-block completion)
    stitch    patches → arms/<arm>/object              (tile-owned partial sums)
    iterative NPZ → arms/<arm>/object                  (the iterative arm)
    score     object → scores/<arm>/aligned, aligned_gt (alignment, registration, metrics)
    report    arms → comparison_metrics.csv, FRC CSVs, plot, NPZs, run.json

A stage whose output is complete and was made with the same parameters and inputs is reused, and an
inference stopped in the middle keeps its finished blocks, so a run killed at any point finishes on
the next call with the same outputs; ``force=True`` redoes everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ptychozarr import _tf, cluster, memory, report, stages
from ptychozarr.config import CompareConfig
from ptychozarr.errors import InvalidParameterError, PtychozarrError
from ptychozarr.inference import load_count, oom_events, release_chunks
from ptychozarr.io import consolidate
from ptychozarr.io.store import DamagedScanError, zarr_source
from ptychozarr.models import Model
from ptychozarr.plan import RunPlan, digest, resolve
from ptychozarr.preflight import ScanHeader
from ptychozarr.report import ArmResult
from ptychozarr.runtime import Runtime, output_lock
from ptychozarr.stages._common import fingerprint, open_run_store, unconsolidate
from ptychozarr.stitch import CanvasFrame

__all__ = ["Comparison", "compare", "run_compare"]

log = logging.getLogger(__name__)



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
    test_data: str | os.PathLike | xr.Dataset,
    models: Mapping[str, str | os.PathLike | Model],
    *,
    output_dir: str | os.PathLike,
    ptychi_recon: str | os.PathLike | None = None,
    **options: Any,
) -> Comparison:
    """Run models on a scan, stitch, align and score them against the ground truth.

    Parameters
    ----------
    test_data : path or xarray.Dataset
        The scan: an NPZ (ingested into ``output_dir/store.zarr``), an ingested Zarr store (whose
        ``groups/`` the run writes or reuses; the arms always go to ``output_dir/store.zarr``), or the
        dataset :func:`ptychozarr.open_dataset` returns for one, unchanged (a selection of it is refused:
        write it to a store of its own first).
    models : mapping of str to path or Model
        Model arms, label → model path (``.keras`` with sidecar, or a PtychoPINN ``wts.h5.zip`` with
        ``trust_bundle=True``) or a model loaded from one (:func:`ptychozarr.load_model`,
        :func:`ptychozarr.models.ptychopinn.load_bundle`), in report order, e.g.
        ``{"PtychoPINN": p, "Baseline": b}``. A loaded model's file is what runs (loaded again by each
        worker), so a loaded bundle needs ``trust_bundle=True`` here too.
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
    paths = {label: _model_path(label, model) for label, model in models.items()}
    config = CompareConfig.from_options(_scan_path(test_data), paths, output_dir, ptychi_recon, options)
    return run_compare(config)


def _scan_path(test_data: str | os.PathLike | xr.Dataset) -> str | os.PathLike:
    """The path of the scan ``compare`` was given: itself, or the store a dataset was opened from."""
    if not isinstance(test_data, xr.Dataset):
        return test_data
    store = test_data.attrs.get("store")
    stored = "diffraction" in test_data and zarr_source(test_data["diffraction"].data) is not None
    if store is None or not stored:
        raise InvalidParameterError(
            "compare(dataset): the dataset is not a whole ingested store as ptychozarr.open_dataset returns "
            "it (a selection or an in-memory dataset); save the scan as an NPZ and pass its path, or pass "
            "open_dataset(store) unchanged"
        )
    return store


def _model_path(label: str, model: str | os.PathLike | Model) -> str | os.PathLike:
    """The file of a model arm: the path given, or the file a loaded model was read from."""
    if not isinstance(model, Model):
        return model
    path = getattr(model, "path", None)
    if path is None:
        raise InvalidParameterError(
            f"models[{label!r}] was built in memory and has no file; save it "
            "(ptychozarr.models.save_keras) and pass its path"
        )
    return path


def run_compare(config: CompareConfig) -> Comparison:
    """Run the comparison a :class:`~ptychozarr.config.CompareConfig` describes (see :func:`compare`).

    A run whose every stage is complete with the same inputs and parameters costs only its checks: the
    memory plan recorded by the run that made it is reused (no model is loaded, TensorFlow is not
    imported) and so are the report's files. When the memory plan must be made and no budget asks for a
    refusal before any work, TensorFlow is imported while the scan is ingested and grouped.
    """
    rt = Runtime(quiet=config.run.quiet, force=config.run.force)
    memory.map_large_blocks()
    with rt.timed("validate"):
        plan = resolve(config)
    kind = cluster.kind(config.run.scheduler)
    with output_lock(config.output_dir), memory.PeakMemory(children=kind.local_workers) as peak:
        rt.memory = peak
        with cluster.scheduler(config.run.scheduler, n_workers=config.run.n_workers) as client:
            unconsolidate(plan.store)
            plan = plan.with_recorded_memory()
            if plan.memory is None and config.run.memory_budget is not None:  # refused before any work
                with rt.timed("plan"):
                    plan = plan.with_memory(client)
            with _tf.preloading(plan.memory is None and bool(plan.arms)):
                ds = stages.ingest.run(rt, config.test_data, plan.store)
                groups = stages.group.run(rt, ds, plan.scan.gridsize, config.group, config.scan)
                if plan.memory is None:
                    with rt.timed("plan"):
                        plan = plan.with_memory(client)
            root = open_run_store(plan.store)
            plan.record(root)
            arms, errors = _model_arms(rt, root, ds, groups, plan, client, kind)
            if config.ptychi_recon is not None:
                key, label, seconds = stages.iterative.run(rt, root, config.ptychi_recon)
                arms.append(ArmResult(key, label, computation_time_s=seconds))
            if plan.scan.has_truth:
                _score_arms(rt, root, ds, groups, arms, errors, plan)
            measured = {"peak": peak.peak, **rt.task_peaks}
            loads = {"client": load_count()}
            if not kind.in_process:
                workers = memory.worker_peaks(client)
                measured["process"] = max(w["host"] for w in workers.values())
                devices = [w["device"] for w in workers.values() if w["device"] is not None]
                if devices:  # GPU workers: the largest device peak, beside the plan's projected device
                    measured["device"] = max(devices)
                loads |= client.run(load_count)
        with rt.timed("report"):
            written = _report(rt, root, arms, ds, plan)
            provenance = {
                "inputs": _inputs(config, ds),
                "parameters": config.options(exclude=("quiet", "force")),
                "versions": _versions(),
            }
            root.attrs.update(report.to_jsonable(provenance))
            consolidate(plan.store)
        measured["peak"] = peak.peak
        payload = {
            **provenance,
            "stages": rt.stage_record(),
            "stage_memory": rt.stage_memory(),
            "graphs": rt.graphs,
            "reused": rt.reused,
            "blocks": rt.blocks,
            "memory": memory.report(plan.memory, measured),
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
    return Comparison(config.output_dir, plan.store, arms, errors, objects, payload)


def _model_arms(
    rt: Runtime, root, ds, groups, plan: RunPlan, client, kind: cluster.SchedulerKind
) -> tuple[list[ArmResult], dict[str, str]]:
    """Infer and stitch every model arm; an arm that fails keeps empty rows and an error."""
    arms, errors = [], {}
    for arm in plan.arms:
        result = ArmResult(arm.key, arm.label)
        node = root.require_group(f"arms/{arm.key}")
        try:
            with _chunks_released(client, kind):
                patches = stages.infer.run(
                    rt, node, ds, groups, arm.model, plan.config.infer, plan.block_groups
                )  # fmt: skip
            result.computation_time_s = patches.attrs["seconds"]
            stages.stitch.run(rt, node, plan.tile, ds.attrs.get("pixel_size_m"), plan.config.stitch.canvas)
        except DamagedScanError:  # the scan itself: every arm would fail, the run is refused
            raise
        except PtychozarrError as exc:
            errors[arm.label] = str(exc)
            log.warning("arm %s: %s", arm.label, exc)
        arms.append(result)
    return arms, errors


@contextlib.contextmanager
def _chunks_released(client, kind: cluster.SchedulerKind):
    """Free the decoded-chunk cache of this process (and, when the block ends without an error, of every
    worker of ``client``): the chunks serve no later stage and would stay in memory for the rest of the
    run."""
    try:
        yield
    finally:
        release_chunks()
    if not kind.in_process:
        client.run(release_chunks)


def _score_arms(rt: Runtime, root, ds, groups, arms, errors, plan: RunPlan) -> None:
    """Align (and register) every arm that has an object, then score them all on one common box.

    The plan says which arms are registered; each arm is marked registered, unregistered, or rejected
    (registration asked but its measurement not accepted, with the reason).
    """
    registered = plan.registered([a.label for a in arms])
    gt = ds["objectGuess"]
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
                rt, node, gt, centres, scan, plan.config.score, registered=arm.label in registered,
                crop=plan.crop,
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
        if registration is not None:
            arm.registration_confidence = registration["confidence"]
            if not registration["accepted"]:
                arm.registration_note = registration["reason"]


def _nan_for_none(value):
    """Metrics read back from JSON attrs, with NaN where JSON holds null."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return float("nan") if value is None else value


def _report(rt: Runtime, root: zarr.Group, arms: list[ArmResult], ds, plan: RunPlan) -> dict:
    """The files beside the store, reused when an earlier report wrote them from the same results.

    The results are the arms' scores and the attributes of every array the files are drawn from
    (which carry each stage's parameters and inputs), with the options of the report.
    """
    config = plan.config
    sources = {
        f"{group}/{a.key}": {name: dict(node.attrs) for name, node in root[f"{group}/{a.key}"].arrays()}
        for a in arms
        for group in ("arms", "scores")
        if f"{group}/{a.key}" in root
    }
    key = digest(
        {
            "arms": [a.__dict__ for a in arms],
            "sources": sources,
            "output": config.output.__dict__,
            "title": _title(config, ds),
            "plot": _plot_limits(config, arms) | {"phase_align": config.score.phase_align_method},
            "truth": plan.scan.has_truth,
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
    written = _write_report(root, arms, ds, config, plan.scan)
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
            if "frc_hann" in arm.metrics:  # the Hann-windowed curves, to Nyquist
                hann = out / f"{arm.key}_frc_curves_hann.csv"
                report.write_frc_curves(hann, arm.label, arm.metrics["frc_hann"])
    else:
        log.warning(
            "the scan has no objectGuess (ground truth): reconstructions and plot only, no "
            "comparison_metrics.csv (as compare_models)"
        )
    if scored:
        aligned = {a.key: root[f"scores/{a.key}/aligned"] for a in scored}
        truths = {a.key: root[f"scores/{a.key}/aligned_gt"] for a in scored}
        written["plot"] = str(
            report.write_comparison_figure(
                out / "comparison_plot.png", {a.label: truths[a.key] for a in scored},
                {a.label: aligned[a.key] for a in scored}, arms, title=_title(config, ds),
                pixel_size_m=config.output.pixel_size or ds.attrs.get("pixel_size_m"),
                phase_align=config.score.phase_align_method, **_plot_limits(config, scored),
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
        plot = report.write_objects_plot(out / "comparison_plot.png", panels, **_plot_limits(config, arms))
        written["plot"] = str(plot)
    if config.output.save_npz:
        truth = ds["objectGuess"].data if header.has_truth else None
        origins = {key: _origin(root, key) for key in objects}
        written["reconstructions"] = str(
            report.write_reconstructions_npz(
                out / "reconstructions.npz", objects, origins, ground_truth=truth
            )
        )
    return written


def _plot_limits(config: CompareConfig, arms: list[ArmResult]) -> dict:
    """The plot's colour limits from the run's options: compare_models' percentiles, and the manual phase
    limits of the arms that have flags for them (``pinn``, ``baseline``)."""
    out = config.output
    limits = {}
    for arm in arms:
        lo, hi = (getattr(out, f"{arm.key}_phase_{end}", None) for end in ("vmin", "vmax"))
        if lo is not None:  # the options hold both bounds or neither
            limits[arm.label] = (lo, hi)
    return {"p_min": out.p_min, "p_max": out.p_max, "phase_limits": limits}


def _title(config: CompareConfig, ds: xr.Dataset) -> str:
    """The figure's title: the scan's name, its size and the crop."""
    return (
        f"{Path(config.test_data).name}: {ds.sizes['pattern']} patterns of {ds.sizes['det_y']}², "
        f"crop M = {config.infer.stitch_crop_size}"
    )


def _origin(root: zarr.Group, key: str) -> tuple[float, float] | None:
    """Object pixel of arm ``key``'s object's pixel (0, 0): the canvas frame's origin for a stitched
    object, (0, 0) for an iterative object in the whole-object frame, None when unknown."""
    source = root[f"arms/{key}/object"]
    if "canvas" in source.attrs:
        return tuple(CanvasFrame.from_attrs(source.attrs["canvas"]).origin)
    aligned = root.get(f"scores/{key}/aligned")
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
