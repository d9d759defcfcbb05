"""Tests of the PtychoPINN bundle adapter.

The error-path tests need neither PtychoPINN nor TensorFlow and run everywhere. The tests against real
bundles run where the ``ptycho`` package is importable and ``PTYCHOZARR_TEST_BUNDLES`` names a folder with
``gs2/wts.h5.zip`` and ``gs1/wts.h5.zip`` made by PtychoPINN's ``scripts/training/train.py``; elsewhere they
are skipped.
"""

import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptychozarr.errors import InvalidParameterError, ModelMismatchError
from ptychozarr.models.ptychopinn import PtychoPINNBundle, load_bundle

_BUNDLES = os.environ.get("PTYCHOZARR_TEST_BUNDLES")


def _fake_bundle(folder: Path) -> Path:
    """An uncompressed zip with a bundle's member names, each holding ``AAAA…`` (nothing loadable)."""
    folder.mkdir()
    path = folder / "wts.h5.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("manifest.dill", "diffraction_to_obj/model.keras", "diffraction_to_obj/params.dill"):
            zf.writestr(name, b"A" * 64)
    return path


def test_missing_ptycho_names_what_to_install(tmp_path, monkeypatch):
    _fake_bundle(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "ptycho", None)
    with pytest.raises(
        ModelMismatchError, match=r"`ptycho` package is not importable.*pip install --no-deps -e"
    ):
        load_bundle(tmp_path / "run", trust_bundle=True)


def test_not_a_zip_is_rejected(tmp_path):
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ModelMismatchError, match="not a PtychoPINN bundle: it cannot be read as a zip"):
        load_bundle(path)


def test_zip_without_bundle_members_is_rejected(tmp_path):
    path = tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.dill", b"x")
    with pytest.raises(ModelMismatchError, match="lacks diffraction_to_obj/model.keras"):
        load_bundle(path)


