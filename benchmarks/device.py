"""The device check: one command on a machine with a GPU, its table in one file.

What it measures, each part in a fresh spawned process (as :func:`benchmarks._harness.measure`):

- **throughput**: per model, the engine's inference stage as the pipeline runs it (:func:`ptychozarr.infer`
  stored into Zarr, threaded scheduler) beside the bare framework call over the same inputs in memory
  (``predict_on_batch`` for Keras, ``InferenceSession.run`` for ONNX), the fastest of ``--repeat``. The
  models: the near-zero-cost 1×1-convolution pair of ``benchmarks/fastpath.py`` as Keras and as their ONNX
  twins (ONNX Runtime's CUDA provider when it has one, else the CPU; the row names the provider), and the
  shipped reference PINN and Baseline (``ptychozarr.models.demo_weights``). Patterns per second count
  the engine's patches.
- **device memory** (a GPU only): per model, the one-batch probe the memory plan projects with
  (``memory.probe_model`` on ``GPU:0``) against the device peak while the engine's whole inference stage
  runs (the model format's own measure: TensorFlow's peak, or NVML's memory in use for ONNX Runtime).
- **compare**: the whole comparison of the shipped models on the threaded scheduler and on ``cuda``
  (``dask_cuda.LocalCUDACluster``, one worker per GPU; skipped, saying why, when dask-cuda does not
  import or sees no GPU): wall time, inference stage, and run.json's ``memory`` section, projected
  against measured (``device``: ``projected.device`` against the largest worker's device peak).

Parts that would start after ``--deadline`` seconds are skipped and say so, so that the command ends in
time. The default size ends in a few minutes on one H100 (TensorFlow start-up included)::

    python -m benchmarks.device --out benchmarks/results/device.md     # also writes device.json

``--cpu-smoke`` runs every part at a tiny size on the CPU, to show that the script works (its figures
are no device figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks._harness import measure, ratio, table, write_json
from benchmarks.fastpath import _bare, _engine, make_models, onnx_twins

__all__ = ["main"]

GPU = "GPU:0"
GRIDSIZE = 2
DEFAULTS = {"points": 4096, "n": 128, "block_groups": 256, "batch_size": 64, "repeat": 3, "deadline": 420}
SMOKE = {"points": 48, "n": 32, "block_groups": 16, "batch_size": 8, "repeat": 1, "deadline": 600}

# No process takes the whole GPU when TensorFlow starts; spawned children inherit it.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


def _failed(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _mib(b) -> float | str:
    """Bytes in MiB; a note (a failure) as it is; ``–`` for none."""
    if isinstance(b, str):
        return b
    return round(b / 2**20, 1) if isinstance(b, int | float) else "–"


def _where(model, on_gpu: bool) -> str:
    """Where ``model`` runs: TensorFlow's device, or the ONNX session's first provider."""
    if getattr(model, "format", None) == "onnx":
        return model.session.get_providers()[0].removesuffix("ExecutionProvider")
    return GPU if on_gpu else "CPU"


def _probe(model, batch: int, device: str) -> int:
    """The plan's probe: one batch through ``model`` on ``device`` (as ``ptychozarr.plan`` projects)."""
    from ptychozarr import memory

    spec = model.spec
    shape = (min(batch, spec.max_batch or batch), spec.N, spec.N, spec.channels)
    if spec.takes_positions:
        return memory.probe_model(
            model.predict_batch, shape, (shape[0], 1, 2, spec.channels), device=device, model=model
        )
    return memory.probe_model(lambda x: model.predict_batch(x, None), shape, device=device, model=model)


def device_info() -> dict:
    """TensorFlow's GPUs, ONNX Runtime's providers and whether dask-cuda imports (in a child process)."""
    import onnxruntime

    from ptychozarr import _tf

    tf = _tf.tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return {
        "tensorflow": tf.__version__,
        "gpus": names,
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "dask_cuda": importlib.util.find_spec("dask_cuda") is not None,
    }


