"""Ingestion: bit-exact round trips of every key and layout, streaming under a memory bound, bad input.

Inputs are written with numpy's own ``np.savez`` / ``np.savez_compressed`` (an independent writer), except
for the large file of the memory test, written with the streaming writer so that it never sits in memory.
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

from ptychozarr.errors import InvalidScanError, StoreError
from ptychozarr.io import NpzReader, NpzWriter, ingest, open_dataset

N, M = 16, 40


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
    for key, value in arrays.items():
        assert ds[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ds[key].values, value, err_msg=key, strict=True)
    assert ds.objectGuess.dims == ("obj_y", "obj_x")
    assert ds.attrs["complete"] is True and ds.attrs["source"] == "scan.npz"
    assert ds.attrs["source_size"] == path.stat().st_size
    assert ds.attrs["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.attrs["diffraction_layout"].replace(" ", "").startswith(layout.split()[0].replace(" ", ""))
    assert ds.attrs["store"] == str(store)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_legacy_uint16_counts_become_sqrt_amplitude(tmp_path, compressed):
    arrays = _scan()
    counts = np.random.default_rng(1).poisson(3.0, (N, N, M)).astype(np.uint16)
    legacy = {k: v for k, v in arrays.items() if k != "diffraction"} | {"diff3d": counts}
    ds = open_dataset(ingest(_save(tmp_path / "old.npz", legacy, compressed), tmp_path / "old.zarr", 5000))
    expected = np.sqrt(counts.transpose(2, 0, 1).astype(np.float32))
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
    np.testing.assert_array_equal(ds.xcoords_start.values, arrays["xcoords"])
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


def test_overwrite(tmp_path):
    path = _save(tmp_path / "s.npz", _scan())
    store = ingest(path, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists.*overwrite"):
        ingest(path, store)
    other = _save(tmp_path / "t.npz", _scan(np.random.default_rng(5)))
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
        np.testing.assert_array_equal(
            ds.diffraction[n - 3 :].values, block[(n - 3) % rows : (n % rows) or rows]
        )
    finally:
        path.unlink()


def test_pickle_trap_is_armed():
    with pytest.raises(AssertionError, match="unpickled"):
        pickle.loads(pickle.dumps(_Trap()))
