"""Right or refused: a result is computed from what the inputs hold, or the run stops with one line.

Reuse follows content (never a path or consolidated metadata); a chunk absent from a store is never read
as its fill value; every chunk carries a checksum; a damaged NPZ is refused before it is trusted; what a
killed ingestion leaves behind is removed by the next run. The bad files are made here, from the small
simulated scan of ``conftest.py``.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from ptychozarr.cli import main
from ptychozarr.errors import InvalidParameterError, InvalidScanError, StoreError
from ptychozarr.io import ingest, open_dataset
from ptychozarr.io.npz import NpzReader
from ptychozarr.io.store import (
    CheckedStore,
    MissingChunkError,
    array_options,
    check_chunks,
    missing_chunks,
    open_store,
    remove_leftovers,
    stores_every_chunk,
)
from ptychozarr.pipeline import compare

M = 8
FLAGS = {"stitch_crop_size": M, "block_groups": 96, "skip_registration": True, "quiet": True}


@pytest.fixture(scope="module")
def pinn(tiny_models) -> Path:
    """A tiny untrained gridsize-2 PINN (fixed random weights) for the 32×32 scan."""
    return tiny_models["pinn"]


@pytest.fixture(scope="module")
def fresh(small_npz, pinn, tmp_path_factory):
    """One run from the NPZ with the default seed: what every recovered run must equal."""
    return compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path_factory.mktemp("fresh"), **FLAGS)


@pytest.fixture(scope="module")
def chunked_store(small_npz, tmp_path_factory) -> Path:
    """The small scan ingested in 25 diffraction chunks of 16 patterns (read-only: copy it)."""
    return ingest(small_npz, tmp_path_factory.mktemp("chunked") / "scan.zarr", chunk_bytes=2**16)


def _metrics(result) -> dict:
    return {a.label: a.metrics for a in result.arms}


def _patches(result) -> np.ndarray:
    return zarr.open_group(result.store, mode="r", use_consolidated=False)["arms/pinn/patches/patches"][:]


def _chunk_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ptychozarr ") and "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _compare_argv(test_data: Path, pinn: Path, out: Path) -> list[str]:
    return [
        "compare", "--test-data", str(test_data), "--pinn-model", str(pinn), "--output-dir", str(out),
        "--stitch-crop-size", str(M), "--block-groups", "96", "--skip-registration", "--quiet",
    ]  # fmt: skip


# -- reuse by content ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_store_reused_with_another_seed_gives_the_fresh_result(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path / "a", **FLAGS)
    scan = first.store  # an earlier run's store (consolidated at its end) as --test-data
    seeded = compare(scan, {"PtychoPINN": pinn}, output_dir=tmp_path / "b", group_seed=5, **FLAGS)
    assert _metrics(seeded) != _metrics(fresh)
    again = compare(scan, {"PtychoPINN": pinn}, output_dir=tmp_path / "b", **FLAGS)
    assert "infer:pinn" not in again.run["reused"]  # the seed-5 patches are not taken for seed 0
    assert _metrics(again) == _metrics(fresh)
    np.testing.assert_array_equal(_patches(again), _patches(fresh))
    groups = zarr.open_group(scan, mode="r", use_consolidated=True)["groups"]  # the store's own record
    assert groups.attrs["seed"] == 0


@pytest.mark.slow
def test_groups_deleted_from_a_consolidated_store_are_made_again(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path / "a", **FLAGS)
    shutil.rmtree(first.store / "groups")  # the consolidated metadata still lists them
    again = compare(first.store, {"PtychoPINN": pinn}, output_dir=tmp_path / "b", **FLAGS)
    assert "group" not in again.run["reused"]
    assert _metrics(again) == _metrics(fresh)


@pytest.mark.slow
def test_groups_that_lost_an_array_are_made_again(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path / "a", **FLAGS)
    shutil.rmtree(first.store / "groups" / "nn_indices")
    again = compare(first.store, {"PtychoPINN": pinn}, output_dir=tmp_path / "a", **FLAGS)
    assert "group" not in again.run["reused"]
    assert _metrics(again) == _metrics(fresh)


# -- missing chunks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_missing_patch_chunk_of_a_done_block_is_recomputed(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    chunks = _chunk_files(first.store / "arms/pinn/patches/patches")
    assert len(chunks) > 1
    chunks[1].unlink()
    again = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    assert again.run["blocks"]["infer:pinn"] == {"computed": 1, "reused": len(chunks) - 1}
    assert _metrics(again) == _metrics(fresh)
    np.testing.assert_array_equal(_patches(again), _patches(fresh))


@pytest.mark.slow
def test_a_missing_object_chunk_is_stitched_again(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, tile=32, **FLAGS)
    obj = zarr.open_array(first.store / "arms/pinn/object", mode="r")
    assert stores_every_chunk(obj)
    before = obj[:]
    _chunk_files(first.store / "arms/pinn/object")[0].unlink()
    again = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, tile=32, **FLAGS)
    assert "stitch:pinn" not in again.run["reused"]
    assert not missing_chunks(zarr.open_array(first.store / "arms/pinn/object", mode="r"))
    np.testing.assert_array_equal(again.objects["PtychoPINN"].compute(), before)


def test_a_missing_diffraction_chunk_is_refused(chunked_store, pinn, tmp_path, capsys):
    store = shutil.copytree(chunked_store, tmp_path / "scan.zarr")
    _chunk_files(store / "data/diffraction")[2].unlink()
    with pytest.raises(MissingChunkError, match="data/diffraction.*re-ingest"):
        open_dataset(store)
    code, err = _cli(_compare_argv(store, pinn, tmp_path / "out"), capsys)
    assert code == 2
    line = _one_line(err)
    assert "data/diffraction" in line and "missing" in line and "re-ingest" in line
    assert not (tmp_path / "out" / "store.zarr" / "arms").exists()


@pytest.mark.slow
def test_a_missing_diffraction_chunk_of_the_run_store_is_ingested_again(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    _chunk_files(first.store / "data/diffraction")[0].unlink()
    again = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    assert "ingest" not in again.run["reused"]
    assert _metrics(again) == _metrics(fresh)


def test_a_strict_read_never_returns_the_fill_value(tmp_path):
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path / "s.zarr"), mode="w")
    arr = root.create_array("a", shape=(4, 3), chunks=(2, 3), dtype="f4", **array_options())
    arr[:] = 0  # equal to the fill value: stored all the same
    assert missing_chunks(arr) == []
    (tmp_path / "s.zarr/a/c/1/0").unlink()
    assert missing_chunks(arr) == [(1, 0)]
    with pytest.raises(MissingChunkError, match="chunks are missing"):
        check_chunks(root, "fix it")
    strict = open_store(tmp_path / "s.zarr")["a"]
    with pytest.raises(MissingChunkError, match=r"s\.zarr/a: chunk c/1/0 is missing"):
        strict[:]
    np.testing.assert_array_equal(strict[:2], 0)  # the chunks that are there read
    import pickle

    assert isinstance(pickle.loads(pickle.dumps(strict)).store, CheckedStore)


# -- damaged chunks ------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_diffraction_chunk_is_refused_in_one_line(chunked_store, pinn, tmp_path, capsys, how):
    store = shutil.copytree(chunked_store, tmp_path / "scan.zarr")
    _damage(_chunk_files(store / "data/diffraction")[1], how)
    with pytest.raises(StoreError, match="data/diffraction.*damaged.*re-ingest"):
        open_dataset(store)["diffraction"].load()
    code, err = _cli(_compare_argv(store, pinn, tmp_path / "out"), capsys)
    assert code == 2
    line = _one_line(err)
    assert "data/diffraction" in line and "damaged" in line
    patches = tmp_path / "out/store.zarr/arms/pinn/patches/zarr.json"
    assert not patches.exists() or not json.loads(patches.read_text())["attributes"]["complete"]


def test_damaged_metadata_is_refused_in_one_line(chunked_store, pinn, tmp_path, capsys):
    store = shutil.copytree(chunked_store, tmp_path / "scan.zarr")
    meta = store / "data/diffraction/zarr.json"
    meta.write_text(meta.read_text()[:-40] + "#garbled")
    code, err = _cli(_compare_argv(store, pinn, tmp_path / "out"), capsys)
    assert code == 2
    assert "data/diffraction/zarr.json" in _one_line(err)


def test_every_array_of_an_ingested_store_is_checksummed(small_store):
    data = open_store(small_store)["data"]
    for _, array in data.arrays():
        assert stores_every_chunk(array)
        assert not missing_chunks(array)


# -- damaged NPZ files ---------------------------------------------------------------------------


def _stored_copy(small_npz: Path, path: Path) -> Path:
    with np.load(small_npz) as npz:
        np.savez(path, **{k: npz[k] for k in npz.files})
    return path


def test_a_stored_member_with_damaged_bytes_is_refused(small_npz, tmp_path):
    path = _stored_copy(small_npz, tmp_path / "stored.npz")
    with NpzReader(path) as npz:
        member = npz.members["diffraction"]
        at = member.data_offset + member.nbytes // 3
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(InvalidScanError, match="'diffraction'.*CRC-32"):
        ingest(path, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    assert not list(tmp_path.glob(".*"))  # no partial store, no scratch


def test_a_damaged_small_stored_member_is_refused_when_read(small_npz, tmp_path):
    path = _stored_copy(small_npz, tmp_path / "stored.npz")
    with NpzReader(path) as npz:
        at = npz.members["xcoords"].data_offset + 3
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(b"\xff")
    with pytest.raises(InvalidScanError, match="xcoords.*CRC-32"):  # zipfile sees a small member whole
        with NpzReader(path) as npz:
            npz.read("xcoords")


def _forge_npy_shape(path: Path, out: Path, key: str, shape: tuple) -> Path:
    """Rewrite one member's .npy header to announce ``shape`` (same header length), and its zip sizes."""
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == f"{key}.npy":
                header_len = struct.unpack("<H", data[8:10])[0]
                header = data[10 : 10 + header_len].decode("latin1")
                old = header[header.index("(") : header.index(")") + 1]
                new = str(shape)
                header = header.replace(old, new).ljust(header_len)[:header_len]
                data = data[:10] + header.encode("latin1") + data[10 + header_len :]
            zout.writestr(info.filename, data)
    return out


