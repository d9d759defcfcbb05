"""Diagnostics of the PINN's forward model and of its fit, on the demo's training scan.

Four checks, each printed as one JSON object:

1. ``forward``: the simulator's own noise-free patterns of the training scan (``|fftshift(fft2(P·O))|/N``
   of each member's ground-truth patch) against ``far_field`` of the same patches (float precision), of
   the ground-truth *group* patches moved by the members' offsets (the path the PINN trains through), and
   against the stored, normalised diffraction divided by the grouping's normaliser ``f`` (Poisson noise).
2. ``ranking``: the PINN's training loss (gain ``f``, counts ``sqrt(dose)/(N/2)``) of the true group
   patches against the same patches shifted by a pixel, blurred, phase-scaled, conjugated, point-reflected
   and phase-flattened: the truth must be the minimum.
3. ``gradient``: the tape's gradient of that loss with respect to the object's phase against central
   finite differences of an independent float64 numpy/scipy evaluation of the loss.
4. ``overfit``: a fresh PINN trained on 16 groups of noise-free patterns with the known probe; the phase r
   (weighted mean removed, under the probe) of its patches against the true group patches.
5. ``fit`` (with ``--model``): a trained PINN on 64 training groups: its loss (at its own gain) over the
   true patches' loss, and the amplitude and phase r of its patches. A loss left well above the truth's
   is a network that does not fit, not a forward model that is wrong.

Usage::

    python -m benchmarks.pinn_diagnose /tmp/pz/diag [--steps 300] [--filters 16] [--depth 3]
    python -m benchmarks.pinn_diagnose /tmp/pz/diag --checks fit \
        --model src/ptychozarr/models/weights/pinn_gs2_n64.keras
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ptychozarr import _tf

__all__ = ["forward_check", "gradient_check", "loss_ranking", "main", "overfit", "training_groups"]


def training_groups(
    output_dir: str | Path, n_groups: int | None = None, seed: int = 0, scan: dict | None = None
) -> dict:
    """The demo's training scan (or ``scan``'s keywords), grouped (gridsize 2) as ``train`` does, with truth.

    Returns
    -------
    dict
        ``x`` (b, N, N, 4) normalised amplitudes, ``clean`` the same without noise (the simulator's
        formula), ``offsets`` (b, 4, 2), ``group`` (b, N, N) true group patches, ``probe``, ``f``,
        ``count_scale``, ``dose``.
    """
    from ptychozarr.grouping import group
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.models.demo import TRAIN_SCAN
    from ptychozarr.simulate import extract_patches, simulate

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scan = scan or TRAIN_SCAN
    dose = scan["dose"]
    scan = simulate(output_dir / "train.npz", **scan)
    ds = open_dataset(ingest(scan, output_dir / "train.zarr", overwrite=True))
    ds.attrs.pop("store")
    groups = group(ds, gridsize=2, k=7, seed=seed)
    chosen = (
        slice(None) if n_groups is None else np.linspace(0, groups.sizes["group"] - 1, n_groups).astype(int)
    )
    members = groups["nn_indices"].values[chosen]
    f = float(groups.attrs["normaliser"])
    n = int(ds.sizes["det_y"])
    obj, probe = ds["objectGuess"].values, ds["probeGuess"].values
    xs, ys = ds["xcoords"].values[members], ds["ycoords"].values[members]
    patches = extract_patches(obj, xs.ravel(), ys.ravel(), n).reshape(*members.shape, n, n)
    clean = np.abs(np.fft.fftshift(np.fft.fft2(probe * patches), axes=(-2, -1))) / n
    centres = groups["centres"].values[chosen]
    return {
        "x": np.moveaxis(ds["diffraction"].values[members], 1, -1) * np.float32(f),
        "clean": np.moveaxis(clean, 1, -1).astype(np.float32) * np.float32(f),
        "members": np.moveaxis(patches, 1, -1),
        "offsets": groups["offsets"].values[chosen].astype(np.float32),
        "group": extract_patches(obj, centres[:, 0], centres[:, 1], n),
        "probe": probe.astype(np.complex64),
        "f": f,
        "dose": dose,
        "count_scale": float(np.sqrt(dose) / (n / 2)),
    }


def _rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - b) ** 2) / np.mean(np.asarray(b) ** 2)))


def forward_check(data: dict) -> dict:
    """Relative RMS differences between the simulator's patterns and the forward model's (see module)."""
    tf = _tf.tensorflow()
    from ptychozarr.models.reference import far_field

    probe, f = tf.constant(data["probe"]), data["f"]
    members = np.moveaxis(data["members"], -1, 1).reshape(-1, *data["group"].shape[1:])
    direct = far_field(tf.constant(members), probe).numpy()[..., 0].reshape(data["clean"].shape[0], 4, -1)
    clean = np.moveaxis(data["clean"], -1, 1).reshape(direct.shape) / f
    moved = far_field(tf.constant(data["group"]), probe, tf.constant(data["offsets"])).numpy() * f
    return {
        "members_direct_vs_simulator": _rel_rms(direct, clean),
        "group_moved_vs_simulator": _rel_rms(moved, data["clean"]),
        "stored_vs_simulator": _rel_rms(data["x"], data["clean"]),
        "stored_over_simulator_gain": float(np.sum(data["x"] * data["clean"]) / np.sum(data["clean"] ** 2)),
    }


def _loss(data: dict, obj) -> float:
    tf = _tf.tensorflow()
    from ptychozarr.models.reference import far_field, poisson_nll

    pred = data["f"] * far_field(tf.constant(obj.astype(np.complex64)), data["probe"], data["offsets"])
    return float(poisson_nll(pred, tf.constant(data["x"]), data["count_scale"]))


def _variants(group: np.ndarray) -> dict[str, np.ndarray]:
    from scipy import ndimage

    amp, phase = np.abs(group), np.angle(group)

    def polar(a, p):
        return a * np.exp(1j * p)

    def blur(z, sigma):
        return ndimage.gaussian_filter(z.real, (0, sigma, sigma)) + 1j * ndimage.gaussian_filter(
            z.imag, (0, sigma, sigma)
        )

    return {
        "shift_x_1px": np.roll(group, 1, axis=2),
        "shift_y_1px": np.roll(group, 1, axis=1),
        "blur_0.7px": blur(group, 0.7),
        "phase_x0.8": polar(amp, 0.8 * phase),
        "phase_x1.2": polar(amp, 1.2 * phase),
        "phase_zero": amp.astype(np.complex64),
        "conjugate": np.conj(group),
        "point_reflected": np.roll(group[:, ::-1, ::-1], 1, axis=(1, 2)),
        "twin": np.roll(np.conj(group[:, ::-1, ::-1]), 1, axis=(1, 2)),
        "amplitude_constant": polar(np.full_like(amp, amp.mean()), phase),
    }


def loss_ranking(data: dict) -> dict:
    """Loss of the true group patches and each variant's excess over it (positive: the truth wins)."""
    truth = _loss(data, data["group"])
    return {"truth": truth} | {name: _loss(data, z) - truth for name, z in _variants(data["group"]).items()}


