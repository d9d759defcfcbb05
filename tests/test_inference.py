"""Blockwise inference against plain in-memory model calls on the same inputs."""

import os
import subprocess
import sys

import dask
import numpy as np
import pytest

from ptychozarr import inference
from ptychozarr.errors import InvalidParameterError, MemoryBudgetError, ModelMismatchError
from ptychozarr.inference import infer, load_count, oom_events
from ptychozarr.io import open_dataset
from ptychozarr.models import ModelSpec, build_baseline, load_model, read_spec, save_keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

M = 8


def _two_input_network(n: int, channels: int):
    """A tiny network whose output depends on the diffraction and on the positions input."""
    x = keras.Input((n, n, channels))
    p = keras.Input((1, 2, channels))
    conv = keras.layers.Conv2D(2, 3, padding="same")(x)
    amp = keras.layers.Conv2D(1, 1, activation="sigmoid")(conv)
    from_pos = keras.layers.Reshape((n, n, 1))(keras.layers.Dense(n * n)(keras.layers.Flatten()(p)))
    phase = keras.layers.Activation("tanh")(keras.layers.Add()([keras.layers.Conv2D(1, 1)(conv), from_pos]))
    return keras.Model([x, p], [amp, phase])


@pytest.fixture(scope="module")
def data(small_store, small_groups):
    return open_dataset(small_store), small_groups


@pytest.fixture(scope="module")
def pinn(tmp_path_factory, data):
    """A gridsize-2 model taking positions, with an intensity scale."""
    ds, _ = data
    n = ds.sizes["det_y"]
    spec = ModelSpec("pinn", n, 2, True, 0.5, "amp_phase", name="tiny-pinn")
    network = _two_input_network(n, 4)
    return save_keras(network, spec, tmp_path_factory.mktemp("pinn") / "pinn"), network


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data):
    """A gridsize-1 model taking positions (it must get zeros)."""
    ds, _ = data
    n = ds.sizes["det_y"]
    spec = ModelSpec("baseline", n, 1, True, None, "amp_phase", name="tiny-baseline")
    network = _two_input_network(n, 1)
    return save_keras(network, spec, tmp_path_factory.mktemp("baseline") / "baseline"), network


def _in_memory(network, ds, groups, members, positions, scale):
    """The model over the whole stack at once, then the centre crop."""
    n = ds.sizes["det_y"]
    d = ds["diffraction"].values
    x = np.moveaxis(d[members], 1, -1) * np.float32(groups.attrs["normaliser"] * scale)
    amp, phase = (np.asarray(o)[..., 0] for o in network([x, positions.astype(np.float32)]))
    full = amp * np.exp(1j * phase)
    lo = n // 2 - M // 2
    return full[:, lo : lo + M, lo : lo + M]


def _splat(patches, positions, weights, shape):
    """Plain bilinear scatter-add of weighted crops onto the object grid, then num / (den + 1e-9)."""
    num = np.zeros(shape, np.complex128)
    den = np.zeros(shape)
    m = patches.shape[1]
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    for patch, (x, y), w in zip(patches, positions, weights, strict=True):
        top, left = y - m / 2 + m, x - m / 2 + m  # a margin of m on every side
        r0, c0 = int(np.floor(top)), int(np.floor(left))
        fy, fx = top - r0, left - c0
        for dr, dc, tap in (
            (0, 0, (1 - fy) * (1 - fx)),
            (0, 1, (1 - fy) * fx),
            (1, 0, fy * (1 - fx)),
            (1, 1, fy * fx),
        ):
            np.add.at(num, (r0 + dr + ii, c0 + dc + jj), w * tap * patch)
            np.add.at(den, (r0 + dr + ii, c0 + dc + jj), w * tap)
    return num / (den + 1e-9)