@pytest.mark.parametrize("key", ["xcoords", "diffraction"])
def test_a_forged_header_shape_is_refused_before_any_allocation(small_npz, tmp_path, key):
    import tracemalloc

    stored = _stored_copy(small_npz, tmp_path / "stored.npz")
    forged = _forge_npy_shape(stored, tmp_path / "forged.npz", key, (3_000_000_000,) if key == "xcoords"
                              else (3_000_000, 64, 64))  # fmt: skip
    tracemalloc.start()
    with pytest.raises(InvalidScanError, match=key):
        ingest(forged, tmp_path / "out.zarr")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20
    assert not (tmp_path / "out.zarr").exists()


def test_a_forged_zip_directory_size_is_refused(small_npz, tmp_path):
    path = _stored_copy(small_npz, tmp_path / "stored.npz")
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    struct.pack_into("<II", data, cd + 20, 2**31, 2**31)  # compressed and uncompressed sizes
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidScanError, match="re-create it"):
        NpzReader(path)


def test_a_forged_central_directory_offset_is_one_line(small_npz, tmp_path, pinn, capsys):
    path = _stored_copy(small_npz, tmp_path / "stored.npz")
    data = bytearray(path.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, eocd + 12, 2**31)  # size of the central directory: past the start
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidScanError, match="not a readable NPZ"):
        NpzReader(path)
    code, err = _cli(_compare_argv(path, pinn, tmp_path / "out"), capsys)
    assert code == 2 and "not a readable NPZ" in _one_line(err)