def test_corrupt_bundle_is_rejected(tmp_path):
    path = _fake_bundle(tmp_path / "run")
    path.write_bytes(path.read_bytes().replace(b"A" * 64, b"B" * 64))  # contents no longer match their CRCs
    with pytest.raises(ModelMismatchError, match="is corrupt"):
        load_bundle(path, trust_bundle=True)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ModelMismatchError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_importing_the_adapter_imports_neither_ptycho_nor_tensorflow():
    code = (
        "import sys, ptychozarr.models.ptychopinn; "
        "print(sorted(m for m in ('tensorflow', 'ptycho', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_untrusted_bundle_is_refused_before_anything_is_unpickled(
    tmp_path, monkeypatch, small_store, small_groups
):
    """Every way in refuses a bundle without the opt-in, with one line saying why and how to opt in."""
    from ptychozarr.inference import cached_model, infer
    from ptychozarr.io import open_dataset
    from ptychozarr.models import load_model

    path = _fake_bundle(tmp_path / "run")
    for name in ("ptycho", "dill", "pickle"):  # importing any of them now fails: nothing is unpickled
        monkeypatch.setitem(sys.modules, name, None)
    calls = (
        lambda: load_bundle(path),
        lambda: load_bundle(path.parent),
        lambda: load_model(path),
        lambda: cached_model(path),
        lambda: infer(open_dataset(small_store), small_groups, path),
    )
    for call in calls:
        with pytest.raises(InvalidParameterError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert "runs code from the file" in message and "--trust-bundle" in message
        assert "trust_bundle" in message.replace("--trust-bundle", "")


class _FakeNetwork:
    """Stands for a bundle's network: records each call's batch; patch = (1 + 1j)·first channel + offset."""

    def __init__(self):
        self.batches = []

    def predict_on_batch(self, inputs):
        x, offsets = inputs
        self.batches.append(len(x))
        return (x[..., :1] * (1 + 1j) + offsets[:, :, :1, :1]).astype(np.complex64)


def _fake_loaded_bundle(tmp_path, gridsize: int, n: int = 16) -> PtychoPINNBundle:
    """A bundle object around :class:`_FakeNetwork` and stand-ins for PtychoPINN's globals."""
    log_scale = types.SimpleNamespace(value=0.0, assign=lambda v: None, numpy=lambda: 0.0)
    params = types.SimpleNamespace(cfg={})
    model = types.SimpleNamespace(_lazy_cache={"log_scale": log_scale}, _get_log_scale=lambda: log_scale)
    cfg = {"gridsize": gridsize, "N": n, "intensity_scale": 2.0}
    return PtychoPINNBundle(tmp_path / "wts.h5.zip", _FakeNetwork(), cfg, (params, model))


@pytest.mark.parametrize("batch_size, calls", [(32, [32] * 4), (100, [63, 63]), (63, [63, 63])])
def test_engine_batches_are_not_padded_to_max_batch(tmp_path, batch_size, calls):
    """max_batch (63 for gridsize 1) caps a batch; the engine's batches of 32 reach the network as 32."""
    from ptychozarr.inference import predict_patches

    bundle = _fake_loaded_bundle(tmp_path, gridsize=1)
    assert bundle.spec.max_batch == 63
    rng = np.random.default_rng(0)
    patterns = rng.random((110, 16, 16), dtype=np.float32)
    members = np.arange(110)[:, None]
    got = predict_patches(bundle, patterns, members, None, 0.5, 8, batch_size)
    assert bundle._network.batches == calls
    want = (patterns * np.float32(0.5))[:, 4:12, 4:12] * (1 + 1j)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_direct_calls_pad_only_when_split(tmp_path):
    bundle = _fake_loaded_bundle(tmp_path, gridsize=2)
    assert bundle.spec.max_batch == 15
    x = np.ones((22, 16, 16, 4), np.float32)
    offsets = np.zeros((22, 1, 2, 4), np.float32)
    assert bundle.predict_batch(x[:7], offsets[:7]).shape == (7, 16, 16)
    assert bundle.predict_batch(x, offsets, crop=6).shape == (22, 6, 6)
    assert bundle._network.batches == [7, 15, 15]


# --- against real bundles --------------------------------------------------------------------------------

_needs_bundles = pytest.mark.skipif(
    not (_BUNDLES and all((Path(_BUNDLES) / g / "wts.h5.zip").is_file() for g in ("gs1", "gs2"))),
    reason="set PTYCHOZARR_TEST_BUNDLES to a folder with gs1/ and gs2/ wts.h5.zip",
)


def _bundle_dir(gridsize: int) -> Path:
    return Path(_BUNDLES) / f"gs{gridsize}"


@pytest.fixture(scope="module")
def ptycho():
    return pytest.importorskip("ptycho")


@pytest.fixture(scope="module")
def bundles(ptycho):
    """Both bundles loaded through the adapter into this one process."""
    return {g: load_bundle(_bundle_dir(g) / "wts.h5.zip", trust_bundle=True) for g in (2, 1)}


def _inputs(model, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scaled diffraction and zero-sum member offsets for ``b`` groups, shaped as the engine gives them."""
    rng = np.random.default_rng(seed)
    n, c = model.spec.N, model.spec.channels
    x = rng.gamma(0.3, 1.0, (b, n, n, c))
    x *= np.sqrt((n / 2) ** 2 / np.mean(np.sum(x**2, axis=(1, 2))))  # spec §1.4 normalisation
    positions = rng.uniform(-12.0, 12.0, (b, 2, c))
    offsets = -(positions - positions.mean(axis=2, keepdims=True))[:, None]
    return (x * model.spec.intensity_scale).astype(np.float32), offsets.astype(np.float32)


def _reference(gridsize: int, x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """PtychoPINN's own inference, called as ``load_inference_bundle`` sets it up, 11 groups per call.

    ``load_inference_bundle`` also rebuilds the unused training model; this loads only
    ``diffraction_to_obj`` (the same ``ModelManager`` call) to keep the test short. ``log_scale`` is
    process-global in PtychoPINN; it is set to the bundle's trained value, which is what a fresh process
    loading only this bundle holds.
    """
    from ptycho import params
    from ptycho.model import _get_log_scale
    from ptycho.model_manager import ModelManager
    from ptycho.workflows.components import DiffractionToObjectAdapter

    base = str(_bundle_dir(gridsize) / "wts.h5")
    network = ModelManager.load_multiple_models(base, ["diffraction_to_obj"])["diffraction_to_obj"]
    _get_log_scale().assign(np.log(params.cfg["intensity_scale"]))
    return DiffractionToObjectAdapter(network).predict([x, offsets], batch_size=11, verbose=0)[..., 0]


@_needs_bundles
@pytest.mark.parametrize("gridsize", [2, 1])
def test_spec_reads_the_bundle(bundles, gridsize):
    import h5py

    model = bundles[gridsize]
    with zipfile.ZipFile(model.path) as zf, zf.open("diffraction_to_obj/model.h5") as fh:
        saved_scale = float(h5py.File(fh, "r").attrs["intensity_scale"])
    spec = model.spec
    assert (spec.gridsize, spec.channels) == (gridsize, gridsize**2)
    n = spec.N  # the bundle's own N (64 or 128 in PtychoPINN's studies): the saved network takes it
    assert tuple(model._network.inputs[0].shape[1:]) == (n, n, spec.channels)
    assert spec.kind == ("pinn" if gridsize > 1 else "baseline")
    assert spec.takes_positions is (gridsize > 1)
    assert spec.output == "complex"
    assert spec.max_batch == {2: 15, 1: 63}[gridsize]
    assert spec.max_batch * spec.channels < 64
    assert spec.intensity_scale == pytest.approx(saved_scale, rel=1e-12)
    assert model.params["gridsize"] == gridsize


@_needs_bundles
@pytest.mark.parametrize("gridsize", [2, 1])
def test_outputs_equal_ptychopinn_inference(bundles, gridsize):
    """Equal to float32 rounding: 1e-5 absolute where the object is (|value| ~ 1), 1e-6 relative outside
    the centre masks, where PtychoPINN divides by 0.001 (spec §3.3) and values reach ~10²."""
    model = bundles[gridsize]
    n = model.spec.N
    x, offsets = _inputs(model, 22, seed=gridsize)  # 22 = 15 + 7: the adapter pads its last call
    if not model.spec.takes_positions:
        offsets = np.zeros_like(offsets)
    ours = model.predict_batch(x, offsets if model.spec.takes_positions else None)
    ref = _reference(gridsize, x, offsets)
    assert ours.shape == (22, n, n) and ours.dtype == np.complex64
    centre = slice(n // 4, 3 * n // 4)  # the centre mask: the decoders' N/2 × N/2 output
    assert np.abs(ref[:, centre, centre]).mean() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)


@_needs_bundles
def test_batch_above_max_batch_is_split_per_group(bundles):
    """17 groups in one call equal the same groups called as 4 + 13: no group sees another."""
    model = bundles[2]
    x, offsets = _inputs(model, model.spec.max_batch + 2, seed=7)
    whole = model.predict_batch(x, offsets)
    parts = np.concatenate([model.predict_batch(x[:4], offsets[:4]), model.predict_batch(x[4:], offsets[4:])])
    assert whole.shape == (len(x), model.spec.N, model.spec.N)
    np.testing.assert_allclose(whole, parts, rtol=1e-6, atol=1e-5)
    assert np.abs(whole[0] - whole[1]).max() > 1e-3  # groups are not merged into one canvas


@_needs_bundles
def test_bundles_do_not_disturb_each_other_or_params(ptycho, bundles):
    from ptycho import params

    before = params.cfg.get("gridsize")
    x2, o2 = _inputs(bundles[2], 5, seed=3)
    x1, _ = _inputs(bundles[1], 5, seed=4)
    first = bundles[2].predict_batch(x2, o2)
    bundles[1].predict_batch(x1, None)
    np.testing.assert_array_equal(bundles[2].predict_batch(x2, o2), first)
    assert params.cfg.get("gridsize") == before


@_needs_bundles
def test_wrong_inputs_are_rejected(bundles):
    gs2, gs1 = bundles[2], bundles[1]
    x2, o2 = _inputs(gs2, 2, seed=0)
    x1, o1 = _inputs(gs1, 2, seed=0)
    with pytest.raises(ModelMismatchError, match="takes diffraction"):
        gs2.predict_batch(x1, o2)
    with pytest.raises(ModelMismatchError, match="needs the members' offsets"):
        gs2.predict_batch(x2, None)
    with pytest.raises(ModelMismatchError, match="gridsize-1 model"):
        gs1.predict_batch(x1, o1 + 1.0)
    assert gs2.predict_batch(x2[:0], o2[:0]).shape == (0, gs2.spec.N, gs2.spec.N)
