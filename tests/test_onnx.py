"""ONNX models through ONNX Runtime, and the model-format registry that finds them.

The proof: an ONNX twin of a ``.keras`` model (the same weights, the graph built with the ``onnx`` helper
API: NHWC inputs transposed to NCHW around 1×1 ``Conv`` nodes, the positions through ``MatMul``) gives the
same patches through :func:`ptychozarr.infer` and the same scores through :func:`ptychozarr.compare`.
"""

import pickle
import subprocess
import sys

import dask
import numpy as np
import pytest

from ptychozarr.errors import InvalidParameterError, ModelMismatchError
from ptychozarr.inference import cached_model, infer, load_count, oom_events
from ptychozarr.io import open_dataset
from ptychozarr.models import (
    ModelSpec,
    format_named,
    is_out_of_memory,
    load_model,
    resolve,
    save_keras,
    save_onnx,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
keras = pytest.importorskip("keras")

M = 8


def keras_network(n: int, channels: int, positions: bool, seed: int = 0):
    """Amplitude and phase, each one 1×1 convolution of the diffraction; with ``positions``, the phase
    adds a linear function of the offsets. Weights and biases random (non-zero)."""
    x = keras.Input((n, n, channels))
    amp = keras.layers.Conv2D(1, 1, name="amp")(x)
    phase = keras.layers.Conv2D(1, 1, name="phase")(x)
    inputs = x
    if positions:
        p = keras.Input((1, 2, channels))
        from_p = keras.layers.Dense(1, name="pos")(keras.layers.Reshape((1, 1, 2 * channels))(p))
        phase = keras.layers.Add()([phase, from_p])
        inputs = [x, p]
    network = keras.Model(inputs, [amp, phase])
    rng = np.random.default_rng(seed)
    network.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in network.get_weights()])
    return network


