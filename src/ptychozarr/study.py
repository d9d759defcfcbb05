"""A grid of comparisons (doses × views × splits) from one TOML file, in PtychoPINN's study layout.

The ``[compare]`` table takes every option of :class:`ptychozarr.config.CompareConfig` (the flags of
``ptychozarr compare`` with underscores), from the same field definitions; an unknown key anywhere in
the file is refused, with the nearest valid one, before any run. See :data:`EXAMPLE`.

Each run writes its compare output in ``<output_dir>/dose_<dose>/<view>/<split>/`` (one level deeper,
``/<repeat>``, for a run that repeats a condition, e.g. with another seed), as PtychoPINN's study does;
a finished run is reused on re-run (its stages are complete in its store). A run whose arm is missing
or fails keeps explicit empty rows and a warning; a run that fails as a whole is recorded as failed,
and the study goes on. The summary files are :func:`ptychozarr.report.write_study_outputs`'.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from ptychozarr.config import CompareConfig, suggest
from ptychozarr.errors import InvalidParameterError, PtychozarrError

if TYPE_CHECKING:  # the CLI imports this module for --help: the report and stages load on use
    from ptychozarr.report import ArmResult, StudyRun

__all__ = ["EXAMPLE", "study"]

log = logging.getLogger(__name__)

EXAMPLE = """\
output_dir = "study_out"          # relative to this file

[compare]                         # options of `ptychozarr compare`, for every run
stitch_crop_size = 20
register_ptychi_only = true
memory_budget = "8GB"
trust_bundle = false              # true loads PtychoPINN wts.h5.zip bundles (unpickled: only your own)

[[run]]                           # written to study_out/dose_1000/dense/test/
name = "dose1000-dense-test"
dose = 1000
view = "dense"
split = "test"
# repeat = "seed1"                # a run repeating a condition (another seed): one level deeper
test_data = "data/dose_1000/dense_test.npz"    # or an ingested .zarr store
pinn_model = "models/pinn_gs2.keras"
baseline_model = "models/baseline.keras"
ptychi_recon = "recon/dose_1000_dense.npz"     # optional
"""
"""An example study TOML (shown by ``ptychozarr study --help``)."""

_TOP_KEYS = {"output_dir", "compare", "run"}
_RUN_KEYS = {
    "name", "dose", "view", "split", "repeat", "test_data", "pinn_model", "baseline_model", "ptychi_recon",
}  # fmt: skip
_REQUIRED = {"name", "dose", "view", "split", "test_data"}
_MODEL_KEYS = (("PtychoPINN", "pinn_model"), ("Baseline", "baseline_model"))


def _unknown(path: Path, where: str, keys, valid) -> None:
    for key in keys:
        if key not in valid:
            raise InvalidParameterError(f"study config {path}: unknown {where} {key!r}" + suggest(key, valid))


def _load_config(path: Path) -> dict:
    """The study TOML, with every key checked (before any run)."""
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidParameterError(f"study config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidParameterError(f"study config {path} is not valid TOML: {exc}") from None
    _unknown(path, "key", config, _TOP_KEYS)
    runs = config.get("run")
    if not runs:
        raise InvalidParameterError(f"study config {path} has no [[run]] tables: add at least one")
    names = [r.get("name") for r in runs]
    for i, run in enumerate(runs):
        _unknown(path, f"key of run #{i + 1}", run, _RUN_KEYS)
        missing = _REQUIRED - run.keys()
        if missing:
            raise InvalidParameterError(f"study config {path}: run #{i + 1} lacks {sorted(missing)}")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"study config {path}: run names must be unique, got {names}")
    conditions = [tuple(str(r.get(k)) for k in ("dose", "view", "split", "repeat")) for r in runs]
    for i, condition in enumerate(conditions):
        if condition in conditions[:i]:
            first = names[conditions.index(condition)]
            raise InvalidParameterError(
                f"study config {path}: runs {first!r} and {names[i]!r} have the same dose, view and split "
                'and would share a folder; give each a distinct `repeat` (e.g. "seed1")'
            )
    return config


def _configs(config: dict, base: Path, out: Path, *, force: bool, quiet: bool) -> dict[str, tuple]:
    """Per run: its CompareConfig (built from ``[compare]``; checked before any run) and missing models."""
    from ptychozarr import report

    options = dict(config.get("compare", {})) | {"force": force, "quiet": quiet}
    built = {}
    for run in config["run"]:
        models = {label: base / run[key] for label, key in _MODEL_KEYS if key in run}
        missing = {label: path for label, path in models.items() if not path.exists()}
        present = {label: path for label, path in models.items() if label not in missing}
        recon = base / run["ptychi_recon"] if "ptychi_recon" in run else None
        folder = report.run_dir(out, run["dose"], run["view"], run["split"], run.get("repeat"))
        cfg = CompareConfig.from_options(
            base / run["test_data"], present, folder, recon, options, where="[compare] key"
        )
        built[run["name"]] = (cfg, missing)
    return built


def study(config_path: str | os.PathLike, *, force: bool = False, quiet: bool = False) -> list[StudyRun]:
    """Run every comparison of a study config and write the study's summary files.

    Parameters
    ----------
    config_path : path
        The study TOML (see :data:`EXAMPLE`).
    force : bool
        Redo every comparison instead of reusing finished stages.
    quiet : bool
        Print only errors.

    Returns
    -------
    list of StudyRun
        One per ``[[run]]``, in order (:func:`ptychozarr.report.write_study_outputs` wrote their
        ``comparison_manifest.json``, ``metrics_summary.json`` / ``.md``, ``study_deltas.*`` and
        ``study_conditions.*`` into the study's ``output_dir``).
    """
    from ptychozarr.pipeline import run_compare
    from ptychozarr.report import StudyRun, write_study_outputs

    config_path = Path(config_path)
    config = _load_config(config_path)
    base = config_path.parent
    out = base / config.get("output_dir", "study_out")
    configs = _configs(config, base, out, force=force, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for run in config["run"]:
        name = run["name"]
        cfg, missing = configs[name]
        done = StudyRun(
            run["dose"], run["view"], run["split"], 0, name=name, repeat=run.get("repeat"),
            output_dir=cfg.output_dir,
        )  # fmt: skip
        for label, path in missing.items():
            log.warning("study run %s: model %s (%s) does not exist; its rows stay empty", name, label, path)
        try:
            result = run_compare(cfg)
        except PtychozarrError as exc:  # one failed run must not lose the study
            log.warning("study run %s failed: %s", name, exc)
            done.returncode, done.error = 1, str(exc)
        else:
            done.arms = _arms(result, missing)
            errors = result.errors | {label: f"{path} does not exist" for label, path in missing.items()}
            for label, error in errors.items():
                log.warning("study run %s: arm %s has no metrics (%s)", name, label, error)
            done.error = "; ".join(f"{label}: {error}" for label, error in errors.items()) or None
        runs.append(done)
    write_study_outputs(out, runs)
    return runs


def _arms(result, missing: dict) -> list[ArmResult]:
    """The run's arms in the config's model order, a missing model as an arm without scores."""
    from ptychozarr.report import ArmResult
    from ptychozarr.stages._common import arm_key

    by_label = {a.label: a for a in result.arms}
    models = [label for label, key in _MODEL_KEYS if label in by_label or label in missing]
    arms = [by_label.get(label) or ArmResult(arm_key(label), label) for label in models]
    return arms + [a for a in result.arms if a.label not in models]
