"""Alignment and registration (spec §4) on small synthetic objects."""

import dask.array as da
import numpy as np
import pytest
from skimage import data

from ptychozarr import align
from ptychozarr.errors import InvalidParameterError


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
