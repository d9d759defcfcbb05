"""A study's outputs in PtychoPINN's study-pipeline schema, and the engine's richer summary beside them.

PtychoPINN's dose/overlap study (``studies/fly64_dose_overlap/comparison.py`` and its summariser)
lays runs out as ``<output_dir>/dose_<dose>/<view>/<split>/`` with compare_models' files, and writes:

- ``comparison_manifest.json``: ``n_jobs``, ``n_executed``, ``n_success``, ``n_failed`` and
  ``execution_results`` (per job ``dose``, ``view``, ``split``, ``returncode``; ``error`` on failure);
- ``metrics_summary.json``: ``n_jobs``, ``n_success``, ``n_failed``, ``jobs`` (per successful job
  ``dose``, ``view``, ``split`` and ``metrics``: the CSV rows as ``{model, metric, amplitude, phase}``
  or ``{model, metric, value}``, or ``{model, metric}`` when empty) and ``aggregate_metrics`` (per
  model: ``ms_ssim`` mean and best (max) of amplitude and phase, ``mae`` mean), which its reporters
  (``report_phase_g_dense_metrics.py``) read; and ``metrics_summary.md``.

Those files keep that schema (extra keys only: a job's ``name``, ``repeat``, ``status``,
``output_dir``, ``registration`` (per model ``registered``, ``unregistered`` or ``rejected: <reason>``)
and ``registration_detail`` (per model :func:`registration_state`: state, applied offset, confidence
and reason, also a table under each job of ``metrics_summary.md``); the manifest's ``study_config``,
the TOML that owns the folder). Beside them, under names of its own, the engine writes
``study_deltas.csv`` / ``.md`` (PINN − Baseline and PINN − iterative per run, metric and part, with
which way is better and whether PINN is better or worse) and ``study_conditions.csv`` / ``.md`` (mean,
sample standard deviation, min and max over the runs of each condition — repeats, e.g. seeds).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptychozarr.metrics import registry
from ptychozarr.report._files import replacing
from ptychozarr.report.runjson import write_json
from ptychozarr.report.tables import ArmResult, metrics_rows

__all__ = [
    "StudyRun",
    "comparison_manifest",
    "condition_stats",
    "deltas",
    "format_study_table",
    "metrics_summary",
    "metrics_summary_markdown",
    "registration_state",
    "run_dir",
    "write_study_outputs",
]

_MODELS = ("PtychoPINN", "Baseline")
_CONDITION = ["dose", "view", "split"]
_QUANTITIES = ("PtychoPINN", "Baseline", "iterative", "pinn_minus_baseline", "pinn_minus_iterative")
_DELTA_COLUMNS = [
    "run", *_CONDITION, "repeat", "metric", "part", "better", "PtychoPINN", "Baseline", "iterative",
    "iterative_label", "pinn_minus_baseline", "vs_baseline", "pinn_minus_iterative", "vs_iterative",
    "registration_PtychoPINN", "registration_Baseline", "registration_iterative",
]  # fmt: skip
_CONFIDENCE = re.compile(r"confidence (\d+(?:\.\d+)?)")


def _dose_name(dose) -> str:
    if isinstance(dose, float) and dose.is_integer():
        dose = int(dose)
    return f"dose_{dose}"


def run_dir(output_dir: str | os.PathLike, dose, view: str, split: str, repeat: str | None = None) -> Path:
    """Folder of one run: ``<output_dir>/dose_<dose>/<view>/<split>/`` (``/<repeat>`` for a repeat).

    A run that repeats a condition (e.g. another seed) goes one level deeper, so that every run keeps
    its own compare_models files; PtychoPINN's layout has one run per condition.
    """
    path = Path(output_dir) / _dose_name(dose) / str(view) / str(split)
    return path / str(repeat) if repeat is not None else path


@dataclass
class StudyRun:
    """One comparison of a study, as the study reports it.

    Parameters
    ----------
    dose, view, split
        The condition (e.g. 1000, ``"dense"``, ``"test"``).
    returncode : int
        0 when the comparison finished (some arms may still lack scores), non-zero when it failed.
    arms : list of ArmResult
        The comparison's scores (empty for a failed run).
    name : str, optional
        The run's name in the study config.
    repeat : str, optional
        Which repeat of the condition this is (e.g. ``"seed2"``); runs with the same condition and
        different repeats are summarised together as mean ± spread.
    error : str, optional
        Why the run failed, or why arms lack scores.
    output_dir : path, optional
        Where the run's files are (written relative to the study folder when inside it).
    """

    dose: int | float | str
    view: str
    split: str
    returncode: int
    arms: list[ArmResult] = field(default_factory=list)
    name: str | None = None
    repeat: str | None = None
    error: str | None = None
    output_dir: str | os.PathLike | None = None

    @property
    def status(self) -> str:
        """``failed`` (non-zero return code), ``partial`` (an arm without scores) or ``ok``."""
        if self.returncode != 0:
            return "failed"
        return "partial" if not self.arms or any(a.metrics is None for a in self.arms) else "ok"

    def _extras(self, base: Path | None) -> dict:
        extras = {"name": self.name, "repeat": self.repeat, "status": self.status}
        if self.output_dir is not None:
            path = Path(self.output_dir)
            extras["output_dir"] = (
                str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path)
            )
        return {k: v for k, v in extras.items() if v is not None}


def _condition(run: StudyRun) -> dict:
    return {"dose": run.dose, "view": run.view, "split": run.split}


def comparison_manifest(
    runs: Sequence[StudyRun],
    output_dir: str | os.PathLike | None = None,
    study_config: str | os.PathLike | None = None,
) -> dict:
    """``comparison_manifest.json``'s content (see the module docstring).

    ``study_config``, the study TOML's absolute path, is kept as ``study_config``: it says which study
    owns the folder (a study refuses to replace another study's files without ``--force``).
    """
    base = Path(output_dir) if output_dir is not None else None
    results = []
    for run in runs:
        entry = _condition(run) | {"returncode": int(run.returncode)} | run._extras(base)
        if run.error:
            entry["error"] = run.error
        results.append(entry)
    n_success = sum(r.returncode == 0 for r in runs)
    manifest = {
        "n_jobs": len(runs),
        "n_executed": len(runs),
        "n_success": n_success,
        "n_failed": len(runs) - n_success,
        "execution_results": results,
    }
    return manifest | ({"study_config": str(study_config)} if study_config is not None else {})


def registration_state(arm: ArmResult | None) -> dict:
    """How an arm was scored: ``{"state", "offset", "confidence", "reason"}``.

    ``state`` is ``registered`` (``offset`` the applied (dy, dx) in px), ``unregistered`` (not asked),
    ``rejected`` (asked, but the measurement was refused: ``reason`` says why) or ``""`` for an arm
    without scores. ``confidence`` is the measurement's (``ArmResult.registration_confidence`` when the
    run recorded it, else the one a refusal's reason names); None when unknown.
    """
    if arm is None:
        return {"state": "", "offset": None, "confidence": None, "reason": None}
    status = arm.registration
    state = status.split(":", 1)[0]
    reason = arm.registration_note if state == "rejected" else None
    confidence = arm.registration_confidence
    if confidence is None and reason:
        found = _CONFIDENCE.search(reason)
        confidence = float(found.group(1)) if found else None
    offset = [float(v) for v in arm.offset] if state == "registered" and arm.offset is not None else None
    return {
        "state": state,
        "offset": offset,
        "confidence": None if confidence is None else float(confidence),
        "reason": reason,
    }


def _state_text(state: dict) -> str:
    """One cell: ``registered (+0.54, -0.18) px``, ``unregistered``, ``rejected (confidence 0.53)``."""
    if state["state"] == "registered" and state["offset"] is not None:
        return f"registered ({state['offset'][0]:+.2f}, {state['offset'][1]:+.2f}) px"
    if state["state"] == "rejected" and state["confidence"] is not None:
        return f"rejected (confidence {state['confidence']:.2f})"
    return state["state"]


def _summary_row(row: dict) -> dict:
    """A CSV row as PtychoPINN's summariser reads it back: empty cells dropped."""
    entry = {"model": row["model"], "metric": row["metric"]}
    if math.isfinite(row["amplitude"]) and math.isfinite(row["phase"]):
        entry |= {"amplitude": row["amplitude"], "phase": row["phase"]}
    elif math.isfinite(row["value"]):
        entry["value"] = row["value"]
    return entry


def metrics_summary(runs: Sequence[StudyRun], output_dir: str | os.PathLike | None = None) -> dict:
    """``metrics_summary.json``'s content (see the module docstring); failed runs have no job entry."""
    base = Path(output_dir) if output_dir is not None else None
    jobs, collected = [], {}
    for run in runs:
        if run.returncode != 0:
            continue
        rows = [_summary_row(r) for r in metrics_rows(run.arms)]
        for row in rows:
            if row["metric"] in ("ms_ssim", "mae") and "amplitude" in row:
                parts = collected.setdefault(row["model"], {}).setdefault(row["metric"], ([], []))
                parts[0].append(row["amplitude"])
                parts[1].append(row["phase"])
        registration = {a.label: a.registration for a in run.arms}
        detail = {a.label: registration_state(a) for a in run.arms}
        jobs.append(
            _condition(run)
            | run._extras(base)
            | {"registration": registration, "registration_detail": detail, "metrics": rows}
        )
    aggregate = {}
    for model in sorted(collected):
        aggregate[model] = {}
        for metric in sorted(collected[model]):
            amp, phase = collected[model][metric]
            entry = {"mean_amplitude": float(np.mean(amp)), "mean_phase": float(np.mean(phase))}
            if metric == "ms_ssim":
                entry |= {"best_amplitude": float(np.max(amp)), "best_phase": float(np.max(phase))}
            aggregate[model][metric] = entry
    n_success = sum(r.returncode == 0 for r in runs)
    return {
        "n_jobs": len(runs),
        "n_success": n_success,
        "n_failed": len(runs) - n_success,
        "jobs": jobs,
        "aggregate_metrics": aggregate,
    }


def _cell(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def metrics_summary_markdown(summary: dict) -> str:
    """``metrics_summary.md``: job counts, aggregate MS-SSIM and MAE per model, then every job's rows."""
    lines = [
        "# Metrics Summary",
        "",
        f"**Total Jobs:** {summary['n_jobs']}  ",
        f"**Successful:** {summary['n_success']}  ",
        f"**Failed:** {summary['n_failed']}",
        "",
        "## Aggregate Metrics",
        "",
    ]
    for model, metrics in summary["aggregate_metrics"].items():
        lines += [f"### {model}", ""]
        rows = [
            (
                f"{metric} {stat}",
                metrics[metric].get(f"{stat}_amplitude"),
                metrics[metric].get(f"{stat}_phase"),
            )
            for metric in metrics
            for stat in ("mean", "best")
            if f"{stat}_amplitude" in metrics[metric]
        ]
        lines += _md_table(("Statistic", "Amplitude", "Phase"), rows)
    for job in summary["jobs"]:
        repeat = f", {job['repeat']}" if "repeat" in job else ""
        lines += [f"## Job: {job['view']}/{job['split']} (dose={job['dose']}{repeat})", ""]
        rows = [
            (m["model"], m["metric"], m.get("amplitude"), m.get("phase"), m.get("value"))
            for m in job["metrics"]
        ]
        lines += _md_table(("Model", "Metric", "Amplitude", "Phase", "Value"), rows)
        detail = job.get("registration_detail", {})
        if detail:
            rows = [
                (label, state["state"] or "—", _offset_text(state["offset"]), state["confidence"],
                 state["reason"] or "")
                for label, state in detail.items()
            ]  # fmt: skip
            lines += ["Registration:", ""]
            lines += _md_table(("Model", "State", "Offset (dy, dx) px", "Confidence", "Reason"), rows)
    return "\n".join(lines)


def _offset_text(offset) -> str:
    return "" if offset is None else f"({offset[0]:+.2f}, {offset[1]:+.2f})"


def _verdict(delta: float, better: str) -> str:
    if not math.isfinite(delta):
        return ""
    if delta == 0:
        return "same"
    return "better" if (delta > 0) == (better == "higher") else "worse"


def _value(arm: ArmResult | None, metric: str, part: int) -> float:
    if arm is None or not arm.metrics or metric not in arm.metrics:
        return math.nan
    value = arm.metrics[metric][part]
    return math.nan if value is None else float(value)


def deltas(runs: Sequence[StudyRun]) -> pd.DataFrame:
    """PINN − Baseline and PINN − iterative per run, registered metric and part, with a verdict.

    Columns: ``run``, ``dose``, ``view``, ``split``, ``repeat``, ``metric``, ``part``, ``better``
    (``higher`` or ``lower``: which way the metric improves), ``PtychoPINN``, ``Baseline``,
    ``iterative`` (the PtyChi or Tike arm, named in ``iterative_label``), ``pinn_minus_baseline``,
    ``vs_baseline`` and ``pinn_minus_iterative``, ``vs_iterative`` (``better``/``worse``/``same`` for
    PINN; empty when a side is missing), then ``registration_PtychoPINN``, ``registration_Baseline``
    and ``registration_iterative``: how each side was scored (``registered (dy, dx) px``,
    ``unregistered``, ``rejected (confidence c)``, empty without scores), since a registered and an
    unregistered arm are not scored on the same footing. Failed runs keep their rows, with NaN values.
    """
    rows = []
    for run in runs:
        by_label = {a.label: a for a in run.arms}
        iterative = next((a for a in run.arms if a.label not in _MODELS), None)
        states = {
            f"registration_{name}": _state_text(registration_state(arm))
            for name, arm in (("PtychoPINN", by_label.get("PtychoPINN")),
                              ("Baseline", by_label.get("Baseline")), ("iterative", iterative))
        }  # fmt: skip
        for entry in registry.metrics():
            metric, better = entry.name, entry.better
            for part, part_name in enumerate(("amplitude", "phase")):
                pinn = _value(by_label.get("PtychoPINN"), metric, part)
                base = _value(by_label.get("Baseline"), metric, part)
                it = _value(iterative, metric, part)
                rows.append(
                    {"run": run.name, **_condition(run), "repeat": run.repeat, "metric": metric,
                     "part": part_name, "better": better, "PtychoPINN": pinn, "Baseline": base,
                     "iterative": it, "iterative_label": iterative.label if iterative else None,
                     "pinn_minus_baseline": pinn - base, "vs_baseline": _verdict(pinn - base, better),
                     "pinn_minus_iterative": pinn - it, "vs_iterative": _verdict(pinn - it, better),
                     **states}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=_DELTA_COLUMNS)


def condition_stats(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± spread over the runs of each condition (repeats, e.g. seeds), from :func:`deltas`.

    One row per condition, metric, part and quantity (``PtychoPINN``, ``Baseline``, ``iterative``,
    ``pinn_minus_baseline``, ``pinn_minus_iterative``): ``n`` (finite values), ``mean``, ``std``
    (sample standard deviation, ddof = 1; NaN for fewer than two), ``min``, ``max``, and ``verdict``
    of the mean difference.
    """
    keys = [*_CONDITION, "metric", "part", "better"]
    long = table.melt(id_vars=keys, value_vars=list(_QUANTITIES), var_name="quantity")
    long["value"] = long["value"].astype(float)
    grouped = long.groupby([*keys, "quantity"], sort=False, dropna=False)["value"]
    stats = grouped.agg(n="count", mean="mean", std=lambda v: v.std(ddof=1), min="min", max="max")
    stats = stats.reset_index()
    is_delta = stats["quantity"].str.startswith("pinn_minus")
    stats["verdict"] = [
        _verdict(m, b) if d else "" for m, b, d in zip(stats["mean"], stats["better"], is_delta, strict=True)
    ]
    return stats


def _write_text(path: Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f", na_rep="")
    return path


def write_study_outputs(
    output_dir: str | os.PathLike,
    runs: Sequence[StudyRun],
    *,
    study_config: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write the study's summary files into ``output_dir`` (see the module docstring); their paths.

    ``study_config`` (the study TOML) is recorded in ``comparison_manifest.json`` as its owner.
    """
    out = Path(output_dir)
    summary = metrics_summary(runs, out)
    table = deltas(runs)
    stats = condition_stats(table)
    return {
        "comparison_manifest": write_json(
            out / "comparison_manifest.json", comparison_manifest(runs, out, study_config)
        ),
        "metrics_summary": write_json(out / "metrics_summary.json", summary),
        "metrics_summary_md": _write_text(out / "metrics_summary.md", metrics_summary_markdown(summary)),
        "study_deltas": _write_csv(out / "study_deltas.csv", table),
        "study_deltas_md": _write_text(
            out / "study_deltas.md", "\n".join(_md_table(table.columns, table.values))
        ),
        "study_conditions": _write_csv(out / "study_conditions.csv", stats),
        "study_conditions_md": _write_text(
            out / "study_conditions.md", "\n".join(_md_table(stats.columns, stats.values))
        ),
    }


_HEADLINE = ("ms_ssim", "frc50", "mae")


def format_study_table(runs: Sequence[StudyRun], metrics: Sequence[str] = _HEADLINE) -> str:
    """The study's printed summary: per condition, headline metric and part, PINN and its differences.

    A difference carries ``better``/``worse`` for PINN; a condition run more than once (``runs``)
    shows ``mean ± std`` over its runs. Run counts by status and failed runs follow the table.
    """
    stats = condition_stats(deltas([r for r in runs if r.returncode == 0]))
    header = ["condition", "runs", "metric", "part", "PtychoPINN", "PINN − Baseline", "PINN − iterative"]
    body = []
    if not stats.empty:
        stats = stats[stats["metric"].isin(metrics)]
        keys = [*_CONDITION, "metric", "part"]
        for (dose, view, split, metric, part), group in stats.groupby(keys, sort=False):
            quantity = group.set_index("quantity")
            cells = [
                _stat_cell(quantity.loc[q])
                for q in ("PtychoPINN", "pinn_minus_baseline", "pinn_minus_iterative")
            ]
            runs_here = str(int(quantity.loc["PtychoPINN", "n"]))
            body.append([f"{_dose_name(dose)}/{view}/{split}", runs_here, metric, part, *cells])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    status = {s: sum(r.status == s for r in runs) for s in ("ok", "partial", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in status.items()) + f" of {len(runs)} runs")
    for run in (r for r in runs if r.returncode != 0):
        name = f" {run.name}" if run.name else ""
        lines.append(
            f"failed: {_dose_name(run.dose)}/{run.view}/{run.split}{name}: {run.error or 'no reason given'}"
        )
    return "\n".join(lines)


def _stat_cell(row: pd.Series) -> str:
    """``mean [± std] [verdict]`` of one quantity (the row's name) of one condition."""
    if row["n"] == 0:
        return "—"
    signed = str(row.name).startswith("pinn_minus")
    text = f"{row['mean']:+.4g}" if signed else f"{row['mean']:.4g}"
    if row["n"] > 1:
        text += f" ± {row['std']:.2g}"
    return f"{text} {row['verdict']}".rstrip()
