"""Session fixtures: one small simulated scan, built once, shared by every test module.

- ``small_npz``: a deflated NPZ from :func:`ptychozarr.simulate.simulate` with the study's keys
  (``diffraction`` (400, 32, 32) float32, coordinates, ``probeGuess`` (32, 32), ``objectGuess`` (160, 160)),
  dose 1000, seed 0. Its parameters are in ``SMALL``.
- ``small_store``: ``small_npz`` ingested into a Zarr store (read it with ``ptychozarr.open_dataset``).
- ``small_groups``: gridsize-2 groups (k=7, seed 0) of the same scan: the lazy ``xarray.Dataset`` that
  :func:`ptychozarr.group` returns. They are written into a private copy of the store
  (``small_groups.attrs["store"]``, data identical to ``small_store``), so that a test grouping
  ``small_store`` differently cannot replace them under a lazy reader.

They are session-scoped and shared: treat them as read-only (copy a store before writing into it).
"""

import os
import shutil
from pathlib import Path

import pytest

# fault injection for the processes tests start (idle unless PTYCHOZARR_KILL_AFTER_* is set)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent / "faults"), os.environ.get("PYTHONPATH")) if p
)

SMALL = {"n_points": 400, "patch_size": 32, "object_size": 160, "dose": 1e3, "seed": 0}


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    from ptychozarr.simulate import simulate

    return simulate(tmp_path_factory.mktemp("small") / "small.npz", **SMALL)


@pytest.fixture(scope="session")
def small_store(small_npz) -> Path:
    from ptychozarr.io import ingest

    return ingest(small_npz, small_npz.with_name("small.zarr"))


@pytest.fixture(scope="session")
def small_groups(small_store):
    from ptychozarr.grouping import group
    from ptychozarr.io import open_dataset

    private = shutil.copytree(small_store, small_store.with_name("small-grouped.zarr"))
    return group(open_dataset(private), gridsize=2, k=7, seed=0)


@pytest.fixture
def before_model_call(monkeypatch):
    """Install functions called with the batch size before every model call inference makes (to count
    the calls, or to raise an injected out-of-memory error); removed when the test ends."""
    from ptychozarr import inference

    hooks = []
    original = inference.predict_patches

    class Watched:
        def __init__(self, model):
            self._model = model

        def __getattr__(self, name):
            return getattr(self._model, name)

        def predict_batch(self, x, *args, **kwargs):
            for hook in hooks:
                hook(len(x))
            return self._model.predict_batch(x, *args, **kwargs)

    def predict_patches(model, *args, **kwargs):
        return original(Watched(model), *args, **kwargs)

    monkeypatch.setattr(inference, "predict_patches", predict_patches)
    return hooks.append
