"""Training of the reference models, streaming batches from a Zarr store.

Batches come from windows of consecutive groups (or patterns): each window's patterns are read from the
Zarr diffraction with one orthogonal selection, shuffled, and cut into batches; windows are visited in a
new random order every epoch. Memory depends on the window, never on the scan.

- ``kind="pinn"``: no ground truth. The network (:func:`~ptychozarr.models.reference.build_pinn`, built
  with the store's probe) takes the group's patterns and its members' offsets in the engine's layout
  ``(b, 1, 2, C)`` (its spec has ``takes_positions``). Its object is moved to each member's offset,
  multiplied by the store's probe and propagated (:func:`~ptychozarr.models.reference.far_field`); a
  trainable gain
  (initialised to the grouping's normaliser ``f``, which maps the simulator's ``|FFT|/N`` onto normalised
  amplitudes) scales the result, and the Poisson negative log-likelihood is taken in photon counts
  ``(sqrt(dose)/(N/2) · amplitude)²`` (the normalised data holds ``dose`` photons per pattern on average).
  The saved network fixes the free mean phase of each patch
  (:func:`~ptychozarr.models.reference.with_phase_gauge`).
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
from tqdm.auto import tqdm

from ptychozarr import _tf
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


def _steps(n_items: int, epochs: int, window: int, batch_size: int) -> int:
    """Steps in ``epochs`` passes of :func:`_windows` (each window drops its incomplete batch)."""
    full, rest = divmod(n_items, window)
    return epochs * (full * (window // batch_size) + rest // batch_size)


def _adam(learning_rate: float, final_learning_rate: float | None, steps: int):
    """Adam at a constant step size, or decaying along a cosine to ``final_learning_rate``."""
    keras = _tf.keras()

    if final_learning_rate is None:
        return keras.optimizers.Adam(learning_rate)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(steps, 1), alpha=final_learning_rate / learning_rate
    )
    return keras.optimizers.Adam(schedule)


def _network(start_from, kind: str, n_pix: int, gridsize: int, build) -> tuple:
    """A fresh network from ``build()``, or the one saved at ``start_from`` with its provenance."""
    if start_from is None:
        return build(), {}
    from ptychozarr.models.keras_model import load_keras

    model = load_keras(start_from)
    spec = model.spec
    if (spec.kind, spec.N, spec.gridsize) != (kind, n_pix, gridsize):
        raise InvalidParameterError(
            f"start_from={start_from}: a {spec.kind} of N={spec.N}, gridsize {spec.gridsize}, not the "
            f"{kind} of N={n_pix}, gridsize {gridsize} being trained; give a model of the same kind"
        )
    if kind == "pinn" and not spec.takes_positions:
        raise InvalidParameterError(
            f"start_from={start_from}: a PINN without the members' offsets as input (an older "
            "architecture); train a new one instead"
        )
    return model.network, model.provenance


def _reflect(image: np.ndarray, axis: int) -> np.ndarray:
    """``image[(N − i) mod N]`` along ``axis``: the reflection about the centre pixel ``N/2``."""
    return np.roll(np.flip(image, axis), 1, axis)


def _dihedral(rng: np.random.Generator, images: list[np.ndarray], offsets: np.ndarray | None = None):
    """One random symmetry of the square, applied to a batch's patterns, object patches and offsets.

    The probe (:func:`~ptychozarr.simulate.make_probe`) is symmetric under the reflections about its
    centre pixel ``N/2`` and under the transpose, and a far-field amplitude of the reflected (transposed)
    exit wave is the reflected (transposed) amplitude; so each image, whose axes 1 and 2 are rows and
    columns, is transformed alike, and a member's offset ``(x, y)`` changes sign with its axis and swaps
    with the transpose. The result is another exact training example.
    """
    flip_rows, flip_cols, transpose = rng.integers(0, 2, size=3).astype(bool)
    offsets = None if offsets is None else offsets.copy()
    for flip, axis in ((flip_rows, 1), (flip_cols, 2)):
        if flip:
            images = [_reflect(image, axis) for image in images]
            if offsets is not None:
                offsets[..., 2 - axis] *= -1  # axis 1 (rows) is y, axis 2 (columns) is x
    if transpose:
        images = [np.swapaxes(image, 1, 2) for image in images]
        if offsets is not None:
            offsets = offsets[..., ::-1]
    return images, offsets


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
    tf = _tf.tensorflow()

    from ptychozarr.models.reference import far_field, object_from_outputs, poisson_nll

    @tf.function(reduce_retracing=True)
    def step(x, offsets):
        positions = tf.transpose(offsets, (0, 2, 1))[:, None]  # the engine's layout, (b, 1, 2, C)
        with tf.GradientTape() as tape:
            obj = object_from_outputs(*network([x, positions], training=True))
            pred = tf.exp(log_gain) * far_field(obj, probe, offsets if gridsize > 1 else None)
            loss = poisson_nll(pred, x, count_scale)
        variables = network.trainable_variables + [log_gain]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return step


def _baseline_step(network, optimizer):
    tf = _tf.tensorflow()

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
    final_learning_rate: float | None = None,
    threads: int | None = None,
    batch_norm: bool = False,
    start_from: str | Path | None = None,
    augment: bool = False,
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
        Adam step size (at the start, when ``final_learning_rate`` is given).
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
        Show a progress bar over each epoch's steps and print one line per epoch.
    final_learning_rate : float, optional
        Decay the step size from ``learning_rate`` to this value along a cosine over all the steps;
        None keeps it constant.
    batch_norm : bool
        Batch-normalise the network's convolutions (:func:`~ptychozarr.models.reference.build_pinn`).
    start_from : str or Path, optional
        A saved model of the same kind and shape (``.keras`` with sidecar) to continue training from,
        its weights and (PINN) gain; ``filters``, ``depth`` and ``batch_norm`` are then its own.
    threads : int, optional
        TensorFlow intra- and inter-op threads (set before TensorFlow initialises; ignored after).
    augment : bool
        Apply a random symmetry of the square (reflections about the centre pixel, transpose) to each
        batch, exact for a probe with those symmetries such as the simulator's: eight times the views of
        the training object.

    Returns
    -------
    Path
        The saved ``.keras`` file. Its sidecar's provenance holds the mean loss of every epoch.
    """
    keras = _tf.keras()
    tf = _tf.tensorflow()

    from ptychozarr.grouping import group, normaliser
    from ptychozarr.io import open_dataset, open_store
    from ptychozarr.models.keras_model import save_keras
    from ptychozarr.models.reference import build_baseline, build_pinn, with_phase_gauge

    if kind not in ("pinn", "baseline"):
        raise InvalidParameterError(f"kind={kind!r}: choose 'pinn' or 'baseline'")
    if kind == "baseline":
        gridsize = 1
    counts = {"epochs": epochs, "gridsize": gridsize, "batch_size": batch_size, "filters": filters,
              "depth": depth, "window": window, "k": k}  # fmt: skip
    if threads is not None:
        counts["threads"] = threads
    if max_steps is not None:
        counts["max_steps"] = max_steps
    for label, value in counts.items():
        if value < 1:
            raise InvalidParameterError(f"{label}={value}: must be at least 1")
    for label, value in (("learning_rate", learning_rate), ("dose", dose)):
        if not 0 < value < float("inf"):
            raise InvalidParameterError(f"{label}={value}: must be a positive number")
    if final_learning_rate is not None and not 0 < final_learning_rate <= learning_rate:
        raise InvalidParameterError(
            f"final_learning_rate={final_learning_rate}: must lie in (0, learning_rate={learning_rate}]"
        )
    if window < batch_size:
        raise InvalidParameterError(f"window={window} < batch_size={batch_size}: a window must hold a batch")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already runs: keep its pools
            pass
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
            network, start = _network(
                start_from,
                kind,
                n_pix,
                gridsize,
                lambda: build_pinn(n_pix, gridsize, filters, depth, batch_norm, probe=probe),
            )
            log_gain = tf.Variable(np.log(start.get("gain", f)), dtype=tf.float32, name="log_gain")
            optimizer = _adam(
                learning_rate, final_learning_rate, _steps(len(members), epochs, window, batch_size)
            )
            step = _pinn_step(
                network, tf.constant(probe), log_gain, optimizer, np.sqrt(dose) / (n_pix / 2), gridsize
            )

            def run(batch):
                x, shifts = [_read(diffraction, members[batch], f)], offsets[batch]
                if augment:
                    x, shifts = _dihedral(rng, x, shifts)
                return step(x[0], shifts)
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
            network, _ = _network(
                start_from,
                kind,
                n_pix,
                1,
                lambda: build_baseline(n_pix, filters, depth, batch_norm, probe=probe),
            )
            optimizer = _adam(
                learning_rate, final_learning_rate, _steps(len(members), epochs, window, batch_size)
            )
            step = _baseline_step(network, optimizer)

            def run(batch):
                truth = extract_patches(obj, xs[batch], ys[batch], n_pix)
                images = [_read(diffraction, members[batch], f), np.abs(truth), np.angle(truth)]
                if augment:
                    images, _ = _dihedral(rng, images)
                x, amp, phase = images
                return step(x, amp, phase.astype(np.float32))

        if len(members) < batch_size:
            raise InvalidParameterError(
                f"batch_size={batch_size} exceeds the {len(members)} training items; use a smaller batch"
            )
        losses, steps, t0 = [], 0, time.perf_counter()

        def save() -> Path:
            spec = ModelSpec(
                kind=kind,
                N=n_pix,
                gridsize=gridsize,
                takes_positions=kind == "pinn",
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
                    "start_from": None if start_from is None else str(start_from),
                    "max_steps": max_steps,
                    "final_learning_rate": final_learning_rate,
                    "batch_norm": batch_norm,
                    "augment": augment,
                },
                "normaliser": f,
                "steps": steps,
                "wall_s": round(time.perf_counter() - t0, 1),
                "loss_per_epoch": losses,
            }
            if kind == "pinn":
                provenance["gain"] = float(np.exp(log_gain.numpy()))
            saved = with_phase_gauge(network, probe) if kind == "pinn" else network
            return save_keras(saved, spec, Path(out) / spec.name, probe=probe, provenance=provenance)

        per_epoch = _steps(len(members), 1, window, batch_size)
        for epoch in range(epochs):
            total, count = 0.0, 0
            bar = tqdm(
                _windows(len(members), window, batch_size, rng),
                total=per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="step",
                disable=not verbose,
                leave=False,
            )
            for batch in bar:
                total += float(run(batch))
                count += 1
                steps += 1
                bar.set_postfix(loss=f"{total / count:.5g}", refresh=False)
                if max_steps is not None and steps >= max_steps:
                    break
            bar.close()
            losses.append(total / max(count, 1))
            path = save()  # every epoch: an interrupted training keeps its last finished epoch
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6g} ({time.perf_counter() - t0:.0f} s)")
            if max_steps is not None and steps >= max_steps:
                break

        return path
