"""The simulator follows the study's data contract (spec §1.3, §1.5) and the frame of DESIGN.md."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL
from scipy import ndimage

from ptychozarr.errors import InvalidParameterError
from ptychozarr.io import ingest, open_dataset
from ptychozarr.simulate import extract_patches, make_object, make_probe, simulate

KEYS = {
    "diffraction": np.float32,
    "xcoords": np.float64,
    "ycoords": np.float64,
    "xcoords_start": np.float64,
    "ycoords_start": np.float64,
    "scan_index": np.int64,
    "probeGuess": np.complex64,
    "objectGuess": np.complex64,
}


def _plain_patches(obj, x, y, n):
    """Bilinear patches by scipy's map_coordinates: pixel (r, c) sees (y + r − n/2, x + c − n/2)."""
    grid = np.arange(n) - n / 2
    out = []
    for xi, yi in zip(x, y, strict=True):
        where = np.meshgrid(yi + grid, xi + grid, indexing="ij")
        real, imag = (
            ndimage.map_coordinates(p, where, order=1, mode="nearest") for p in (obj.real, obj.imag)
        )
        out.append(real + 1j * imag)
    return np.array(out)


def test_keys_shapes_and_dtypes(small_npz):
    with np.load(small_npz) as z:
        assert set(z.files) == set(KEYS)
        for key, dtype in KEYS.items():
            assert z[key].dtype == dtype, key
        n, size, side = SMALL["n_points"], SMALL["patch_size"], SMALL["object_size"]
        assert z["diffraction"].shape == (n, size, size)
        assert z["probeGuess"].shape == (size, size)
        assert z["objectGuess"].shape == (side, side)
        np.testing.assert_array_equal(z["xcoords_start"], z["xcoords"])
        np.testing.assert_array_equal(z["ycoords_start"], z["ycoords"])
        assert not z["scan_index"].any()
        for key in ("xcoords", "ycoords"):
            assert z[key].min() >= size / 2 and z[key].max() <= side - size / 2


def test_object_and_probe_are_structured():
    obj, probe = make_object(128), make_probe(64)
    assert 0.2 - 1e-6 <= np.abs(obj).min() and np.abs(obj).max() <= 1 + 1e-6
    assert np.abs(np.angle(obj)).max() <= 1.5
    assert np.abs(obj).std() > 0.1 and np.angle(obj).std() > 0.2
    assert np.abs(probe).max() == pytest.approx(1.0)
    energy = np.abs(probe) ** 2
    assert energy[8:56, 8:56].sum() > 0.99 * energy.sum()  # confined within the window
    far = np.abs(np.fft.fftshift(np.fft.fft2(probe))) ** 2
    radius = np.hypot(*(np.indices(probe.shape) - 32))
    assert far[radius > 0.45 * 64].sum() < 0.01 * far.sum()  # its far field fits the detector
    singular = np.linalg.svd(probe, compute_uv=False)
    assert singular[1] < 1e-5 * singular[0]  # separable: the back-propagation stage is exact for it
    # the symmetries the training augmentation relies on: reflections about the centre pixel, transpose
    np.testing.assert_array_equal(probe, probe.T)
    np.testing.assert_array_equal(probe, np.roll(np.flip(probe, 0), 1, 0))
    # a strong defocus (a wave at radius r leaves at r/N cycles per pixel) behind a diffuser: what is left
    # of the phase without the defocus varies by about a radian over the aperture
    lit = energy > 0.5
    residual = np.angle(probe * np.exp(-1j * np.pi * radius**2 / 64))[lit]
    assert 0.5 < residual.std() < 2.5


@pytest.mark.parametrize("size", [128, 256])
def test_object_phase_has_no_drift_beyond_a_probe_width(size):
    """A pattern cannot tell a patch's mean phase: the phase's structure lies below the probe's scale."""
    phase = np.angle(make_object(size))
    blurred = ndimage.gaussian_filter(phase, sigma=size / 16)  # what survives beyond ~a probe width
    assert blurred.std() < 0.2 * phase.std()
    assert phase.std() > 0.4


def test_extract_patches_matches_map_coordinates():
    obj = make_object(96)
    x, y = np.array([16.0, 40.25, 80.0, 55.5]), np.array([16.0, 71.9, 80.0, 33.125])
    patches = extract_patches(obj, x, y, 32)
    np.testing.assert_allclose(patches, _plain_patches(obj, x, y, 32), atol=1e-6)
    np.testing.assert_array_equal(patches[0], obj[0:32, 0:32])  # integer position: a plain slice


def test_diffraction_is_poisson_counts_scaled_as_spec(small_npz):
    """(A·s_sim)² are integers; s_sim and the expected intensities recomputed plainly from the file."""
    with np.load(small_npz) as z:
        amp, probe, obj = z["diffraction"].astype(np.float64), z["probeGuess"], z["objectGuess"]
        waves = probe * _plain_patches(obj, z["xcoords"], z["ycoords"], probe.shape[0])
    n = probe.shape[0]
    scale = np.sqrt(SMALL["dose"] / np.mean(np.sum(np.abs(waves) ** 2, axis=(1, 2))))
    counts = (amp * scale) ** 2
    assert np.all(np.abs(counts - np.round(counts)) < 2e-3 * np.maximum(counts, 1))
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(SMALL["dose"], rel=0.02)
    expected = np.abs(np.fft.fftshift(np.fft.fft2(waves), axes=(1, 2))) ** 2 / n**2 * scale**2
    assert np.corrcoef(expected.ravel(), counts.ravel())[0, 1] > 0.9
    np.testing.assert_allclose(counts.sum(axis=0), expected.sum(axis=0), rtol=0.5, atol=30)


