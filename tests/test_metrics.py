"""Out-of-core metrics against scikit-image / numpy computed in memory (spec §5 written plainly)."""

import multiprocessing
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.metrics import structural_similarity

from ptychozarr.errors import InvalidParameterError
from ptychozarr.metrics import (
    Metric,
    evaluate,
    fourier,
    frc,
    frc_crossing,
    frc_cutoff,
    frc_length,
    frc_rings,
    gaussian_prefilter,
    mae,
    ms_ssim,
    mse,
    phase_plane,
    psnr,
    register,
    registry,
    remove_phase_plane,
    ssim,
    structural,
    task_memory,
)

RTOL = 1e-6
# chunk shapes that do not divide the images, and ones smaller than the 3-px SSIM halo / 7-px window
CHUNKS = [(64, 50), (70, 2), (5, 90)]


# ---------------------------------------------------------------- in-memory references (spec §5)

def ref_psnr(a, b):
    return 20 * np.log10(255.0 / (np.sqrt(np.mean((a - b) ** 2)) + np.finfo(np.float64).eps))


def ref_plane_removed(phase):
    rows, cols = np.meshgrid(np.arange(phase.shape[0]), np.arange(phase.shape[1]), indexing="ij")
    design = np.column_stack([cols.ravel(), rows.ravel(), np.ones(phase.size)])
    coef = np.linalg.lstsq(design, phase.ravel(), rcond=None)[0]
    return phase - (coef[0] * cols + coef[1] * rows + coef[2]), coef


def ref_ms_ssim(a, b, sigma):
    if sigma > 0:
        a, b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    data_range = max(a.max() - a.min(), b.max() - b.min())
    value = 1.0
    for level in range(5):
        s = structural_similarity(a, b, data_range=data_range)
        if np.isnan(s):
            return 0.0
        value *= (s if s >= 0 else 1e-4) ** weights[level]
        if level < 4:
            a, b = a[::2, ::2], b[::2, ::2]
            if min(a.shape) < 7:
                break
    return value


def ref_frc(a, b):
    n = min(a.shape)
    r0, c0 = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    a, b = a[r0 : r0 + n, c0 : c0 + n], b[r0 : r0 + n, c0 : c0 + n]
    f1, f2 = np.fft.fftshift(np.fft.fft2(a)), np.fft.fftshift(np.fft.fft2(b))
    rr, cc = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    ring = np.round(np.sqrt(rr**2 + cc**2)).astype(int)

    def ring_mean(z):
        return np.array([z[ring == k].mean() for k in range(ring.max() + 1)])

    c12, c11, c22 = ring_mean(f1 * f2.conj()), ring_mean(np.abs(f1) ** 2), ring_mean(np.abs(f2) ** 2)
    return np.abs(c12) / np.sqrt(np.abs(c11 * c22))


def ref_cutoff(curve, threshold):
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
        return float(len(curve))
    i = below[0]
    return 0.0 if i == 0 else (i - 1) + (threshold - curve[i - 1]) / (curve[i] - curve[i - 1])


