"""Ingestion: bit-exact round trips of every key and layout, streaming under a memory bound, bad input,
and the store's curve order (the same store whatever the input's order, mapped back by ``input_index``).

Inputs are written with numpy's own ``np.savez`` / ``np.savez_compressed`` (an independent writer), except
for the large file of the memory test, written with the streaming writer so that it never sits in memory.
Stores hold patterns in curve order, so every per-pattern value is compared with the input's value at
``input_index``.
"""

import hashlib
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError
from ptychozarr.io import NpzReader, NpzWriter, curve_order, ingest, open_dataset
from ptychozarr.io import store as store_module
from ptychozarr.io.order import hilbert_index
from ptychozarr.io.store import read_by_chunk

N, M = 16, 40
PER_PATTERN = ("diffraction", "xcoords", "ycoords", "xcoords_start", "ycoords_start", "scan_index")


def _scan(rng=None, n=M, size=N) -> dict:
    rng = rng or np.random.default_rng(0)
    x, y = rng.uniform(8, 56, n), rng.uniform(8, 56, n)
    return {
        "diffraction": rng.gamma(0.3, 1.0, (n, size, size)).astype(np.float32),
        "xcoords": x,
        "ycoords": y,
        "xcoords_start": x + 0.25,
        "ycoords_start": y - 0.25,
        "scan_index": rng.integers(0, 3, n),
        "probeGuess": (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))).astype(
            np.complex64
        ),
        "objectGuess": (rng.normal(size=(64, 72)) + 1j).astype(np.complex64),
    }


def _save(path, arrays: dict, compressed: bool = False):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _explode():
    raise AssertionError("an object member was unpickled")


class _Trap:
    """Unpickling this runs ``_explode``: proof that ingestion never unpickles."""

    def __reduce__(self):
        return (_explode, ())