def run_throughput(
    scans: dict[int, str], models: dict[str, str], work: str, block_groups: int, batch: int, repeat: int
) -> dict:
    """Per model: engine and bare seconds (fastest of ``repeat``), where it ran, and on a GPU the plan's
    probe against the device peak of the engine's whole stage."""
    import dask

    from ptychozarr import _tf
    from ptychozarr.grouping import group
    from ptychozarr.inference import cached_model
    from ptychozarr.io import ingest, open_dataset
    from ptychozarr.models.formats import format_of_model

    on_gpu = bool(_tf.tensorflow().config.list_logical_devices("GPU"))
    prepared = {}
    for n, npz in scans.items():
        ds = open_dataset(ingest(npz, Path(work) / f"scan{n}.zarr", overwrite=True))
        prepared[n] = (ds, group(ds, GRIDSIZE, seed=0))
    out = {}
    for label, path in models.items():
        model = cached_model(path)
        spec = model.spec
        ds, groups = prepared[spec.N]
        shape = (batch, spec.N, spec.N, spec.channels)
        model.predict_batch(np.zeros(shape, np.float32), np.zeros((batch, 1, 2, spec.channels), np.float32))
        diffraction, nn = ds["diffraction"].values, groups["nn_indices"].values
        f = np.float32(groups.attrs["normaliser"])
        if spec.gridsize == 1:
            x = diffraction[np.unique(nn), ..., None] * f
        else:
            x = np.moveaxis(diffraction[nn], 1, -1) * f
        pos = None
        if spec.takes_positions:
            pos = np.swapaxes(groups["offsets"].values, 1, 2)[:, None].astype(np.float32)
        engine, bare, inputs = [], [], 0
        for _ in range(repeat):
            with dask.config.set(scheduler="threads"):
                seconds, inputs = _engine(ds, groups, path, block_groups, batch)
            engine.append(seconds)
            bare.append(_bare(model, x, pos, batch))
        del x, pos
        row = {"inputs": inputs, "engine": min(engine), "bare": min(bare), "where": _where(model, on_gpu)}
        if on_gpu:
            try:
                row["probe"] = _probe(model, batch, GPU)
                with dask.config.set(scheduler="threads"):
                    stage = partial(_engine, ds, groups, path, block_groups, batch)
                    row["stage_peak"] = format_of_model(model).device_peak(stage, GPU)
            except Exception as exc:  # e.g. no NVML for ONNX Runtime's measure: the row says so
                row["probe"], row["stage_peak"] = _failed(exc), None
        out[label] = row
    return out


def run_compare(npz: str, models: dict[str, str], output: str, scheduler: str) -> dict:
    """The whole comparison on ``scheduler``; its wall time and run.json's stages, memory and loads."""
    t0 = time.perf_counter()
    from ptychozarr.pipeline import compare

    compare(npz, models, output_dir=output, quiet=True, scheduler=scheduler, save_npz=False,
            save_npz_aligned=False)  # fmt: skip
    run = json.loads((Path(output) / "run.json").read_text())
    keep = ("stages", "memory", "model_loads", "errors")
    return {"wall": time.perf_counter() - t0, **{k: run.get(k) for k in keep}}


def _cuda_skip(info: dict) -> str | None:
    """Why the ``cuda`` scheduler cannot run here, or None."""
    if not info["dask_cuda"]:
        return "skipped: dask_cuda does not import (pip install 'ptychozarr[gpu]')"
    if not info["gpus"]:
        return "skipped: no GPU visible to TensorFlow"
    return None