def _numpy_loss(data: dict, amp: np.ndarray, phase: np.ndarray) -> float:
    """The PINN's loss in float64 with numpy and scipy only: shift (bilinear, zero fill), probe, FFT."""
    from scipy import ndimage

    n = amp.shape[-1]
    obj = amp * np.exp(1j * phase)
    total = 0.0
    for b in range(len(obj)):
        for c, (tx, ty) in enumerate(data["offsets"][b].astype(np.float64)):
            moved = [
                ndimage.shift(part, (ty, tx), order=1, mode="grid-constant")
                for part in (obj[b].real, obj[b].imag)
            ]
            wave = data["probe"].astype(np.complex128) * (moved[0] + 1j * moved[1])
            pred = data["f"] * np.abs(np.fft.fftshift(np.fft.fft2(wave))) / n
            rate = (data["count_scale"] * pred) ** 2
            counts = (data["count_scale"] * data["x"][b, :, :, c].astype(np.float64)) ** 2
            total += np.sum(rate - counts * np.log(rate + 1e-8))
    return total / data["x"].size


def gradient_check(data: dict, n_dirs: int = 4, eps: float = 1e-6, seed: int = 0) -> dict:
    """Directional derivatives of the loss in the phase: tape (float32) against float64 differences.

    Taken at the true amplitude and half the true phase, away from the minimum, along random directions.
    The steps must be small (``eps`` 1e-6 in float64): pixels with counts where the predicted rate is
    near zero make the log-likelihood strongly curved, so differences over 1e-2 rad are off by up to 40 %.
    """
    tf = _tf.tensorflow()
    from ptychozarr.models.reference import far_field, poisson_nll

    amp, phase = np.abs(data["group"]).astype(np.float64), 0.5 * np.angle(data["group"]).astype(np.float64)
    ph = tf.Variable(phase.astype(np.float32))
    with tf.GradientTape() as tape:
        obj = tf.complex(amp.astype(np.float32) * tf.cos(ph), amp.astype(np.float32) * tf.sin(ph))
        loss = poisson_nll(
            data["f"] * far_field(obj, data["probe"], data["offsets"]), data["x"], data["count_scale"]
        )
    grad = tape.gradient(loss, ph).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    out = {"numpy_loss": _numpy_loss(data, amp, phase), "tf_loss": float(loss), "directions": []}
    for _ in range(n_dirs):
        v = rng.standard_normal(phase.shape)
        fd = (_numpy_loss(data, amp, phase + eps * v) - _numpy_loss(data, amp, phase - eps * v)) / (2 * eps)
        out["directions"].append({"tape": float(np.sum(grad * v)), "finite_difference": fd})
    return out