def ref_frc_windowed(a, b):
    """Hann-windowed FRC to Nyquist and ring pixel counts: np.fft.fft2 of the windowed images, ring sums
    with np.bincount (integer frequencies, no fftshift needed)."""
    n = min(a.shape)
    r0, c0 = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    a, b = a[r0 : r0 + n, c0 : c0 + n], b[r0 : r0 + n, c0 : c0 + n]
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic Hann
    window = w[:, None] * w[None, :]
    f1, f2 = np.fft.fft2(a * window), np.fft.fft2(b * window)
    k = np.fft.fftfreq(n, 1.0 / n)
    ring = np.rint(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).astype(int)
    keep = ring <= n // 2

    def ring_sum(z):
        return np.bincount(ring[keep], weights=z[keep], minlength=n // 2 + 1)

    c12 = ring_sum((f1 * f2.conj()).real)
    curve = np.abs(c12) / np.sqrt(ring_sum(np.abs(f1) ** 2) * ring_sum(np.abs(f2) ** 2))
    return curve, np.bincount(ring[keep])


def ref_crossing(curve, threshold):
    """The first fall below the threshold after the curve was at or above it, from the curve's peak
    on (ring 0 ignored), interpolated from the ring before; 0.0 if never at or above, NaN if it never
    falls."""
    threshold = np.broadcast_to(threshold, np.shape(curve))
    risen = False
    start = 1 + max(range(len(curve) - 1), key=lambda k: curve[k + 1])
    for i in range(start, len(curve)):
        if curve[i] >= threshold[i]:
            risen = True
        elif risen:
            d0, d1 = curve[i - 1] - threshold[i - 1], curve[i] - threshold[i]
            return (i - 1) + d0 / (d0 - d1)
    return np.nan if risen else 0.0


def ref_half_bit(counts):
    return (0.2071 + 1.9102 / np.sqrt(counts)) / (1.2071 + 0.9102 / np.sqrt(counts))


def ref_one_bit(counts):
    return (0.5 + 2.4142 / np.sqrt(counts)) / (1.5 + 1.4142 / np.sqrt(counts))


def ref_windowed_crossings(pairs):
    rings = [ref_frc_windowed(*pair) for pair in pairs]
    thresholds = {"frc50_hann": lambda c: 0.5, "frc1over7_hann": lambda c: 1 / 7,
                  "frc_halfbit_hann": ref_half_bit, "frc_onebit_hann": ref_one_bit}
    out = {name: tuple(ref_crossing(curve, th(counts)) for curve, counts in rings)
           for name, th in thresholds.items()}
    return out | {"frc_hann": tuple(curve for curve, _ in rings)}


def ref_evaluate(recon, gt, ms_ssim_sigma=1.0):
    t = np.abs(gt)[2:-2, 2:-2]
    p = np.abs(recon)[2:-2, 2:-2]
    p = p * t.mean() / p.mean()
    phi_t = ref_plane_removed(np.angle(gt)[2:-2, 2:-2])[0]
    phi_p = ref_plane_removed(np.angle(recon)[2:-2, 2:-2])[0]
    s_t, s_p = (phi_t + np.pi) / (2 * np.pi), (phi_p + np.pi) / (2 * np.pi)
    curves = ref_frc(t, p), ref_frc(phi_t, phi_p)
    return {
        "mae": (np.mean(np.abs(t - p)), np.mean(np.abs(phi_t - phi_p))),
        "mse": (np.mean((t - p) ** 2), np.mean((phi_t - phi_p) ** 2)),
        "psnr": (ref_psnr(t, p), ref_psnr(phi_t, phi_p)),
        "ssim": (structural_similarity(t, p, data_range=t.max() - t.min()),
                 structural_similarity(s_t, s_p, data_range=1.0)),
        "ms_ssim": (ref_ms_ssim(t, p, ms_ssim_sigma), ref_ms_ssim(s_t, s_p, 0.0)),
        "frc50": tuple(ref_cutoff(c, 0.5) for c in curves),
        "frc1over7": tuple(ref_cutoff(c, 1 / 7) for c in curves),
        "frc": curves,
    } | ref_windowed_crossings(((t, p), (phi_t, phi_p)))


# ---------------------------------------------------------------- images

def _pairs():
    rng = np.random.default_rng(1)
    camera = data.camera()[:201, :187].astype(np.float64)
    structured = (camera, camera + rng.normal(0, 25, camera.shape))
    noise = rng.random((97, 130))
    return {"camera": structured, "random": (noise, 0.5 * noise + rng.random(noise.shape))}


PAIRS = _pairs()


def _complex_pair(shape=(150, 170)):
    rng = np.random.default_rng(2)
    amp = data.camera()[: shape[0], : shape[1]] / 255.0 + 0.2
    phase = data.astronaut()[: shape[0], : shape[1], 1] / 255.0 * 2 - 1
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    gt = amp * np.exp(1j * phase)
    recon_amp = 1.4 * amp + rng.normal(0, 0.05, shape)
    recon_phase = phase + 0.01 * cols - 0.02 * rows + 0.4 + rng.normal(0, 0.2, shape)
    return recon_amp * np.exp(1j * recon_phase), gt


def _dask(x, chunks):
    return da.from_array(x, chunks=chunks)


# ---------------------------------------------------------------- each metric

@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_pointwise_metrics_equal_numpy(name, chunks):
    a, b = PAIRS[name]
    da_, db = _dask(a, chunks), _dask(b, chunks)
    computed = dask.compute(mae(da_, db), mse(da_, db), psnr(da_, db))
    expected = (np.mean(np.abs(a - b)), np.mean((a - b) ** 2), ref_psnr(a, b))
    np.testing.assert_allclose(computed, expected, rtol=RTOL)


def test_psnr_of_identical_images_is_opencv_ceiling():
    a = PAIRS["random"][0]
    assert psnr(a, a) == pytest.approx(20 * np.log10(255 / np.finfo(np.float64).eps))


@pytest.mark.parametrize("chunks", CHUNKS)
def test_phase_plane_equals_lstsq(chunks):
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[:123, :77]
    phase = np.angle(np.exp(1j * (0.03 * cols - 0.05 * rows + 1.0 + rng.normal(0, 0.3, rows.shape))))
    expected, coef = ref_plane_removed(phase)
    np.testing.assert_allclose(phase_plane(_dask(phase, chunks)).compute(), coef, rtol=RTOL)
    np.testing.assert_allclose(remove_phase_plane(_dask(phase, chunks)).compute(), expected,
                               rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_ssim_equals_skimage(name, chunks):
    a, b = PAIRS[name]
    expected = structural_similarity(a, b, data_range=a.max() - a.min())
    assert ssim(_dask(a, chunks), _dask(b, chunks)).compute() == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_gaussian_prefilter_equals_scipy(chunks):
    a = PAIRS["camera"][0]
    np.testing.assert_allclose(gaussian_prefilter(_dask(a, chunks), 1.5).compute(),
                               gaussian_filter(a, 1.5), rtol=RTOL)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_ms_ssim_equals_in_memory(name, chunks, sigma):
    a, b = PAIRS[name]
    got = ms_ssim(_dask(a, chunks), _dask(b, chunks), sigma=sigma).compute()
    assert got == pytest.approx(ref_ms_ssim(a, b, sigma), rel=RTOL)


def test_ms_ssim_clamps_negative_levels():
    rng = np.random.default_rng(4)
    a = rng.random((64, 64))
    assert ms_ssim(a, 1 - a) == pytest.approx(ref_ms_ssim(a, 1 - a, 0.0), rel=RTOL)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_frc_equals_numpy(name, chunks, tmp_path):
    a, b = PAIRS[name]
    expected = ref_frc(a, b)
    in_memory = frc(_dask(a, chunks), _dask(b, chunks), slab_bytes=2**15).compute()
    spilled = frc(_dask(a, chunks), _dask(b, chunks), workdir=tmp_path, slab_bytes=2**15).compute()
    np.testing.assert_allclose(in_memory, expected, rtol=RTOL)
    np.testing.assert_allclose(spilled, expected, rtol=RTOL)


def test_frc_smoothing_filters_the_curve():
    a, b = PAIRS["random"]
    np.testing.assert_allclose(frc(a, b, sigma=2.0), gaussian_filter(ref_frc(a, b), 2.0), rtol=RTOL)


@pytest.mark.parametrize(("n", "length"), [(64, 46), (182, 130), (353, 250)])
def test_frc_curve_reaches_the_corners(n, length):
    assert frc_length(n) == length
    rng = np.random.default_rng(n)
    assert len(frc(rng.random((n, n)), rng.random((n, n)))) == length


@pytest.mark.parametrize(
    ("curve", "threshold", "expected"),
    [
        ([0.95, 0.72, 0.55, 0.45, 0.20], 0.5, 2.5),
        ([0.95, 0.72, 0.66, 0.51], 0.5, 4.0),
        ([0.8, 0.4, 0.2, 0.1], 0.5, 0.75),
        ([0.8, 0.4, 0.2, 0.1], 1 / 7, 2.5714285714285716),
        ([0.3, 0.2], 0.5, 0.0),
    ],
)
def test_frc_cutoff_golden_values(curve, threshold, expected):
    assert frc_cutoff(np.array(curve), threshold) == pytest.approx(expected, rel=1e-12)
    assert frc_cutoff(da.from_array(np.array(curve), chunks=2), threshold).compute() == pytest.approx(
        expected, rel=1e-12)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_windowed_frc_to_nyquist_equals_numpy(name, chunks, tmp_path):
    a, b = PAIRS[name]
    curve, counts = ref_frc_windowed(a, b)
    assert curve.size == min(a.shape) // 2 + 1
    for workdir in (None, tmp_path):
        got = frc_rings(_dask(a, chunks), _dask(b, chunks), window="hann", nyquist=True, workdir=workdir,
                        slab_bytes=2**15).compute()
        np.testing.assert_allclose(got[0], curve, rtol=RTOL)
        np.testing.assert_array_equal(got[1], counts)


def test_plain_frc_to_nyquist_is_the_corner_curve_cut_at_nyquist():
    a, b = PAIRS["camera"]
    n = min(a.shape)
    np.testing.assert_allclose(frc(a, b, nyquist=True), ref_frc(a, b)[: n // 2 + 1], rtol=RTOL)


def test_unknown_window_raises():
    a, b = PAIRS["random"]
    with pytest.raises(InvalidParameterError, match="window"):
        frc(a, b, window="tukey")


@pytest.mark.parametrize(
    ("curve", "threshold", "expected"),
    [
        ([0.1, 0.9, 0.7, 0.3], 0.5, 2.5),  # ring 0 (the means) is ignored: no crossing before ring 1
        ([1.0, 0.9, 0.8, 0.7], 0.5, np.nan),  # never crosses: NaN (an empty cell), not the length
        ([1.0, 0.4, 0.3], 0.5, 0.0),  # never at or above past ring 0: nothing resolved, not 0.0 + ε
        ([1.0, 0.2, 0.6, 0.9, 0.3], 0.5, 3 + 2 / 3),  # low rings below, then a rise: the fall after it
        ([1.0, 0.8, 0.2, 0.1], 1 / 7, 2.5714285714285716),
        ([1.0, 0.8, 0.6], [1.0, 0.5, 0.7], 1.75),  # a per-ring threshold
        ([1.0, 0.18, 0.08, 0.56, 0.9, 0.1], 1 / 7, 4 + (0.9 - 1 / 7) / 0.8),  # a dip before the peak
    ],
)
def test_frc_crossing_golden_values(curve, threshold, expected):
    rings = np.array([curve, np.ones(len(curve))])
    got = frc_crossing(rings, threshold)
    assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)
    assert got == pytest.approx(ref_crossing(np.array(curve), threshold), rel=1e-12, nan_ok=True)
    lazy = frc_crossing(da.from_array(rings, chunks=1), threshold).compute()
    assert lazy == pytest.approx(expected, rel=1e-12, nan_ok=True)


def test_named_thresholds_follow_the_ring_pixel_counts():
    counts = np.array([1.0, 8, 16, 24, 1e4])
    curve = np.array([1.0, 0.95, 0.9, 0.5, 0.1])
    rings = np.array([curve, counts])
    for name, reference in (("halfbit", ref_half_bit), ("onebit", ref_one_bit)):
        assert frc_crossing(rings, name) == pytest.approx(ref_crossing(curve, reference(counts)))
    assert ref_half_bit(1.0) == pytest.approx(1.0, abs=1e-4)
    assert ref_one_bit(1.0) == pytest.approx(1.0, abs=1e-4)


def _blurred_pair(n=128, sigma=3.0):
    """A non-periodic textured object with a ramp and its Gaussian blur (σ = 3 px) plus a little noise:
    the blur's transfer is below 2 % past ring 20 of 128, so nothing there is resolved."""
    rng = np.random.default_rng(4)
    rows, cols = np.mgrid[:n, :n]
    truth = 1 + 0.004 * rows - 0.003 * cols + 0.3 * gaussian_filter(rng.standard_normal((n, n)), 1.0)
    recon = gaussian_filter(truth, sigma) + 0.01 * rng.standard_normal((n, n))
    return truth, recon


def test_apodised_frc_falls_past_the_true_resolution_where_the_plain_one_stays_high():
    truth, recon = _blurred_pair()
    n = truth.shape[0]
    plain, windowed = frc(truth, recon), frc(truth, recon, window="hann", nyquist=True)
    past = slice(30, n // 2 + 1)
    assert plain[past].mean() > 0.5  # the box edges correlate with themselves at every ring
    assert windowed[past].max() < 0.2 and windowed[past].mean() < 0.1
    assert windowed.size == n // 2 + 1
    # through evaluate: the windowed crossings fall where the blur cuts off, the plain 1/7 never does
    scored = evaluate(recon * np.exp(0.3j * truth), truth * np.exp(0.3j * truth))
    assert 12 < scored["frc50_hann"][0] < scored["frc1over7_hann"][0] < 30
    assert 12 < scored["frc_halfbit_hann"][0] < 30 and 12 < scored["frc_onebit_hann"][0] < 30
    assert len(scored["frc_hann"][0]) == (n - 4) // 2 + 1


# ---------------------------------------------------------------- the registry

@pytest.fixture
def toy_metric():
    """A metric registered for one test: the mean of recon − truth, amplitude and phase."""
    entry = Metric(
        "mean_bias", "mean bias", "lower",
        lambda scored: scored.resolve(*((p - t).mean() for t, p in (scored.amplitude, scored.phase))),
        memory=lambda shape, chunk: {"mean_bias": 1},
    )
    register(entry)
    yield entry
    registry.unregister("mean_bias")


def test_a_registered_metric_is_evaluated_and_projected(toy_metric):
    recon, gt = _complex_pair((60, 70))
    got = evaluate(recon, gt)
    t = np.abs(gt)[2:-2, 2:-2]
    p = np.abs(recon)[2:-2, 2:-2]
    assert got["mean_bias"][0] == pytest.approx(np.mean(p * t.mean() / p.mean() - t), abs=1e-12)
    assert list(got)[-2:] == ["mean_bias", "frc_hann"]
    assert task_memory((64, 64))["mean_bias"] == 1
    with pytest.raises(ValueError, match="registered already"):
        register(toy_metric)
    with pytest.raises(ValueError, match="compare_models"):
        registry.unregister("ssim")


def test_a_registered_metric_reaches_the_csv_the_tables_and_the_deltas(toy_metric, tmp_path):
    import pandas as pd

    from ptychozarr.report import ArmResult, StudyRun, deltas, format_table, write_metrics_csv

    arms = [ArmResult("pinn", "PtychoPINN", {"mean_bias": (0.1, 0.2)}),
            ArmResult("baseline", "Baseline", {"mean_bias": (0.3, 0.1)})]
    frame = pd.read_csv(write_metrics_csv(tmp_path / "m.csv", arms))
    rows = frame[frame["metric"] == "mean_bias"]
    assert list(rows["model"]) == ["PtychoPINN", "Baseline"] and list(rows["amplitude"]) == [0.1, 0.3]
    assert list(frame["metric"])[:7] == list(registry.COMPARE_MODELS)  # compare_models' rows first
    assert frame.index[frame["metric"] == "mean_bias"].min() > frame.index[
        frame["metric"] == "computation_time_s"].max()
    line = next(x for x in format_table(arms).splitlines() if x.startswith("mean bias"))
    assert line.split()[-6:] == ["0.1", "/", "0.2", "0.3", "/", "0.1"]
    table = deltas([StudyRun(1, "dense", "test", 0, arms)])
    bias = table[table["metric"] == "mean_bias"].set_index("part")
    assert bias.loc["amplitude", "vs_baseline"] == "better" and bias.loc["phase", "vs_baseline"] == "worse"
    assert set(bias["better"]) == {"lower"}


# ---------------------------------------------------------------- evaluate

@pytest.mark.parametrize("chunks", [None, (37, 23), (4, 60)])
def test_evaluate_equals_in_memory_reference(chunks):
    recon, gt = _complex_pair()
    expected = ref_evaluate(recon, gt)
    if chunks is not None:
        recon, gt = _dask(recon, chunks), _dask(gt, chunks)
    got = evaluate(recon, gt)
    assert list(got) == ["mae", "mse", "psnr", "ssim", "ms_ssim", "frc50", "frc1over7", "frc",
                         "frc50_hann", "frc1over7_hann", "frc_halfbit_hann", "frc_onebit_hann", "frc_hann"]
    for key in expected:
        if key in ("frc", "frc_hann"):
            for curve, ref in zip(got[key], expected[key], strict=True):
                np.testing.assert_allclose(curve, ref, rtol=RTOL)
        else:
            assert all(isinstance(v, float) for v in got[key])
            np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, err_msg=key)


def test_evaluate_lazy_is_one_graph_with_the_same_values():
    recon, gt = _complex_pair((90, 80))
    eager = evaluate(recon, gt, phase_align="mean")
    lazy = evaluate(_dask(recon, (31, 29)), _dask(gt, (31, 29)), phase_align="mean", lazy=True)
    assert isinstance(lazy["ssim"][0], da.Array)
    (computed,) = dask.compute(lazy)
    for key in eager:
        np.testing.assert_allclose(np.concatenate([np.ravel(v) for v in computed[key]]),
                                   np.concatenate([np.ravel(v) for v in eager[key]]), rtol=RTOL, err_msg=key)
    phi, phi_t = np.angle(recon)[2:-2, 2:-2], np.angle(gt)[2:-2, 2:-2]
    expected_mae = np.mean(np.abs((phi_t - phi_t.mean()) - (phi - phi.mean())))
    assert eager["mae"][1] == pytest.approx(expected_mae, rel=RTOL)


@pytest.fixture
def small_work_units(monkeypatch):
    """Force the paths that large images take: SSIM scored a few rows at a time, several FFT row and
    column slabs, ring sums one column at a time."""
    monkeypatch.setattr(structural, "_STRIP_BYTES", 2**13)
    monkeypatch.setattr(fourier, "_SLAB_BYTES", 2**14)
    monkeypatch.setattr(fourier, "_RING_BYTES", 2**6)


@pytest.mark.parametrize("chunks", [(41, 150), (5, 90)])
def test_evaluate_in_small_work_units_equals_in_memory_reference(small_work_units, chunks, tmp_path):
    recon, gt = _complex_pair()
    expected = ref_evaluate(recon, gt)
    got = evaluate(_dask(recon, chunks), _dask(gt, chunks), workdir=tmp_path)
    for key in expected:
        flat = [np.concatenate([np.ravel(v) for v in d[key]]) for d in (got, expected)]
        np.testing.assert_allclose(*flat, rtol=RTOL, err_msg=key)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_ms_ssim_in_strips_with_chunks_narrower_than_the_halo(small_work_units, sigma):
    a, b = PAIRS["random"]  # 5 levels: a halo of 3·16 + 4 px, far wider than chunks of 3 × 40
    got = ms_ssim(_dask(a, (3, 40)), _dask(b, (3, 40)), sigma=sigma).compute()
    assert got == pytest.approx(ref_ms_ssim(a, b, sigma), rel=RTOL)


class _PeakPerPass(Callback):
    """tracemalloc's peak above the start of each ``compute`` (one pass of ``evaluate``)."""

    def __init__(self):
        super().__init__()
        self.peaks = []

    def _start(self, dsk):
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]

    def _finish(self, dsk, state, errored):
        self.peaks.append(tracemalloc.get_traced_memory()[1] - self.base)


def _traced_passes(recon, gt, workdir) -> list[int]:
    """tracemalloc's peak of each pass of ``evaluate`` (after one untraced run: imports are not a pass's)."""
    n = recon.shape[0]
    with dask.config.set(scheduler="sync"):
        evaluate(_dask(recon, n), _dask(gt, n), workdir=workdir)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="sync"), _PeakPerPass() as passes:
            evaluate(_dask(recon, n), _dask(gt, n), workdir=workdir)
    finally:
        tracemalloc.stop()
    return passes.peaks


def test_task_memory_bounds_each_measured_pass(tmp_path):
    # one chunk per image, one thread: each pass of evaluate is one task of each kind
    n = 256
    rng = np.random.default_rng(6)
    gt = (1 + rng.random((n, n))) * np.exp(1j * rng.random((n, n)))
    recon = gt * (1 + 0.1 * rng.random((n, n)))
    projected = task_memory((n, n), chunk=n)
    projected["frc"] = max(projected.pop("frc_rows"), projected.pop("frc_columns"))
    projected["frc_hann"] = max(projected.pop("frc_rows_hann"), projected.pop("frc_columns_hann"))
    context = multiprocessing.get_context("spawn")  # a fresh process: tracemalloc sees every thread
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        peaks = pool.submit(_traced_passes, recon, gt, tmp_path).result()
    kinds = ["stats", "pointwise", "store", "ssim", "ssim", "ms_ssim", "ms_ssim", "frc", "frc", "frc_hann",
             "frc_hann"]
    assert len(peaks) == len(kinds)
    for kind, measured in zip(kinds, peaks, strict=True):
        assert measured <= projected[kind] <= 3 * measured, (kind, measured, projected[kind])


def _windowed_pass_peaks(sides, chunk, workdir) -> dict:
    """tracemalloc's peak of the amplitude MS-SSIM pass over zarr-backed pairs of each side, with the
    blocks overlapped in memory and read from the written images (after one untraced run of each)."""
    import zarr

    from ptychozarr.metrics._blocks import store_images
    from ptychozarr.metrics.multiscale import _ms_ssim_of

    rng = np.random.default_rng(3)
    peaks = {}
    for n in sides:
        images = []
        for name in ("a", "b"):
            z = zarr.create_array(store=f"{workdir}/{name}{n}.zarr", shape=(n, n), chunks=(chunk, chunk),
                                  dtype=np.float32)
            z[:] = rng.random((n, n), dtype=np.float32)
            images.append(da.from_zarr(z).astype(np.float64))
        for how, pair in (("overlap", images), ("stored", store_images(images, workdir, f"s{n}"))):
            with dask.config.set(scheduler="threads", num_workers=2):
                _ms_ssim_of(*pair, 1.0, 1.0).compute()
                tracemalloc.start()
                _ms_ssim_of(*pair, 1.0, 1.0).compute()
                peaks[how, n] = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
    return peaks


@pytest.mark.slow
def test_windowed_passes_read_from_disk_do_not_grow_with_the_image(tmp_path):
    # 9× the pixels (36 → 324 blocks): blocks overlapped in memory wait for a row of their neighbours
    # (measured 4.3×); blocks read with their halos from the written images do not (1.25×: the graph)
    context = multiprocessing.get_context("spawn")  # a fresh process: tracemalloc sees every thread
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        peaks = pool.submit(_windowed_pass_peaks, (768, 2304), 128, tmp_path).result()
    assert peaks["stored", 2304] <= 1.5 * peaks["stored", 768], peaks
    assert peaks["overlap", 2304] >= 2.5 * peaks["overlap", 768], peaks  # the pass this replaces grows


def test_task_memory_does_not_grow_with_the_width():
    narrow, wide = task_memory((8192, 8192), chunk=512), task_memory((8192, 65536), chunk=512)
    assert set(narrow) == {"stats", "pointwise", "store", "ssim", "ms_ssim", "frc_rows", "frc_columns",
                           "frc_rows_hann", "frc_columns_hann"}
    for kind in ("stats", "pointwise", "store", "ssim", "ms_ssim"):
        assert wide[kind] == narrow[kind], kind


# ---------------------------------------------------------------- errors

def test_nan_input_raises():
    recon, gt = _complex_pair((40, 40))
    recon[10, 10] = np.nan
    with pytest.raises(InvalidParameterError, match="NaN"):
        evaluate(recon, gt)
    with pytest.raises(InvalidParameterError, match="NaN"):
        dask.compute(evaluate(_dask(recon, 16), _dask(gt, 16), lazy=True))


def test_mismatched_shapes_raise():
    with pytest.raises(InvalidParameterError, match="shape"):
        evaluate(np.ones((40, 40), np.complex64), np.ones((40, 41), np.complex64))
    with pytest.raises(InvalidParameterError, match="shape"):
        ssim(np.ones((40, 40)), np.ones((41, 40)))


def test_too_small_images_raise():
    small = np.random.default_rng(5).random((6, 30))
    for metric in (ssim, ms_ssim):
        with pytest.raises(InvalidParameterError, match="too small"):
            metric(small, small)
    with pytest.raises(InvalidParameterError, match="too small"):
        evaluate(np.ones((10, 10), np.complex64), np.ones((10, 10), np.complex64))


def test_unknown_phase_align_raises():
    recon, gt = _complex_pair((20, 20))
    with pytest.raises(InvalidParameterError, match="phase_align"):
        evaluate(recon, gt, phase_align="unwrap")