def onnx_twin(network, n: int, channels: int, positions: bool, batch="b"):
    """The same network as an ONNX graph (``onnx.ModelProto``), channels-last inputs and outputs."""
    from onnx import TensorProto, helper, numpy_helper

    def conv_weights(layer):
        kernel, bias = network.get_layer(layer).get_weights()
        return [
            numpy_helper.from_array(kernel.transpose(3, 2, 0, 1).astype(np.float32), f"{layer}_w"),  # OIHW
            numpy_helper.from_array(bias.astype(np.float32), f"{layer}_b"),
        ]

    inits = conv_weights("amp") + conv_weights("phase")
    nodes = [helper.make_node("Transpose", ["diffraction"], ["x_nchw"], perm=[0, 3, 1, 2])]
    for layer in ("amp", "phase"):
        nodes.append(helper.make_node("Conv", ["x_nchw", f"{layer}_w", f"{layer}_b"], [f"{layer}_nchw"]))
    nodes.append(helper.make_node("Transpose", ["amp_nchw"], ["amp"], perm=[0, 2, 3, 1]))
    phase_out = "phase" if not positions else "phase_x"
    nodes.append(helper.make_node("Transpose", ["phase_nchw"], [phase_out], perm=[0, 2, 3, 1]))
    graph_inputs = [helper.make_tensor_value_info("diffraction", TensorProto.FLOAT, [batch, n, n, channels])]
    if positions:
        kernel, bias = network.get_layer("pos").get_weights()
        inits += [
            numpy_helper.from_array(np.array([-1, 1, 1, 2 * channels], np.int64), "q_shape"),
            numpy_helper.from_array(kernel.astype(np.float32), "pos_w"),
            numpy_helper.from_array(bias.astype(np.float32), "pos_b"),
        ]
        nodes += [
            helper.make_node("Reshape", ["positions", "q_shape"], ["q"]),
            helper.make_node("MatMul", ["q", "pos_w"], ["qw"]),
            helper.make_node("Add", ["qw", "pos_b"], ["from_p"]),
            helper.make_node("Add", ["phase_x", "from_p"], ["phase"]),
        ]
        graph_inputs.append(
            helper.make_tensor_value_info("positions", TensorProto.FLOAT, [batch, 1, 2, channels])
        )
    outputs = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, [batch, n, n, 1]) for o in ("amp", "phase")
    ]
    graph = helper.make_graph(nodes, "twin", graph_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def twins(folder, n, gridsize, positions, scale, name, batch="b"):
    """A ``.keras`` model and its ONNX twin, each with its sidecar; (keras path, onnx path)."""
    channels = gridsize**2
    kind = "pinn" if gridsize > 1 else "baseline"
    spec = ModelSpec(kind, n, gridsize, positions, scale, "amp_phase", name=name)
    network = keras_network(n, channels, positions)
    folder.mkdir(parents=True, exist_ok=True)
    k = save_keras(network, spec, folder / name / "keras" / name)
    o = save_onnx(onnx_twin(network, n, channels, positions, batch), spec, folder / name / "onnx" / name)
    return k, o


@pytest.fixture(scope="module")
def data(small_store, small_groups):
    return open_dataset(small_store), small_groups


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    ds, _ = data
    n = ds.sizes["det_y"]
    folder = tmp_path_factory.mktemp("twins")
    return {
        "pinn": twins(folder, n, 2, True, 0.5, "pinn"),
        "baseline": twins(folder, n, 1, False, None, "baseline"),
    }


@pytest.mark.parametrize("arm", ["pinn", "baseline"])
def test_onnx_twin_predicts_as_the_keras_model_through_infer(data, models, arm):
    ds, groups = data
    k, o = models[arm]
    assert type(load_model(o)).__name__ == "OnnxModel"
    with dask.config.set(scheduler="threads", num_workers=2):
        want = infer(ds, groups, k, crop=M, block_groups=64, batch_size=16)
        got = infer(ds, groups, o, crop=M, block_groups=64, batch_size=16)
        want_patches, got_patches = want.patches.values, got.patches.values
    assert got.attrs["mode"] == want.attrs["mode"] and got.attrs["model"] == want.attrs["model"]
    assert np.abs(want_patches).max() > 0.1  # not trivially equal
    np.testing.assert_allclose(got_patches, want_patches, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.positions.values, want.positions.values)
    np.testing.assert_array_equal(got.weights.values, want.weights.values)


def test_onnx_twin_scores_as_the_keras_model_through_compare(small_npz, models, tmp_path):
    from ptychozarr.pipeline import compare

    arms = {
        "KerasPINN": models["pinn"][0],
        "OnnxPINN": models["pinn"][1],
        "KerasBase": models["baseline"][0],
        "OnnxBase": models["baseline"][1],
    }
    result = compare(
        small_npz, arms, output_dir=tmp_path / "out", stitch_crop_size=M, block_groups=96,
        skip_registration=True, quiet=True, save_npz=False, save_npz_aligned=False,
    )  # fmt: skip
    assert not result.errors
    scores = {a.label: a.metrics for a in result.arms}
    for keras_arm, onnx_arm in (("KerasPINN", "OnnxPINN"), ("KerasBase", "OnnxBase")):
        assert scores[keras_arm] is not None
        _assert_close(scores[onnx_arm], scores[keras_arm], keras_arm)
        a = np.asarray(result.objects[keras_arm])
        np.testing.assert_allclose(np.asarray(result.objects[onnx_arm]), a, atol=1e-5, rtol=0)


def _assert_close(got, want, where):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list | tuple) or isinstance(want, np.ndarray):
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-4, atol=1e-5)
    elif isinstance(want, float | int) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5, nan_ok=True), where
    else:
        assert got == want, where


def test_a_graph_of_fixed_batch_runs_in_calls_of_its_batch(data, models, tmp_path):
    ds, groups = data
    n = ds.sizes["det_y"]
    k, o = twins(tmp_path, n, 2, True, 0.5, "fixed", batch=6)
    assert load_model(o).fixed_batch == 6
    with dask.config.set(scheduler="sync"):
        want = infer(ds, groups, k, crop=M, block_groups=50, batch_size=16).patches.values
        got = infer(ds, groups, o, crop=M, block_groups=50, batch_size=16).patches.values
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_one_session_per_process(data, models, tmp_path):
    ds, groups = data
    o = tmp_path / "again.onnx"
    o.write_bytes(models["pinn"][1].read_bytes())
    o.with_suffix(".json").write_text(models["pinn"][1].with_suffix(".json").read_text())
    before = load_count()
    out = infer(ds, groups, o, crop=M, block_groups=50, batch_size=16)
    assert load_count() == before  # the spec comes from the sidecar
    with dask.config.set(scheduler="threads", num_workers=4):
        out.patches.compute()
        infer(ds, groups, tmp_path, crop=M, block_groups=30).patches.compute()  # by directory
    assert load_count() == before + 1
    assert cached_model(o) is cached_model(tmp_path)


