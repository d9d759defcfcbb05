"""Model adapters, the reference networks' forward model, and training."""

import json
import pickle
import sys
import types

import numpy as np
import pytest

from ptychozarr.errors import ModelMismatchError
from ptychozarr.models import (
    KerasModel,
    ModelSpec,
    build_baseline,
    build_pinn,
    check_compatible,
    load_model,
    read_spec,
    save_keras,
)
from ptychozarr.simulate import extract_patches, make_object, make_probe

tf = pytest.importorskip("tensorflow")

N = 32


def _spec(**kw) -> ModelSpec:
    base = dict(kind="pinn", N=N, gridsize=2, takes_positions=False, intensity_scale=None, output="amp_phase")
    return ModelSpec(**{**base, **kw})


def test_translate_moves_content_by_the_shift():
    from ptychozarr.models.reference import translate

    rng = np.random.default_rng(0)
    image = rng.random((1, 16, 16, 1), dtype=np.float32)
    tx, ty = 2.25, 1.5
    out = translate(tf.constant(image), tf.constant([[tx, ty]], tf.float32)).numpy()[0, :, :, 0]
    # out[r, s] = image[r − ty, s − tx], bilinear, written plainly
    r, s = 8, 9
    y, x = r - ty, s - tx
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    img = image[0, :, :, 0]
    want = (
        (1 - fy) * (1 - fx) * img[y0, x0]
        + (1 - fy) * fx * img[y0, x0 + 1]
        + fy * (1 - fx) * img[y0 + 1, x0]
        + fy * fx * img[y0 + 1, x0 + 1]
    )
    assert out[r, s] == pytest.approx(want, abs=1e-5)


def test_far_field_matches_the_simulator_for_each_member():
    """The group patch moved by each member's offset, times the probe, gives that member's pattern."""
    from ptychozarr.models.reference import far_field

    obj = make_object(128)
    probe = make_probe(N)
    centre = np.array([64.0, 60.0])
    positions = centre + np.array([[3.0, -2.0], [-1.0, 4.0], [0.0, 0.0], [-2.0, -2.0]])
    group = extract_patches(obj, centre[:1], centre[1:], N)
    members = extract_patches(obj, positions[:, 0], positions[:, 1], N)
    offsets = -(positions - centre)
    got = far_field(tf.constant(group), tf.constant(probe), tf.constant(offsets[None], tf.float32)).numpy()[0]
    # the simulator's amplitude without noise: |fftshift(fft2(P·O))| / N; the group patch lacks the members'
    # border pixels (filled with 0), so compare against members with the same border zeroed
    for c, (dx, dy) in enumerate(offsets.astype(int)):
        member = members[c].copy()
        valid = np.zeros((N, N), bool)
        valid[max(dy, 0) : N + min(dy, 0), max(dx, 0) : N + min(dx, 0)] = True
        member[~valid] = 0
        want = np.abs(np.fft.fftshift(np.fft.fft2(probe * member))) / N
        np.testing.assert_allclose(got[..., c], want, atol=1e-4)


def test_reference_networks_give_amplitude_and_phase_in_range():
    x = np.random.default_rng(1).random((2, N, N, 4), dtype=np.float32)
    amp, phase = build_pinn(N, 2, filters=4, depth=2)(x)
    assert amp.shape == phase.shape == (2, N, N, 1)
    assert 0 <= float(tf.reduce_min(amp)) and float(tf.reduce_max(amp)) <= 1
    assert float(tf.reduce_max(tf.abs(phase))) <= np.pi
    assert len(build_baseline(N, filters=4, depth=2).outputs) == 2


def test_keras_round_trip_applies_the_output_convention(tmp_path):
    network = build_pinn(N, 2, filters=4, depth=2)
    probe = make_probe(N)
    path = save_keras(network, _spec(), tmp_path / "m", probe=probe, provenance={"note": "test"})
    spec, provenance = read_spec(path)
    assert spec == _spec() and provenance == {"note": "test"}
    model = load_model(tmp_path)  # a directory holding one model
    assert isinstance(model, KerasModel)
    np.testing.assert_array_equal(model.probe, probe)
    x = np.random.default_rng(2).random((3, N, N, 4), dtype=np.float32)
    amp, phase = (np.asarray(o)[..., 0] for o in network(x))
    got = model.predict_batch(x, None)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict_batch(x, None), got)
    assert got.dtype == np.complex64 and got.shape == (3, N, N)
    np.testing.assert_allclose(got, amp * np.exp(1j * phase), atol=1e-5)


