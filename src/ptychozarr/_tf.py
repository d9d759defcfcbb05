"""The one way into TensorFlow and Keras: quiet, and only when a model needs them.

TensorFlow writes to stderr as it loads: ``cuInit … (303)`` on machines without a GPU, oneDNN's notice,
``absl::InitializeLog`` warnings. Its own level, ``TF_CPP_MIN_LOG_LEVEL``, is read at its first import
but TensorFlow 2.16+ writes these lines through Abseil before its logging is initialised, when no level
applies. So :func:`tensorflow` and :func:`keras` make the first import (and TensorFlow's device
discovery, where ``cuInit`` runs) with the process's stderr file descriptor pointed at ``/dev/null``,
whenever the level is ``3`` (:func:`quiet` sets it unless the user set it: a user who sets a lower level
sees everything). Python exceptions are raised after stderr is restored, so real failures still show;
anything another thread writes to stderr during that first import is lost.

:func:`quiet` also raises the ``tensorflow`` and ``absl`` Python loggers to errors unless the user
configured them. Importing :mod:`ptychozarr.models` calls it, so it holds in the client and in dask
workers (which import the task functions' modules). ``TF_ENABLE_ONEDNN_OPTS`` is left as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

__all__ = ["LOG_LEVEL", "keras", "preloading", "quiet", "tensorflow"]

LOG_LEVEL = "3"
"""``TF_CPP_MIN_LOG_LEVEL`` set when the user has not; at this level start-up lines are not printed."""

_LOCK = threading.Lock()
_LOADED: set[str] = set()


def quiet() -> None:
    """Ask TensorFlow for errors only, in C++ and Python, keeping whatever level the user set."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    for name in ("tensorflow", "absl"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


@contextlib.contextmanager
def _muted_stderr() -> Iterator[None]:
    """Point file descriptor 2 at ``/dev/null`` inside the block when the C++ level is :data:`LOG_LEVEL`."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != LOG_LEVEL:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load(name: str) -> ModuleType:
    """Import ``name`` (``tensorflow`` or ``keras``), quietly the first time in this process."""
    if name not in _LOADED:
        quiet()
        with _LOCK:
            if name not in _LOADED:
                with _muted_stderr():
                    module = importlib.import_module(name)
                    if name == "tensorflow":
                        module.config.list_physical_devices()  # device discovery: where cuInit logs
                _LOADED.add(name)
    return sys.modules[name]


@contextlib.contextmanager
def preloading(wanted: bool) -> Iterator[None]:
    """Import Keras (and TensorFlow) in a background thread while the block runs, when ``wanted``.

    The import takes seconds; work that needs neither (reading and grouping a scan) runs beside it, and
    the first :func:`keras` or :func:`tensorflow` call waits for it. The block's exit waits too, so that
    stderr is restored before anything is printed (the import mutes it, see the module docstring).
    """
    if not wanted or "keras" in _LOADED:
        yield
        return
    thread = threading.Thread(target=keras, name="ptychozarr-tf-import", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported and its devices discovered without start-up lines."""
    return _load("tensorflow")


def keras() -> ModuleType:
    """The ``keras`` module, imported (with TensorFlow first) without start-up lines."""
    tensorflow()
    return _load("keras")
