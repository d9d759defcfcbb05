"""Reference architectures and the differentiable forward model that trains the PINN.

Two networks, both Keras 3 functional models built from stock layers only (so a saved ``.keras`` file
loads without custom objects), both U-Nets returning ``[amplitude, phase]`` as two ``(b, N, N, 1)``
tensors:

- :func:`build_pinn` — from a group's ``C`` diffraction amplitudes and its members' offsets to the group's
  object patch (amplitude ``sigmoid``, phase ``π·tanh``). Given the known probe, its first layers are
  fixed physics: each pattern is propagated back to the object (:func:`back_propagated`, a first
  estimate of the illuminated patch, twin image included) and moved by minus its member's offset onto
  the group centre (:func:`moved_to_centre`); the U-Net then corrects aligned estimates locally. It is
  trained without ground truth: the predicted object is moved to each member's offset
  (:func:`translate`), multiplied by the probe and propagated to the far field (:func:`far_field`), and
  compared with the measured amplitudes through a Poisson negative log-likelihood (:func:`poisson_nll`).
- :func:`build_baseline` — a U-Net from one pattern (and, given the probe, its back-propagation) to its
  object patch, trained on ground-truth patches.

Frames are those of DESIGN.md: a pattern's offset is ``−(position − group centre)`` as ``(x, y)``, and
member ``c`` of a group sees the group object moved by its offset, i.e. ``member[r, s] =
group[r − t_y, s − t_x]`` with ``t`` the offset (content moves by ``+t``).
"""

from __future__ import annotations

import math

from ptychozarr import _tf

__all__ = [
    "back_propagated",
    "build_baseline",
    "build_pinn",
    "far_field",
    "moved_to_centre",
    "object_from_outputs",
    "poisson_nll",
    "propagation_matrices",
    "translate",
    "with_phase_gauge",
]


def _conv(x, filters: int, name: str, batch_norm: bool = False):
    """Two 3×3 convolutions with ReLU, each batch-normalised before its ReLU when ``batch_norm``."""
    keras = _tf.keras()

    for i in range(2):
        if batch_norm:
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
        else:
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv{i}")(x)
    return x


def _heads(x):
    """Amplitude (sigmoid) and phase (π·tanh) heads, one channel each."""
    keras = _tf.keras()

    amp = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="amplitude")(x)
    tanh = keras.layers.Conv2D(1, 3, padding="same", activation="tanh", name="phase_tanh")(x)
    phase = keras.layers.Rescaling(math.pi, name="phase")(tanh)
    return [amp, phase]


def _check_depth(N: int, depth: int) -> None:
    from ptychozarr.errors import InvalidParameterError

    if depth < 1 or N % (2**depth):
        raise InvalidParameterError(
            f"depth={depth} needs N divisible by 2**depth, got N={N}; choose a smaller depth"
        )


