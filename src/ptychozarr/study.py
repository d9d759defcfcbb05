"""A grid of comparisons (doses × views × splits) from one TOML file, summarised as PINN deltas.

The ``[compare]`` table takes every option of :class:`ptychozarr.config.CompareConfig` (the flags of
``ptychozarr compare`` with underscores), from the same field definitions; an unknown key anywhere in
the file is refused, with the nearest valid one, before any run. See :data:`EXAMPLE`.

Each run writes its own compare output in ``<output_dir>/<name>/``; a finished run is reused on re-run
(its stages are complete in its store). A run whose arm is missing or fails keeps explicit empty rows and
a warning; a run that fails as a whole is recorded as failed, and the study goes on.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from pathlib import Path

import pandas as pd

from ptychozarr.config import CompareConfig, suggest
from ptychozarr.errors import InvalidParameterError, PtychozarrError
from ptychozarr.outputs import METRIC_ORDER, ArmResult, write_json

__all__ = ["EXAMPLE", "deltas", "study"]

log = logging.getLogger(__name__)

EXAMPLE = """\
output_dir = "study_out"          # relative to this file

[compare]                         # options of `ptychozarr compare`, for every run
stitch_crop_size = 20
register_ptychi_only = true
memory_budget = "8GB"
trust_bundle = false              # true loads PtychoPINN wts.h5.zip bundles (unpickled: only your own)

[[run]]
name = "dose1000-dense-test"
dose = 1000
view = "dense"
split = "test"
test_data = "data/dose_1000/dense_test.npz"    # or an ingested .zarr store
pinn_model = "models/pinn_gs2.keras"
baseline_model = "models/baseline.keras"
ptychi_recon = "recon/dose_1000_dense.npz"     # optional
"""
"""An example study TOML (shown by ``ptychozarr study --help``)."""

_TOP_KEYS = {"output_dir", "compare", "run"}
_RUN_KEYS = {"name", "dose", "view", "split", "test_data", "pinn_model", "baseline_model", "ptychi_recon"}


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
        missing = {"name", "test_data"} - run.keys()
        if missing:
            raise InvalidParameterError(f"study config {path}: run #{i + 1} lacks {sorted(missing)}")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"study config {path}: run names must be unique, got {names}")
    return config


def _configs(config: dict, base: Path, out: Path, *, force: bool, quiet: bool) -> dict[str, tuple]:
    """Per run: its CompareConfig (built from ``[compare]``; checked before any run) and missing models."""
    options = dict(config.get("compare", {})) | {"force": force, "quiet": quiet}
    built = {}
    for run in config["run"]:
        models = {
            label: base / run[key]
            for label, key in (("PtychoPINN", "pinn_model"), ("Baseline", "baseline_model"))
            if key in run
        }
        missing = {label: path for label, path in models.items() if not path.exists()}
        present = {label: path for label, path in models.items() if label not in missing}
        recon = base / run["ptychi_recon"] if "ptychi_recon" in run else None
        cfg = CompareConfig.from_options(
            base / run["test_data"], present, out / run["name"], recon, options, where="[compare] key"
        )
        built[run["name"]] = (cfg, missing)
    return built


def study(config_path: str | os.PathLike, *, force: bool = False, quiet: bool = False) -> dict:
    """Run every comparison of a study config and write its summary and delta tables.

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
    dict
        The content of ``metrics_summary.json``: per run its labels, status and metrics per model.
    """
    from ptychozarr.pipeline import run_compare

    config_path = Path(config_path)
    config = _load_config(config_path)
    base = config_path.parent
    out = base / config.get("output_dir", "study_out")
    runs = _configs(config, base, out, force=force, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for run in config["run"]:
        name = run["name"]
        cfg, missing = runs[name]
        entry = {k: run.get(k) for k in ("dose", "view", "split")}
        for label, path in missing.items():
            log.warning("study run %s: model %s (%s) does not exist; its rows stay empty", name, label, path)
        try:
            result = run_compare(cfg)
        except PtychozarrError as exc:  # one failed run must not lose the study
            log.warning("study run %s failed: %s", name, exc)
            entry.update(status="failed", error=str(exc), metrics={})
        else:
            failed = [a.label for a in result.arms if a.metrics is None]
            for label in failed:
                log.warning(
                    "study run %s: arm %s has no metrics (%s)",
                    name,
                    label,
                    result.errors.get(label, "missing"),
                )
            errors = result.errors | {label: f"{path} does not exist" for label, path in missing.items()}
            tables = {a.label: a.metrics_table() for a in result.arms}
            tables |= {label: ArmResult(label, label).metrics_table() for label in missing}
            entry.update(status="partial" if failed or missing else "ok", errors=errors, metrics=tables)
        summary[name] = entry
    write_json(out / "metrics_summary.json", summary)
    table = deltas(summary)
    table.to_csv(out / "metrics_deltas.csv", index=False, float_format="%.6f", na_rep="")
    (out / "metrics_deltas.md").write_text(_markdown(table))
    return summary


def deltas(summary: dict) -> pd.DataFrame:
    """PINN − Baseline and PINN − iterative, per run, metric and part (amplitude, phase).

    A difference with a missing side is NaN (an explicit empty cell), never a dropped row.
    """
    rows = []
    for name, entry in summary.items():
        metrics = entry.get("metrics", {})
        iterative = next((m for m in metrics if m not in ("PtychoPINN", "Baseline")), None)
        pinn = metrics.get("PtychoPINN", {})
        for metric in METRIC_ORDER:
            for part in ("amplitude", "phase"):
                row = {
                    "run": name,
                    "dose": entry.get("dose"),
                    "view": entry.get("view"),
                    "split": entry.get("split"),
                    "metric": metric,
                    "part": part,
                }
                p = _get(pinn, metric, part)
                row["pinn"] = p
                row["pinn_minus_baseline"] = p - _get(metrics.get("Baseline", {}), metric, part)
                row["pinn_minus_iterative"] = p - _get(metrics.get(iterative, {}), metric, part)
                rows.append(row)
    return pd.DataFrame(rows)


def _get(table: dict, metric: str, part: str) -> float:
    value = table.get(metric, {}).get(part)
    return math.nan if value is None else float(value)


def _markdown(table: pd.DataFrame) -> str:
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples(index=False):
        cells = [
            "" if isinstance(v, float) and math.isnan(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))
            for v in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
