"""``run.json`` and every other JSON file of a run: one normaliser, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ptychozarr.report._files import replacing

__all__ = ["to_jsonable", "write_json"]


def to_jsonable(value):
    """``value`` as plain JSON types.

    Mappings become dicts with string keys; lists, tuples and arrays become lists (sets sorted); numpy
    scalars become Python numbers; paths become strings; dataclass instances become dicts; NaN and
    infinities become None (JSON has no such numbers).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, payload) -> Path:
    """Write ``payload`` (normalised by :func:`to_jsonable`) as indented JSON, atomically."""
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path
