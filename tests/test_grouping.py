"""Grouping (spec §1.4) against plain brute-force references written here, and its locality: groups in
store (curve) order, the same whatever the input's order, a block of them reading few chunks."""

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import SMALL

from ptychozarr.errors import InvalidParameterError, StoreError
from ptychozarr.grouping import group, neighbour_groups, normaliser, open_groups
from ptychozarr.io import ingest, open_dataset
from ptychozarr.io.store import MissingChunkError

PER_PATTERN = ("diffraction", "xcoords", "ycoords", "xcoords_start", "ycoords_start", "scan_index")
CHUNK, BLOCK = 25, 16  # patterns per diffraction chunk, groups per block (as inference blocks them)


@pytest.fixture
def store_copy(small_store, tmp_path):
    """A private copy of the small store, without any groups another test may have written there."""
    return shutil.copytree(small_store, tmp_path / "copy.zarr", ignore=shutil.ignore_patterns("groups"))


@pytest.fixture(scope="module")
def two_orders(small_npz, tmp_path_factory):
    """The small scan ingested from its random-order file and from a raster-order copy, in small chunks."""
    directory = tmp_path_factory.mktemp("orders")
    with np.load(small_npz) as z:
        arrays = {key: z[key] for key in z.files}
    raster = np.lexsort((arrays["xcoords"], arrays["ycoords"]))
    np.savez(directory / "raster.npz", **{k: v[raster] if k in PER_PATTERN else v for k, v in arrays.items()})
    chunk = CHUNK * arrays["diffraction"][0].nbytes
    return [
        ingest(path, directory / f"{path.stem}.zarr", chunk_bytes=chunk)
        for path in (small_npz, directory / "raster.npz")
    ]


def test_members_are_true_nearest_neighbours(small_store, small_groups):
    ds = open_dataset(small_store)
    points = np.stack([ds.xcoords.values, ds.ycoords.values], axis=-1)
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    kth = np.sort(distance, axis=1)[:, 6]  # the 7th nearest other point
    nn = small_groups.nn_indices.values
    assert nn.shape == (SMALL["n_points"], 4) and nn.dtype == np.int32
    rows = np.arange(len(nn))[:, None]
    assert (nn != rows).all()  # the seed point is not its own member
    assert all(len(set(members)) == 4 for members in nn)  # drawn without replacement
    assert (distance[rows, nn] <= kth[:, None] + 1e-9).all()


def test_draws_are_uniform_over_the_k_neighbours():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 100, 4000), rng.uniform(0, 100, 4000)
    nn = neighbour_groups(x, y, gridsize=2, k=7, seed=3)
    points = np.stack([x, y], axis=-1)
    order = np.argsort(np.linalg.norm(points[:500, None] - points[None], axis=-1), axis=1)[:, 1:8]
    ranks = np.array(
        [[list(o).index(m) for m in members] for o, members in zip(order, nn[:500], strict=True)]
    )
    frequency = np.bincount(ranks.ravel(), minlength=7) / ranks.size
    np.testing.assert_allclose(frequency, 1 / 7, atol=0.03)


def test_reproducible_with_a_seed(small_store):
    ds = open_dataset(small_store).drop_attrs()
    one, two = group(ds, 2, seed=5), group(ds, 2, seed=5)
    np.testing.assert_array_equal(one.nn_indices.values, two.nn_indices.values)
    assert not np.array_equal(one.nn_indices.values, group(ds, 2, seed=6).nn_indices.values)


def test_centres_offsets_and_normaliser_match_plain_numpy(small_store, small_groups):
    ds = open_dataset(small_store)
    nn = small_groups.nn_indices.values
    x, y = ds.xcoords.values, ds.ycoords.values
    np.testing.assert_allclose(small_groups.centres.values[:, 0], x[nn].mean(axis=1))
    np.testing.assert_allclose(small_groups.centres.values[:, 1], y[nn].mean(axis=1))
    xs, ys = ds.xcoords_start.values[nn], ds.ycoords_start.values[nn]
    np.testing.assert_allclose(small_groups.offsets.values[..., 0], -(xs - xs.mean(axis=1, keepdims=True)))
    np.testing.assert_allclose(small_groups.offsets.values[..., 1], -(ys - ys.mean(axis=1, keepdims=True)))
    stack = ds.diffraction.values.astype(np.float64)[nn]  # (B, C, N, N): the grouped stack, with repeats
    size = stack.shape[-1]
    expected = np.sqrt((size / 2) ** 2 / np.mean(np.sum(stack**2, axis=(2, 3))))
    assert small_groups.attrs["normaliser"] == pytest.approx(expected, rel=1e-12)
    assert np.mean(np.sum((expected * stack) ** 2, axis=(2, 3))) == pytest.approx((size / 2) ** 2)