def _compare_row(scheduler: str, run: dict) -> dict:
    mem = run["memory"]
    projected, measured, ratios = mem["projected"], mem["measured"], mem["ratio"]
    return {
        "scheduler": scheduler,
        "wall s": run["wall"],
        "infer s": sum(v for k, v in run["stages"].items() if k.startswith("infer")),
        "processes × threads": f"{projected['processes']} × {projected['threads']}",
        "projected peak MiB": _mib(projected["peak"]),
        "measured peak MiB": _mib(measured.get("peak")),
        "projected device MiB": _mib(projected.get("device")),
        "measured device MiB": _mib(measured.get("device")),
        "device measured / projected": ratios.get("device", "–"),
        "model loads": sum(run["model_loads"].values()) if run.get("model_loads") else "–",
        "errors": "; ".join(f"{k}: {v}" for k, v in (run.get("errors") or {}).items()) or "none",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, to show the script runs")
    parser.add_argument("--points", type=int, help=f"scan positions (default {DEFAULTS['points']})")
    parser.add_argument("--n", type=int, help=f"patch size of the 1×1 models (default {DEFAULTS['n']})")
    parser.add_argument("--block-groups", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeat", type=int, help="engine and bare alternated; the fastest kept")
    parser.add_argument("--deadline", type=float, help="seconds after which parts not begun are skipped")
    parser.add_argument("--out", default="device.md", help="markdown table (a .json beside it)")
    parser.add_argument("--workdir", help="where to keep data (default: a temporary folder)")
    args = parser.parse_args(argv)
    size = SMOKE if args.cpu_smoke else DEFAULTS
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children inherit: TensorFlow and ORT stay on the CPU
    t0 = time.monotonic()

    def late() -> str:
        """Why a part is skipped when it would begin after ``--deadline``, or ""."""
        spent = time.monotonic() - t0
        return f"skipped: {spent:.0f} s spent, past --deadline {args.deadline:g} s" * (spent > args.deadline)

    sections: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ptychozarr-device-", dir=args.workdir) as tmp:
        work = Path(tmp)
        info = measure(device_info).value
        sections["machine"] = [
            {"gpus": ", ".join(info["gpus"]) or "none", "tensorflow": info["tensorflow"],
             "onnxruntime": info["onnxruntime"], "ort providers": ", ".join(info["ort_providers"]),
             "dask_cuda": info["dask_cuda"], "smoke": args.cpu_smoke}
        ]  # fmt: skip
        fast = measure(make_models, work / "fast", args.n).value
        fast = {f"1×1 {k}": v for k, v in fast.items()}
        models = {**fast, **measure(onnx_twins, fast).value}
        from ptychozarr.models import demo_weights
        from ptychozarr.models.demo import DEMO_SCAN, SHIPPED
        from ptychozarr.simulate import simulate

        shipped = {f"shipped {k}": str(demo_weights(v)) for k, v in SHIPPED.items()}
        models |= shipped
        scans = {64: str(simulate(work / "scan64.npz", **(DEMO_SCAN | {"n_points": args.points})))}
        if args.n != 64:
            obj = max(256, 3 * args.n)
            scans[args.n] = str(
                simulate(work / f"scan{args.n}.npz", n_points=args.points, patch_size=args.n,
                         object_size=obj, split="test", seed=1)
            )  # fmt: skip

        rows, memory_rows = [], []
        arms = {}
        if reason := late():
            rows.append({"model": "all", "note": reason})
        else:
            try:
                arms = measure(
                    run_throughput, scans, models, str(work / "infer"), args.block_groups, args.batch_size,
                    args.repeat,
                ).value  # fmt: skip
            except Exception as exc:  # one part failing leaves the others to run
                rows.append({"model": "all", "note": _failed(exc)})
        if arms:
            for label, a in arms.items():
                rows.append(
                    {
                        "model": label,
                        "runs on": a["where"],
                        "patterns": a["inputs"],
                        "engine s": a["engine"],
                        "bare s": a["bare"],
                        "engine patterns/s": a["inputs"] / a["engine"] if a["engine"] else "–",
                        "bare patterns/s": a["inputs"] / a["bare"] if a["bare"] else "–",
                        "engine / bare": ratio(a["engine"], a["bare"]),
                    }
                )
                if "probe" in a:
                    memory_rows.append(
                        {
                            "model": label,
                            "runs on": a["where"],
                            "projected (one-batch probe) MiB": _mib(a["probe"]),
                            "measured (infer stage peak) MiB": _mib(a["stage_peak"]),
                            "measured / projected": ratio(a["stage_peak"], a["probe"])
                            if isinstance(a["probe"], int)
                            else "–",
                        }
                    )
        sections["throughput"] = rows
        sections["device memory"] = memory_rows or [{"note": "skipped: no GPU (device memory is per GPU)"}]

        compare_rows = []
        for scheduler in ("threads", "cuda"):
            reason = late() or (_cuda_skip(info) if scheduler == "cuda" else None)
            if reason:
                compare_rows.append({"scheduler": scheduler, "errors": reason})
                continue
            try:
                run = measure(
                    run_compare, scans[64], shipped, str(work / f"compare-{scheduler}"), scheduler
                ).value
                compare_rows.append(_compare_row(scheduler, run))
            except Exception as exc:
                compare_rows.append({"scheduler": scheduler, "errors": _failed(exc)})
        sections["compare"] = compare_rows

    wall = time.monotonic() - t0
    text = [f"# Device check ({'CPU smoke: not device figures' if args.cpu_smoke else 'device'})", ""]
    text.append(
        f"points {args.points}, 1×1 N {args.n}, shipped N 64, block {args.block_groups}, "
        f"batch {args.batch_size}, repeat {args.repeat}; {wall:.0f} s in all"
    )
    for name, section in sections.items():
        text += ["", f"## {name}", "", table(section)]
    markdown = "\n".join(text) + "\n"
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    write_json(
        str(out.with_suffix(".json")), "device",
        [{"section": name, **row} for name, section in sections.items() for row in section],
    )  # fmt: skip
    return sections


if __name__ == "__main__":
    main()