def test_an_onnx_model_pickles_as_its_path(models):
    model = load_model(models["pinn"][1])
    copy = pickle.loads(pickle.dumps(model))
    x = np.random.default_rng(0).random((3, *model.session.get_inputs()[0].shape[1:]), np.float32)
    p = np.zeros((3, 1, 2, 4), np.float32)
    np.testing.assert_array_equal(copy.predict_batch(x, p, crop=M), model.predict_batch(x, p, crop=M))


def _ort_error(message: str) -> Exception:
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    return RuntimeException(message)


def test_onnx_out_of_memory_halves_the_batch_and_gives_the_same_result(data, models, before_model_call):
    ds, groups = data
    model = load_model(models["pinn"][1])
    with dask.config.set(scheduler="sync"):
        clean = infer(ds, groups, model, crop=M, block_groups=100, batch_size=16).patches.values

        def small_device(batch):
            if batch > 4:
                raise _ort_error(
                    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                    "running Conv node. Name:'' Status Message: Failed to allocate memory for requested "
                    f"buffer of size {batch * 4096}"
                )

        events = len(oom_events())
        before_model_call(small_device)
        retried = infer(ds, groups, model, crop=M, block_groups=100, batch_size=16).patches.values
    new = oom_events()[events:]
    assert {"batch": 16, "retry": 8} in new and {"batch": 8, "retry": 4} in new
    np.testing.assert_allclose(retried, clean, atol=1e-6, rtol=0)


