"""Alignment and registration (spec §4) on small synthetic objects."""

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from skimage import data

from ptychozarr import align
from ptychozarr.errors import InvalidParameterError, InvalidScanError


@pytest.fixture(scope="module")
def obj():
    amp = data.camera()[::2, ::2][:200, :220] / 255.0 + 0.1
    phase = data.astronaut()[::2, ::2, 0][:200, :220] / 255.0
    return amp * np.exp(1j * phase)


def test_gt_crop_box_truncates_and_clips():
    positions = np.array([[30.9, 40.7], [150.2, 120.99], [-3.5, 60.0]])  # (x, y)
    rows, cols = align.gt_crop_box(positions, 20, (130, 500))
    # rows: int(40.7) - 10 = 30, min(130, int(120.99) + 10 = 130); cols: max(0, int(-3.5) - 10), 160
    assert (rows.start, rows.stop, cols.start, cols.stop) == (30, 130, 0, 160)


def test_align_by_coordinates_crops_gt_then_centre_crops_both(obj):
    positions = np.array([[50.0, 40.0], [150.0, 140.0]])
    recon = np.arange(96 * 130).reshape(96, 130)
    r, g = align.align_by_coordinates(recon, obj, positions, 20)
    # GT box rows 30:150 (120), cols 40:160 (120) -> common (96, 120)
    assert r.shape == g.shape == (96, 120)
    np.testing.assert_array_equal(r, recon[:, 5:125])
    np.testing.assert_array_equal(g, obj[30 + 12 : 30 + 108, 40:160])


def test_align_by_placement_matches_object_pixels(obj):
    canvas = obj[23:163, 31:201]  # canvas pixel (0, 0) is object (23, 31)
    r, g = align.align_by_placement(canvas, obj, (23.2, 30.8))
    np.testing.assert_array_equal(r, g)
    assert r.shape == canvas.shape
    with pytest.raises(InvalidParameterError, match="overlap"):
        align.align_by_placement(canvas, obj, (500, 0))


def test_align_by_placement_limits_to_scan_box(obj):
    canvas = obj[23:163, 31:201]
    positions = np.array([[60.0, 50.0], [170.0, 150.0]])
    r, g = align.align_by_placement(canvas, obj, (23, 31), positions, 20)
    assert g.shape == (120, 130)  # scan box rows 40:160, cols 50:180, inside the canvas
    np.testing.assert_array_equal(r, obj[40:160, 50:180])
    r_dask, _ = align.align_by_placement(da.from_array(canvas, chunks=50), obj, (23, 31), positions, 20)
    np.testing.assert_array_equal(r_dask.compute(), g)


def test_fixed_canvas_pads_or_crops_to_the_full_box(obj):
    positions = np.array([[50.0, 40.0], [150.0, 140.0]])
    small = np.ones((100, 130), np.complex64)
    r, g = align.align_fixed_canvas(small, obj, positions, 20)
    assert r.shape == g.shape == (120, 120)
    # rows padded 10 + 10 with zeros, cols cropped from 5
    assert r[:10].sum() == 0 and r[-10:].sum() == 0 and np.all(r[10:110] == 1)
    r_dask, _ = align.align_fixed_canvas(da.from_array(small, chunks=40), obj, positions, 20)
    np.testing.assert_array_equal(r_dask.compute(), r)


@pytest.mark.parametrize("roll", [(3, -5), (-7, 2)])
def test_registration_detects_minus_the_applied_roll(obj, roll):
    moved = np.roll(obj, roll, axis=(0, 1))
    found = align.find_offset(moved, obj)
    assert found.offset == pytest.approx((-roll[0], -roll[1]), abs=1e-6)
    assert not found.windowed


def test_registration_recovers_subpixel_shift_and_realigns(obj):
    applied = (1.3, -2.7)
    moved = align.fourier_shift(obj, applied)
    image, ref, found = align.register(da.from_array(moved, chunks=(64, 90)), obj)
    assert found.offset == pytest.approx((-1.3, 2.7), abs=0.03)
    assert image.shape == ref.shape == (obj.shape[0] - 4, obj.shape[1] - 4)
    # away from the periodic wrap, the re-shifted image matches the reference
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(image.compute()[inner] - ref[inner]).max() < 0.05 * np.abs(obj).max()


