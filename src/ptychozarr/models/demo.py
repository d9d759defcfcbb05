"""The demo's held-out scan, and how well the shipped reference models reconstruct it.

The shipped models (``weights/``) were trained on the upper half of the simulated object
(:data:`TRAIN_SCAN`); the demo compares them on the lower half (:data:`DEMO_SCAN`), new positions and
noise. :func:`held_out_scores` scores a comparison's aligned reconstructions the way
``weights/README.md`` reports them (``benchmarks/heldout.py`` runs the comparison and records them), and
:func:`describe_models` gives the one line the demo prints before its table, from the scores recorded in
``weights/scores.json`` (they are not the table's compare_models metrics, and the line says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "DEMO_SCAN",
    "SCORES_FILE",
    "SHIPPED",
    "TRAIN_SCAN",
    "covered_pixels",
    "describe_models",
    "held_out_scores",
    "pearson",
    "plane_removed",
]

DEMO_SCAN: dict = {
    "n_points": 1000,
    "patch_size": 64,
    "object_size": 256,
    "dose": 1e6,
    "seed": 2,
    "split": "test",
}
"""``simulate`` keywords of the demo's scan: the held-out lower half of the object, at 10⁶ photons per
pattern (the study's 10³ leaves the small demo models little to reconstruct from)."""

TRAIN_SCAN: dict = DEMO_SCAN | {"n_points": 6000, "seed": 1, "split": "train"}
"""``simulate`` keywords of the shipped models' training scan: the upper half of the same object."""

SCORES_FILE = Path(__file__).parent / "weights" / "scores.json"
"""Held-out scores of the shipped models on :data:`DEMO_SCAN`, as :func:`held_out_scores` gives them."""

SHIPPED = {"PtychoPINN": "pinn_gs2_n64", "Baseline": "baseline_n64"}
"""The shipped models' names (:func:`ptychozarr.models.demo_weights`), by arm label."""


def plane_removed(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` less its least-squares plane ``a·row + b·col + c`` (fitted on ``mask``'s pixels)."""
    rows, cols = np.indices(image.shape)
    design = np.stack([rows.ravel(), cols.ravel(), np.ones(image.size)], axis=1)
    used = np.ones(image.size, bool) if mask is None else np.ravel(mask)
    coef, *_ = np.linalg.lstsq(design[used], image.ravel()[used].astype(np.float64), rcond=None)
    return image - (design @ coef).reshape(image.shape)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped images (0 when either is constant)."""
    a, b = (np.ravel(x).astype(np.float64) for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / norm) if norm > 0 else 0.0


def _centre_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    top, left = (image.shape[0] - shape[0]) // 2, (image.shape[1] - shape[1]) // 2
    return image[top : top + shape[0], left : left + shape[1]]


_SSIM_WINDOW = 7  # scikit-image's default


def _ssim(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """scikit-image's SSIM map averaged over the pixels whose whole window lies in ``mask`` (an all-True
    mask gives scikit-image's mean SSIM, which leaves out the half-window border)."""
    from scipy.ndimage import binary_erosion
    from skimage.metrics import structural_similarity

    _, ssim_map = structural_similarity(image, truth, data_range=float(np.ptp(truth[mask])), full=True)
    inside = binary_erosion(mask, np.ones((_SSIM_WINDOW, _SSIM_WINDOW), bool), border_value=False)
    return float(ssim_map[inside].mean())


def _scores(amplitude, phase, true_amplitude, true_phase, covered=None) -> dict[str, float]:
    shape = tuple(min(a, b) for a, b in zip(amplitude.shape, true_amplitude.shape, strict=True))
    amp, ph, t_amp, t_ph = (_centre_crop(x, shape) for x in (amplitude, phase, true_amplitude, true_phase))
    mask = np.ones(shape, bool) if covered is None else _centre_crop(covered, shape)
    ph, t_ph = plane_removed(ph, mask), plane_removed(t_ph, mask)
    return {
        "r_amplitude": round(pearson(amp[mask], t_amp[mask]), 3),
        "r_phase": round(pearson(ph[mask], t_ph[mask]), 3),
        "ssim_amplitude": round(_ssim(amp * (t_amp[mask].mean() / amp[mask].mean()), t_amp, mask), 3),
        "ssim_phase": round(_ssim(ph, t_ph, mask), 3),
    }


def covered_pixels(store: str | Path, key: str) -> np.ndarray:
    """Which pixels of arm ``key``'s scored crop (``scores/<key>/aligned``) a stitched patch covers.

    From the arm's stitched object in the store, before any registration shift: a pixel no crop reaches
    is exactly zero there (the stitcher's ``num / (den + 1e-9)`` with ``den = 0``).
    """
    import zarr

    root = zarr.open_group(str(store), mode="r")
    arm, scored = root[f"arms/{key}"], root[f"scores/{key}"]
    rows = scored["object_y"][:] - arm["object_y"][0]
    cols = scored["object_x"][:] - arm["object_x"][0]
    inside = (rows[:, None] >= 0) & (rows[:, None] < arm["object"].shape[0])
    inside = inside & (cols[None, :] >= 0) & (cols[None, :] < arm["object"].shape[1])
    values = arm["object"][np.clip(rows, 0, arm["object"].shape[0] - 1)][
        :, np.clip(cols, 0, arm["object"].shape[1] - 1)
    ]
    return inside & (values != 0)


def held_out_scores(
    aligned: str | Path, labels: Iterable[str], covered: Mapping[str, np.ndarray] | None = None
) -> dict[str, dict[str, float]]:
    """Score a comparison's aligned reconstructions against the ground truth, beside a constant object.

    For each arm: Pearson r and SSIM of the amplitude, and of the phase after removing a best-fit plane
    from both (the amplitude scaled to the truth's mean before its SSIM, as compare_models does: the
    normalised patterns do not hold the object's absolute transmission), against the arm's own
    ground-truth crop (``ground_truth_<arm>_*`` when the arms' crops
    differ, else the shared ``ground_truth_*``), on the ground truth's pixels (an arm's image larger than
    the ground truth's is centre-cropped to it). ``"constant"`` is the first arm's ground truth's mean.

    Parameters
    ----------
    aligned : str or Path
        ``reconstructions_aligned.npz`` of :func:`ptychozarr.compare`.
    labels : iterable of str
        Arm labels of that comparison.
    covered : mapping of str to bool array, optional
        Per label, the pixels of its aligned image that the scan covers (:func:`covered_pixels`): only
        they are scored (r, the plane fit, and SSIM windows lying wholly on them). By default every pixel
        of the box, those no patch reaches included.

    Returns
    -------
    dict
        ``{label: {"r_amplitude", "r_phase", "ssim_amplitude", "ssim_phase"}}``, plus ``"constant"``.
    """
    covered = dict(covered or {})
    with np.load(aligned) as npz:

        def images(prefix: str) -> tuple[np.ndarray, np.ndarray]:
            return npz[f"{prefix}_amplitude"], npz[f"{prefix}_phase"]

        def truth(prefix: str) -> tuple[np.ndarray, np.ndarray]:
            own = f"ground_truth_{prefix}"
            return images(own if f"{own}_amplitude" in npz.files else "ground_truth")

        scored = {label: (*images(label.lower()), *truth(label.lower())) for label in labels}
    first = next(iter(scored))
    shared = scored[first][2:]
    constant = tuple(np.full_like(t, t.mean()) for t in shared)
    arms = scored | {"constant": (*constant, *shared)}
    masks = covered | {"constant": covered.get(first)}
    return {label: _scores(*arm, covered=masks.get(label)) for label, arm in arms.items()}


def describe_models(scores_file: str | Path = SCORES_FILE) -> str:
    """One line naming the shipped models and their recorded held-out scores, for the demo to print.

    The scores are :func:`held_out_scores`' on the pixels the scan covers (Pearson r, and scikit-image's
    SSIM of the amplitude scaled to the truth's mean and of the plane-removed phase: "plain SSIM"),
    recorded for the default demo scan; the line says so, because the table the demo prints next scores
    the whole scan box compare_models' way (its SSIM also trims the borders and maps the phase to
    [0, 1]), a different number.
    """
    scores_file = Path(scores_file)
    recorded = json.loads(scores_file.read_text())
    scores = recorded["scores"]

    def arm(label: str, how: str) -> str:
        s = scores[label]
        return (
            f"{label} ({SHIPPED[label]}, {how}) r {s['r_amplitude']:.2f} / {s['r_phase']:.2f}, "
            f"plain SSIM {s['ssim_amplitude']:.2f} / {s['ssim_phase']:.2f}"
        )

    constant = scores["constant"]
    plain = f"plain SSIM {constant['ssim_amplitude']:.2f} / {constant['ssim_phase']:.2f}"
    return (
        "models: small N=64 reference models trained on simulated data (the object's upper half, "
        f"{TRAIN_SCAN['dose']:.0e} photons per pattern). Held-out scores recorded in "
        f"{scores_file.parent.name}/{scores_file.name} "
        f"for the default {recorded['scan']['n_points']}-point scan of its lower half, amplitude / phase, as "
        "Pearson r and plain SSIM on the pixels the scan covers (scikit-image's, of the amplitude scaled to "
        "the truth's mean and the plane-removed phase; not the table's compare_models SSIM): "
        f"{arm('PtychoPINN', 'physics loss, no ground truth')}; {arm('Baseline', 'supervised')}; "
        f"a constant object r 0 / 0, {plain}"
    )
