"""The stages of a comparison, one module each; none knows of schedulers or of the others.

Each module exposes ``run(rt, …)`` (what it computes, handing its dask graphs to a
:class:`~ptychozarr.runtime.Runtime`) and, where its tasks grow with a knob, ``project_memory(…)`` (the
projected memory of one of its tasks, :class:`ptychozarr.memory.TaskMemory`). A stage reads its
parameters from what the previous stage wrote where that is the truth (the stitch and score stages take
the patch size from the stored patches)::

    ingest   input.npz → store.zarr/data
    group    data → groups
    infer    groups → arms/<arm>/patches      (+ done: per-block completion)
    stitch   patches → arms/<arm>/object
    iterative  NPZ → arms/<arm>/object
    score    object → scores/<arm>/aligned, aligned_gt (attrs: metrics, offset)
"""

from ptychozarr.stages import group, infer, ingest, iterative, score, stitch

__all__ = ["group", "infer", "ingest", "iterative", "score", "stitch"]
