"""Fault injection for the resume tests, loaded at start-up by every Python process the tests start.

``tests/conftest.py`` puts this folder first on ``PYTHONPATH``, so ``python -m ptychozarr …`` run by a
test imports this module as ``sitecustomize``. It does nothing unless one of these is set:

- ``PTYCHOZARR_KILL_AFTER_TASKS=n``: SIGKILL the process after n dask tasks of the run's computations
  (those :meth:`ptychozarr.runtime.Runtime.compute` runs);
- ``PTYCHOZARR_KILL_AFTER_BLOCKS=n``: SIGKILL it after n blocks are recorded done.

The engine holds no fault hook: these wrap its methods from outside.
"""

import os
import signal


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(tasks: str | None, blocks: str | None) -> None:
    from dask.callbacks import Callback

    from ptychozarr import runtime

    if tasks:

        class KillAfterTasks(Callback):
            left = int(tasks)

            def _posttask(self, key, result, dsk, state, worker_id):
                KillAfterTasks.left -= 1
                if KillAfterTasks.left <= 0:
                    _kill()

        compute = runtime.Runtime.compute

        def compute_then_kill(self, *args, **kwargs):
            with KillAfterTasks():
                return compute(self, *args, **kwargs)

        runtime.Runtime.compute = compute_then_kill

    if blocks:
        done = [0]
        setitem = runtime._BlockWriter.__setitem__

        def record_then_kill(self, region, value):
            setitem(self, region, value)
            done[0] += 1
            if done[0] >= int(blocks):
                _kill()

        runtime._BlockWriter.__setitem__ = record_then_kill


_TASKS, _BLOCKS = (
    os.environ.get("PTYCHOZARR_KILL_AFTER_TASKS"),
    os.environ.get("PTYCHOZARR_KILL_AFTER_BLOCKS"),
)
if _TASKS or _BLOCKS:
    _install(_TASKS, _BLOCKS)
