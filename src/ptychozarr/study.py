"""A grid of comparisons (doses × views × splits) from one TOML file, in PtychoPINN's study layout.

The ``[compare]`` table takes every option of :class:`ptychozarr.config.CompareConfig` (the flags of
``ptychozarr compare`` with underscores), from the same field definitions; an unknown key anywhere in
the file is refused, with the nearest valid one, before any run. See :data:`EXAMPLE`.

Each run writes its compare output in ``<output_dir>/dose_<dose>/<view>/<split>/`` (one level deeper,
``/<repeat>``, for a run that repeats a condition, e.g. with another seed), as PtychoPINN's study does;
a finished run is reused on re-run (its stages are complete in its store). A run whose arm is missing
or fails keeps explicit empty rows and a warning; a run that fails as a whole is recorded as failed,
and the study goes on. The summary files are :func:`ptychozarr.report.write_study_outputs`'.
PtychoPINN's summariser finds runs only under ``<hub>/analysis/``, so :data:`EXAMPLE` names an
``output_dir`` that ends in ``analysis``.

Before the first run, and before anything is written, a study refuses (one line) what would make it
wrong or write elsewhere: a value of the wrong type; two runs whose conditions name one folder once
normalised (dose ``1000`` and ``1000.0`` are ``dose_1000``; view ``./dense`` is ``dense``); an
``output_dir`` outside the config file's folder, or a view, split or repeat that is not one folder
name (``..``, ``/``, an absolute path) or leads out of ``output_dir`` through a symbolic link; a run
whose test data or iterative NPZ is missing, not a file, or does not fit (checked as ``compare``
checks it); and an ``output_dir`` holding another study's files (the manifest names the TOML that
wrote it; ``--force`` replaces them). A study holds the lock of its ``output_dir`` while it runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ptychozarr.config import CompareConfig, suggest
from ptychozarr.errors import InvalidParameterError, PtychozarrError

if TYPE_CHECKING:  # the CLI imports this module for --help: the report and stages load on use
    from ptychozarr.report import ArmResult, StudyRun

__all__ = ["EXAMPLE", "MANIFEST", "study"]

log = logging.getLogger(__name__)

EXAMPLE = """\
output_dir = "study_out/analysis" # relative to this file; PtychoPINN's summariser reads
                                  # <hub>/analysis/ (here the hub is study_out)

[compare]                         # options of `ptychozarr compare`, for every run
stitch_crop_size = 20
register_ptychi_only = true
memory_budget = "8GB"
trust_bundle = false              # true loads PtychoPINN wts.h5.zip bundles (unpickled: only your own)

[[run]]                           # written to study_out/analysis/dose_1000/dense/test/
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
_PATH_KEYS = ("test_data", "pinn_model", "baseline_model", "ptychi_recon")
MANIFEST = "comparison_manifest.json"
"""The study file whose ``study_config`` says which study owns an output folder."""


@dataclass(frozen=True)
class _Run:
    """One ``[[run]]``, checked and normalised: the condition names its folder exactly one way."""

    name: str
    dose: int | float
    view: str
    split: str
    repeat: str | None
    inputs: dict[str, Path]  # test_data, models and ptychi_recon given, absolute

    @property
    def condition(self) -> tuple:
        return (self.dose, self.view, self.split, self.repeat)


def _unknown(path: Path, where: str, keys, valid) -> None:
    for key in keys:
        if key not in valid:
            raise InvalidParameterError(f"study config {path}: unknown {where} {key!r}" + suggest(key, valid))


