"""The run plan: what a comparison will do, resolved once from its configuration before any work.

:func:`resolve` checks the configuration against the inputs' headers (:func:`ptychozarr.preflight.validate`:
the scan, the models' sidecars, the iterative NPZ) and names every arm with its store key, its source and
whether it is registered; :func:`with_memory` adds the memory plan (each stage's projection, the block
size ``auto`` resolves to, the budget's refusal). Everything downstream reads these values from the plan —
the crop M, N, the gridsize, the block size, the tile, the arms — never from the options again.

The memory plan is recorded in the run's store under :attr:`RunPlan.key`, a digest of what it depends on
(the models' contents, the scan's shape, the options of inference, stitching and the scheduler). A later
run with the same key re-projects it from the recorded parameters, so a finished run loads no model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import zarr

from ptychozarr import align, cluster, memory, stages
from ptychozarr.config import CompareConfig
from ptychozarr.inference import cached_model
from ptychozarr.preflight import ScanHeader, validate
from ptychozarr.report.runjson import to_jsonable
from ptychozarr.stages._common import arm_key, fingerprint, open_run_store

__all__ = ["ArmPlan", "RunPlan", "digest", "resolve"]

log = logging.getLogger(__name__)

MAX_BLOCK = 256
"""Groups per inference task at most: larger blocks add memory and no speed (batches are 32)."""
ITERATIVE = ("PtyChi", "Tike")
"""Labels of iterative arms (registered alone under ``--register-ptychi-only``)."""


@dataclass(frozen=True)
class ArmPlan:
    """One model arm of a run.

    Attributes
    ----------
    label : str
        Its name in the CSV and the figure (``PtychoPINN``, ``Baseline``, …).
    key : str
        Its name in the store and in file names (``pinn``, ``baseline``, …).
    model : Path
        The model file (``.keras`` with sidecar, or a PtychoPINN bundle).
    """

    label: str
    key: str
    model: Path


@dataclass(frozen=True)
class RunPlan:
    """A comparison resolved before any work.

    Attributes
    ----------
    config : CompareConfig
        The options as given.
    scan : ScanHeader
        What the headers say of the scan and the models: patterns, N, ground truth, gridsize.
    arms : tuple of ArmPlan
        The model arms, in report order.
    register : str
        Which arms are registered before scoring: ``"all"``, ``"ptychi-only"`` or ``"none"``.
    key : str
        Digest of what the memory plan depends on (see the module docstring).
    memory : memory.Plan or None
        The memory plan, once made or re-projected (:func:`with_memory`).
    """

    config: CompareConfig
    scan: ScanHeader
    arms: tuple[ArmPlan, ...]
    register: str
    key: str
    memory: memory.Plan | None = None

    @property
    def store(self) -> Path:
        """The run's Zarr store, inside the output folder."""
        return self.config.output_dir / "store.zarr"

    @property
    def crop(self) -> int:
        """M: side of the kept centre of every patch."""
        return self.config.infer.stitch_crop_size

    @property
    def tile(self) -> int:
        """Side of the stitched objects' tiles (their Zarr chunks)."""
        return self.config.stitch.tile

    @property
    def block_groups(self) -> int:
        """Groups per inference task: the option, or what ``auto`` resolved to in the memory plan."""
        if self.memory is None:
            raise RuntimeError("the block size is resolved with the memory plan (with_memory)")
        return int(self.memory.params["block_groups"])

    def registered(self, labels: list[str]) -> set[str]:
        """Which of ``labels`` are registered before scoring."""
        return align.arms_to_register(labels, self.register, iterative_arms=ITERATIVE)

    def with_recorded_memory(self) -> RunPlan:
        """This plan with the memory plan an earlier run recorded in the store under :attr:`key`
        (re-projected from its parameters: no model is loaded), when there is one and the run is not
        forced; else this plan as it is."""
        recorded = None if self.config.run.force else _recorded(self.store, self.key)
        return dataclasses.replace(self, memory=recorded) if recorded is not None else self

    def with_memory(self, client=None) -> RunPlan:
        """This plan with a memory plan: the one it has, else one projected now — which loads and probes
        the models — and checked against ``--memory-budget`` (:class:`~ptychozarr.errors.MemoryBudgetError`
        when over it)."""
        if self.memory is not None:
            return self
        return dataclasses.replace(self, memory=_project_run(self, client))

    def record(self, root: zarr.Group) -> None:
        """Keep the memory plan's parameters in the store under :attr:`key`, for the next run."""
        root.attrs["plan"] = {"key": self.key, "params": to_jsonable(self.memory.params)}