def _phase_r(pred: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> float:
    """Weighted Pearson r of two phase stacks, each patch's weighted mean removed, on the probe's support."""
    w = weights / weights.sum()
    a = np.angle(np.exp(1j * (pred - np.sum(pred * w, axis=(1, 2), keepdims=True))))
    b = truth - np.sum(truth * w, axis=(1, 2), keepdims=True)
    support = weights > 0.1 * weights.max()
    a, b = a[:, support], b[:, support]
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def overfit(
    data: dict, steps: int = 300, filters: int = 16, depth: int = 3, lr: float = 1e-3, **build
) -> dict:
    """Train a fresh PINN on ``data``'s groups (its clean patterns) and score its patches on them."""
    tf = _tf.tensorflow()
    keras = _tf.keras()
    from ptychozarr.models.reference import build_pinn, far_field, object_from_outputs, poisson_nll

    keras.utils.set_random_seed(0)
    n = data["group"].shape[-1]
    network = build_pinn(n, 2, filters, depth, probe=data["probe"], **build)
    optimizer = keras.optimizers.Adam(lr)
    x, offsets = tf.constant(data["clean"]), tf.constant(data["offsets"])
    positions = tf.constant(np.swapaxes(data["offsets"], 1, 2)[:, None])  # the engine's (b, 1, 2, C)
    gain = tf.constant(data["f"], tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            obj = object_from_outputs(*network([x, positions], training=True))
            loss = poisson_nll(gain * far_field(obj, data["probe"], offsets), x, data["count_scale"])
        optimizer.apply_gradients(
            zip(tape.gradient(loss, network.trainable_variables), network.trainable_variables, strict=True)
        )
        return loss

    truth_loss = _loss(data | {"x": data["clean"]}, data["group"])
    t0, losses = time.perf_counter(), []
    for i in range(steps):
        loss = float(step())
        if i % max(steps // 10, 1) == 0 or i == steps - 1:
            losses.append(round(loss - truth_loss, 3))
    amp, phase = (np.asarray(o)[..., 0] for o in network([x, positions]))
    weights = np.abs(data["probe"]) ** 2
    support = weights > 0.1 * weights.max()
    t_amp = np.abs(data["group"])
    return {
        "steps": steps,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loss_excess_over_truth": losses,
        "r_amplitude": float(np.corrcoef(amp[:, support].ravel(), t_amp[:, support].ravel())[0, 1]),
        "r_phase": _phase_r(phase, np.angle(data["group"]), weights),
    }


def fit_check(data: dict, model_path: str | Path) -> dict:
    """A trained PINN's loss over the true patches' loss on ``data``, and the r of its patches."""
    from ptychozarr.models import load_model

    model = load_model(model_path)
    positions = np.swapaxes(data["offsets"], 1, 2)[:, None]
    inputs = [data["x"], positions] if model.spec.takes_positions else data["x"]
    amp, phase = (np.asarray(o)[..., 0] for o in model.network(inputs))
    weights = np.abs(data["probe"]) ** 2
    support = weights > 0.1 * weights.max()
    gain = model.provenance.get("gain", data["f"])
    return {
        "loss_excess_over_truth": _loss(data | {"f": gain}, amp * np.exp(1j * phase))
        - _loss(data, data["group"]),
        "r_amplitude": float(
            np.corrcoef(amp[:, support].ravel(), np.abs(data["group"])[:, support].ravel())[0, 1]
        ),
        "r_phase": _phase_r(phase, np.angle(data["group"]), weights),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("output_dir", help="where the training scan goes")
    parser.add_argument("--steps", type=int, default=300, help="overfit steps (0 skips the overfit)")
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--checks", default="forward,ranking,gradient,overfit")
    parser.add_argument("--model", help="a trained PINN for the fit check")
    args = parser.parse_args(argv)
    data = training_groups(args.output_dir, n_groups=16)
    checks = {
        "fit": lambda: fit_check(training_groups(args.output_dir, n_groups=64), args.model),
        "forward": lambda: forward_check(data),
        "ranking": lambda: loss_ranking(data),
        "gradient": lambda: gradient_check(data),
        "overfit": lambda: overfit(data, args.steps, args.filters, args.depth),
    }
    result = {}
    for name in args.checks.split(","):
        result[name] = checks[name]()
        print(json.dumps({name: result[name]}), flush=True)
    return result


if __name__ == "__main__":
    main()