def test_legacy_variant_holds_the_same_counts(tmp_path):
    """Same seed: the legacy (N, N, M) uint16 counts are the amplitude file's (A·s_sim)², transposed."""
    params = {**SMALL, "n_points": 64}
    amplitude = simulate(tmp_path / "new.npz", stored=True, **params)
    legacy = simulate(tmp_path / "legacy.npz", legacy=True, **params)
    with np.load(amplitude) as a, np.load(legacy) as b:
        assert "diffraction" not in b.files and b["diff3d"].dtype == np.uint16
        assert b["diff3d"].shape == (32, 32, 64)
        counts = b["diff3d"].transpose(2, 0, 1)
        squared = a["diffraction"].astype(np.float64) ** 2
    scale2 = np.median(counts[counts > 0] / squared[counts > 0])  # s_sim², not stored in the files
    np.testing.assert_allclose(squared * scale2, counts, atol=1e-3)
    ingested = open_dataset(ingest(legacy, tmp_path / "legacy.zarr"))
    expected = np.sqrt(counts.astype(np.float32))[ingested.input_index.values]  # stored in curve order
    np.testing.assert_array_equal(ingested.diffraction.values, expected)
    with zipfile.ZipFile(amplitude) as s, zipfile.ZipFile(legacy) as d:
        assert {i.compress_type for i in s.infolist()} == {zipfile.ZIP_STORED}
        assert {i.compress_type for i in d.infolist()} == {zipfile.ZIP_DEFLATED}


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_halves_by_y(tmp_path, split):
    path = simulate(tmp_path / f"{split}.npz", split=split, **{**SMALL, "n_points": 50})
    middle = SMALL["object_size"] / 2
    with np.load(path) as z:
        assert len(z["ycoords"]) == 50 and z["diffraction"].shape[0] == 50
        assert (z["ycoords"] < middle).all() if split == "train" else (z["ycoords"] >= middle).all()


def test_seeded_and_reproducible(tmp_path):
    params = {**SMALL, "n_points": 20}
    one, two = simulate(tmp_path / "a.npz", **params), simulate(tmp_path / "b.npz", **params)
    other = simulate(tmp_path / "c.npz", **{**params, "seed": 1})
    with np.load(one) as a, np.load(two) as b, np.load(other) as c:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["xcoords"], c["xcoords"])


@pytest.mark.parametrize(
    "bad",
    [
        {"n_points": 0},
        {"patch_size": 31},
        {"object_size": 32},
        {"dose": 0},
        {"seed": -1},
        {"split": "validation"},
    ],
)
def test_impossible_parameters(tmp_path, bad):
    with pytest.raises(InvalidParameterError, match=next(iter(bad))):
        simulate(tmp_path / "x.npz", **{**SMALL, **bad})
    assert not (tmp_path / "x.npz").exists()


def test_legacy_overflow_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(InvalidParameterError, match="lower the dose"):
        simulate(tmp_path / "hot.npz", legacy=True, **{**SMALL, "n_points": 4, "dose": 1e9})
    assert list(tmp_path.iterdir()) == []


def test_a_target_that_is_not_a_regular_file_is_refused_and_kept(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "kept").write_text("x")
    targets = [tmp_path / "fifo", tmp_path / "folder"]
    if os.path.exists("/dev/full"):
        targets.append(Path("/dev/full"))  # as root, a rename would replace the device
    for target in targets:
        with pytest.raises(InvalidParameterError, match="exists and is not a regular file") as caught:
            simulate(target, n_points=4, patch_size=8, object_size=16)
        assert str(caught.value).startswith(f"{target}: ") and ".partial" not in str(caught.value)
    assert (tmp_path / "folder" / "kept").read_text() == "x"
    assert not (tmp_path / "fifo").is_file() and (tmp_path / "fifo").exists()
    assert not Path("/dev/full").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder"]  # no .partial left


def test_a_target_whose_folder_is_missing_or_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path / "missing" / "s.npz": f"its folder {tmp_path / 'missing'} does not exist",
        tmp_path / "afile" / "s.npz": f"{tmp_path / 'afile'} is a file, not a folder",
        tmp_path / "afile" / "deeper" / "s.npz": f"{tmp_path / 'afile'} is a file, not a folder",
    }
    for target, needle in cases.items():
        with pytest.raises(InvalidParameterError) as caught:
            simulate(target, n_points=4, patch_size=8, object_size=16)
        assert str(caught.value).startswith(f"{target}: ") and needle in str(caught.value)
        assert ".partial" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_regular_file_is_replaced_and_a_write_error_names_the_target(tmp_path, monkeypatch):
    import errno

    from ptychozarr.io import npz

    target = tmp_path / "s.npz"
    target.write_text("old")
    simulate(target, n_points=4, patch_size=8, object_size=16)
    with np.load(target) as z:
        assert z["diffraction"].shape == (4, 8, 8)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self._zip.filename))

    monkeypatch.setattr(npz.NpzWriter, "write", full)
    with pytest.raises(OSError, match="No space left") as caught:
        simulate(target, n_points=4, patch_size=8, object_size=16)
    assert caught.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # the old file kept, no .partial
