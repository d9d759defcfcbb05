"""Held-out scores of the shipped models: simulate the demo's scan, compare the models on it, score them.

Scores as ``src/ptychozarr/models/weights/README.md`` reports them
(:func:`ptychozarr.models.demo.held_out_scores`); ``--record`` writes them to ``weights/scores.json``,
where the demo reads the line it prints before its table. Usage::

    python -m benchmarks.heldout /tmp/pz/score --record
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ptychozarr.models import demo_weights
from ptychozarr.models.demo import DEMO_SCAN, SCORES_FILE, SHIPPED, covered_pixels, held_out_scores
from ptychozarr.pipeline import compare
from ptychozarr.simulate import simulate

__all__ = ["main", "score_models"]

def score_models(output_dir: str | Path, models: dict | None = None, record: bool = False) -> dict:
    """Simulate :data:`DEMO_SCAN`, compare the models on it and score them (:func:`held_out_scores`) on
    the pixels the scan covers, and on the whole scored box beside them (``"whole_box"``).

    Parameters
    ----------
    output_dir : str or Path
        Where the scan and the comparison go.
    models : dict of str to path, optional
        Arms, label → model; default the shipped PINN and Baseline.
    record : bool
        Write the scores to :data:`SCORES_FILE`, where :func:`describe_models` reads them.

    Returns
    -------
    dict
        ``{"scan": DEMO_SCAN, "scores": held_out_scores(..., covered), "whole_box": held_out_scores(...)}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = models or {label: demo_weights(stem) for label, stem in SHIPPED.items()}
    scan = simulate(output_dir / "scan_test.npz", **DEMO_SCAN)
    run = compare(scan, models, output_dir=output_dir / "compare", quiet=True, force=True)
    aligned = output_dir / "compare" / "reconstructions_aligned.npz"
    covered = {arm.label: covered_pixels(run.store, arm.key) for arm in run.arms}
    result = {
        "scan": DEMO_SCAN,
        "scores": held_out_scores(aligned, models, covered),
        "whole_box": held_out_scores(aligned, models),
    }
    if record:
        SCORES_FILE.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("output_dir", help="where the scan and the comparison go")
    parser.add_argument("--record", action="store_true", help="write the scores to weights/scores.json")
    args = parser.parse_args(argv)
    result = score_models(args.output_dir, record=args.record)
    print(json.dumps(result["scores"], indent=2))
    return result


if __name__ == "__main__":
    main()