@pytest.mark.parametrize("block_groups", [400, 64, 37, 1000])
def test_blockwise_equals_in_memory(data, pinn, block_groups):
    ds, groups = data
    path, network = pinn
    out = infer(ds, groups, path, crop=M, block_groups=block_groups, batch_size=16)
    nn = groups["nn_indices"].values
    assert out.patches.shape == (len(nn), M, M) and out.patches.dtype == np.complex64
    assert out.patches.data.chunks[0][0] == min(block_groups, len(nn))
    positions = np.swapaxes(groups["offsets"].values, 1, 2)[:, None]  # (B, 1, 2, C)
    want = _in_memory(network, ds, groups, nn, positions, scale=0.5)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = out.patches.values
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.positions.values, groups["centres"].values)
    np.testing.assert_array_equal(out.weights.values, 1.0)


def test_one_model_load_per_process(data, pinn, tmp_path):
    ds, groups = data
    path = save_keras(pinn[1], read_spec(pinn[0])[0], tmp_path / "fresh")
    before = load_count()
    out = infer(ds, groups, path, crop=M, block_groups=50, batch_size=16)
    assert load_count() == before  # validation reads the sidecar only
    with dask.config.set(scheduler="threads", num_workers=4):
        out.patches.compute()
        infer(ds, groups, path.parent, crop=M, block_groups=30).patches.compute()  # same model, by directory
    assert load_count() == before + 1


def test_distinct_patterns_stitch_like_the_flattened_stack(data, baseline):
    """Distinct patterns once, weighted by multiplicity, == the B·C flattening at true positions."""
    ds, groups = data
    path, network = baseline
    nn = groups["nn_indices"].values
    out = infer(ds, groups, path, crop=M, block_groups=45, batch_size=8)
    distinct = np.unique(nn)
    assert out.sizes["patch"] == len(distinct) < nn.size
    assert out.weights.values.sum() == nn.size
    flat = nn.reshape(-1, 1)
    zeros = np.zeros((nn.size, 1, 2, 1))
    flat_patches = _in_memory(network, ds, groups, flat, zeros, scale=1.0)
    x, y = ds["xcoords"].values, ds["ycoords"].values
    flat_positions = np.stack([x[nn.ravel()], y[nn.ravel()]], axis=1)
    shape = (ds.sizes["object_y"] + 2 * M + 2, ds.sizes["object_x"] + 2 * M + 2)
    want = _splat(flat_patches, flat_positions, np.ones(nn.size), shape)
    with dask.config.set(scheduler="threads"):
        got = _splat(out.patches.values, out.positions.values, out.weights.values, shape)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_mismatched_model_is_refused_before_any_work(data, pinn, tmp_path):
    ds, groups = data
    n = ds.sizes["det_y"]
    wrong_n = save_keras(
        build_baseline(2 * n, filters=2, depth=1),
        ModelSpec("baseline", 2 * n, 1, False, None, "amp_phase"),
        tmp_path / "n",
    )
    before = load_count()
    with pytest.raises(ModelMismatchError, match=f"{2 * n}×{2 * n} patterns but the data has {n}×{n}"):
        infer(ds, groups, wrong_n)
    wrong_gs = save_keras(
        _two_input_network(n, 9), ModelSpec("pinn", n, 3, True, None, "amp_phase"), tmp_path / "gs"
    )
    with pytest.raises(ModelMismatchError, match="gridsize 3 but the groups have gridsize 2"):
        infer(ds, groups, wrong_gs)
    assert load_count() == before
    with pytest.raises(InvalidParameterError, match="crop=7"):
        infer(ds, groups, pinn[0], crop=7)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(data, pinn, before_model_call):
    ds, groups = data
    model = load_model(pinn[0])  # a loaded model works as well as a path
    with dask.config.set(scheduler="sync"):
        clean = infer(ds, groups, model, crop=M, block_groups=100, batch_size=16).patches.values

        def small_device(batch):
            if batch > 4:
                raise tf.errors.ResourceExhaustedError(None, None, f"injected: batch {batch}")

        events = len(oom_events())
        before_model_call(small_device)
        retried = infer(ds, groups, model, crop=M, block_groups=100, batch_size=16).patches.values
    new = oom_events()[events:]
    assert {"batch": 16, "retry": 8} in new and {"batch": 8, "retry": 4} in new
    assert all(e["retry"] >= 4 for e in new)
    np.testing.assert_allclose(retried, clean, atol=1e-6, rtol=0)


