"""Synthetic ptychography scans that follow the study's data contract (PtychoPINN's keys, dtypes, frame).

The object is complex and structured (amplitude from scikit-image's ``camera``, phase from the detail
of ``astronaut``), the probe a strongly defocused soft aperture behind a diffuser, the positions
uniform within the object's margins, and each pattern

    A = sqrt(Poisson(s_sim² · |FFT(P·O)|² / N²)) / s_sim,   s_sim = sqrt(dose / mean_patterns Σ|P·O|²),

fftshifted, so that ``(A·s_sim)²`` are photon counts whose mean total per pattern is ``dose``.
Patterns are generated in batches and appended to the NPZ member as they are made: memory depends on the
batch, never on ``n_points``.

Frame (DESIGN.md): positions are object pixels ``(x, y)`` = (column, row); patch pixel ``(r, c)`` of the
pattern at ``(x, y)`` sees object pixel ``(y + r − N/2, x + c − N/2)``, bilinearly interpolated.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ptychozarr.errors import InvalidParameterError
from ptychozarr.io.npz import NpzWriter

__all__ = ["SPLITS", "extract_patches", "make_object", "make_probe", "simulate"]

SPLITS = ("none", "train", "test")
_BATCH_BYTES = 16 * 2**20  # complex64 exit waves held per batch


def make_object(size: int) -> np.ndarray:
    """A ``size``×``size`` complex64 object: amplitude in [0.2, 1], phase within ±1.4 rad.

    The amplitude is scikit-image's ``camera``; the phase is the detail of ``astronaut``: the image less
    its Gaussian blur of width ``size / 40`` (6 px at 256), so that it varies on scales below a probe's
    footprint. A far-field pattern cannot tell a patch's mean phase, so phase that drifts over more than a
    probe width is lost to any single-pattern reconstruction; this phase keeps no such drift.
    """
    from skimage import color, data, filters, transform

    def _resized(image: np.ndarray) -> np.ndarray:
        image = transform.resize(image.astype(np.float64), (size, size), anti_aliasing=True)
        return filters.gaussian(image, sigma=1.0)

    def _unit(image: np.ndarray) -> np.ndarray:
        return (image - image.min()) / (np.ptp(image) or 1.0)

    amplitude = 0.2 + 0.8 * _unit(_resized(data.camera()))
    gray = _resized(color.rgb2gray(data.astronaut()))
    detail = gray - filters.gaussian(gray, sigma=size / 40)
    phase = 1.4 * np.tanh(detail / (2.0 * detail.std() or 1.0))
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def make_probe(n: int) -> np.ndarray:
    """An ``n``×``n`` complex64 probe: a soft square aperture under a strong defocus and a diffuser.

    - **aperture**: a soft square of side ``0.3·√π·n`` (the area of a disc of radius 0.3·n), edges
      ``n/40`` wide;
    - **defocus**: the quadratic phase ``π r²/n``, whose local frequency ``r/n`` cycles per pixel sends
      the wave at radius ``r`` to ``r`` pixels from the centre of the far field: a pattern is a Fresnel
      image of the illuminated object;
    - **diffuser**: a phase ``d(y) + d(x)`` of 1 rad rms, ``d`` a random profile (fixed seed) smoothed
      over ``n/40`` px. Under a defocus alone a shift of the object is a tilt of the wave, so patterns a
      few pixels apart carry the same information and the frequencies a defocus does not transfer stay
      lost; the diffuser makes every position see the object through a different phase, as in near-field
      ptychography with a diffuser.

    The probe is separable (``P[r, c] = p[r]·p[c]``) and symmetric under the reflections about its
    centre pixel ``n/2`` and the transpose. Its maximum amplitude is 1.
    """
    from scipy.ndimage import gaussian_filter1d

    t = np.arange(n) - n / 2
    aperture = 1.0 / (1.0 + np.exp((np.abs(t) - 0.15 * np.sqrt(np.pi) * n) / (n / 40)))
    profile = gaussian_filter1d(np.random.default_rng(7).standard_normal(n), n / 40, mode="wrap")
    diffuser = (profile / profile.std())[np.abs(t).astype(np.intp)]  # even about the centre pixel
    line = aperture * np.exp(1j * (np.pi * t**2 / n + diffuser))
    probe = np.outer(line, line)
    return (probe / np.abs(probe).max()).astype(np.complex64)


def extract_patches(obj: np.ndarray, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """The ``n``×``n`` object patches seen at positions ``(x, y)``, bilinearly interpolated.

    Patch pixel ``(r, c)`` of position ``(x, y)`` is object pixel ``(y + r − n/2, x + c − n/2)``. Every
    patch must lie inside the object: ``n/2 ≤ x, y`` and ``x, y ≤ size − n/2``.

    Returns
    -------
    numpy.ndarray
        ``(len(x), n, n)``, the object's dtype.
    """
    padded = np.pad(obj, ((0, 1), (0, 1)), mode="edge")  # the last tap of a patch at the far edge
    top, left = np.asarray(y, np.float64) - n / 2, np.asarray(x, np.float64) - n / 2
    row0, col0 = np.floor(top).astype(np.intp), np.floor(left).astype(np.intp)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (n + 1, n + 1))[row0, col0]
    real = np.float32 if obj.dtype.itemsize <= 8 else np.float64
    fy, fx = ((top - row0).astype(real)[:, None, None], (left - col0).astype(real)[:, None, None])
    upper = (1 - fx) * windows[:, :-1, :-1] + fx * windows[:, :-1, 1:]
    lower = (1 - fx) * windows[:, 1:, :-1] + fx * windows[:, 1:, 1:]
    return ((1 - fy) * upper + fy * lower).astype(obj.dtype, copy=False)


def _positions(rng: np.random.Generator, n_points: int, n: int, size: int, split: str) -> np.ndarray:
    low, high = n / 2, size - n / 2
    middle = low + 0.5 * (high - low)
    y_range = {"none": (low, high), "train": (low, middle), "test": (middle, high)}[split]
    x = rng.uniform(low, high, n_points)
    y = rng.uniform(*y_range, n_points)
    return np.stack([x, y])


def _exit_waves(obj, probe, xy, batch) -> Iterator[np.ndarray]:
    n = probe.shape[0]
    for start in range(0, xy.shape[1], batch):
        yield probe * extract_patches(obj, xy[0, start : start + batch], xy[1, start : start + batch], n)


def _check(n_points, patch_size, object_size, dose, seed, split) -> None:
    if n_points < 1:
        raise InvalidParameterError(f"n_points={n_points}: at least one scan position is needed")
    if patch_size < 4 or patch_size % 2:
        raise InvalidParameterError(f"patch_size={patch_size}: use an even size of at least 4 (64 or 128)")
    if object_size <= patch_size:
        raise InvalidParameterError(
            f"object_size={object_size} must exceed patch_size={patch_size} so that positions have room"
        )
    if not dose > 0:
        raise InvalidParameterError(f"dose={dose}: photons per pattern must be positive")
    if seed < 0:
        raise InvalidParameterError(f"seed={seed}: use a non-negative integer")
    if split not in SPLITS:
        raise InvalidParameterError(f"split={split!r}: choose one of {', '.join(SPLITS)}")


def simulate(
    path: str | Path,
    n_points: int = 5216,
    patch_size: int = 128,
    object_size: int = 464,
    dose: float = 1e3,
    seed: int = 0,
    split: str = "none",
    stored: bool = False,
    legacy: bool = False,
) -> Path:
    """Simulate a scan and write it as an NPZ file with the keys and dtypes of PtychoPINN's scans.

    Parameters
    ----------
    path : str or Path
        The NPZ file to write: a regular file there is replaced once the new one is complete; anything
        else there (a folder, a device, a FIFO) is refused, and so is a folder that does not exist.
    n_points : int
        Scan positions written to the file, *after* the split: ``split="test"`` with 5216 points gives a
        file like the study's ``patched_test.npz``.
    patch_size : int
        Pattern and probe size N.
    object_size : int
        Side of the square ``objectGuess``.
    dose : float
        Mean photon count per pattern.
    seed : int
        Seed of the positions and the Poisson noise (the object and the probe are fixed).
    split : {"none", "train", "test"}
        Half of the object to scan, split by y at the midpoint of the position range (as the study):
        train ``y < mid``, test ``y ≥ mid``, none: the whole range.
    stored : bool
        Store the members uncompressed (``np.savez``) instead of deflating them.
    legacy : bool
        Write the legacy variant instead: key ``diff3d``, layout (N, N, M), uint16 photon counts.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InvalidParameterError
        An impossible parameter, a target that exists and is not a regular file, or a target whose
        folder does not exist or is a file (one line naming the target and the fix).
    """
    _check(n_points, patch_size, object_size, dose, seed, split)
    path = Path(path)
    _check_target(path)
    rng = np.random.default_rng(seed)
    obj, probe = make_object(object_size), make_probe(patch_size)
    xy = _positions(rng, n_points, patch_size, object_size, split)
    batch = max(1, _BATCH_BYTES // (8 * patch_size**2))
    energy = np.concatenate([np.sum(np.abs(w) ** 2, axis=(1, 2)) for w in _exit_waves(obj, probe, xy, batch)])
    scale = np.sqrt(dose / energy.astype(np.float64).mean())

    def counts() -> Iterator[np.ndarray]:
        for wave in _exit_waves(obj, probe, xy, batch):
            far = np.fft.fftshift(np.fft.fft2(wave), axes=(1, 2))
            yield rng.poisson(scale**2 * np.abs(far) ** 2 / patch_size**2)

    shape = (n_points, patch_size, patch_size)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with NpzWriter(partial, compress=not stored) as npz:
            if legacy:
                _write_transposed(npz, "diff3d", counts(), shape, np.uint16, batch, scratch=path.parent)
            else:
                with npz.stream("diffraction", shape, np.float32) as append:
                    for block in counts():
                        append((np.sqrt(block) / scale).astype(np.float32))
            for key, value in (("xcoords", xy[0]), ("ycoords", xy[1])):
                npz.write(key, value)
                npz.write(f"{key}_start", value)
            npz.write("scan_index", np.zeros(n_points, np.int64))
            npz.write("probeGuess", probe)
            npz.write("objectGuess", obj)
        _check_target(path)  # again: something may have been put there while simulating
        os.replace(partial, path)  # only a finished file ever has the requested name
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (str(partial), partial):
            exc.filename = str(path)  # name the requested file, not the hidden one beside it
        raise
    return path


def _check_target(path: Path) -> None:
    """Refuse a target that exists and is not a regular file, or whose folder is missing or a file.

    Only ``stat`` is used: a FIFO or a device is never opened, and a symbolic link to a regular file
    counts as one (the link is replaced).
    """
    if path.exists() and not path.is_file():
        raise InvalidParameterError(
            f"{path}: exists and is not a regular file (a folder, a device or a FIFO); give a file path"
        )
    folder = path.parent
    if folder.is_dir():
        return
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if existing.exists() and not existing.is_dir():
        raise InvalidParameterError(
            f"{path}: {existing} is a file, not a folder; give a path inside a folder"
        )
    raise InvalidParameterError(
        f"{path}: its folder {folder} does not exist (no such file or folder); "
        "create the folder first or give another path"
    )


def _write_transposed(npz: NpzWriter, name: str, blocks, shape, dtype, batch: int, scratch: Path) -> None:
    """Write pattern blocks (M, N, N) as one (N, N, M) member, through a temporary Zarr array.

    The (N, N, M) layout is stored row by row, so no pattern is complete before the last row: the blocks
    go to a scratch array chunked (rows, N, batch) in a temporary directory under ``scratch`` and come
    back one band of rows at a time.
    """
    from ptychozarr.io.store import scratch_array

    n_patterns, n = shape[0], shape[1]
    rows = min(n, max(1, _BATCH_BYTES // (n * n_patterns * np.dtype(dtype).itemsize)))
    with tempfile.TemporaryDirectory(prefix=".ptychozarr-scratch-", dir=scratch) as tmp:
        staged = scratch_array(tmp, (n, n, n_patterns), dtype, (rows, n, batch))
        start, limit = 0, np.iinfo(dtype).max
        for block in blocks:
            if block.max(initial=0) > limit:
                raise InvalidParameterError(
                    f"legacy=True: a pixel holds more than {limit} photons, beyond {np.dtype(dtype)}; "
                    "lower the dose"
                )
            staged[:, :, start : start + len(block)] = block.astype(dtype).transpose(1, 2, 0)
            start += len(block)
        with npz.stream(name, (n, n, n_patterns), dtype) as append:
            for row in range(0, n, rows):
                append(staged[row : row + rows])