def test_a_real_onnx_runtime_allocation_failure_halves_the_batch(models):
    """ONNX Runtime's own error, from a CPU arena capped at 1 MiB (process-wide: in a subprocess)."""
    code = f"""
import numpy as np, onnxruntime as ort
from ptychozarr.inference import oom_events, predict_patches
from ptychozarr.models import load_model
model = load_model({str(models["baseline"][1])!r})
n = model.spec.N
patterns = np.random.default_rng(0).random((200, n, n), np.float32)
members = np.arange(200)[:, None]
clean = predict_patches(model, patterns, members, None, 1.0, {M}, 64)
arena = ort.OrtArenaCfg(1 << 20, -1, -1, -1)
info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
ort.create_and_register_allocator(info, arena)
options = ort.SessionOptions()
options.add_session_config_entry("session.use_env_allocators", "1")
model.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
got = predict_patches(model, patterns, members, None, 1.0, {M}, 64)
assert oom_events() and oom_events()[0] == {{"batch": 64, "retry": 32}}, oom_events()
np.testing.assert_array_equal(got, clean)
print("ok", oom_events()[-1]["retry"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_other_onnx_errors_are_not_retried(data, models, before_model_call):
    ds, groups = data

    def broken(batch):
        raise _ort_error("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input")

    before_model_call(broken)
    events = len(oom_events())
    with pytest.raises(Exception, match="INVALID_ARGUMENT"), dask.config.set(scheduler="sync"):
        infer(ds, groups, models["pinn"][1], crop=M, block_groups=100, batch_size=8).patches.compute()
    assert len(oom_events()) == events


def test_each_entry_recognises_only_its_frameworks_out_of_memory(models):
    tf = pytest.importorskip("tensorflow")
    tf_oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    ort_oom = _ort_error("CUDA failure 2: out of memory ; GPU=0")
    ort_bfc = _ort_error(
        "BFCArena::AllocateRawInternal Available memory of 0 is smaller than requested bytes"
    )
    onnx_entry, keras_entry = format_named("onnx"), format_named("keras")
    assert onnx_entry.is_out_of_memory(ort_oom) and onnx_entry.is_out_of_memory(ort_bfc)
    assert not onnx_entry.is_out_of_memory(tf_oom)
    assert not onnx_entry.is_out_of_memory(RuntimeError("out of memory"))  # not ONNX Runtime's
    assert keras_entry.is_out_of_memory(tf_oom) and not keras_entry.is_out_of_memory(ort_oom)
    onnx_model = load_model(models["pinn"][1])
    assert is_out_of_memory(ort_oom, onnx_model) and not is_out_of_memory(tf_oom, onnx_model)
    assert is_out_of_memory(tf_oom) and is_out_of_memory(ort_oom)  # a model of no known format: any entry


def test_the_registry_finds_a_format_by_suffix_content_and_directory(models, tmp_path):
    k, o = models["pinn"]
    assert resolve(k)[0].name == "keras" and resolve(o)[0].name == "onnx"
    assert resolve(o.parent) == (format_named("onnx"), o)  # a directory of one model
    renamed = tmp_path / "model.bin"  # no known suffix: found by its content (and its sidecar)
    renamed.write_bytes(o.read_bytes())
    renamed.with_suffix(".json").write_text(o.with_suffix(".json").read_text())
    assert resolve(renamed)[0].name == "onnx"
    assert load_model(renamed).spec == load_model(o).spec
    both = tmp_path / "both"
    both.mkdir()
    for f in (k, o):
        (both / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelMismatchError, match="exactly one model file.*found 2"):
        resolve(both)
    with pytest.raises(ModelMismatchError, match="unknown model format.*onnx"):
        resolve(_touch(tmp_path / "w.pt"))
    assert [f.name for f in format_named("onnx").files(o)] == [o.name, o.with_suffix(".json").name]


def test_an_onnx_file_that_contradicts_its_sidecar_is_refused(models, tmp_path):
    _, o = models["pinn"]
    folder = tmp_path / "bad"
    folder.mkdir()
    bad = folder / "m.onnx"
    bad.write_bytes(o.read_bytes())
    with pytest.raises(ModelMismatchError, match="no sidecar m.json"):
        load_model(bad)
    spec = load_model(o).spec
    for change, message in (
        ({"takes_positions": False}, r"2 input\(s\).*takes_positions=False"),
        ({"gridsize": 1, "kind": "baseline"}, "diffraction of shape"),
        ({"N": spec.N * 2}, "diffraction of shape"),
        ({"output": "complex"}, r"2 output\(s\).*output='complex'"),
    ):
        from ptychozarr.models import write_sidecar

        write_sidecar(bad, ModelSpec(**{**spec.to_dict(), **change}))
        with pytest.raises(ModelMismatchError, match=message):
            load_model(bad)
    write_sidecar(bad, spec)
    bad.write_bytes(b"\x08\x09not a graph")
    with pytest.raises(ModelMismatchError, match="ONNX Runtime cannot load"):
        load_model(bad)


def test_an_onnx_file_reading_weights_outside_its_folder_is_refused(models, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    weight = numpy_helper.from_array(np.ones(4, np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    path = save_onnx(proto, load_model(models["baseline"][1]).spec, tmp_path / "inner" / "m")
    with pytest.raises(ModelMismatchError, match="ONNX Runtime cannot load.*escapes model directory"):
        load_model(path)


def test_bundles_still_need_trust_through_the_registry(tmp_path):
    bundle = _touch(tmp_path / "wts.h5.zip")
    with pytest.raises(InvalidParameterError, match="--trust-bundle"):
        cached_model(bundle)
    with pytest.raises(InvalidParameterError, match="--trust-bundle"):
        cached_model(tmp_path)  # the training output directory


def test_onnx_models_run_without_tensorflow_and_frameworks_load_only_with_their_models(models):
    """Importing the package imports no framework; an ONNX model loads and runs without TensorFlow."""
    code = (
        "import sys, numpy as np, ptychozarr, ptychozarr.inference, ptychozarr.models, ptychozarr.memory; "
        "assert 'onnxruntime' not in sys.modules and 'tensorflow' not in sys.modules; "
        "from ptychozarr.inference import cached_model, model_spec; "
        f"spec = model_spec({str(models['pinn'][1])!r}); "
        "assert 'onnxruntime' not in sys.modules; "
        f"m = cached_model({str(models['pinn'][1])!r}, 1); "
        "x, p = np.ones((2, spec.N, spec.N, 4), np.float32), np.zeros((2, 1, 2, 4), np.float32); "
        "y = m.predict_batch(x, p); "
        "assert y.shape == (2, spec.N, spec.N) and y.dtype == np.complex64; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok" and out.stderr == ""


def test_the_cpu_probe_measures_an_onnx_batch(models):
    from ptychozarr.memory import probe_model

    model = load_model(models["pinn"][1])
    n = model.spec.N
    output = 256 * n * n * (2 * 4 + 8)  # two (b, N, N, 1) float32 planes, then the complex64 patches
    assert probe_model(model.predict_batch, (256, n, n, 4), (256, 1, 2, 4), model=model) >= 0.5 * output


def _touch(path):
    path.write_bytes(b"")
    return path