LAYOUTS = {
    "(M,N,N)": lambda d: d,
    "(M,N,N,1)": lambda d: d[..., None],
    "(M,N,N) Fortran": np.asfortranarray,
    "(N,N,M)": lambda d: np.ascontiguousarray(d.transpose(1, 2, 0)),
    "(N,N,M) Fortran": lambda d: np.asfortranarray(d.transpose(1, 2, 0)),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_every_key_and_layout(tmp_path, layout, compressed):
    arrays = _scan()
    stored = {**arrays, "diffraction": LAYOUTS[layout](arrays["diffraction"])}
    path = _save(tmp_path / "scan.npz", stored, compressed)
    store = ingest(path, tmp_path / "scan.zarr", chunk_bytes=3 * N * N * 4)  # 3 patterns per chunk
    ds = open_dataset(store)
    assert ds.diffraction.dims == ("pattern", "det_y", "det_x")
    assert ds.diffraction.data.chunks[0][:2] == (3, 3)
    index = ds.input_index.values
    np.testing.assert_array_equal(np.sort(index), np.arange(M))
    for key, value in arrays.items():
        assert ds[key].dtype == value.dtype, key
        expected = value[index] if key in PER_PATTERN else value
        np.testing.assert_array_equal(ds[key].values, expected, err_msg=key, strict=True)
    squares = arrays["diffraction"][index].astype(np.float64) ** 2
    np.testing.assert_allclose(ds.intensity_sum.values, squares.sum(axis=(1, 2)), rtol=1e-12)
    assert ds.objectGuess.dims == ("object_y", "object_x")
    assert ds.attrs["complete"] is True and ds.attrs["source"] == "scan.npz"
    assert ds.attrs["source_size"] == path.stat().st_size
    assert ds.attrs["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.attrs["diffraction_layout"].replace(" ", "").startswith(layout.split()[0].replace(" ", ""))
    assert ds.attrs["store"] == str(store)


@pytest.mark.parametrize("fortran", [False, True], ids=["C", "Fortran"])
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_an_object_of_many_tiles_is_stored_as_it_was_saved(tmp_path, monkeypatch, compressed, fortran):
    # 16² tiles: a 40×70 object spans 3×5 chunks, partly filled at its right and bottom edges
    monkeypatch.setattr(store_module, "OBJECT_TILE", 16)
    arrays = _scan()
    rng = np.random.default_rng(4)
    obj = (rng.normal(size=(40, 70)) + 1j * rng.normal(size=(40, 70))).astype(np.complex64)
    arrays["objectGuess"] = np.asfortranarray(obj) if fortran else obj
    store = ingest(_save(tmp_path / "scan.npz", arrays, compressed), tmp_path / "scan.zarr")
    stored = zarr.open_array(store / "data" / "objectGuess", mode="r")
    assert stored.chunks == (16, 16)
    np.testing.assert_array_equal(stored[:], arrays["objectGuess"], strict=True)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_legacy_uint16_counts_become_sqrt_amplitude(tmp_path, compressed):
    arrays = _scan()
    counts = np.random.default_rng(1).poisson(3.0, (N, N, M)).astype(np.uint16)
    legacy = {k: v for k, v in arrays.items() if k != "diffraction"} | {"diff3d": counts}
    ds = open_dataset(ingest(_save(tmp_path / "old.npz", legacy, compressed), tmp_path / "old.zarr", 5000))
    expected = np.sqrt(counts.transpose(2, 0, 1).astype(np.float32))[ds.input_index.values]
    np.testing.assert_array_equal(ds.diffraction.values, expected, strict=True)
    assert ds.attrs["diffraction_key"] == "diff3d" and ds.attrs["diffraction_source_dtype"] == "uint16"
    assert "sqrt" in ds.attrs["diffraction_conversion"]


def test_defaults_and_skipped_keys_are_never_unpickled(tmp_path):
    arrays = _scan()
    for key in ("xcoords_start", "ycoords_start", "scan_index", "objectGuess"):
        del arrays[key]
    arrays["Y"] = np.zeros((1, N, N, 1), np.complex64)
    arrays["_metadata"] = np.array(_Trap(), dtype=object)
    ds = open_dataset(ingest(_save(tmp_path / "s.npz", arrays), tmp_path / "s.zarr"))
    np.testing.assert_array_equal(ds.xcoords_start.values, arrays["xcoords"][ds.input_index.values])
    np.testing.assert_array_equal(ds.scan_index.values, np.zeros(M, np.int64))
    assert "objectGuess" not in ds
    assert ds.attrs["defaults"] == ["scan_index", "xcoords_start", "ycoords_start"]
    assert ds.attrs["skipped_keys"] == ["Y", "_metadata"]


def test_writer_matches_numpy_and_reader_streams_blocks(tmp_path):
    data = _scan()["diffraction"]
    with NpzWriter(tmp_path / "w.npz", compress=True) as npz, npz.stream("d", data.shape, data.dtype) as add:
        for start in range(0, M, 7):
            add(data[start : start + 7])
    with np.load(tmp_path / "w.npz") as z:
        np.testing.assert_array_equal(z["d"], data)
    with NpzReader(tmp_path / "w.npz") as npz:
        blocks = list(npz.iter_blocks("d", 6))
    assert [len(b) for b in blocks] == [6] * 6 + [4]
    np.testing.assert_array_equal(np.concatenate(blocks), data)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", ">f4", "<u2", "<i8", "<c8", "<c16"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    fortran=st.booleans(),
    compressed=st.booleans(),
    rows=st.integers(1, 4),
)
def test_reader_reads_any_member_as_numpy_wrote_it(tmp_path_factory, array, fortran, compressed, rows):
    array = np.asfortranarray(array) if fortran else array
    path = _save(tmp_path_factory.mktemp("h") / "a.npz", {"a": array}, compressed)
    with NpzReader(path) as npz:
        np.testing.assert_array_equal(npz.read("a"), array, strict=True)
        storage = array.T if npz.members["a"].fortran_order else array
        blocks = list(npz.iter_blocks("a", rows))
    assert all(block.dtype == array.dtype for block in blocks)
    if storage.ndim and storage.shape[0]:
        np.testing.assert_array_equal(np.concatenate(blocks), storage)
    if storage.ndim and not compressed:
        rows = np.random.default_rng(storage.shape[0]).permutation(storage.shape[0])
        with NpzReader(path) as npz:
            np.testing.assert_array_equal(npz.read_rows("a", rows), storage[rows], strict=True)


def test_read_rows_gathers_any_rows_of_a_stored_member(tmp_path):
    data = np.random.default_rng(3).random((3000, 3, 2)).astype(np.float32)
    path = _save(tmp_path / "r.npz", {"d": data, "f": np.asfortranarray(data)})
    shuffled = np.random.default_rng(4).permutation(3000)
    # one run longer than a preadv call takes, reversed (no run), shuffled, repeated rows, none
    cases = [np.arange(3000), np.arange(3000)[::-1], shuffled, np.array([7, 7, 0, 8]), np.array([], int)]
    with NpzReader(path) as npz:
        for rows in cases:
            np.testing.assert_array_equal(npz.read_rows("d", rows), data[rows], strict=True)
        np.testing.assert_array_equal(npz.read_rows("f", [1, 0]), data.T[[1, 0]], strict=True)
        with pytest.raises(InvalidParameterError, match="row indices"):
            npz.read_rows("d", [3000])
    with NpzReader(_save(tmp_path / "z.npz", {"d": data}, compressed=True)) as npz:
        with pytest.raises(InvalidParameterError, match="deflated"):
            npz.read_rows("d", [0])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_hilbert_index_is_a_hilbert_walk(bits):
    side = 2**bits
    ix, iy = np.divmod(np.arange(side * side), side)
    distance = hilbert_index(ix, iy, bits)
    np.testing.assert_array_equal(np.sort(distance), np.arange(side * side))  # every cell once
    walk = np.argsort(distance)
    steps = np.abs(np.diff(ix[walk])) + np.abs(np.diff(iy[walk]))
    assert (steps == 1).all()  # from each cell to an edge-adjacent one
    for level in range(bits + 1):  # every aligned 2^level square is walked in one stretch
        square = (ix >> level) * side + (iy >> level)
        assert len(set(zip(distance >> (2 * level), square, strict=True))) == (side >> level) ** 2


def test_curve_order_depends_on_the_positions_only_and_is_local():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 6, (2, 300)).astype(float)  # many points at equal positions
    start = rng.normal(size=300)  # tells them apart
    order = curve_order(x, y, start)
    shuffle = rng.permutation(300)
    np.testing.assert_array_equal(shuffle[curve_order(x[shuffle], y[shuffle], start[shuffle])], order)
    x, y = rng.uniform(0, 100, (2, 4000))
    spacing = 100 / np.sqrt(4000)  # mean distance between neighbours

    def median_step(walk):
        return np.median(np.hypot(np.diff(x[walk]), np.diff(y[walk])))

    assert median_step(curve_order(x, y)) < 2 * spacing and median_step(np.arange(4000)) > 10 * spacing