def test_registration_on_a_central_window(obj):
    moved = np.roll(obj, (4, 3), axis=(0, 1))
    found = align.find_offset(moved, obj, max_window=128)
    assert found.windowed and found.window == (slice(36, 164), slice(46, 174))
    assert found.offset == pytest.approx((-4, -3), abs=1e-6)


def test_fourier_shift_through_a_work_directory_equals_numpy(obj, tmp_path, monkeypatch):
    from ptychozarr import registration

    monkeypatch.setattr(registration, "SLAB_BYTES", 16 * 7 * max(obj.shape))  # slabs of 7 rows / columns
    expected = align.fourier_shift(obj, (0.4, -1.6))
    got = align.fourier_shift(da.from_array(obj, chunks=(70, 45)), (0.4, -1.6), workdir=tmp_path)
    np.testing.assert_allclose(got.compute(), expected, atol=1e-12)
    assert len(list(tmp_path.glob("*.zarr"))) == 2  # the transposition and the result


def test_fourier_shift_through_a_work_directory_keeps_its_chunks_within_the_image(obj, tmp_path):
    import zarr

    align.fourier_shift(da.from_array(obj, chunks=(70, 45)), (0.4, -1.6), workdir=tmp_path).compute()
    for path in tmp_path.glob("*.zarr"):  # a small image's slab is the whole image, not a larger chunk
        stored = zarr.open_array(path, mode="r")
        assert all(c <= n for c, n in zip(stored.chunks, obj.shape, strict=True)), stored.chunks


def test_fourier_shift_dask_equals_numpy(obj):
    expected = align.fourier_shift(obj, (0.4, -1.6))
    got = align.fourier_shift(da.from_array(obj, chunks=(70, 45)), (0.4, -1.6)).compute()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    real = align.fourier_shift(np.abs(obj), (2, 0))
    assert not np.iscomplexobj(real)
    np.testing.assert_allclose(real, np.roll(np.abs(obj), 2, axis=0), atol=1e-12)


def test_registration_modes():
    arms = ["pinn", "baseline", "ptychi"]
    assert align.arms_to_register(arms) == arms
    assert align.arms_to_register(arms, "ptychi-only") == ["ptychi"]
    assert align.arms_to_register(arms, "none") == []
    with pytest.raises(InvalidParameterError, match="mode"):
        align.arms_to_register(arms, "some")


def test_registration_errors(obj):
    with pytest.raises(InvalidParameterError, match="equal shape"):
        align.find_offset(obj[:50], obj)
    with pytest.raises(InvalidParameterError, match="border_crop"):
        align.shift_and_crop(obj[:4, :4], obj[:4, :4], (0, 0), border_crop=2)


def _blurred_shifted(obj, sigma, shift, noise, seed, ramp=0.02):
    """``obj`` blurred (complex Gaussian σ), shifted by ``shift`` (content moves by it), noisy, with a
    constant phase and a phase ramp; inner 150×170 region, with the truth over the same region."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter(obj.real, sigma) + 1j * ndimage.gaussian_filter(obj.imag, sigma)
    moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(blurred), shift))
    rows, cols = np.indices(obj.shape)
    moved = moved * np.exp(1j * (0.7 + ramp * cols - ramp / 2 * rows))
    box = (slice(25, 175), slice(25, 195))
    image = moved[box] + noise * (rng.standard_normal((150, 170)) + 1j * rng.standard_normal((150, 170)))
    return image, obj[box]


@pytest.mark.parametrize("sigma", [1.5, 4.0, 6.0])
@pytest.mark.parametrize("shift", [(2.3, -1.4), (-0.65, 3.35)])
def test_registration_recovers_blurred_noisy_subpixel_shifts(obj, sigma, shift):
    image, truth = _blurred_shifted(obj, sigma, shift, noise=0.05, seed=int(10 * sigma))
    found = align.find_offset(image, truth)
    error = np.hypot(found.offset[0] + shift[0], found.offset[1] + shift[1])
    assert error <= 0.25, (found, error)
    assert found.accepted and found.confidence >= align.MIN_CONFIDENCE and found.reason == ""
    assert found.blur == pytest.approx(sigma, abs=1.0)


@pytest.mark.parametrize("component", ["channels", "amplitude"])
def test_registration_ignores_amplitude_offsets_damped_phase_and_ramps(obj, component):
    """A learned reconstruction's amplitude may be scaled and offset and its phase damped."""
    image, truth = _blurred_shifted(obj, 4.0, (1.7, -0.8), noise=0.05, seed=1, ramp=0.0)
    rows, cols = np.indices(image.shape)  # the phase is damped before a ramp is added
    distorted = (0.3 + 0.5 * np.abs(image)) * np.exp(1j * (0.6 * np.angle(image) - 0.03 * rows))
    found = align.find_offset(distorted, truth, component=component)
    assert np.hypot(found.offset[0] + 1.7, found.offset[1] - 0.8) <= 0.25, found
    assert found.accepted