def test_normaliser_is_streamed_over_blocks(small_store, small_groups):
    ds = open_dataset(small_store)
    rechunked = ds.diffraction.data.rechunk((37, 11, -1))  # patterns split across blocks too
    assert rechunked.numblocks[0] > 1
    nn = small_groups.nn_indices.values
    assert normaliser(rechunked, nn) == pytest.approx(small_groups.attrs["normaliser"], rel=1e-12)


def test_gridsize_one_is_each_point_alone(small_store):
    ds = open_dataset(small_store).drop_attrs()
    groups = group(ds, 1)
    np.testing.assert_array_equal(groups.nn_indices.values[:, 0], np.arange(SMALL["n_points"]))
    assert not groups.offsets.values.any()


def test_stored_reused_and_replaced(store_copy):
    ds = open_dataset(store_copy)
    first = group(ds, 2, seed=1)
    assert first.attrs["complete"] is True and first.attrs["gridsize"] == 2
    stamp = (store_copy / "groups" / "zarr.json").stat().st_mtime_ns
    again = group(ds, 2, seed=1)
    assert (store_copy / "groups" / "zarr.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(again.nn_indices.values, first.nn_indices.values)
    other = group(ds, 1)
    assert open_groups(store_copy).attrs["gridsize"] == 1
    assert other.nn_indices.shape == (SMALL["n_points"], 1)
    assert sorted(p.name for p in store_copy.iterdir()) == ["data", "groups", "zarr.json"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gridsize": 0}, "gridsize=0"),
        ({"gridsize": 2, "k": 3}, "k=3"),
        ({"gridsize": 3, "k": 8}, "k=8"),
        ({"gridsize": 2, "seed": -1}, "seed=-1"),
    ],
)
def test_impossible_parameters(small_store, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        group(open_dataset(small_store).drop_attrs(), **kwargs)


def test_too_few_points():
    with pytest.raises(InvalidParameterError, match="only 5 scan points"):
        neighbour_groups(np.arange(5.0), np.zeros(5), gridsize=2, k=7)


def test_missing_or_incomplete_groups(store_copy):
    with pytest.raises(StoreError, match="'groups' is missing"):
        open_groups(store_copy)
    group(open_dataset(store_copy), 2)
    zarr.open_group(store_copy / "groups", mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_groups(store_copy)


@pytest.mark.parametrize("gridsize", [1, 2])
@pytest.mark.parametrize("subsample", [False, True])
def test_the_same_scan_in_any_order_gives_the_same_groups(two_orders, gridsize, subsample):
    points = np.sort(np.random.default_rng(2).choice(SMALL["n_points"], 150, replace=False))
    one, two = (
        group(open_dataset(store).drop_attrs(), gridsize, seed=3, points=points if subsample else None)
        for store in two_orders
    )
    for name in ("nn_indices", "centres", "offsets"):
        np.testing.assert_array_equal(one[name].values, two[name].values, err_msg=name, strict=True)
    assert one.attrs["normaliser"] == two.attrs["normaliser"]


def test_a_block_of_groups_reads_few_chunks(two_orders):
    """Groups of a random-order scan, blocked in store order, touch few of the chunks; in input order, all."""
    ds = open_dataset(two_orders[0])  # ingested from the random-order file
    chunks = ds.diffraction.data.numblocks[0]
    assert ds.diffraction.data.chunks[0][0] == CHUNK and chunks >= 16

    def touched(nn):  # distinct chunks read by each block of BLOCK consecutive groups
        return np.array([len(np.unique(nn[s : s + BLOCK] // CHUNK)) for s in range(0, len(nn), BLOCK)])

    stored = touched(group(ds.drop_attrs(), 2).nn_indices.values)
    assert stored.mean() <= chunks / 3 and stored.max() <= chunks / 2, stored
    back = np.argsort(ds.input_index.values)  # the input's order: a store laid out as the file was
    in_input_order = neighbour_groups(ds.xcoords.values[back], ds.ycoords.values[back], 2)
    assert touched(in_input_order).mean() >= 0.9 * chunks


def test_groups_come_in_store_order_whatever_the_order_of_points(small_store):
    ds = open_dataset(small_store).drop_attrs()
    points = np.random.default_rng(4).choice(SMALL["n_points"], 120, replace=False)
    shuffled, ordered = group(ds, 2, points=points), group(ds, 2, points=np.sort(points))
    np.testing.assert_array_equal(shuffled.nn_indices.values, ordered.nn_indices.values)
    assert set(np.unique(ordered.nn_indices.values)) <= set(points)


def test_grouping_never_reads_the_diffraction(store_copy, small_groups):
    shutil.rmtree(store_copy / "data" / "diffraction" / "c")  # the chunks: reading now fails
    with pytest.raises(MissingChunkError):
        open_dataset(store_copy)  # refused up front
    ds = open_dataset(store_copy, verify=False)
    with pytest.raises(MissingChunkError):
        normaliser(ds.diffraction.data, small_groups.nn_indices.values)  # what a read would meet
    groups = group(ds, 2, k=7, seed=0)
    assert groups.attrs["normaliser"] == small_groups.attrs["normaliser"]
    np.testing.assert_array_equal(groups.nn_indices.values, small_groups.nn_indices.values)


def test_store_opens_as_a_datatree_with_named_dimensions(store_copy):
    group(open_dataset(store_copy), 2)
    tree = xr.open_datatree(store_copy, engine="zarr", consolidated=False)
    assert tree["data"].diffraction.dims == ("pattern", "det_y", "det_x")
    assert "input_index" in tree["data"].coords and "intensity_sum" in tree["data"].data_vars
    assert tree["groups"].nn_indices.dims == ("group", "member")


def _compare(npz, out, *flags) -> int:
    from ptychozarr.cli import main

    argv = ["compare", "--test-data", str(npz), "--output-dir", str(out), "--stitch-crop-size", "8",
            "--skip-registration", "--quiet", *flags]  # fmt: skip
    return main(argv)


@pytest.mark.parametrize(
    ("flags", "told", "fix"),
    [
        (["--n-test-subsample", "10", "--n-test-groups", "50"], "--n-test-subsample 10 draws 10 points",
         "give --n-test-groups 10 or less, or --n-test-subsample 50 or more"),
        (["--n-test-groups", "500"], "the scan has only 400 points", "give --n-test-groups 400 or less"),
        (["--n-test-subsample", "500", "--n-test-groups", "500"],
         "--n-test-subsample 500 draws 400 points (the scan has only 400)",
         "give --n-test-groups 400 or less"),
    ],
    ids=["subsample", "whole-scan", "subsample-past-the-scan"],
)  # fmt: skip
def test_more_groups_than_points_at_gridsize_2_is_refused_before_any_work(
    small_npz, tiny_models, tmp_path, capsys, flags, told, fix
):
    """compare_models fails here (it never enables K-choose-C oversampling); the engine says so first."""
    out = tmp_path / "out"
    assert _compare(small_npz, out, "--pinn-model", str(tiny_models["pinn"]), *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--n-test-groups {flags[-1]}: {told}, and at gridsize 2 each point seeds one group" in err
    assert err.rstrip().endswith(fix)
    assert not out.exists()


def test_more_groups_than_points_at_gridsize_1_form_one_group_per_point(small_npz, tmp_path):
    """As compare_models at gridsize 1: every drawn point seeds its group once, and one line says so."""
    import json

    recon = tmp_path / "recon.npz"  # an iterative arm only: the groups have gridsize 1
    np.savez(recon, reconstructed_object=np.ones((160, 160), np.complex64))

    def run(name, *flags):
        out = tmp_path / name
        seeded = ("--ptychi-recon", str(recon), "--test-subsample-seed", "3")
        assert _compare(small_npz, out, *seeded, *flags) == 0
        warnings = json.loads((out / "run.json").read_text())["warnings"]
        nn = zarr.open_group(str(out / "store.zarr"), mode="r")["groups/nn_indices"][:]
        return [w for w in warnings if "--n-test-groups" in w], nn

    capped_lines, capped = run("capped", "--n-test-subsample", "10", "--n-test-groups", "50")
    asked_lines, asked = run("asked", "--n-test-subsample", "10", "--n-test-groups", "10")
    assert capped.shape == (10, 1)
    np.testing.assert_array_equal(capped, asked)  # the same 10 points as asking for 10 groups
    assert asked_lines == []
    assert capped_lines == [
        "--n-test-groups 50 > the 10 scan points in use: forming 10 groups, one per point, as compare_models "
        "does at gridsize 1"
    ]