def test_a_fifo_is_refused_without_opening_it(pinn, tmp_path, capsys):
    fifo = tmp_path / "scan.npz"
    os.mkfifo(fifo)
    with pytest.raises(InvalidScanError, match="not a regular file"):
        NpzReader(fifo)
    code, err = _cli(_compare_argv(fifo, pinn, tmp_path / "out"), capsys)  # would hang if opened
    assert code == 2 and "FIFO" in _one_line(err)
    code, err = _cli(["ingest", str(fifo), str(tmp_path / "x.zarr")], capsys)
    assert code == 2 and "FIFO" in _one_line(err)


def test_a_device_is_refused(pinn, tmp_path, capsys):
    code, err = _cli(_compare_argv(Path("/dev/zero"), pinn, tmp_path / "out"), capsys)
    assert code == 2 and "FIFO or device" in _one_line(err)


# -- what a killed ingestion leaves --------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_scratch_and_partial_store_are_removed(small_npz, tmp_path):
    dead, live = _dead_pid(), os.getpid()
    leftovers = [
        tmp_path / f".ptychozarr-scratch-{dead}-abc123",
        tmp_path / f".store.zarr.partial-{dead}-0123abcd",
        tmp_path / ".ptychozarr-scratch-legacy1",  # an older version's name: no owner left
    ]
    kept = [tmp_path / f".ptychozarr-scratch-{live}-xyz", tmp_path / f".store.zarr.partial-{live}-89abcdef"]
    for path in leftovers + kept:
        path.mkdir()
        (path / "patterns.npz").write_bytes(b"x" * 100)
    ingest(small_npz, tmp_path / "store.zarr")
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)
    assert set(remove_leftovers(tmp_path)) == set()