def test_the_same_scan_in_any_order_gives_the_same_store(tmp_path, small_npz):
    """A random-order (deflated) and a raster-order (stored) file of one scan: identical stores."""
    with np.load(small_npz) as z:
        arrays = {key: z[key] for key in z.files}
    raster = np.lexsort((arrays["xcoords"], arrays["ycoords"]))
    sorted_arrays = {k: v[raster] if k in PER_PATTERN else v for k, v in arrays.items()}
    chunk = 25 * arrays["diffraction"][0].nbytes
    stores = [
        ingest(small_npz, tmp_path / "random.zarr", chunk_bytes=chunk),
        ingest(_save(tmp_path / "raster.npz", sorted_arrays), tmp_path / "raster.zarr", chunk_bytes=chunk),
    ]
    random_ds, raster_ds = (open_dataset(store) for store in stores)
    for ds, source in ((random_ds, arrays), (raster_ds, sorted_arrays)):  # input_index maps back
        for key in PER_PATTERN:
            np.testing.assert_array_equal(ds[key].values, source[key][ds.input_index.values], err_msg=key)
    np.testing.assert_array_equal(raster[raster_ds.input_index.values], random_ds.input_index.values)
    one, two = (zarr.open_group(store / "data", mode="r") for store in stores)
    assert sorted(one.array_keys()) == sorted(two.array_keys())
    for name in one.array_keys():
        if name != "input_index":
            assert one[name].chunks == two[name].chunks, name
            np.testing.assert_array_equal(one[name][...], two[name][...], err_msg=name, strict=True)
    provenance = {"source", "source_size", "source_sha256", "source_stat", "store"}
    assert {k: v for k, v in random_ds.attrs.items() if k not in provenance} == {
        k: v for k, v in raster_ds.attrs.items() if k not in provenance
    }


