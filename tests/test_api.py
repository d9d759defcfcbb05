"""The public API as dask/xarray users expect it: one object frame in the store, ``compare`` taking a
dataset and loaded models, ``infer`` / ``stitch`` reusing a store, ``stitch`` returning a DataArray, types."""

import inspect
import shutil
from importlib import resources

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import TINY_FLAGS

import ptychozarr as pz
from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError
from ptychozarr.io import ingest, open_dataset
from ptychozarr.io.store import SCHEMA_VERSION
from ptychozarr.runtime import Runtime
from ptychozarr.stages import stitch as stitch_stage
from ptychozarr.stages._common import open_run_store

M = TINY_FLAGS["stitch_crop_size"]


@pytest.fixture
def model_calls(before_model_call):
    """Sizes of the batches the model is called with, while the test runs."""
    calls = []
    before_model_call(calls.append)
    return calls


def _scan_with(small_npz, path, **extra):
    """A copy of the small scan NPZ with ``extra`` keys."""
    with np.load(small_npz) as scan:
        arrays = {key: scan[key] for key in scan.files}
    np.savez(path, **arrays, **extra)
    return path


# -- one frame -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["pinn", "baseline"])
def test_truth_object_and_aligned_crop_line_up_on_object_pixels(tiny_run, arm):
    tree = xr.open_datatree(tiny_run.store, engine="zarr")
    truth = tree["data"]["objectGuess"]
    obj = tree[f"arms/{arm}"]["object"]
    aligned, aligned_gt = (tree[f"scores/{arm}"][name] for name in ("aligned", "aligned_gt"))
    for array in (truth, obj, aligned, aligned_gt):
        assert array.dims == ("object_y", "object_x")
        assert array["object_y"].attrs["units"] == "pixel" and array["object_x"].attrs["units"] == "pixel"

    t, o, a, g = xr.align(truth, obj, aligned, aligned_gt, join="inner")
    assert a.shape == aligned.shape  # the scored crop lies inside both the truth and the object
    # the truth at those object pixels, cut from the raw array by numpy slicing
    raw = zarr.open_array(tiny_run.store / "data" / "objectGuess", mode="r")[...]
    ys, xs = aligned["object_y"].values, aligned["object_x"].values
    np.testing.assert_array_equal(np.diff(ys), 1)
    expected = raw[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    np.testing.assert_array_equal(t.values, expected)
    np.testing.assert_array_equal(g.values, expected)
    # placement alignment, unregistered: the scored crop is the stitched object at the same object pixels
    np.testing.assert_array_equal(a.values, o.values)


def test_diffraction_and_positions_carry_units(small_store):
    ds = open_dataset(small_store)
    assert ds["xcoords"].attrs["units"] == "pixel" and ds["ycoords"].attrs["units"] == "pixel"
    assert "units" in ds["diffraction"].attrs
    np.testing.assert_array_equal(ds["object_y"], np.arange(ds.sizes["object_y"]))


def test_pixel_size_and_energy_are_kept_with_coordinates_in_metres(small_npz, tmp_path):
    sized = {"pixel_size_m": np.float64(8e-9), "energy_eV": np.float64(6.2e3)}
    npz = _scan_with(small_npz, tmp_path / "sized.npz", **sized)
    ds = open_dataset(ingest(npz, tmp_path / "sized.zarr"))
    assert ds.attrs["pixel_size_m"] == 8e-9 and ds.attrs["energy_eV"] == 6200.0
    assert "pixel_size_m" not in ds.attrs["skipped_keys"]
    truth = ds["objectGuess"]
    assert truth.attrs["pixel_size_m"] == 8e-9
    np.testing.assert_allclose(truth["object_x_m"].values, np.arange(truth.shape[1]) * 8e-9)
    assert truth["object_y_m"].attrs["units"] == "m"


@pytest.mark.parametrize("value", [np.float64(-1), np.float64(np.nan), np.zeros(3)], ids=["neg", "nan", "3"])
def test_a_bad_pixel_size_is_refused_naming_the_key(small_npz, tmp_path, value):
    npz = _scan_with(small_npz, tmp_path / "bad.npz", pixel_size_m=value)
    with pytest.raises(InvalidScanError, match="pixel_size_m") as caught:
        ingest(npz, tmp_path / "bad.zarr")
    assert "\n" not in str(caught.value)


def test_a_store_of_the_old_frame_is_refused_in_one_line(small_store, tmp_path):
    old = shutil.copytree(small_store, tmp_path / "old.zarr")
    zarr.open_group(old / "data", mode="r+").attrs["schema_version"] = SCHEMA_VERSION - 1
    with pytest.raises(StoreError, match="re-ingest") as caught:
        open_dataset(old)
    assert "\n" not in str(caught.value)


def test_an_object_stitched_in_the_old_frame_is_stitched_again(tiny_run, tmp_path):
    store = shutil.copytree(tiny_run.store, tmp_path / "store.zarr")
    node = open_run_store(store)["arms/pinn"]
    params = dict(node["object"].attrs["params"])
    tile = params["tile"]
    old = {k: v for k, v in params.items() if k != "frame"}  # what the first version recorded
    node["object"].attrs["params"] = old
    expected = node["object_x"][...]
    node["object_x"][...] = expected + 1  # coordinates of another frame
    rt = Runtime(quiet=True)
    stitch_stage.run(rt, node, tile)
    assert "stitch:pinn" not in rt.reused
    np.testing.assert_array_equal(node["object_x"][...], expected)
    assert node["object"].attrs["params"] == params


# -- compare's inputs ------------------------------------------------------------------------------


def test_compare_takes_the_dataset_of_a_store_and_loaded_models(small_store, tiny_models, tiny_run, tmp_path):
    scan = shutil.copytree(small_store, tmp_path / "scan.zarr")
    models = {"PtychoPINN": pz.load_model(tiny_models["pinn"]), "Baseline": tiny_models["baseline"]}
    result = pz.compare(open_dataset(scan), models, output_dir=tmp_path / "out", **TINY_FLAGS)
    assert [a.label for a in result.arms] == ["PtychoPINN", "Baseline"]
    assert result.run["inputs"]["test_data"]["path"] == str(scan)
    by_label = {a.label: a.metrics for a in tiny_run.arms}
    for arm in result.arms:  # the same scan and models as the path-given run: the same scores
        assert arm.metrics["ssim"] == pytest.approx(by_label[arm.label]["ssim"])


def test_compare_refuses_a_selection_and_a_model_without_a_file(small_store, tiny_models, tmp_path):
    ds = open_dataset(small_store)
    with pytest.raises(InvalidParameterError, match="open_dataset") as caught:
        pz.compare(ds.isel(pattern=slice(0, 100)), tiny_models, output_dir=tmp_path / "a")
    assert "\n" not in str(caught.value)

    class InMemory:  # a Model built in memory: no file to fingerprint or reload in the workers
        spec = pz.load_model(tiny_models["baseline"]).spec

        def predict_batch(self, diffraction, positions, *, crop=None):
            raise AssertionError("never called")

    with pytest.raises(InvalidParameterError, match="save it"):
        pz.compare(ds, {"Baseline": InMemory()}, output_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- infer and stitch ------------------------------------------------------------------------------


def test_infer_and_stitch_reuse_a_store_of_the_same_inputs(small_groups, tiny_models, model_calls, tmp_path):
    ds, groups = open_dataset(small_groups.attrs["store"]), small_groups
    kwargs = dict(crop=M, block_groups=96, batch_size=16, store=tmp_path / "arm")
    arm = pz.infer(ds, groups, tiny_models["pinn"], **kwargs)
    obj = pz.stitch(arm, tile=64, store=tmp_path / "arm")
    ran = len(model_calls)
    assert ran > 0
    chunk = tmp_path / "arm" / "object" / "c" / "0" / "0"
    written = chunk.stat().st_mtime_ns

    again = pz.infer(ds, groups, pz.load_model(tiny_models["pinn"]), **kwargs)  # the same model file, loaded
    same = pz.stitch(again, tile=64, store=tmp_path / "arm")
    assert len(model_calls) == ran  # the model never ran again
    assert chunk.stat().st_mtime_ns == written  # the object was not written again
    np.testing.assert_array_equal(same.values, obj.values)
    np.testing.assert_array_equal(again.patches.values, arm.patches.values)

    pz.stitch(again, tile=64, store=tmp_path / "arm", overwrite=True)
    assert chunk.stat().st_mtime_ns != written


def test_stitch_gives_a_dataarray_on_the_frame_and_reads_stored_patches(small_groups, tiny_models, tmp_path):
    ds, groups = open_dataset(small_groups.attrs["store"]), small_groups
    arm = pz.infer(ds, groups, tiny_models["baseline"], crop=M, block_groups=200, store=tmp_path / "arm")
    lazy = pz.stitch(arm, tile=32)
    assert isinstance(lazy, xr.DataArray) and lazy.dims == ("object_y", "object_x")
    assert lazy.chunks == tuple(tuple(min(32, n - s) for s in range(0, n, 32)) for n in lazy.shape)
    # the tile tasks read the Zarr array of the patches themselves: no task reads it through dask
    assert not [name for name in lazy.data.dask.layers if name.startswith("from-zarr")]
    assert lazy.attrs["tile"] == 32 and lazy.attrs["patch_size"] == M
    stored = pz.stitch(arm, tile=32, store=tmp_path / "arm")
    xr.testing.assert_identical(lazy.compute(), stored.compute())
    # the same patches from numpy, positions and weights given apart: the same object and frame
    plain = pz.stitch(arm.patches.values, arm.positions.values, arm.weights.values, tile=32)
    xr.testing.assert_identical(plain.compute(), lazy.compute())


# -- typing ----------------------------------------------------------------------------------------


def test_the_package_is_typed():
    assert resources.files("ptychozarr").joinpath("py.typed").is_file()
    for name in pz.__all__:
        value = getattr(pz, name)
        if not inspect.isfunction(value):
            continue
        signature = inspect.signature(value)
        untyped = [p for p, v in signature.parameters.items() if v.annotation is inspect.Parameter.empty]
        assert not untyped and signature.return_annotation is not inspect.Signature.empty, name
