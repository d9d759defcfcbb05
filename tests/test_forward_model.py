"""The PINN's forward model against the simulator, on a small scan at the shipped models' dose.

The path the PINN trains through — normalised diffraction, the grouping's normaliser, member offsets,
``translate``, ``far_field``, the Poisson likelihood in photon counts — is checked against the simulator
(numpy) and an independent float64 numpy/scipy evaluation of the same loss.
"""

import numpy as np
import pytest

from ptychozarr.simulate import extract_patches

tf = pytest.importorskip("tensorflow")

N = 64  # the demo's patch size: the probe's defocus and aperture scale with it
DOSE = 1e6  # the shipped models' training dose


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Twelve gridsize-2 groups of a small scan: normalised patterns, offsets, true patches, gain, scale."""
    from ptychozarr.grouping import group
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.simulate import simulate

    folder = tmp_path_factory.mktemp("forward")
    scan = simulate(folder / "scan.npz", n_points=150, patch_size=N, object_size=160, dose=DOSE, seed=3)
    ds = open_dataset(ingest(scan, folder / "scan.zarr"))
    ds.attrs.pop("store")
    grouped = group(ds, gridsize=2, k=7, seed=0)
    chosen = np.arange(0, grouped.sizes["group"], grouped.sizes["group"] // 12)[:12]
    members = grouped["nn_indices"].values[chosen]
    f = float(grouped.attrs["normaliser"])
    obj = ds["objectGuess"].values
    xs, ys = ds["xcoords"].values[members], ds["ycoords"].values[members]
    centres = grouped["centres"].values[chosen]
    every = extract_patches(obj, ds["xcoords"].values, ds["ycoords"].values, N)
    photons_per_amplitude = np.sqrt(
        DOSE / np.mean(np.sum(np.abs(ds["probeGuess"].values * every) ** 2, axis=(1, 2)))
    )
    return {
        "photons_per_amplitude": photons_per_amplitude,
        "x": np.moveaxis(ds["diffraction"].values[members], 1, -1) * np.float32(f),
        "members": extract_patches(obj, xs.ravel(), ys.ravel(), N).reshape(*members.shape, N, N),
        "group": extract_patches(obj, centres[:, 0], centres[:, 1], N),
        "offsets": grouped["offsets"].values[chosen].astype(np.float32),
        "probe": ds["probeGuess"].values.astype(np.complex64),
        "f": f,
        "count_scale": float(np.sqrt(DOSE) / (N / 2)),
    }


def _rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - b) ** 2) / np.mean(np.asarray(b) ** 2)))


def _loss(g, obj) -> float:
    from ptychozarr.models.reference import far_field, poisson_nll

    pred = g["f"] * far_field(tf.constant(obj.astype(np.complex64)), g["probe"], g["offsets"])
    return float(poisson_nll(pred, tf.constant(g["x"]), g["count_scale"]))


def test_far_field_of_the_true_patches_gives_the_stored_patterns(groups):
    """Members' own patches: the simulator's noise-free patterns to float precision; the stored, normalised
    data within Poisson noise at gain ``f``; the group patch moved to each member within interpolation."""
    from ptychozarr.models.reference import far_field

    g = groups
    members = g["members"].reshape(-1, N, N)
    direct = far_field(tf.constant(members), tf.constant(g["probe"])).numpy()[..., 0]
    simulator = np.abs(np.fft.fftshift(np.fft.fft2(g["probe"] * members), axes=(1, 2))) / N
    np.testing.assert_allclose(direct, simulator, rtol=1e-4, atol=1e-6 * simulator.max())
    clean = g["f"] * np.moveaxis(simulator.reshape(g["members"].shape), 1, -1)
    counts_noise = 0.5 / np.sqrt(DOSE / N**2)  # amplitude noise over the mean amplitude, per pixel
    assert _rel_rms(g["x"], clean) < 2 * counts_noise
    assert np.sum(g["x"] * clean) / np.sum(clean**2) == pytest.approx(1, abs=2e-3)
    moved = g["f"] * far_field(tf.constant(g["group"]), tf.constant(g["probe"]), tf.constant(g["offsets"]))
    assert _rel_rms(moved.numpy(), clean) < 0.05  # a bilinear shift of a bilinearly sampled patch


def test_counts_of_the_loss_are_the_simulators_photons(groups):
    """The loss's counts ``(count_scale · x)²`` are the simulator's ``(s · stored)²``, with ``s`` its
    photons per unit amplitude ``sqrt(DOSE / mean Σ|P·O|²)`` over the scan: one scale maps both."""
    assert groups["count_scale"] * groups["f"] == pytest.approx(groups["photons_per_amplitude"], rel=0.01)


def _variants(z: np.ndarray) -> dict:
    from scipy import ndimage

    amp, phase = np.abs(z), np.angle(z)
    blurred = ndimage.gaussian_filter(z.real, (0, 0.7, 0.7)) + 1j * ndimage.gaussian_filter(
        z.imag, (0, 0.7, 0.7)
    )
    reflected = np.roll(z[:, ::-1, ::-1], 1, axis=(1, 2))  # about the centre pixel N/2
    return {
        "shifted x": np.roll(z, 1, axis=2),
        "shifted y": np.roll(z, 1, axis=1),
        "blurred": blurred,
        "phase × 0.8": amp * np.exp(0.8j * phase),
        "phase × 1.2": amp * np.exp(1.2j * phase),
        "conjugated": np.conj(z),
        "point-reflected": reflected,
        "twin": np.conj(reflected),
    }


def test_the_true_object_minimises_the_loss(groups):
    truth = _loss(groups, groups["group"])
    excess = {name: _loss(groups, z) - truth for name, z in _variants(groups["group"]).items()}
    assert min(excess.values()) > 0, excess


def _numpy_loss(g, amp, phase) -> float:
    """The loss in float64, numpy and scipy only: bilinear zero-filled shift, probe, FFT, Poisson."""
    from scipy import ndimage

    obj, total = amp * np.exp(1j * phase), 0.0
    for b in range(len(obj)):
        for c, (tx, ty) in enumerate(g["offsets"][b].astype(np.float64)):
            moved = [
                ndimage.shift(p, (ty, tx), order=1, mode="grid-constant") for p in (obj[b].real, obj[b].imag)
            ]
            pred = g["f"] * np.abs(np.fft.fft2(g["probe"] * (moved[0] + 1j * moved[1]))) / N
            rate, counts = (
                (g["count_scale"] * pred) ** 2,
                (g["count_scale"] * np.fft.ifftshift(g["x"][b, ..., c])) ** 2,
            )
            total += np.sum(rate - counts * np.log(rate + 1e-8))
    return total / g["x"].size


def test_gradient_in_the_phase_matches_finite_differences(groups):
    from ptychozarr.models.reference import far_field, poisson_nll

    g = {key: value[:3] if key in ("x", "group", "offsets") else value for key, value in groups.items()}
    amp, phase = np.abs(g["group"]).astype(np.float64), 0.5 * np.angle(g["group"]).astype(np.float64)
    variable = tf.Variable(phase.astype(np.float32))
    with tf.GradientTape() as tape:
        a = tf.constant(amp, tf.float32)
        obj = tf.complex(a * tf.cos(variable), a * tf.sin(variable))
        loss = poisson_nll(g["f"] * far_field(obj, g["probe"], g["offsets"]), g["x"], g["count_scale"])
    grad = tape.gradient(loss, variable).numpy().astype(np.float64)
    assert _numpy_loss(g, amp, phase) == pytest.approx(float(loss), rel=1e-5)
    eps = 1e-6  # the log-likelihood is strongly curved where a rate nears zero: small steps only
    for v in np.random.default_rng(0).standard_normal((3, *phase.shape)):
        fd = (_numpy_loss(g, amp, phase + eps * v) - _numpy_loss(g, amp, phase - eps * v)) / (2 * eps)
        assert np.sum(grad * v) == pytest.approx(fd, rel=5e-3)


def _network_backprop(g):
    """The PINN's back-propagation layer applied to the groups' normalised patterns, as complex."""
    from ptychozarr import _tf
    from ptychozarr.models.reference import build_pinn

    keras = _tf.keras()
    network = build_pinn(N, 2, filters=4, depth=2, probe=g["probe"])
    out = keras.Model(network.inputs[0], network.get_layer("backprop").output)(g["x"]).numpy()
    return np.moveaxis(out[..., :4] + 1j * out[..., 4:], -1, 1)


def test_back_propagation_layer_is_the_inverse_fft_of_the_phased_patterns(groups):
    """numpy's 2-D inverse FFT of the amplitudes given the probe lines' far-field phases, times the
    conjugate phases of the probe's lines, equals the network's fixed Dense layers."""
    probe, x = groups["probe"], np.moveaxis(groups["x"], -1, 1)
    row, col = probe[N // 2, :], probe[:, N // 2]
    far_row, far_col = (np.exp(1j * np.angle(np.fft.fftshift(np.fft.fft(line)))) for line in (row, col))
    field = x * far_col[:, None] * far_row[None, :] * N
    want = np.fft.ifft2(np.fft.ifftshift(field, axes=(-2, -1)))
    want *= np.exp(-1j * np.angle(col))[:, None] * np.exp(-1j * np.angle(row))[None, :]
    np.testing.assert_allclose(_network_backprop(groups), want, atol=2e-5 * np.abs(want).max())


def test_back_propagation_is_a_first_estimate_of_the_object(groups):
    """Within the probe's support the back-propagated patterns already follow the members' patches."""
    estimate, truth = _network_backprop(groups), groups["members"]
    weights = np.abs(groups["probe"]) ** 2
    support = weights > 0.1 * weights.max()
    gauge = np.exp(-1j * np.angle(np.sum(estimate * weights, axis=(2, 3), keepdims=True)))
    true_phase = (
        np.angle(truth) - np.sum(np.angle(truth) * weights, axis=(2, 3), keepdims=True) / weights.sum()
    )
    r_amp = np.corrcoef(np.abs(estimate)[:, :, support].ravel(), np.abs(truth)[:, :, support].ravel())[0, 1]
    r_phase = np.corrcoef(
        np.angle(estimate * gauge)[:, :, support].ravel(), true_phase[:, :, support].ravel()
    )
    # measured 0.63 and 0.55: the twin term, speckle under the diffuser, is what the U-Net removes
    assert r_amp > 0.5 and r_phase[0, 1] > 0.45, (r_amp, r_phase[0, 1])