def _unet(inp, filters: int, depth: int, batch_norm: bool):
    """U-Net body: ``depth`` pooled stages, a bottleneck, and decoder stages fed the matching encoder's
    features (skip connections), so that detail finer than the bottleneck's cells reaches the heads."""
    keras = _tf.keras()

    x, skips = inp, []
    for level in range(depth):
        x = _conv(x, filters * 2**level, f"enc{level}", batch_norm)
        skips.append(x)
        x = keras.layers.MaxPooling2D(name=f"enc{level}_pool")(x)
    x = _conv(x, filters * 2**depth, "bottleneck", batch_norm)
    for level in reversed(range(depth)):
        x = keras.layers.UpSampling2D(name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_skip")([x, skips[level]])
        x = _conv(x, filters * 2**level, f"dec{level}", batch_norm)
    return x


def propagation_matrices(probe):
    """The two ``N×N`` complex matrices of the separable back-propagation of :func:`back_propagated`.

    Along each axis: the measured amplitude times the phase of the far field of the probe's central line
    (row for x, column for y), inverse FFT (zero frequency at ``N/2``), times the conjugate phase of that
    line. For a separable probe ``P[r, c] = p[r]·q[c]`` (the simulator's) this is exact: the phase of its
    2-D far field is the sum of its two lines' far-field phases, and its phase the sum of theirs (the
    constant each line carries from the other cancels). For another probe it is an approximation.

    Parameters
    ----------
    probe : ndarray, (N, N) complex

    Returns
    -------
    (ndarray, ndarray)
        ``My`` (rows) and ``Mx`` (columns), complex128: ``back = My · amplitude · Mxᵀ``.
    """
    import numpy as np

    n = probe.shape[0]

    def along(line):
        far = np.exp(1j * np.angle(np.fft.fftshift(np.fft.fft(line))))
        inverse = np.fft.ifft(np.fft.ifftshift(np.diag(far), axes=0), axis=0)
        return np.sqrt(n) * np.exp(-1j * np.angle(line))[:, None] * inverse

    return along(probe[:, n // 2]), along(probe[n // 2, :])


def back_propagated(amplitudes, probe):
    """Stock layers giving each pattern's wave back-propagated to the object, as real and imaginary parts.

    The far-field amplitude is given the phase of the probe's far field, propagated back (inverse FFT)
    and freed of the probe's phase, in a separable form (:func:`propagation_matrices`): a first estimate
    of the illuminated object: for a weakly scattering patch ``1 + δ``, ``1 + δ/2`` plus a twin term whose
    phase the probe's far field scrambles (a defocus alone would make it a coherent twin image; the
    simulator's diffuser turns it into speckle). Fixed ``Dense`` layers along each axis, so a saved
    network needs no custom code.

    Parameters
    ----------
    amplitudes : keras tensor, (b, N, N, C)
    probe : ndarray, (N, N) complex

    Returns
    -------
    keras tensor, (b, N, N, 2C)
        Real parts of the ``C`` patterns' estimates, then their imaginary parts.
    """
    keras = _tf.keras()
    import numpy as np

    n, c = probe.shape[0], amplitudes.shape[-1]
    my, mx = propagation_matrices(probe)
    along_x = keras.layers.Dense(2 * n, use_bias=False, trainable=False, name="backprop_x")
    along_y = keras.layers.Dense(2 * n, use_bias=False, trainable=False, name="backprop_y")
    x = keras.layers.Permute((3, 1, 2), name="backprop_channels_first")(amplitudes)  # (b, C, y, x)
    x = along_x(x)  # (b, C, y, [re x', im x'])
    x = keras.layers.Reshape((c, n, 2, n), name="backprop_split_x")(x)
    x = keras.layers.Permute((1, 4, 3, 2), name="backprop_rows_last")(x)  # (b, C, x', part, y)
    x = keras.layers.Reshape((c, n, 2 * n), name="backprop_join_y")(x)
    x = along_y(x)  # (b, C, x', [re y', im y'])
    x = keras.layers.Reshape((c, n, 2, n), name="backprop_split_y")(x)
    x = keras.layers.Permute((4, 2, 3, 1), name="backprop_channels_last")(x)  # (b, y', x', part, C)
    x = keras.layers.Reshape((n, n, 2 * c), name="backprop")(x)
    along_x.set_weights([np.concatenate([mx.T.real, mx.T.imag], axis=1).astype(np.float32)])
    r, i = my.T.real, my.T.imag  # rows: input y, columns: output y'
    along_y.set_weights([np.block([[r, i], [-i, r]]).astype(np.float32)])
    return x


MAX_SHIFT = 8
"""Largest member offset, in pixels along each axis, that :func:`moved_to_centre` moves (beyond: zeros)."""


def _hat_weights(positions, axis: int, features: int, members: int, name: str):
    """Per sample, channel and integer shift ``j``: the bilinear weight ``max(0, 1 − |t − j|)`` of the
    channel's member offset ``t`` along ``axis`` (0: x, 1: y), from fixed Dense layers and ReLUs.

    Returns a ``(b, 1, 1, features·S)`` tensor, channel-major, ``S = 2·MAX_SHIFT + 1`` shifts.
    """
    keras = _tf.keras()
    import numpy as np

    shifts = np.arange(-MAX_SHIFT, MAX_SHIFT + 1)
    s = len(shifts)
    flat = keras.layers.Flatten(name=f"{name}_offsets")(positions)  # (b, 2C): x of each member, then y
    signed = keras.layers.Dense(2 * features * s, activation="relu", trainable=False, name=f"{name}_signed")
    hat = keras.layers.Dense(features * s, activation="relu", trainable=False, name=f"{name}_hat")
    weights = hat(signed(flat))
    select = np.zeros((2 * members, features * s))
    for k in range(features):
        select[axis * members + k % members, k * s : (k + 1) * s] = 1
    bias = -np.tile(shifts, features).astype(np.float64)
    signed.set_weights(
        [
            np.concatenate([select, -select], 1).astype(np.float32),
            np.concatenate([bias, -bias]).astype(np.float32),
        ]
    )
    eye = np.eye(features * s)
    hat.set_weights([-np.concatenate([eye, eye]).astype(np.float32), np.ones(features * s, np.float32)])
    return keras.layers.Reshape((1, 1, features * s), name=f"{name}_weights")(weights)


def moved_to_centre(features, positions):
    """Each member's feature channels moved by minus its offset, onto the group's centre, in stock layers.

    Along x, then y: every integer shift ``j`` of ``−MAX_SHIFT … MAX_SHIFT`` from a fixed one-hot
    depthwise convolution (zero fill), weighted per sample by the bilinear weights of the member's offset
    (:func:`_hat_weights`) and summed: ``out[r, s] = feature[r + t_y, s + t_x]``, bilinear, the inverse of
    :func:`translate`.

    Parameters
    ----------
    features : keras tensor, (b, N, N, K)
        Channel ``k`` belongs to member ``k mod C``.
    positions : keras tensor, (b, 1, 2, C)
        Members' offsets ``(x, y)`` as the engine passes them (PtychoPINN's layout).

    Returns
    -------
    keras tensor, (b, N, N, K)
    """
    keras = _tf.keras()
    import numpy as np

    k, members = features.shape[-1], positions.shape[-1]
    s = 2 * MAX_SHIFT + 1
    x = features
    for axis, kernel_shape in ((0, (1, s)), (1, (s, 1))):
        name = f"centre_{'xy'[axis]}"
        shifted_layer = keras.layers.DepthwiseConv2D(
            kernel_shape,
            padding="same",
            depth_multiplier=s,
            use_bias=False,
            trainable=False,
            name=f"{name}_shifts",
        )
        shifted = shifted_layer(x)  # (b, N, N, K·S): channel-major, shift j = index − MAX_SHIFT
        kernel = np.zeros((*kernel_shape, k, s), np.float32)
        for j in range(s):
            kernel[(0, j) if axis == 0 else (j, 0)][:, j] = 1  # picks input[· + j − MAX_SHIFT]
        shifted_layer.set_weights([kernel])
        weighted = keras.layers.Multiply(name=f"{name}_weighted")(
            [shifted, _hat_weights(positions, axis, k, members, name)]
        )
        total = keras.layers.Conv2D(k, 1, use_bias=False, trainable=False, name=f"{name}_sum")
        x = total(weighted)
        total.set_weights([np.kron(np.eye(k), np.ones((s, 1)))[None, None].astype(np.float32)])
    return x


def build_pinn(
    N: int, gridsize: int, filters: int = 16, depth: int = 3, batch_norm: bool = False, probe=None
):
    """U-Net from a group's diffraction (and, given the probe, its back-propagation) to the group's patch.

    Parameters
    ----------
    N : int
        Pattern side.
    gridsize : int
        Group side; the input has ``gridsize**2`` channels.
    filters : int
        Filters of the first stage; each deeper stage doubles them.
    depth : int
        Number of 2× pooling stages (``N`` must be divisible by ``2**depth``).
    batch_norm : bool
        Batch-normalise every convolution before its ReLU (faster training).
    probe : ndarray, (N, N) complex, optional
        The known probe: the U-Net then also sees each pattern's back-propagated wave
        (:func:`back_propagated`), so that it corrects a first estimate of the object locally instead of
        inverting the propagation, which spans the whole probe, with small convolutions.

    Returns
    -------
    keras.Model
        Input ``(b, N, N, C)`` float32, outputs ``[amplitude, phase]``, each ``(b, N, N, 1)``.
    """
    keras = _tf.keras()

    _check_depth(N, depth)
    c = gridsize**2
    inp = keras.Input((N, N, c), name="diffraction")
    if probe is None:
        return keras.Model(
            inp, _heads(_unet(inp, filters, depth, batch_norm)), name=f"pinn_gs{gridsize}_n{N}"
        )
    positions = keras.Input((1, 2, c), name="positions")
    estimates = back_propagated(inp, probe)
    x = keras.layers.Concatenate(name="with_backprop")([inp, moved_to_centre(estimates, positions)])
    outputs = _heads(_unet(x, filters, depth, batch_norm))
    return keras.Model([inp, positions], outputs, name=f"pinn_gs{gridsize}_n{N}")


def build_baseline(N: int, filters: int = 16, depth: int = 3, batch_norm: bool = False, probe=None):
    """U-Net from one diffraction pattern to its object patch.

    Parameters
    ----------
    N : int
        Pattern side.
    filters, depth, batch_norm
        As in :func:`build_pinn`.
    probe : ndarray, (N, N) complex, optional
        The known probe: the U-Net then also sees the pattern's back-propagated wave
        (:func:`back_propagated`), as the PINN does.

    Returns
    -------
    keras.Model
        Input ``(b, N, N, 1)`` float32, outputs ``[amplitude, phase]``, each ``(b, N, N, 1)``.
    """
    keras = _tf.keras()

    _check_depth(N, depth)
    inp = keras.Input((N, N, 1), name="diffraction")
    x = (
        inp
        if probe is None
        else keras.layers.Concatenate(name="with_backprop")([inp, back_propagated(inp, probe)])
    )
    return keras.Model(inp, _heads(_unet(x, filters, depth, batch_norm)), name=f"baseline_n{N}")


def with_phase_gauge(network, probe):
    """The network with its phase shifted to zero mean under the probe's intensity ``|P|²``.

    A far-field pattern does not change when its patch's phase changes by a constant, so the PINN's loss
    leaves each patch's mean phase free, and patches stitched side by side disagree by those constants.
    This output stage fixes the constant (stock layers: a fixed ``N×N`` convolution with weights
    ``|P|²/Σ|P|²``, spread back and subtracted); it changes neither the loss nor its gradients. A network
    that has the stage already is returned as it is.

    Parameters
    ----------
    network : keras.Model
        Outputs ``[amplitude, phase]``, each ``(b, N, N, 1)``.
    probe : ndarray, (N, N) complex

    Returns
    -------
    keras.Model
    """
    keras = _tf.keras()
    import numpy as np

    if any(layer.name == "phase_gauge" for layer in network.layers):
        return network
    n = probe.shape[0]
    weights = np.abs(probe) ** 2
    amplitude, phase = network.outputs
    mean_layer = keras.layers.Conv2D(1, n, use_bias=False, trainable=False, name="phase_gauge_mean")
    mean = mean_layer(phase)
    mean_layer.set_weights([(weights / weights.sum()).astype(np.float32)[:, :, None, None]])
    spread = keras.layers.UpSampling2D(size=n, name="phase_gauge_spread")(mean)
    gauged = keras.layers.Subtract(name="phase_gauge")([phase, spread])
    inputs = network.inputs[0] if len(network.inputs) == 1 else network.inputs
    return keras.Model(inputs, [amplitude, gauged], name=network.name)


def object_from_outputs(amplitude, phase):
    """Complex object ``(b, N, N)`` from the networks' ``(b, N, N, 1)`` amplitude and phase tensors."""
    tf = _tf.tensorflow()

    amp = tf.cast(amplitude[..., 0], tf.float32)
    ph = tf.cast(phase[..., 0], tf.float32)
    return tf.complex(amp * tf.cos(ph), amp * tf.sin(ph))


def translate(images, shifts):
    """Bilinear translation with zero fill: ``out[r, s] = images[r − t_y, s − t_x]``.

    Parameters
    ----------
    images : tf.Tensor, (b, H, W, k) float32
    shifts : tf.Tensor, (b, 2) float32
        ``t = (t_x, t_y)`` per image; content moves by ``+t`` (columns by x, rows by y).

    Returns
    -------
    tf.Tensor, (b, H, W, k) float32
    """
    tf = _tf.tensorflow()

    b = tf.shape(images)[0]
    one, zero = tf.ones((b,), tf.float32), tf.zeros((b,), tf.float32)
    transforms = tf.stack([one, zero, -shifts[:, 0], zero, one, -shifts[:, 1], zero, zero], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def far_field(obj, probe, offsets=None):
    """Far-field amplitude ``|fftshift(fft2(P · O_c))| / N`` of each member of each group.

    Parameters
    ----------
    obj : tf.Tensor, (b, N, N) complex64
        One object patch per group, centred on the group centre.
    probe : tf.Tensor, (N, N) complex64
    offsets : tf.Tensor, (b, C, 2) float32, optional
        Members' offsets ``−(position − centre)``, ``(x, y)``; None for single patterns.

    Returns
    -------
    tf.Tensor, (b, N, N, C) float32
        Amplitudes in the simulator's convention (unnormalised FFT, divided by N, zero frequency centred).
    """
    tf = _tf.tensorflow()

    n = tf.shape(obj)[1]
    if offsets is None:
        members = obj[:, None]
    else:
        c = tf.shape(offsets)[1]
        parts = tf.stack([tf.math.real(obj), tf.math.imag(obj)], axis=-1)  # (b, N, N, 2)
        parts = tf.repeat(parts, c, axis=0)  # (b·C, N, N, 2), batch-major then member
        moved = translate(parts, tf.reshape(offsets, (-1, 2)))
        members = tf.reshape(tf.complex(moved[..., 0], moved[..., 1]), (-1, c, n, n))
    field = tf.signal.fft2d(members * tf.cast(probe, tf.complex64)[None, None])
    amp = tf.abs(tf.signal.fftshift(field, axes=(2, 3))) / tf.cast(n, tf.float32)
    return tf.transpose(amp, (0, 2, 3, 1))


def poisson_nll(predicted, measured, count_scale: float):
    """Mean Poisson negative log-likelihood of measured amplitudes given predicted ones.

    Counts are ``(count_scale · amplitude)²``; the constant ``log k!`` term is left out.

    Parameters
    ----------
    predicted, measured : tf.Tensor, same shape, float32
        Amplitudes.
    count_scale : float
        Factor from amplitude to the square root of photon counts.
    """
    tf = _tf.tensorflow()

    rate = tf.square(count_scale * predicted)
    counts = tf.square(count_scale * measured)
    return tf.reduce_mean(rate - counts * tf.math.log(rate + 1e-8))
