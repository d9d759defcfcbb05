"""A run's store opens as one xarray tree; ``infer`` and ``stitch`` with ``store=`` compute once into Zarr."""

import re
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import ptychozarr as pz
from ptychozarr.errors import InvalidParameterError, StoreError
from ptychozarr.io import open_dataset
from ptychozarr.io.store import SCHEMA_VERSION
from ptychozarr.runtime import Runtime
from ptychozarr.stages import ingest as ingest_stage
from ptychozarr.stitch import CanvasFrame, stitch

M = 8  # stitch crop of the small scan's 32×32 patterns
UNNAMED = re.compile(r"dim_\d+")


@pytest.fixture(scope="module")
def models(tiny_models):
    """A tiny gridsize-2 PINN and a tiny Baseline for the 32×32 scan (untrained: fixed random weights)."""
    return {"PtychoPINN": tiny_models["pinn"], "Baseline": tiny_models["baseline"]}


@pytest.fixture(scope="module")
def run(tiny_run):
    """One uninterrupted compare of the small scan with both models, crop M (shared with test_pipeline.py)."""
    return tiny_run


@pytest.fixture
def model_calls(before_model_call):
    """Sizes of the batches the model is called with, while the test runs."""
    calls = []
    before_model_call(calls.append)
    return calls


def _open_tree(store) -> tuple[xr.DataTree, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = xr.open_datatree(store, engine="zarr")
    return tree, [str(w.message) for w in caught]


def test_a_run_opens_as_one_tree_with_named_dimensions(run):
    tree, caught = _open_tree(run.store)
    assert not [m for m in caught if "consolidated" in m.lower()]
    assert zarr.open_group(run.store, mode="r", use_consolidated=True)  # raises when not consolidated
    paths = {node.path for node in tree.subtree}
    assert {"/data", "/groups", "/arms/pinn", "/arms/pinn/patches", "/arms/baseline/patches"} <= paths
    for node in tree.subtree:
        for name, variable in node.dataset.variables.items():
            assert not [d for d in variable.dims if UNNAMED.fullmatch(str(d))], f"{node.path}/{name}"
    assert tree["data"].attrs["source_sha256"] == run.run["inputs"]["test_data"]["sha256"]


@pytest.mark.parametrize("arm", ["pinn", "baseline"])
def test_objects_lie_on_object_pixel_coordinates(run, arm):
    tree, _ = _open_tree(run.store)
    obj = tree[f"arms/{arm}"].dataset["object"]
    stored = zarr.open_array(run.store / "arms" / arm / "object", mode="r")
    frame = CanvasFrame.from_attrs(stored.attrs["canvas"])
    assert obj.dims == ("object_y", "object_x") and obj.shape == frame.shape
    # the object pixel nearest to each canvas pixel: the exact origin rounded, plus the index
    np.testing.assert_array_equal(obj["object_y"], round(frame.origin[0]) + np.arange(frame.shape[0]))
    np.testing.assert_array_equal(obj["object_x"], round(frame.origin[1]) + np.arange(frame.shape[1]))
    assert obj["object_y"].attrs["units"] == "pixel"
    np.testing.assert_array_equal(obj.values, stored[...])
    # every crop the arm was stitched from lies on the canvas (to the half pixel of the rounding)
    positions = tree[f"arms/{arm}/patches"].dataset["positions"].values
    for axis, dim in enumerate(("object_x", "object_y")):
        first, last = float(obj[dim][0]), float(obj[dim][-1])
        assert first <= positions[:, axis].min() - M / 2 + 0.5
        assert positions[:, axis].max() + M / 2 - 1 <= last + 0.5


def test_a_store_of_an_older_schema_is_ingested_again(small_npz, tmp_path):
    store = tmp_path / "store.zarr"
    ingest_stage.run(Runtime(quiet=True), small_npz, store)
    rt = Runtime(quiet=True)
    ingest_stage.run(rt, small_npz, store)
    assert rt.reused == ["ingest"]
    zarr.open_group(store / "data", mode="r+").attrs["schema_version"] = SCHEMA_VERSION - 1
    rt = Runtime(quiet=True)
    ds = ingest_stage.run(rt, small_npz, store)
    assert rt.reused == [] and ds.attrs["schema_version"] == SCHEMA_VERSION


def test_infer_and_stitch_with_a_store_compute_once(small_groups, models, model_calls, tmp_path):
    scan = shutil.copytree(small_groups.attrs["store"], tmp_path / "scan.zarr")
    ds, groups = open_dataset(scan), pz.open_groups(scan)
    kwargs = dict(crop=M, block_groups=96, batch_size=16)
    lazy = pz.infer(ds, groups, models["PtychoPINN"], **kwargs)
    expected_patches = lazy.patches.values
    one_pass = len(model_calls)
    assert one_pass == sum(-(-n // 16) for n in lazy.patches.data.chunks[0])
    expected_object, expected_frame = stitch(
        expected_patches, lazy.positions.values, lazy.weights.values, tile=64
    )

    model_calls.clear()
    arm = pz.infer(ds, groups, models["PtychoPINN"], **kwargs, store=tmp_path / "arm")
    obj = pz.stitch(arm, tile=64, store=tmp_path / "arm")
    frame = CanvasFrame.from_attrs(obj.attrs["canvas"])
    np.testing.assert_array_equal(obj.values, expected_object.compute())
    np.testing.assert_array_equal(arm.patches.values, expected_patches)
    for _ in range(3):  # every later read comes from the store
        np.asarray(obj), arm.patches.values
    assert len(model_calls) == one_pass
    assert frame == expected_frame and arm.attrs["mode"] == lazy.attrs["mode"]

    tree, caught = _open_tree(tmp_path / "arm")
    assert not [m for m in caught if "consolidated" in m.lower()]
    np.testing.assert_array_equal(tree["patches"].dataset["patches"].values, expected_patches)
    np.testing.assert_array_equal(tree.dataset["object_x"], obj["object_x"])
    np.testing.assert_array_equal(tree.dataset["object"].values, obj.values)


def test_a_store_made_from_other_inputs_is_not_overwritten_unless_asked(small_groups, models, tmp_path):
    ds, groups = open_dataset(small_groups.attrs["store"]), small_groups
    kwargs = dict(crop=M, block_groups=200, store=tmp_path / "arm")
    arm = pz.infer(ds, groups, models["Baseline"], **kwargs)
    pz.stitch(arm, tile=64, store=tmp_path / "arm")
    with pytest.raises(StoreError, match="overwrite=True"):
        pz.infer(ds, groups, models["PtychoPINN"], **kwargs)
    with pytest.raises(StoreError, match="overwrite=True"):
        pz.stitch(arm, tile=32, store=tmp_path / "arm")
    with pytest.raises(InvalidParameterError, match="from the dataset"):
        pz.stitch(arm, arm.positions.values, store=tmp_path / "arm")
    pz.infer(ds, groups, models["Baseline"], **kwargs, overwrite=True)
    assert "object" not in zarr.open_group(tmp_path / "arm", mode="r")  # stitched from the old patches


def test_the_package_exports_the_functions_with_a_store_after_their_modules_are_imported():
    import ptychozarr.inference
    import ptychozarr.stitch  # noqa: F401  (a submodule named like the function)
    from ptychozarr import api

    assert pz.stitch is api.stitch and pz.infer is api.infer