def test_out_of_memory_at_batch_one_is_a_clear_error(data, pinn, before_model_call):
    ds, groups = data

    def no_device(batch):
        raise tf.errors.ResourceExhaustedError(None, None, "injected")

    before_model_call(no_device)
    with pytest.raises(MemoryBudgetError, match="batch of 1"), dask.config.set(scheduler="sync"):
        infer(ds, groups, pinn[0], crop=M, block_groups=100, batch_size=2).patches.compute()


def test_empty_block_gives_no_patches(pinn):
    ref = inference._ModelRef(path=str(pinn[0]))
    out = inference._infer_block(
        np.empty((0, 4), np.int32),
        np.empty((0, 4, 2)),
        store="unused",
        model=ref,
        scale=1.0,
        crop=M,
        batch_size=4,
    )
    assert out.shape == (0, M, M) and out.dtype == np.complex64


# --- the lean block path: chunked reads, memory, loading and quiet TensorFlow ----------------------------


@pytest.fixture(scope="module")
def chunked(small_npz, tmp_path_factory):
    """The small scan ingested in chunks of 23 patterns (so blocks read many chunks), grouped."""
    from ptychozarr.grouping import group
    from ptychozarr.io import ingest

    with np.load(small_npz) as f:
        n = f["diffraction"].shape[-1]
    store = ingest(small_npz, tmp_path_factory.mktemp("chunked") / "s.zarr", chunk_bytes=23 * n * n * 4)
    ds = open_dataset(store)
    assert ds["diffraction"].data.chunks[0][0] == 23
    return ds, group(ds, gridsize=2, k=7, seed=0)


@pytest.mark.parametrize("arm", ["pinn", "baseline"])
def test_blocks_spanning_many_chunks_equal_in_memory(chunked, pinn, baseline, arm):
    ds, groups = chunked
    path, network = pinn if arm == "pinn" else baseline
    nn = groups["nn_indices"].values
    out = infer(ds, groups, path, crop=M, block_groups=57, batch_size=16)
    if arm == "pinn":
        want = _in_memory(network, ds, groups, nn, np.swapaxes(groups["offsets"].values, 1, 2)[:, None], 0.5)
    else:
        distinct = np.unique(nn)[:, None]
        want = _in_memory(network, ds, groups, distinct, np.zeros((len(distinct), 1, 2, 1)), 1.0)
    with dask.config.set(scheduler="threads", num_workers=2):
        np.testing.assert_allclose(out.patches.values, want, atol=1e-5, rtol=0)


def test_reader_reads_any_sorted_rows_and_hands_on_its_error():
    import zarr

    data = np.random.default_rng(1).random((100, 3, 3), dtype=np.float32)
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, chunks=(16, 3, 3), dtype="f4")
    array[:] = data
    rng = np.random.default_rng(2)
    for needed in (np.arange(100), np.arange(30, 40), np.array([99]), np.sort(rng.choice(100, 37, False))):
        for key in (None, "reader-test"):  # straight into the buffer; through the chunk cache
            with inference._Reader(array, needed, key) as reader:
                reader.wait(len(needed))
                np.testing.assert_array_equal(reader.patterns, data[needed])

    class Failing:
        shape, chunks, dtype = data.shape, (16, 3, 3), data.dtype

        def get_orthogonal_selection(self, *args, **kwargs):
            raise OSError("chunk unreadable")

    with inference._Reader(Failing(), np.array([1, 5])) as reader, pytest.raises(OSError, match="unreadable"):
        reader.wait(1)


def test_reader_reads_whole_chunks_past_the_cache(monkeypatch):
    """Chunks a block needs whole are read straight into its buffer (not decoded into the cache) unless
    cached already; partly needed chunks go through the cache. The rows equal the array's either way."""
    import zarr

    data = np.random.default_rng(3).random((40, 2, 2), dtype=np.float32)
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, chunks=(16, 2, 2), dtype="f4")
    array[:] = data
    cache = inference._ChunkCache(2**20)
    monkeypatch.setattr(inference, "_CHUNKS", cache)
    for needed, decoded in ((np.arange(16, 40), 0), (np.arange(3, 20), 2), (np.arange(0, 32), 2)):
        with inference._Reader(array, needed, "whole-test") as reader:
            reader.wait(len(needed))
            np.testing.assert_array_equal(reader.patterns, data[needed])
        assert cache.decoded == decoded