def resolve(config: CompareConfig) -> RunPlan:
    """Check ``config`` against the inputs' headers and resolve what the run will do (no work, no lock).

    Raises
    ------
    PtychozarrError
        One line naming the problem and the fix (:func:`ptychozarr.preflight.validate`).
    """
    header = validate(config)
    recon, crop = config.ptychi_recon, config.infer.stitch_crop_size
    if recon is not None and header.has_truth:
        frame = stages.iterative.check_frame(recon, config.test_data, crop)
        log.info("iterative reconstruction %s: %s frame", recon.name, frame)
    score = config.score
    register = "none" if score.skip_registration else "ptychi-only" if score.register_ptychi_only else "all"
    arms = tuple(ArmPlan(label, arm_key(label), path) for label, path in config.models)
    key = digest(
        {
            "models": [fingerprint(arm.model) for arm in arms],
            "scan": [header.patterns, header.N, config.scan.n_test_groups],
            "infer": config.infer.__dict__,
            "stitch": config.stitch.__dict__,
            "run": [config.run.scheduler, config.run.n_workers, config.run.memory_budget],
        }
    )
    return RunPlan(config, header, arms, register, key)


def digest(value) -> str:
    """SHA-256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(to_jsonable(value), sort_keys=True).encode()).hexdigest()


def _recorded(store: Path, key: str) -> memory.Plan | None:
    """The memory plan an earlier run in ``store`` recorded under ``key``, re-projected; None if none."""
    if not (store / "zarr.json").is_file():
        return None
    recorded = open_run_store(store).attrs.get("plan")
    if not isinstance(recorded, dict) or recorded.get("key") != key:
        return None
    return _project(**recorded["params"])


def _project_run(plan: RunPlan, client) -> memory.Plan:
    """Project the run's memory, pick ``auto`` blocks, and refuse an over-budget plan.

    The models' working memory is probed with one batch each (the largest counts); the per-process
    baseline is this process's RSS now on the threaded scheduler, the default on a cluster. On the
    ``cuda`` scheduler the device side is the models' probe on the GPU.
    """
    config, infer, budget = plan.config, plan.config.infer, plan.config.run.memory_budget
    n_points = min(plan.scan.patterns, config.scan.points or plan.scan.patterns)
    kind = cluster.kind(config.run.scheduler)
    conc = kind.concurrency(client)
    loaded = [cached_model(arm.model, trust_bundle=infer.trust_bundle) for arm in plan.arms]
    on_gpu = kind.on_gpu
    args = dict(
        batch_size=infer.batch_size,
        N=plan.scan.N,
        channels=max((m.spec.channels for m in loaded), default=1),
        crop=plan.crop,
        model_probe=max((_probe(m, infer.batch_size) for m in loaded), default=0),
        device=max((_probe(m, infer.batch_size, "GPU:0") for m in loaded), default=0) if on_gpu else None,
        tile=plan.tile,
        threads=conc.threads,
        processes=conc.processes,
        reserved=memory.measure_reserved() if kind.in_process else None,
    )
    block_groups = infer.block_groups
    if block_groups == "auto":
        auto_budget = budget or int(0.5 * psutil.virtual_memory().available)
        block_groups = memory.choose_block_groups(auto_budget, max_groups=n_points, factory=_project, **args)
        block_groups = min(block_groups, MAX_BLOCK)
    projected = _project(block_groups=block_groups, **args)
    if budget is not None:
        memory.check(projected, budget)
    return projected


def _project(
    *, block_groups, batch_size, N, channels, crop, model_probe, device, tile, threads, processes, reserved
) -> memory.Plan:
    """The run's memory plan from each stage's own projection: inference, stitching, metrics."""
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