def test_registration_of_a_pure_phase_object(obj):
    phase_only = np.exp(1j * np.angle(obj))
    image, truth = _blurred_shifted(phase_only, 4.0, (-1.35, 2.6), noise=0.05, seed=2)
    found = align.find_offset(image, truth)
    assert np.hypot(found.offset[0] - 1.35, found.offset[1] + 2.6) <= 0.25, found
    assert found.accepted


def test_registration_rejects_a_flat_image_and_pure_noise(obj):
    truth = obj[25:175, 25:195]
    flat = np.full(truth.shape, 0.8 * np.exp(0.3j))
    found = align.find_offset(flat, truth)
    assert not found.accepted and found.confidence == 0 and "flat" in found.reason
    rng = np.random.default_rng(3)
    for noise in (
        rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape),
        ndimage.gaussian_filter(rng.standard_normal(truth.shape), 4) + 0j,
    ):
        found = align.find_offset(noise, truth)
        assert not found.accepted and found.confidence < align.MIN_CONFIDENCE, found
        assert "ambiguous" in found.reason
    # rejected measurements leave both images as they were
    image, ref, found = align.register(flat, truth)
    assert image is flat and ref is truth and not found.accepted


def test_registration_rejects_a_periodic_pattern():
    rows, cols = np.indices((128, 128))
    pattern = np.exp(1j * np.sin(2 * np.pi * cols / 12) * np.sin(2 * np.pi * rows / 12))
    pattern = pattern * (1.5 + np.sin(2 * np.pi * cols / 12))
    found = align.find_offset(np.roll(pattern, (3, 2), axis=(0, 1)), pattern)
    assert not found.accepted and "ambiguous" in found.reason


def test_max_shift_is_a_second_guard(obj):
    moved = np.roll(obj, (3, -5), axis=(0, 1))
    found = align.find_offset(moved, obj, max_shift=4)
    assert found.offset == pytest.approx((-3, 5), abs=0.05)
    assert not found.accepted and "max_shift" in found.reason
    assert align.find_offset(moved, obj, max_shift=6).accepted


def test_common_shape_scores_every_arm_on_one_box(obj):
    truth = obj[:120, :140]
    shifted = align.shift_and_crop(truth, truth, (1.2, -3.4), border_crop=0)[0]
    pairs = {
        "pinn": (shifted, truth),
        "baseline": (obj[:124, :138], obj[50:174, 60:198]),
        "ptychi": (obj[:120, :140], truth),
    }
    offsets = {"pinn": (1.2, -3.4), "baseline": None, "ptychi": None}
    cropped = align.crop_to_common(pairs, offsets)
    shapes = {image.shape for pair in cropped.values() for image in pair}
    # the smallest aligned shape (120, 138) less 4 px per side (the 3.4 px shift wraps 4 columns)
    assert shapes == {(112, 130)}
    np.testing.assert_array_equal(cropped["baseline"][1], obj[56:168, 64:194])
    np.testing.assert_array_equal(cropped["ptychi"][0], obj[4:116, 5:135])
    assert align.common_shape([(120, 140), (124, 138)], [None, None]) == (120, 138)
    assert align.common_shape([(120, 140)], [(0.3, 0.1)]) == (116, 136)  # compare_models' 2 px
    with pytest.raises(InvalidParameterError, match="one offset per shape"):
        align.common_shape([(120, 140)], [])