@pytest.mark.parametrize("capacity_chunks", [100, 2])
def test_blocks_share_decoded_chunks(chunked, baseline, monkeypatch, capacity_chunks):
    """Blocks smaller than a chunk share it through the cache: with room for every chunk each is decoded
    exactly once (not once per block); the cache never holds more than its capacity."""
    ds, groups = chunked
    chunk_bytes = 23 * ds.sizes["det_y"] ** 2 * 4
    cache = inference._ChunkCache(capacity_chunks * chunk_bytes)
    monkeypatch.setattr(inference, "_CHUNKS", cache)
    out = infer(ds, groups, baseline[0], crop=M, block_groups=10, batch_size=4)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = out.patches.values
    distinct = np.unique(groups["nn_indices"].values)
    chunks, reads = (
        len(np.unique(distinct // 23)),
        sum(len(np.unique(b // 23)) for b in np.array_split(distinct, range(10, len(distinct), 10))),
    )
    assert chunks < reads
    if capacity_chunks >= chunks:
        assert cache.decoded == chunks
    assert sum(c.nbytes for c in cache._items.values()) <= capacity_chunks * chunk_bytes
    want = _in_memory(baseline[1], ds, groups, distinct[:, None], np.zeros((len(distinct), 1, 2, 1)), 1.0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_task_memory_bounds_a_measured_task(chunked, pinn):
    """Projected ≥ traced peak of one task (numpy and zarr buffers, model loaded and traced first), and
    within 3× of it. The network's own buffers are the measured probe's part (0 here); the task reads
    without the chunk cache (no ``store_key``), whose bytes are projected per process."""
    import tracemalloc

    ds, groups = chunked
    model = load_model(pinn[0])
    block, batch, n = 150, 16, ds.sizes["det_y"]
    members = groups["nn_indices"].values[:block]
    offsets = groups["offsets"].values[:block]
    kwargs = dict(store=ds.attrs["store"], model=inference._ModelRef(model=model), scale=1.0, crop=M)
    inference._infer_block(members, offsets, batch_size=batch, **kwargs)  # trace the network first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        inference._infer_block(members, offsets, batch_size=batch, **kwargs)
        measured = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    projected = inference.task_memory(
        block_groups=block,
        batch_size=batch,
        N=n,
        channels=4,
        crop=M,
        model_probe=0,
        chunk_bytes=23 * n * n * 4,
    )["infer"]
    assert measured <= projected <= 3 * measured


def test_keras_files_load_in_safe_mode(tmp_path, data):
    """A .keras file with a Python lambda (code in the file) is refused, not run."""
    n = data[0].sizes["det_y"]
    x = keras.Input((n, n, 1))
    network = keras.Model(x, [keras.layers.Lambda(lambda t: t * 2.0)(x), keras.layers.Conv2D(1, 1)(x)])
    path = save_keras(network, ModelSpec("baseline", n, 1, False, None, "amp_phase"), tmp_path / "lam")
    with pytest.raises(ModelMismatchError, match="safe_mode"):
        load_model(path)


@pytest.mark.slow
def test_loading_and_predicting_prints_nothing(pinn):
    """TensorFlow's C++ start-up lines (cuInit, oneDNN, absl) and Python logs stay off stderr."""
    code = (
        "import numpy as np; from ptychozarr.inference import cached_model; "
        f"m = cached_model({str(pinn[0])!r}); n = m.spec.N; "
        "m.predict_batch(np.ones((2, n, n, 4), np.float32), np.zeros((2, 1, 2, 4), np.float32), crop=4)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_importing_inference_does_not_import_tensorflow():
    code = (
        "import sys, ptychozarr, ptychozarr.inference, ptychozarr.models; "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