def test_an_ingestion_killed_mid_way_is_cleaned_by_the_next(small_npz, tmp_path):
    script = (
        "import os, signal, sys\n"
        "import ptychozarr.io.store as s\n"
        "def die(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.check_block = die\n"  # in the middle of the diffraction, read back from the scratch copy
        "s.ingest(sys.argv[1], sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    argv = [sys.executable, "-c", script, str(small_npz), str(tmp_path / "store.zarr")]
    killed = subprocess.run(argv, env=env)
    assert killed.returncode < 0
    left = {p.name.split("-")[0] for p in tmp_path.glob(".*")}
    assert left == {".ptychozarr", ".store.zarr.partial"}, left  # scratch (the whole diffraction) and store
    ingest(small_npz, tmp_path / "store.zarr")
    assert not list(tmp_path.glob(".*"))
    open_dataset(tmp_path / "store.zarr")


def test_a_model_fifo_is_refused(small_npz, tmp_path, capsys):
    fifo = tmp_path / "model.keras"
    os.mkfifo(fifo)
    with pytest.raises(InvalidParameterError):
        compare(small_npz, {"PtychoPINN": fifo}, output_dir=tmp_path / "out", **FLAGS)


def test_reuse_needs_every_chunk_of_a_checksummed_output(tmp_path):
    from ptychozarr.io.store import lost_chunks
    from ptychozarr.runtime import Runtime

    root = zarr.open_group(zarr.storage.LocalStore(tmp_path / "s.zarr"), mode="w")
    out = root.create_array("object", shape=(4, 4), chunks=(2, 2), dtype="c8", **array_options())
    out[:] = 0
    out.attrs.update({"params": {"tile": 2}, "complete": True})
    rt = Runtime(quiet=True)
    assert rt.reusable("stitch", out, {"tile": 2}) and not rt.reusable("stitch", out, {"tile": 3})
    assert not Runtime(quiet=True, force=True).reusable("stitch", out, {"tile": 2})
    (tmp_path / "s.zarr/object/c/1/1").unlink()
    assert lost_chunks(root) == {"object": [(1, 1)]}
    assert not rt.reusable("stitch", out, {"tile": 2})
    assert rt.reused == ["stitch"]


@pytest.mark.slow
def test_groups_with_damaged_metadata_are_made_again(fresh, small_npz, pinn, tmp_path):
    first = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    (first.store / "groups/offsets/zarr.json").write_text("{garbled")
    again = compare(small_npz, {"PtychoPINN": pinn}, output_dir=tmp_path, **FLAGS)
    assert "group" not in again.run["reused"]
    assert _metrics(again) == _metrics(fresh)


def test_an_array_made_again_without_checksums_is_read_as_such(tmp_path):
    store = CheckedStore(zarr.storage.LocalStore(tmp_path / "s.zarr"), strict=False)
    root = zarr.open_group(store, mode="w")
    root.create_array("a", data=np.arange(4.0), **array_options())
    np.testing.assert_array_equal(root["a"][:], np.arange(4.0))  # the codecs are now known
    root.create_array("a", data=np.ones(4), compressors=None, overwrite=True)
    np.testing.assert_array_equal(root["a"][:], 1.0)


def test_a_deflated_member_announcing_more_than_deflate_can_hold_is_refused(small_npz, tmp_path):
    path = Path(shutil.copy(small_npz, tmp_path / "deflated.npz"))
    data = bytearray(path.read_bytes())
    cd = data.find(b"PK\x01\x02")  # the first member's central directory entry
    struct.pack_into("<I", data, cd + 24, 2**32 - 1)  # its uncompressed size: 4 GiB
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidScanError, match="more than they can hold"):
        NpzReader(path)


def test_ingest_trusts_an_unchanged_file_and_rehashes_one_whose_stat_changed(small_npz, tmp_path):
    from ptychozarr import stages
    from ptychozarr.runtime import Runtime

    with np.load(small_npz) as npz:
        members = {k: npz[k] for k in npz.files}
    scan, other, store = tmp_path / "scan.npz", tmp_path / "other.npz", tmp_path / "run" / "store.zarr"
    np.savez(scan, **members)
    np.savez(other, **{**members, "diffraction": members["diffraction"][::-1].copy()})
    first = stages.ingest.run(Runtime(quiet=True), scan, store)["diffraction"].values
    rt = Runtime(quiet=True)
    stages.ingest.run(rt, scan, store)
    assert rt.reused == ["ingest"]
    os.utime(scan)  # touched: the stat differs, the content (hashed again) does not
    rt = Runtime(quiet=True)
    stages.ingest.run(rt, scan, store)
    assert rt.reused == ["ingest"]
    before = os.stat(scan)
    assert other.stat().st_size == before.st_size  # same size, other content ...
    shutil.copyfile(other, scan)
    os.utime(scan, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the old modification time
    rt = Runtime(quiet=True)
    again = stages.ingest.run(rt, scan, store)
    assert rt.reused == []
    assert not np.array_equal(again["diffraction"].values, first)