def test_iterative_arm_in_the_whole_object_frame_scores_like_the_scan_frame(obj):
    positions = np.array([[30.0, 30.0], [120.0, 110.0], [70.0, 60.0]])  # (x, y)
    rows, cols = align.gt_crop_box(positions, 20, obj.shape)  # rows 20:120, cols 20:130, off-centre
    rng = np.random.default_rng(0)
    whole = obj * np.exp(0.4j) + 0.02 * rng.standard_normal(obj.shape)  # a reconstruction of the object
    scan = whole[rows, cols]
    r_obj, g_obj, frame_obj = align.align_iterative(whole, obj, positions, 20)
    r_scan, g_scan, frame_scan = align.align_iterative(scan, obj, positions, 20)
    assert (frame_obj, frame_scan) == ("object", "scan")
    np.testing.assert_array_equal(r_obj, r_scan)
    np.testing.assert_array_equal(g_obj, g_scan)
    np.testing.assert_array_equal(g_obj, obj[rows, cols])
    # centre-cropping the whole-object reconstruction, as for the scan frame, misplaces it
    misplaced, _ = align.align_by_coordinates(whole, obj, positions, 20)

    def amplitude_error(image):
        return np.abs(np.abs(image) - np.abs(g_obj)).mean()

    assert amplitude_error(misplaced) > 5 * amplitude_error(r_obj)
    # a solver's object padded by 3 px per side is still the whole-object frame
    padded = np.pad(whole, 3)
    r_pad, _, frame = align.align_iterative(padded, obj, positions, 20)
    assert frame == "object"
    np.testing.assert_array_equal(r_pad, r_obj)
    with pytest.raises(InvalidScanError, match="neither accepted frame"):
        align.align_iterative(whole[:150, :90], obj, positions, 20)


def test_registration_refuses_when_amplitude_and_phase_disagree(obj):
    """A phase unrelated to the truth's pulls the joint peak away from the amplitude's own."""
    image, truth = _blurred_shifted(obj, 4.0, (1.7, -0.8), noise=0.05, seed=0, ramp=0.0)
    phase = ndimage.gaussian_filter(np.random.default_rng(100).standard_normal(image.shape), 2)
    unrelated = np.abs(image) * np.exp(1j * 0.5 * phase / phase.std())
    found = align.find_offset(unrelated, truth)
    assert not found.accepted and "amplitude and phase disagree" in found.reason, found
    assert found.channel_confidence["amplitude"] >= align.MIN_CONFIDENCE
    assert found.channel_confidence["phase"] < align.MIN_CONFIDENCE
    assert "amplitude 0.7" in found.reason  # each channel's own measurement is named
    # the amplitude alone, asked for, registers it
    amplitude = align.find_offset(unrelated, truth, component="amplitude")
    assert amplitude.accepted and np.hypot(amplitude.offset[0] + 1.7, amplitude.offset[1] - 0.8) <= 0.25


def test_registration_names_what_it_measured_on_and_takes_its_threshold(obj):
    image, truth = _blurred_shifted(obj, 4.0, (2.3, -1.4), noise=0.05, seed=40)
    found = align.find_offset(image, truth)
    assert found.accepted and found.component == "channels"
    assert set(found.channel_confidence) == {"amplitude", "phase"}
    strict = align.find_offset(image, truth, min_confidence=0.95)
    assert not strict.accepted and "< 0.95" in strict.reason
    assert strict.offset == found.offset and strict.confidence == found.confidence
    assert align.find_offset(np.abs(image), np.abs(truth)).component == "real"
    assert align.find_offset(image, truth, component="amplitude").component == "amplitude"


def test_the_threshold_is_a_score_option_passed_to_the_measurement(obj, capsys):
    from ptychozarr.cli import main
    from ptychozarr.config import ScoreOptions
    from ptychozarr.stages import score

    assert ScoreOptions().min_registration_confidence == align.MIN_CONFIDENCE
    image, truth = _blurred_shifted(obj, 4.0, (2.3, -1.4), noise=0.05, seed=40)
    params = {"max_registration_shift": 10.0, "min_registration_confidence": 0.6}
    assert score._register(image, truth, params)["accepted"]
    refused = score._register(image, truth, params | {"min_registration_confidence": 0.95})
    assert not refused["accepted"] and refused["offset"] is None and "< 0.95" in refused["reason"]
    assert refused["component"] == "channels" and set(refused["channel_confidence"]) == {"amplitude", "phase"}
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--min-registration-confidence" in capsys.readouterr().out