def test_a_store_is_reused_for_its_own_file_and_replaced_for_another_only_with_overwrite(tmp_path):
    path = _save(tmp_path / "s.npz", _scan())
    store = ingest(path, tmp_path / "s.zarr")
    written = (store / "data" / "zarr.json").stat()
    assert ingest(path, store) == store
    again = (store / "data" / "zarr.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # nothing rewritten
    with pytest.raises(StoreError, match="overwrite"):  # the same file in other chunks
        ingest(path, store, chunk_bytes=2**16)
    other = _save(tmp_path / "t.npz", _scan(np.random.default_rng(5)))
    with pytest.raises(StoreError, match="already exists.*overwrite"):
        ingest(other, store)
    assert open_dataset(store).attrs["source"] == "s.npz"
    ingest(other, store, overwrite=True)
    assert open_dataset(store).attrs["source"] == "t.npz"
    assert _leftovers(tmp_path) == []


def _cases():
    """Bad-input cases: (id, arrays to save, what the message must say)."""
    base = _scan()
    nan = base["diffraction"].copy()
    nan[33, 2, 3] = np.nan
    negative = base["diffraction"].copy()
    negative[12, 0, 0] = -1.0
    inf_x = base["xcoords"].copy()
    inf_x[4] = np.inf
    yield (
        "missing diffraction",
        {k: v for k, v in base.items() if k != "diffraction"},
        "'diff3d' or 'diffraction'",
    )
    for key in ("xcoords", "ycoords", "probeGuess"):
        yield f"missing {key}", {k: v for k, v in base.items() if k != key}, f"'{key}'"
    yield "short xcoords", {**base, "xcoords": base["xcoords"][:-1]}, "'xcoords' has 39"
    yield "short ycoords", {**base, "ycoords": base["ycoords"][:-1]}, "'ycoords' has shape"
    yield "short scan_index", {**base, "scan_index": base["scan_index"][:-1]}, "'scan_index'"
    yield "non-square", {**base, "diffraction": np.zeros((M, N, N + 2), np.float32)}, "square"
    yield "nan diffraction", {**base, "diffraction": nan}, "pattern 33 holds NaN"
    yield "inf xcoords", {**base, "xcoords": inf_x}, "'xcoords' holds NaN or inf"
    yield "negative", {**base, "diffraction": negative}, "pattern 12 holds negative"
    empty = {**base, "diffraction": np.zeros((0, N, N), np.float32)}
    empty |= {k: base[k][:0] for k in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "scan_index")}
    yield "empty scan", empty, "empty scan"
    yield "probe shape", {**base, "probeGuess": base["probeGuess"][:8, :8]}, "'probeGuess' has shape"
    yield (
        "object diffraction",
        {**base, "diffraction": base["diffraction"].astype(object)},
        "'diffraction' holds",
    )
    yield "object xcoords", {**base, "xcoords": base["xcoords"].astype(object)}, "'xcoords' holds Python"


@pytest.mark.parametrize(("arrays", "match"), [pytest.param(a, m, id=i) for i, a, m in _cases()])
def test_bad_input_is_refused_and_leaves_no_store(tmp_path, arrays, match):
    path = _save(tmp_path / "bad.npz", arrays)
    with pytest.raises(InvalidScanError, match=match):
        ingest(path, tmp_path / "bad.zarr", chunk_bytes=4 * N * N * 4)
    assert not (tmp_path / "bad.zarr").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["not a zip", "truncated", "empty file"])
