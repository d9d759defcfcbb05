"""The one way into TensorFlow and Keras: quiet, and only when a model needs them.

TensorFlow's C++ runtime writes to stderr as it loads (``cuInit … (303)`` on machines without a GPU,
oneDNN notices, ``absl::InitializeLog`` warnings) unless ``TF_CPP_MIN_LOG_LEVEL`` is set before its
first import; its Python side logs through the ``tensorflow`` and ``absl`` loggers. :func:`quiet`
sets the variable and raises those loggers to errors, unless the user already set them; importing
:mod:`ptychozarr.models` calls it, so every import of TensorFlow made by this package, in the client
and in dask workers (which import the task functions' modules), follows it. ``TF_ENABLE_ONEDNN_OPTS``
is left as it is: with the log level set, oneDNN's notice is not printed and its numerics stay
TensorFlow's default.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

__all__ = ["keras", "quiet", "tensorflow"]

LOG_LEVEL = "3"
"""``TF_CPP_MIN_LOG_LEVEL`` set when the user has not: C++ errors and below are not printed (TensorFlow
still raises Python exceptions for real failures)."""


def quiet() -> None:
    """Silence TensorFlow's C++ and Python logs, keeping whatever level the user set.

    Effective for the C++ logs only before TensorFlow is first imported in the process.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    for name in ("tensorflow", "absl"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported after :func:`quiet`."""
    quiet()
    import tensorflow as tf

    return tf


def keras() -> ModuleType:
    """The ``keras`` module, imported after :func:`quiet`."""
    quiet()
    import keras as k

    return k
