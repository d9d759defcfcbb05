"""Adapter for ONNX models run by ONNX Runtime, with the same JSON sidecar as a ``.keras`` file.

Files of one model share a stem: ``<stem>.onnx`` (the graph) and ``<stem>.json`` (``{"spec": ModelSpec
fields, "provenance": {...}}``, :func:`~ptychozarr.models.keras_model.write_sidecar` writes it), and
optionally ``<stem>.probe.npy``.

The graph takes exactly what a Keras model takes, channels last: the diffraction batch ``(b, N, N, C)``
float32 and, when ``spec.takes_positions``, the offsets ``(b, 1, 2, C)`` float32 (inputs are matched by
shape, else by order). It gives what a Keras model gives: for ``output="amp_phase"`` two outputs,
amplitude then phase, each ``(b, N, N, 1)`` (or ``(b, N, N)``); for ``"complex"`` one output. A graph
with a fixed batch dimension is called with exactly that many rows (the last call zero-padded).

**Trust**: an ONNX file holds a graph of operators and tensors, never code; no custom-operator library is
ever registered, so a graph naming an operator ONNX Runtime does not have is refused when it loads, and
ONNX Runtime refuses external weight files outside the model's folder. The file is therefore always
loaded, like a ``.keras`` file in safe mode.

**Placement**: one :class:`onnxruntime.InferenceSession` per model per process (through the model cache
of :mod:`ptychozarr.inference`), on the CUDA execution provider when ONNX Runtime has it (the
``onnxruntime-gpu`` wheel; device 0 of those the process sees, as one worker per GPU arranges), else on
the CPU. ONNX Runtime is imported only here, and only when a model loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ptychozarr.errors import ModelMismatchError
from ptychozarr.models.base import ModelSpec, centre_crop
from ptychozarr.models.formats import ModelFormat
from ptychozarr.models.keras_model import read_sidecar, sidecar_path, write_sidecar

__all__ = ["OnnxFormat", "OnnxModel", "load_onnx", "save_onnx"]

_STATE: dict[str, Any] = {"threads": None}
_OOM = re.compile(
    r"out of memory|failed to allocate|bad[_ ]alloc|ALLOC_FAILED|cudaErrorMemoryAllocation"
    r"|smaller than requested|MemoryError",
    re.IGNORECASE,
)


def _ort():
    """The ``onnxruntime`` module, its default logger at errors only."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def providers() -> list:
    """Execution providers a session is given: CUDA (device 0 as this process sees them) when ONNX
    Runtime has it, then the CPU."""
    available = _ort().get_available_providers()
    chosen: list = []
    if "CUDAExecutionProvider" in available:
        chosen.append(
            ("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"})
        )
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxModel:
    """An ONNX Runtime session behind the :class:`~ptychozarr.models.base.Model` contract.

    Build it with :func:`load_onnx`. It pickles as its path (a copy in another process opens its own
    session).

    Attributes
    ----------
    spec : ModelSpec
    path : Path
    session : onnxruntime.InferenceSession
    provenance : dict
    probe : ndarray or None
    """

    format = "onnx"

    def __init__(self, path: Path, spec: ModelSpec, provenance: dict | None = None, probe=None):
        self.path = Path(path)
        self.spec = spec
        self.provenance = provenance or {}
        self.probe = probe
        self._open()

    def _open(self) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if _STATE["threads"]:
            options.intra_op_num_threads = options.inter_op_num_threads = int(_STATE["threads"])
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers())
        except MemoryError:
            raise
        except Exception as exc:  # ORT raises its own types for a damaged or unsupported graph
            raise ModelMismatchError(
                f"{self.path}: ONNX Runtime cannot load the model ({_first_line(exc)}); export it again"
            ) from exc
        self._bind()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("session", "_feeds", "_outputs")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def _bind(self) -> None:
        """Match the graph's inputs and outputs to the spec; refuse a graph that contradicts it."""
        spec, where = self.spec, self.path
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want_inputs = 2 if spec.takes_positions else 1
        want_outputs = 2 if spec.output == "amp_phase" else 1
        if len(inputs) != want_inputs or len(outputs) != want_outputs:
            raise ModelMismatchError(
                f"{where}: the graph has {len(inputs)} input(s) and {len(outputs)} output(s) but the sidecar "
                f"says takes_positions={spec.takes_positions}, output={spec.output!r}; fix the sidecar"
            )
        diffraction = (spec.N, spec.N, spec.channels)
        order = list(inputs)
        if (
            len(order) == 2
            and _fits(order[1].shape[1:], diffraction)
            and not _fits(order[0].shape[1:], diffraction)
        ):
            order.reverse()  # positions given first
        if not _fits(order[0].shape[1:], diffraction) or len(order[0].shape) != 4:
            raise ModelMismatchError(
                f"{where}: the graph takes diffraction of shape {tuple(order[0].shape[1:])} but the sidecar "
                f"says N={spec.N}, gridsize={spec.gridsize} (NHWC: {diffraction}); fix the sidecar, or "
                "export the graph channels last"
            )
        if len(order) == 2 and not _fits(order[1].shape[1:], (1, 2, spec.channels)):
            raise ModelMismatchError(
                f"{where}: the graph takes positions of shape {tuple(order[1].shape[1:])}, not "
                f"(1, 2, {spec.channels}); export it with the offsets input (b, 1, 2, C)"
            )
        for node in order:
            if node.type != "tensor(float)":
                raise ModelMismatchError(f"{where}: input {node.name!r} is {node.type}, not float32")
        self._feeds = [node.name for node in order]
        self._outputs = [node.name for node in outputs]
        batch = order[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def predict_batch(
        self, diffraction: np.ndarray, positions: np.ndarray | None, *, crop: int | None = None
    ) -> np.ndarray:
        """Predict one batch; see :class:`~ptychozarr.models.base.Model`. Outputs are cropped before
        amplitude and phase are combined."""
        x = np.ascontiguousarray(diffraction, dtype=np.float32)
        arrays = [x]
        if self.spec.takes_positions:
            if positions is None:
                positions = np.zeros((len(x), 1, 2, self.spec.channels), np.float32)
            arrays.append(np.ascontiguousarray(positions, dtype=np.float32))
        step = self.fixed_batch
        if step is None or step == len(x):
            return self._run(arrays, crop)
        side = self.spec.N if crop is None else crop
        out = np.empty((len(x), side, side), np.complex64)
        for start in range(0, len(x), step):
            part = [a[start : start + step] for a in arrays]
            k = len(part[0])
            if k < step:
                part = [np.concatenate([p, np.zeros((step - k, *p.shape[1:]), p.dtype)]) for p in part]
            out[start : start + k] = self._run(part, crop)[:k]
        return out

    def _run(self, arrays: list[np.ndarray], crop: int | None) -> np.ndarray:
        out = self.session.run(self._outputs, dict(zip(self._feeds, arrays, strict=True)))
        planes = [centre_crop(o[..., 0] if o.ndim == 4 else o, crop) for o in out]
        if self.spec.output == "amp_phase":
            amp, phase = planes
            return (amp * np.exp(1j * phase)).astype(np.complex64)
        return planes[0].astype(np.complex64)


def _fits(shape, want) -> bool:
    """Whether a graph's (possibly symbolic) shape agrees with ``want``: fixed sides equal, symbolic any."""
    shape = tuple(shape)
    return len(shape) == len(want) and all(
        not isinstance(s, int) or s == w for s, w in zip(shape, want, strict=True)
    )


def load_onnx(path: str | Path) -> OnnxModel:
    """Load an ``.onnx`` file and its sidecar into one ONNX Runtime session.

    Raises
    ------
    ModelMismatchError
        No or an invalid sidecar, a graph ONNX Runtime cannot load, or one whose inputs and outputs
        contradict the sidecar.
    """
    path = Path(path)
    spec, provenance = read_sidecar(path)
    probe_file = path.with_suffix(".probe.npy")
    probe = np.load(probe_file, allow_pickle=False) if probe_file.exists() else None
    return OnnxModel(path, spec, provenance, probe)


def save_onnx(model: bytes | Any, spec: ModelSpec, path: str | Path, probe=None, provenance=None) -> Path:
    """Write an ONNX model (serialised bytes or an ``onnx.ModelProto``) with its sidecar.

    Returns
    -------
    Path
        The ``.onnx`` file.
    """
    path = Path(path).with_suffix(".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes | bytearray) else model.SerializeToString()
    path.write_bytes(bytes(data))
    write_sidecar(path, spec, probe, provenance)
    return path


class OnnxFormat(ModelFormat):
    """An ``.onnx`` graph with its JSON sidecar, run by ONNX Runtime."""

    name = "onnx"
    suffixes = (".onnx",)
    describe = ".onnx file with its .json sidecar"

    def sniff(self, path: Path) -> bool:
        """A serialised ``ModelProto`` starts with its ``ir_version`` (field 1, a varint: byte 0x08) and
        has a sidecar."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(1)
        except OSError:
            return False
        return head == b"\x08" and sidecar_path(path).is_file()

    def read_spec(self, path: Path) -> ModelSpec:
        return read_sidecar(path)[0]

    def load(self, path: Path) -> OnnxModel:
        return load_onnx(path)

    def configure(self, threads: int | None) -> None:
        """Intra- and inter-op threads of the sessions this process opens (ORT's default otherwise)."""
        if threads:
            _STATE["threads"] = int(threads)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """An ONNX Runtime error (its pybind types) whose message says an allocation failed: the CPU
        arena's ``Failed to allocate memory``, CUDA's ``out of memory``, the BFC arena's ``Available
        memory … is smaller than requested bytes``, cuBLAS/cuDNN ``ALLOC_FAILED``."""
        module = type(exc).__module__ or ""
        return module.startswith("onnxruntime") and bool(_OOM.search(str(exc)))

    def device_peak(self, call: Callable[[], Any], device: str) -> int:
        """Device memory in use after ``call()`` on the GPU this process sees first (NVML; the arena
        keeps what a call took, so this is at least the call's peak; other processes on the same GPU
        count too)."""
        call()
        used = _nvml_used()
        if used is None:
            raise ModelMismatchError(
                "cannot measure the device memory of an ONNX model: NVML (libnvidia-ml.so.1) is not available"
            )
        return used

    def files(self, path: Path) -> list[Path]:
        extra = [sidecar_path(path), Path(path).with_suffix(".probe.npy")]
        return [Path(path), *(p for p in extra if p.exists())]


_NVML_LOCK = threading.Lock()


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_used() -> int | None:
    """Bytes used on the first GPU this process sees (``CUDA_VISIBLE_DEVICES``' first entry), via NVML."""
    with _NVML_LOCK:
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            handle = ctypes.c_void_p()
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            if first.isdigit():
                rc = nvml.nvmlDeviceGetHandleByIndex_v2(int(first), ctypes.byref(handle))
            else:
                rc = nvml.nvmlDeviceGetHandleByUUID(first.encode(), ctypes.byref(handle))
            info = _Memory()
            if rc != 0 or nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)) != 0:
                return None
            return int(info.used)
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
