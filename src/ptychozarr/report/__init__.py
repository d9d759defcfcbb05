"""What a comparison and a study leave beside their stores, formatted from plain data.

Nothing here knows the pipeline's stages: each function takes numbers, arrays (numpy, Zarr or dask)
and paths, and writes one file under a unique temporary name before renaming it into place.

- :mod:`~ptychozarr.report.tables`: ``comparison_metrics.csv`` (compare_models' rows, plus each arm
  marked registered / unregistered / rejected), ``<arm>_frc_curves.csv``, the console table;
- :mod:`~ptychozarr.report.figure`: ``comparison_plot.png``;
- :mod:`~ptychozarr.report.npz`: ``reconstructions.npz`` and ``reconstructions_aligned.npz``;
- :mod:`~ptychozarr.report.study`: the study's files in PtychoPINN's study-pipeline schema, deltas
  and mean ± spread beside them, the study's printed table;
- :mod:`~ptychozarr.report.runjson`: ``run.json`` and the project's one JSON normaliser;
- :mod:`~ptychozarr.report.resolution`: FRC ring counts, the half-bit and 1-bit thresholds, crossings.
"""

from ptychozarr.report.figure import comparison_figure, write_comparison_figure, write_objects_plot
from ptychozarr.report.npz import npz_prefix, write_aligned_npz, write_reconstructions_npz
from ptychozarr.report.resolution import (
    frc_side,
    half_bit_threshold,
    one_bit_threshold,
    resolution_m,
    ring_counts,
    threshold_crossing,
)
from ptychozarr.report.runjson import to_jsonable, write_json
from ptychozarr.report.study import (
    StudyRun,
    comparison_manifest,
    condition_stats,
    deltas,
    format_study_table,
    metrics_summary,
    metrics_summary_markdown,
    run_dir,
    write_study_outputs,
)
from ptychozarr.report.tables import (
    BETTER,
    CSV_COLUMNS,
    METRIC_ORDER,
    ArmResult,
    format_table,
    metrics_rows,
    write_frc_curves,
    write_metrics_csv,
)

__all__ = [
    "BETTER",
    "CSV_COLUMNS",
    "METRIC_ORDER",
    "ArmResult",
    "StudyRun",
    "comparison_figure",
    "comparison_manifest",
    "condition_stats",
    "deltas",
    "format_study_table",
    "format_table",
    "frc_side",
    "half_bit_threshold",
    "metrics_rows",
    "metrics_summary",
    "metrics_summary_markdown",
    "npz_prefix",
    "one_bit_threshold",
    "resolution_m",
    "ring_counts",
    "run_dir",
    "threshold_crossing",
    "to_jsonable",
    "write_aligned_npz",
    "write_comparison_figure",
    "write_objects_plot",
    "write_frc_curves",
    "write_json",
    "write_metrics_csv",
    "write_reconstructions_npz",
    "write_study_outputs",
]