def test_unreadable_files(tmp_path, damage):
    good = _save(tmp_path / "good.npz", _scan()).read_bytes()
    data = {
        "not a zip": b"diffraction,xcoords\n1,2\n",
        "truncated": good[: len(good) * 2 // 3],
        "empty file": b"",
    }
    (tmp_path / "bad.npz").write_bytes(data[damage])
    with pytest.raises(InvalidScanError, match="bad.npz"):
        ingest(tmp_path / "bad.npz", tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists() and _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_store(tmp_path):
    store = ingest(_save(tmp_path / "s.npz", _scan()), tmp_path / "s.zarr")
    bad = {**_scan(), "probeGuess": np.zeros((3, 3), np.complex64)}
    with pytest.raises(InvalidScanError):
        ingest(_save(tmp_path / "b.npz", bad), store, overwrite=True)
    assert open_dataset(store).attrs["source"] == "s.npz"


def test_open_dataset_refuses_missing_or_incomplete(tmp_path):
    with pytest.raises(StoreError, match="no Zarr store"):
        open_dataset(tmp_path / "nothing.zarr")
    store = ingest(_save(tmp_path / "s.npz", _scan()), tmp_path / "s.zarr")
    zarr.open_group(store / "data", mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_dataset(store)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ptychozarr.io import ingest
    ingest(sys.argv[1], sys.argv[2])
    # VmHWM is this process's own peak (ru_maxrss would include the forking pytest process's peak)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak": int(hwm.split()[1]) * 1024}))
    """
)


@pytest.mark.slow
def test_ingest_memory_is_bounded_by_blocks_not_file_size(tmp_path):
    """Ingest a 1.5 GB stored NPZ in a fresh process; its peak RSS stays far below the file size."""
    n, size, rows = 23_000, 128, 500
    path = tmp_path / "big.npz"
    block = np.zeros((rows, size, size), np.float32)
    block[:, 60:68, 60:68] = np.arange(rows, dtype=np.float32)[:, None, None] % 7
    with NpzWriter(path) as npz:
        with npz.stream("diffraction", (n, size, size), np.float32) as add:
            for start in range(0, n, rows):
                add(block[: min(rows, n - start)])
        npz.write("xcoords", np.linspace(64, 400, n))
        npz.write("ycoords", np.linspace(400, 64, n))
        npz.write("probeGuess", np.ones((size, size), np.complex64))
    file_size = path.stat().st_size
    assert file_size > 1.5e9
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(tmp_path / "big.zarr")],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
        assert peak < 0.25 * file_size, (
            f"peak RSS {peak / 2**20:.0f} MiB for a {file_size / 2**20:.0f} MiB file"
        )
        ds = open_dataset(tmp_path / "big.zarr")
        assert ds.diffraction.shape == (n, size, size)
        last = ds.input_index.values[-3:]
        np.testing.assert_array_equal(ds.diffraction[n - 3 :].values, block[last % rows])
    finally:
        path.unlink()


def test_pickle_trap_is_armed():
    with pytest.raises(AssertionError, match="unpickled"):
        pickle.loads(pickle.dumps(_Trap()))


@pytest.mark.parametrize("kind", ["zarr", "dask", "numpy"])
def test_read_by_chunk_equals_the_numpy_selection(kind, tmp_path):
    # 100×130 in 32×48 chunks (dask: uneven ones), selections that cut chunks unevenly
    import dask.array as da

    rng = np.random.default_rng(2)
    image = (rng.random((100, 130)) + 1j * rng.random((100, 130))).astype(np.complex64)
    if kind == "zarr":
        array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=image.shape, chunks=(32, 48),
                                  dtype=image.dtype)  # fmt: skip
        array[:] = image
    else:
        array = da.from_array(image, chunks=((10, 50, 40), (48, 48, 34))) if kind == "dask" else image
    for rows, cols in [
        (slice(None), slice(None)),
        (slice(2, 98, 3), slice(5, 125, 7)),
        (slice(31, 33), slice(0, 130, 129)),
        (slice(40, 40), slice(None)),
    ]:
        got = read_by_chunk(array, rows, cols)
        np.testing.assert_array_equal(got, image[rows, cols], strict=True)


class _Reads:
    """A chunked array that records the selections read from it."""

    def __init__(self, image, chunks):
        self.image, self.chunks, self.selections = image, chunks, []
        self.shape, self.dtype = image.shape, image.dtype

    def __getitem__(self, key):
        self.selections.append(key)
        return self.image[key]


def test_read_by_chunk_reads_no_selection_across_two_chunks():
    array = _Reads(np.arange(100 * 130).reshape(100, 130), (32, 48))
    read_by_chunk(array, slice(2, 98, 3), slice(2, 128, 3))
    assert len(array.selections) == 3 * 3  # rows 2…95 and columns 2…125 meet three chunks each
    for key in array.selections:
        for part, chunk in zip(key, array.chunks, strict=True):
            assert part.start // chunk == (part.stop - 1) // chunk
