"""Training of the reference models, streaming batches from a Zarr store.

Batches come from windows of consecutive groups (or patterns): each window's patterns are read from the
Zarr diffraction with one orthogonal selection, shuffled, and cut into batches; windows are visited in a
new random order every epoch. Memory depends on the window, never on the scan.

- ``kind="pinn"``: no ground truth. The network's object is moved to each member's offset, multiplied
  by the store's probe and propagated (:func:`~ptychozarr.models.reference.far_field`); a trainable gain
  (initialised to the grouping's normaliser ``f``, which maps the simulator's ``|FFT|/N`` onto normalised
  amplitudes) scales the result, and the Poisson negative log-likelihood is taken in photon counts
  ``(sqrt(dose)/(N/2) · amplitude)²`` (the normalised data holds ``dose`` photons per pattern on average).
- ``kind="baseline"``: supervised; targets are ``objectGuess`` patches at the patterns' positions
  (DESIGN.md frame, bilinear), loss = MAE of amplitude + MAE of the wrapped phase difference.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from ptychozarr.errors import InvalidParameterError
from ptychozarr.models.base import ModelSpec

__all__ = ["train"]


def _windows(n_items: int, window: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Item indices per batch: windows of consecutive items in random order, shuffled within a window.

    A window's last incomplete batch is dropped, so every batch has ``batch_size`` items (no retracing).
    """
    starts = np.arange(0, n_items, window)
    for start in rng.permutation(starts):
        items = rng.permutation(np.arange(start, min(start + window, n_items)))
        for b in range(0, len(items) - batch_size + 1, batch_size):
            yield np.sort(items[b : b + batch_size])


def _read(diffraction: zarr.Array, members: np.ndarray, scale: float) -> np.ndarray:
    """Patterns of ``members`` (b, C) as (b, N, N, C) float32 times ``scale``: one Zarr selection."""
    needed, rows = np.unique(members, return_inverse=True)
    patterns = diffraction.get_orthogonal_selection((needed, slice(None), slice(None)))
    return np.moveaxis(patterns[rows.reshape(members.shape)], 1, -1) * np.float32(scale)


def _open_training_store(data: Path, tmp: str) -> Path:
    """The Zarr store to train from: ``data`` itself, or ``data`` (an NPZ) ingested into ``tmp``."""
    from ptychozarr.io import ingest

    if data.suffix == ".npz":
        return Path(ingest(data, Path(tmp) / "train.zarr"))
    return data


def _pinn_step(network, probe, log_gain, optimizer, count_scale: float, gridsize: int):
    import tensorflow as tf

    from ptychozarr.models.reference import far_field, object_from_outputs, poisson_nll

    @tf.function(reduce_retracing=True)
    def step(x, offsets):
        with tf.GradientTape() as tape:
            obj = object_from_outputs(*network(x, training=True))
            pred = tf.exp(log_gain) * far_field(obj, probe, offsets if gridsize > 1 else None)
            loss = poisson_nll(pred, x, count_scale)
        variables = network.trainable_variables + [log_gain]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return step


def _baseline_step(network, optimizer):
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x, amp_true, phase_true):
        with tf.GradientTape() as tape:
            amp, phase = network(x, training=True)
            diff = phase[..., 0] - phase_true
            loss = tf.reduce_mean(tf.abs(amp[..., 0] - amp_true)) + tf.reduce_mean(
                tf.abs(tf.atan2(tf.sin(diff), tf.cos(diff)))
            )
        optimizer.apply_gradients(
            zip(tape.gradient(loss, network.trainable_variables), network.trainable_variables, strict=True)
        )
        return loss

    return step


