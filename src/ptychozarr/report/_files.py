"""Write a file under a unique temporary name beside it, then rename it into place."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name is unique per process and call (``.<name>.<pid>.<random>.tmp<suffix>``, the
    suffix kept so that writers choosing a format by extension still do), so concurrent writers of
    the same file never share a temporary file, and a reader never sees a partial file. The temporary
    file is removed when the block fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