def _type_name(value) -> str:
    return {list: "an array", dict: "a table", bool: "a boolean", str: "a string", int: "an integer"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _dose(where: str, value) -> int | float:
    """A positive finite number; an integral float is the same dose as the integer (1000.0 is 1000)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(f"{where}: `dose` must be a number (e.g. 1000), not {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(f"{where}: `dose` must be a positive number, not {value}")
    return int(value) if float(value).is_integer() else float(value)


def _folder_name(where: str, key: str, value, *, allow_int: bool = False) -> str:
    """A condition value that names one folder: text, normalised (``./dense`` is ``dense``), one level."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidParameterError(f"{where}: `{key}` must be a string, not {_type_name(value)}")
    name = os.path.normpath(value) if value.strip() else ""
    if not name or name in (".", "..") or os.path.isabs(name) or os.sep in name or "/" in name:
        raise InvalidParameterError(
            f"{where}: `{key}` = {value!r} must name one folder inside the study's output_dir "
            "(no '/', '..' or absolute path)"
        )
    if name.startswith("."):
        raise InvalidParameterError(f"{where}: `{key}` = {value!r} must not start with '.'")
    return name


def _input_path(where: str, key: str, value, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"{where}: `{key}` must be a path string, not {_type_name(value)}")
    return Path(os.path.abspath(base / value))


def _load_config(path: Path) -> dict:
    """The study TOML, with every key and type checked (before any run)."""
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidParameterError(f"study config {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidParameterError(f"study config {path} is a folder; give the TOML file") from None
    except UnicodeDecodeError:
        raise InvalidParameterError(f"study config {path} is not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidParameterError(f"study config {path} is not valid TOML: {exc}") from None
    _unknown(path, "key", config, _TOP_KEYS)
    runs = config.get("run")
    if isinstance(runs, dict):
        raise InvalidParameterError(
            f"study config {path}: `run` is one table; write each run as an array table [[run]]"
        )
    if not runs:
        raise InvalidParameterError(f"study config {path} has no [[run]] tables: add at least one")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise InvalidParameterError(
            f"study config {path}: `run` must be [[run]] tables, not {_type_name(runs)}"
            + (" of non-tables" if isinstance(runs, list) else "")
        )
    if not isinstance(config.get("compare", {}), dict):
        raise InvalidParameterError(
            f"study config {path}: `compare` must be a [compare] table, not {_type_name(config['compare'])}"
        )
    if not isinstance(config.get("output_dir", ""), str) or config.get("output_dir") == "":
        raise InvalidParameterError(
            f"study config {path}: `output_dir` must be a non-empty path string, "
            f"not {_type_name(config['output_dir'])}"
        )
    for i, run in enumerate(runs):
        _unknown(path, f"key of run #{i + 1}", run, _RUN_KEYS)
        missing = _REQUIRED - run.keys()
        if missing:
            raise InvalidParameterError(f"study config {path}: run #{i + 1} lacks {sorted(missing)}")
    return config


def _runs(config: dict, path: Path, base: Path) -> list[_Run]:
    """Every run checked and normalised; duplicate names and conditions refused (before any run)."""
    runs: list[_Run] = []
    for i, raw in enumerate(config["run"]):
        where = f"study config {path}: run #{i + 1}"
        if not isinstance(raw["name"], str) or not raw["name"]:
            raise InvalidParameterError(f"{where}: `name` must be a non-empty string, not {raw['name']!r}")
        where = f"study config {path}: run {raw['name']!r}"
        repeat = raw.get("repeat")
        run = _Run(
            name=raw["name"],
            dose=_dose(where, raw["dose"]),
            view=_folder_name(where, "view", raw["view"]),
            split=_folder_name(where, "split", raw["split"]),
            repeat=None if repeat is None else _folder_name(where, "repeat", repeat, allow_int=True),
            inputs={k: _input_path(where, k, raw[k], base) for k in _PATH_KEYS if k in raw},
        )
        for other in runs:
            if other.name == run.name:
                raise InvalidParameterError(f"study config {path}: two runs are named {run.name!r}")
            if other.condition == run.condition:
                raise InvalidParameterError(
                    f"study config {path}: runs {other.name!r} and {run.name!r} have the same dose, view, "
                    'split and repeat and would share a folder; give each a distinct `repeat` (e.g. "seed1")'
                )
        runs.append(run)
    plain = {r.condition[:3] for r in runs if r.repeat is None}
    for run in runs:
        if run.repeat is not None and run.condition[:3] in plain and "." in run.repeat:
            raise InvalidParameterError(
                f"study config {path}: run {run.name!r}: `repeat` = {run.repeat!r} goes inside the folder "
                "of the run without a repeat, beside its files; give a name without '.' (e.g. \"seed1\")"
            )
    return runs


def _output_dir(config: dict, path: Path, base: Path) -> Path:
    """The study's output folder: relative to the config file and inside its folder."""
    given = config.get("output_dir", "study_out")
    out = Path(os.path.abspath(base / given))
    if Path(given).is_absolute() or not _inside(out, base):
        raise InvalidParameterError(
            f"study config {path}: `output_dir` = {given!r} leaves the config file's folder {base}; "
            "give a path relative to it without '..' (or move the study TOML)"
        )
    return out


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` stays inside ``root`` once symbolic links are followed (as far as they exist)."""
    return path.resolve().is_relative_to(root.resolve())


def _check_inputs(path: Path, run: _Run) -> None:
    """The run's test data and iterative NPZ exist and are files (or an ingested store)."""
    where = f"study config {path}: run {run.name!r}"
    for key in ("test_data", "ptychi_recon"):
        file = run.inputs.get(key)
        if file is None:
            continue
        if not file.exists():
            raise InvalidParameterError(f"{where}: `{key}` {file} does not exist")
        store = key == "test_data" and file.is_dir() and (file / "zarr.json").is_file()
        if not file.is_file() and not store:
            kind = "a folder that is not a Zarr store" if file.is_dir() else "not a regular file"
            raise InvalidParameterError(f"{where}: `{key}` {file} is {kind}")
    for _, key in _MODEL_KEYS:
        model = run.inputs.get(key)
        if model is not None and model.exists() and not (model.is_file() or model.is_dir()):
            raise InvalidParameterError(f"{where}: `{key}` {model} is not a file or a model folder")


def _check_owner(out: Path, config_path: Path, *, force: bool) -> None:
    """Refuse to replace the summary files of another study in ``out`` (unless ``force``)."""
    manifest = out / MANIFEST
    if not manifest.exists() or force:
        return
    try:
        owner = json.loads(manifest.read_text()).get("study_config")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != str(config_path):
        who = f"the study {owner}" if owner else "another study"
        raise InvalidParameterError(
            f"{out} holds the results of {who}; give this study another output_dir, or --force to "
            "replace them (and redo every run)"
        )


def _configs(
    config: dict, runs: list[_Run], path: Path, out: Path, *, force: bool, quiet: bool
) -> dict[str, tuple]:
    """Per run: its CompareConfig (checked against its scan and models before any run) and missing models."""
    from ptychozarr import report
    from ptychozarr.preflight import validate

    options = dict(config.get("compare", {})) | {"force": force, "quiet": quiet}
    built = {}
    for run in runs:
        _check_inputs(path, run)
        folder = report.run_dir(out, run.dose, run.view, run.split, run.repeat)
        if not _inside(folder, out) or folder == out:
            raise InvalidParameterError(
                f"study config {path}: run {run.name!r} would write to {folder.resolve()}, outside {out} "
                "(a symbolic link?)"
            )
        models = {label: run.inputs[key] for label, key in _MODEL_KEYS if key in run.inputs}
        missing = {label: p for label, p in models.items() if not p.exists()}
        present = {label: p for label, p in models.items() if label not in missing}
        cfg = CompareConfig.from_options(
            run.inputs["test_data"], present, folder, run.inputs.get("ptychi_recon"), options,
            where="[compare] key",
        )  # fmt: skip
        if present or cfg.ptychi_recon is not None:
            try:
                validate(cfg)
            except PtychozarrError as exc:
                raise type(exc)(f"study config {path}: run {run.name!r}: {exc}") from None
        built[run.name] = (cfg, missing)
    return built


def study(config_path: str | os.PathLike, *, force: bool = False, quiet: bool = False) -> list[StudyRun]:
    """Run every comparison of a study config and write the study's summary files.

    Everything is checked before the first run: every key and value type, every run's inputs (they
    exist and are files; the scan, models and iterative NPZ agree, as ``compare`` checks them), that
    every folder the study writes stays inside its ``output_dir`` (itself inside the config file's
    folder), that no two runs share a folder once their conditions are normalised (dose ``1000`` is
    ``1000.0``, view ``./dense`` is ``dense``), and that ``output_dir`` holds no other study's files.
    The study holds the lock of its ``output_dir`` while it runs.

    Parameters
    ----------
    config_path : path
        The study TOML (see :data:`EXAMPLE`).
    force : bool
        Redo every comparison instead of reusing finished stages, and replace the files of another
        study in ``output_dir``.
    quiet : bool
        Print only errors.

    Returns
    -------
    list of StudyRun
        One per ``[[run]]``, in order (:func:`ptychozarr.report.write_study_outputs` wrote their
        ``comparison_manifest.json``, ``metrics_summary.json`` / ``.md``, ``study_deltas.*`` and
        ``study_conditions.*`` into the study's ``output_dir``).

    Raises
    ------
    InvalidParameterError
        Anything wrong in the config or its inputs (one line, before any run or write).
    """
    from ptychozarr.pipeline import run_compare
    from ptychozarr.report import StudyRun, write_study_outputs
    from ptychozarr.runtime import output_lock

    config_path = Path(os.path.abspath(config_path))
    config = _load_config(config_path)
    base = config_path.parent
    out = _output_dir(config, config_path, base)
    runs = _runs(config, config_path, base)
    configs = _configs(config, runs, config_path, out, force=force, quiet=quiet)
    _check_owner(out, config_path, force=force)
    results = []
    with output_lock(out):
        _check_owner(out, config_path, force=force)  # again, now that no other study can start here
        for run in runs:
            cfg, missing = configs[run.name]
            done = StudyRun(
                run.dose, run.view, run.split, 0, name=run.name, repeat=run.repeat, output_dir=cfg.output_dir
            )
            for label, path in missing.items():
                log.warning(
                    "study run %s: model %s (%s) does not exist; its rows stay empty", run.name, label, path
                )
            try:
                result = run_compare(cfg)
            except PtychozarrError as exc:  # one failed run must not lose the study
                log.warning("study run %s failed: %s", run.name, exc)
                done.returncode, done.error = 1, str(exc)
            else:
                done.arms = _arms(result, missing)
                errors = result.errors | {label: f"{path} does not exist" for label, path in missing.items()}
                for label, error in errors.items():
                    log.warning("study run %s: arm %s has no metrics (%s)", run.name, label, error)
                done.error = "; ".join(f"{label}: {error}" for label, error in errors.items()) or None
            results.append(done)
        write_study_outputs(out, results, study_config=config_path)
    return results


def _arms(result, missing: dict) -> list[ArmResult]:
    """The run's arms in the config's model order, a missing model as an arm without scores."""
    from ptychozarr.report import ArmResult
    from ptychozarr.stages._common import arm_key

    by_label = {a.label: a for a in result.arms}
    models = [label for label, key in _MODEL_KEYS if label in by_label or label in missing]
    arms = [by_label.get(label) or ArmResult(arm_key(label), label) for label in models]
    return arms + [a for a in result.arms if a.label not in models]