def train(
    kind: Literal["pinn", "baseline"],
    data: str | Path,
    out: str | Path,
    epochs: int = 10,
    gridsize: int = 2,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    filters: int = 16,
    depth: int = 3,
    dose: float = 1e3,
    window: int = 512,
    k: int = 7,
    seed: int = 0,
    max_steps: int | None = None,
    name: str | None = None,
    verbose: bool = True,
) -> Path:
    """Train a reference model on a scan and save it as ``.keras`` + JSON sidecar (+ probe).

    Parameters
    ----------
    kind : {"pinn", "baseline"}
        Self-supervised physics-informed network, or supervised U-Net (needs ``objectGuess``).
    data : str or Path
        An NPZ scan (ingested into a temporary store) or a ptychozarr Zarr store.
    out : str or Path
        Directory for ``<name>.keras``, ``<name>.json`` and ``<name>.probe.npy``.
    epochs : int
        Passes over the training groups (or patterns).
    gridsize : int
        Group side for ``pinn`` (1 or 2, …); a baseline always has gridsize 1.
    batch_size : int
        Groups (or patterns) per step.
    learning_rate : float
        Adam step size.
    filters, depth : int
        Width and depth of the network (:func:`~ptychozarr.models.reference.build_pinn`).
    dose : float
        Mean photons per pattern of the data, for the PINN's Poisson likelihood.
    window : int
        Groups (or patterns) read from the store at once; the shuffle buffer.
    k : int
        Neighbours to draw group members from (``pinn`` with gridsize > 1).
    seed : int
        Seed of the grouping, the weights and the batch order.
    max_steps : int, optional
        Stop after this many steps in total (for quick tests).
    name : str, optional
        File stem; default ``pinn_gs<gridsize>_n<N>`` or ``baseline_n<N>``.
    verbose : bool
        Print one line per epoch.

    Returns
    -------
    Path
        The saved ``.keras`` file. Its sidecar's provenance holds the mean loss of every epoch.
    """
    import keras
    import tensorflow as tf

    from ptychozarr.grouping import group, normaliser
    from ptychozarr.io import open_dataset, open_store
    from ptychozarr.models.keras_model import save_keras
    from ptychozarr.models.reference import build_baseline, build_pinn

    if kind not in ("pinn", "baseline"):
        raise InvalidParameterError(f"kind={kind!r}: choose 'pinn' or 'baseline'")
    if kind == "baseline":
        gridsize = 1
    for label, value in (("epochs", epochs), ("gridsize", gridsize), ("batch_size", batch_size)):
        if value < 1:
            raise InvalidParameterError(f"{label}={value}: must be at least 1")
    if window < batch_size:
        raise InvalidParameterError(f"window={window} < batch_size={batch_size}: a window must hold a batch")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    data = Path(data)
    with tempfile.TemporaryDirectory(prefix="ptychozarr-train-") as tmp:
        store = _open_training_store(data, tmp)
        ds = open_dataset(store)
        diffraction = open_store(store)["data/diffraction"]
        n_pix = int(ds.sizes["det_y"])
        probe = ds["probeGuess"].values.astype(np.complex64)
        if kind == "pinn":
            unstored = ds.copy()
            unstored.attrs.pop("store")  # group in memory: training never writes into the data's store
            groups = group(unstored, gridsize=gridsize, k=k, seed=seed)
            members = groups["nn_indices"].values
            offsets = groups["offsets"].values.astype(np.float32)
            f = float(groups.attrs["normaliser"])
            network = build_pinn(n_pix, gridsize, filters=filters, depth=depth)
            log_gain = tf.Variable(np.log(f), dtype=tf.float32, name="log_gain")
            optimizer = keras.optimizers.Adam(learning_rate)
            step = _pinn_step(
                network, tf.constant(probe), log_gain, optimizer, np.sqrt(dose) / (n_pix / 2), gridsize
            )

            def run(batch):
                return step(_read(diffraction, members[batch], f), offsets[batch])
        else:
            from ptychozarr.simulate import extract_patches

            if "objectGuess" not in ds:
                raise InvalidParameterError(
                    f"{data}: a baseline trains on ground truth; the scan has no objectGuess"
                )
            members = np.arange(ds.sizes["pattern"])[:, None]
            f = normaliser(ds["diffraction"].data, members)
            pad = n_pix  # zero margin, so that any position's patch can be read
            obj = np.pad(ds["objectGuess"].values.astype(np.complex64), pad)
            xs = ds["xcoords"].values + pad
            ys = ds["ycoords"].values + pad
            network = build_baseline(n_pix, filters=filters, depth=depth)
            optimizer = keras.optimizers.Adam(learning_rate)
            step = _baseline_step(network, optimizer)

            def run(batch):
                truth = extract_patches(obj, xs[batch], ys[batch], n_pix)
                return step(
                    _read(diffraction, members[batch], f), np.abs(truth), np.angle(truth).astype(np.float32)
                )

        if len(members) < batch_size:
            raise InvalidParameterError(
                f"batch_size={batch_size} exceeds the {len(members)} training items; use a smaller batch"
            )
        losses, steps, t0 = [], 0, time.perf_counter()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for batch in _windows(len(members), window, batch_size, rng):
                total += float(run(batch))
                count += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            losses.append(total / max(count, 1))
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6g} ({time.perf_counter() - t0:.0f} s)")
            if max_steps is not None and steps >= max_steps:
                break

        spec = ModelSpec(
            kind=kind,
            N=n_pix,
            gridsize=gridsize,
            takes_positions=False,
            intensity_scale=None,
            output="amp_phase",
            name=name or (f"pinn_gs{gridsize}_n{n_pix}" if kind == "pinn" else f"baseline_n{n_pix}"),
        )
        provenance = {
            "trained_by": "ptychozarr.models.train",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "data": str(data),
            "parameters": {
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "filters": filters,
                "depth": depth,
                "dose": dose,
                "window": window,
                "k": k,
                "seed": seed,
                "max_steps": max_steps,
            },
            "normaliser": f,
            "steps": steps,
            "wall_s": round(time.perf_counter() - t0, 1),
            "loss_per_epoch": losses,
        }
        if kind == "pinn":
            provenance["gain"] = float(np.exp(log_gain.numpy()))
        return save_keras(network, spec, Path(out) / spec.name, probe=probe, provenance=provenance)
