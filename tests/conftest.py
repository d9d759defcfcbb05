"""Session fixtures: one small simulated scan, built once, shared by every test module.

- ``small_npz``: a deflated NPZ from :func:`ptychozarr.simulate.simulate` with the study's keys
  (``diffraction`` (400, 32, 32) float32, coordinates, ``probeGuess`` (32, 32), ``objectGuess`` (160, 160)),
  dose 1000, seed 0. Its parameters are in ``SMALL``.
- ``small_store``: ``small_npz`` ingested into a Zarr store (read it with ``ptychozarr.open_dataset``).
- ``small_groups``: gridsize-2 groups (k=7, seed 0) of the same scan: the lazy ``xarray.Dataset`` that
  :func:`ptychozarr.group` returns. They are written into a private copy of the store
  (``small_groups.attrs["store"]``, data identical to ``small_store``), so that a test grouping
  ``small_store`` differently cannot replace them under a lazy reader.

- ``tiny_models``: an untrained gridsize-2 PINN and a Baseline for the 32×32 scan (``filters=4, depth=2``,
  fixed random weights: Keras seed 0), saved once as ``{"pinn": path, "baseline": path}``.
- ``tiny_run``: one uninterrupted :func:`ptychozarr.pipeline.compare` of ``small_npz`` with both
  ``tiny_models`` and ``TINY_FLAGS`` (crop 8, 96 groups a block, no registration, quiet).

They are session-scoped and shared: treat them as read-only (copy a store before writing into it).

Tests marked ``slow`` (each > ~5 s: training, subprocess runs that import TensorFlow, kill/resume, clusters,
lock races, large canvases, the notebook) are left out by ``make test-fast`` (``pytest -m "not slow"``).
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
TINY_FLAGS = {"stitch_crop_size": 8, "block_groups": 96, "skip_registration": True, "quiet": True}


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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    import keras

    from ptychozarr.models import ModelSpec, build_baseline, build_pinn, save_keras

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("tiny-models")
    pinn = ModelSpec("pinn", 32, 2, False, None, "amp_phase", name="tiny-pinn")
    base = ModelSpec("baseline", 32, 1, False, None, "amp_phase", name="tiny-baseline")
    return {
        "pinn": save_keras(build_pinn(32, 2, filters=4, depth=2), pinn, folder / "pinn"),
        "baseline": save_keras(build_baseline(32, filters=4, depth=2), base, folder / "baseline"),
    }


@pytest.fixture(scope="session")
def tiny_run(small_npz, tiny_models, tmp_path_factory):
    from ptychozarr.pipeline import compare

    models = {"PtychoPINN": tiny_models["pinn"], "Baseline": tiny_models["baseline"]}
    return compare(small_npz, models, output_dir=tmp_path_factory.mktemp("tiny-run"), **TINY_FLAGS)


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