def test_sidecar_that_contradicts_the_network_is_refused(tmp_path):
    path = save_keras(build_pinn(N, 2, filters=4, depth=2), _spec(), tmp_path / "m")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["spec"]["gridsize"] = 1
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelMismatchError, match="gridsize=1"):
        load_model(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelMismatchError, match="no sidecar"):
        load_model(path)


def test_check_compatible():
    check_compatible(_spec(), N, 2)
    check_compatible(_spec(kind="baseline", gridsize=1), N, 2)  # single-pattern models fit any grouping
    with pytest.raises(ModelMismatchError, match="32×32 patterns but the data has 64×64"):
        check_compatible(_spec(), 64, 2)
    with pytest.raises(ModelMismatchError, match="gridsize 2 but the groups have gridsize 1"):
        check_compatible(_spec(), N, 1)


def test_zip_bundles_go_to_the_ptychopinn_adapter(tmp_path, monkeypatch):
    bundle = tmp_path / "wts.h5.zip"
    bundle.write_bytes(b"")
    fake = types.ModuleType("ptychozarr.models.ptychopinn")
    fake.load_bundle = lambda path: ("bundle", path)
    monkeypatch.setitem(sys.modules, "ptychozarr.models.ptychopinn", fake)
    assert load_model(bundle) == ("bundle", bundle)
    with pytest.raises(ModelMismatchError, match="unknown model format"):
        load_model(_touch(tmp_path / "w.h5"))


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind, source", [("pinn", "small_store"), ("baseline", "small_npz")])
def test_training_lowers_the_loss_and_saves_a_loadable_model(kind, source, tmp_path, request):
    from ptychozarr.models import train

    data = request.getfixturevalue(source)
    path = train(
        kind,
        data,
        tmp_path,
        epochs=2,
        gridsize=2,
        batch_size=16,
        filters=4,
        depth=2,
        window=400,
        verbose=False,
    )
    model = load_model(path)
    assert (model.spec.kind, model.spec.N, model.spec.gridsize) == (kind, N, 2 if kind == "pinn" else 1)
    losses = model.provenance["loss_per_epoch"]
    assert len(losses) == 2 and losses[1] < losses[0]
    np.testing.assert_array_equal(model.probe, make_probe(N))
    x = np.ones((2, N, N, model.spec.channels), np.float32)
    assert model.predict_batch(x, None).shape == (2, N, N)


@pytest.mark.parametrize(
    "name, kind, gridsize", [("pinn_gs2_n64", "pinn", 2), ("baseline_n64", "baseline", 1)]
)
def test_shipped_demo_weights_load(name, kind, gridsize):
    from ptychozarr.models import demo_weights

    path = demo_weights(name)
    assert path.stat().st_size < 3 * 2**20
    spec, provenance = read_spec(path)
    assert (spec.kind, spec.N, spec.gridsize) == (kind, 64, gridsize)
    assert provenance["loss_per_epoch"][-1] < provenance["loss_per_epoch"][0]
    model = load_model(path)
    out = model.predict_batch(np.zeros((1, 64, 64, gridsize**2), np.float32), None)
    assert out.shape == (1, 64, 64) and np.isfinite(out).all()


def test_training_refuses_impossible_parameters(small_store, tmp_path):
    from ptychozarr.errors import InvalidParameterError
    from ptychozarr.models import train

    with pytest.raises(InvalidParameterError, match="kind='gan'"):
        train("gan", small_store, tmp_path)
    with pytest.raises(InvalidParameterError, match="window=8 < batch_size=16"):
        train("pinn", small_store, tmp_path, window=8, batch_size=16)
