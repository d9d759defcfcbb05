"""The engine beside a near-zero-cost model: what a GPU user waits for.

Two models of one 1×1 convolution per output (``.keras`` + sidecar, amplitude and phase): a gridsize-2
PINN-like arm taking positions and a gridsize-1 Baseline-like arm; and their ONNX twins (the same weights,
``.onnx`` + the same sidecar, run by ONNX Runtime on the CPU or CUDA), whose rows set the engine beside a
bare ``InferenceSession.run`` on the same inputs. The seed's size (5216 positions,
N=128), in random order (as ``ptychozarr simulate`` writes it) and in raster order (the same scan sorted
by position). Each variant runs in a fresh process:

- **infer**: per arm, the engine's inference stage as the pipeline runs it (:func:`ptychozarr.infer`
  stored into a Zarr array on the threaded scheduler) and, in the same process, the **bare**
  ``predict_on_batch`` of the network over the same inputs (held in memory, already normalised) at the
  same batch size, the last batch padded: the speed limit (``InferenceSession.run`` for an ONNX arm).
  The model is loaded and traced first; the two
  alternate ``--repeat`` times and the fastest of each is kept (robust to other load on the machine).
- **compare**: the whole :func:`ptychozarr.compare` on the NPZ; the stages from ``run.json`` and the wall
  time outside them, against the bare passes of both arms.

Targets: each arm's inference ≤ 1.25× bare; the work stages (ingest to score) ≤ 3× the bare passes of both
arms; outside them (start-up, imports, validation, planning with its model probe, report) ≤ 4 s. Usage::

    python -m benchmarks.fastpath --json benchmarks/results/fastpath.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._harness import measure, ratio, table, write_json

__all__ = ["main", "make_models", "onnx_twins"]

SEED_POINTS, N, GRIDSIZE, CROP, BLOCK, BATCH = 5216, 128, 2, 20, 256, 32
_OUTSIDE = ("validate", "plan", "report", "other", "total")
"""run.json entries that are not the work stages (ingest to score): checks, planning (which loads and probes
the models), writing the report, the rest, and the sum of all."""


def make_models(folder: Path, n: int = N, gridsize: int = GRIDSIZE) -> dict[str, str]:
    """The two near-zero-cost models, saved as ``.keras`` + sidecar; label → path."""
    import keras

    from ptychozarr.models import ModelSpec, save_keras

    def network(channels: int, positions: bool):
        x = keras.Input((n, n, channels))
        inputs = [x, keras.Input((1, 2, channels))] if positions else x
        amp, phase = keras.layers.Conv2D(1, 1)(x), keras.layers.Conv2D(1, 1)(x)
        return keras.Model(inputs, [amp, phase])

    pinn = ModelSpec("pinn", n, gridsize, True, None, "amp_phase", name="pinn-1x1")
    base = ModelSpec("baseline", n, 1, False, None, "amp_phase", name="baseline-1x1")
    return {
        "PtychoPINN": str(save_keras(network(gridsize**2, True), pinn, folder / "pinn")),
        "Baseline": str(save_keras(network(1, False), base, folder / "baseline")),
    }


def onnx_twins(models: dict[str, str]) -> dict[str, str]:
    """ONNX twins of :func:`make_models`' networks: the same weights, NHWC inputs transposed to NCHW
    around two 1×1 ``Conv`` nodes (the PINN twin keeps its unused positions input), the same sidecar;
    ``"<label> (onnx)"`` → path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ptychozarr.models import load_keras, save_onnx

    out = {}
    for label, path in models.items():
        model = load_keras(path)
        spec, network = model.spec, model.network
        c, b = spec.channels, "batch"
        convs = [layer for layer in network.layers if layer.__class__.__name__ == "Conv2D"]
        names = [o.name for o in network.outputs]
        inputs = [helper.make_tensor_value_info("diffraction", TensorProto.FLOAT, [b, spec.N, spec.N, c])]
        if spec.takes_positions:
            inputs.append(helper.make_tensor_value_info("positions", TensorProto.FLOAT, [b, 1, 2, c]))
        nodes = [helper.make_node("Transpose", ["diffraction"], ["x"], perm=[0, 3, 1, 2])]
        inits, outputs = [], []
        for i, conv in enumerate(convs):
            kernel, bias = conv.get_weights()
            inits += [
                numpy_helper.from_array(kernel.transpose(3, 2, 0, 1).astype(np.float32), f"w{i}"),
                numpy_helper.from_array(bias.astype(np.float32), f"b{i}"),
            ]
            nodes += [
                helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"]),
                helper.make_node("Transpose", [f"y{i}"], [f"out{i}"], perm=[0, 2, 3, 1]),
            ]
            outputs.append(
                helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [b, spec.N, spec.N, 1])
            )
        assert len(convs) == len(names) == 2, "make_models' networks: one 1×1 convolution per output"
        graph = helper.make_graph(nodes, spec.name, inputs, outputs, inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 9
        onnx.checker.check_model(proto)
        out[f"{label} (onnx)"] = str(save_onnx(proto, spec, Path(path).with_name(Path(path).stem + "_onnx")))
    return out


def prepare(folder: Path, points: int) -> dict[str, str]:
    """A simulated scan in random order and the same scan in raster order; order → NPZ."""
    from ptychozarr.simulate import simulate

    random = simulate(folder / "random.npz", n_points=points, patch_size=N, split="test", seed=1)
    with np.load(random) as f:
        members = {k: f[k] for k in f.files}
    raster = np.lexsort((members["xcoords"], np.round(members["ycoords"] / 8)))  # rows of 8 px, then x
    n = len(members["xcoords"])
    for k, v in members.items():
        if v.ndim and v.shape[0] == n and k not in ("objectGuess", "probeGuess"):
            members[k] = v[raster]
    np.savez(folder / "raster.npz", **members)
    return {"random": str(random), "raster": str(folder / "raster.npz")}


def _bare(model, x: np.ndarray, pos: np.ndarray | None, batch: int) -> float:
    """Seconds of the framework's own batch call over ``x`` in fixed batches (the last padded), inputs in
    memory: ``predict_on_batch`` for a Keras model, ``InferenceSession.run`` for an ONNX one."""
    if getattr(model, "format", None) == "onnx":
        session, feeds = model.session, model._feeds

        def call(inputs):
            arrays = inputs if isinstance(inputs, list) else [inputs]
            return session.run(None, dict(zip(feeds, arrays, strict=True)))
    else:
        call = model.network.predict_on_batch
    spent = 0.0
    for start in range(0, len(x), batch):
        xb = np.zeros((batch, *x.shape[1:]), np.float32)
        xb[: len(x[start : start + batch])] = x[start : start + batch]
        inputs = xb
        if pos is not None:
            pb = np.zeros((batch, *pos.shape[1:]), np.float32)
            pb[: len(pos[start : start + batch])] = pos[start : start + batch]
            inputs = [xb, pb]
        t0 = time.perf_counter()
        call(inputs)
        spent += time.perf_counter() - t0
    return spent


def run_infer(
    npz: str, models: dict[str, str], work: str, block_groups: int, batch: int, repeat: int
) -> dict:
    """Per arm: the engine's inference stage stored to Zarr and the bare passes over the same inputs,
    alternated ``repeat`` times; the fastest of each (the least disturbed by other load)."""
    import dask

    from ptychozarr.grouping import group
    from ptychozarr.inference import cached_model
    from ptychozarr.io import ingest, open_dataset

    store = ingest(npz, Path(work) / "scan.zarr", overwrite=True)
    ds = open_dataset(store)
    groups = group(ds, GRIDSIZE, seed=0)
    diffraction = ds["diffraction"].values
    nn = groups["nn_indices"].values
    f = np.float32(groups.attrs["normaliser"])
    out = {}
    for label, path in models.items():
        model = cached_model(path)
        spec = model.spec
        shape = (batch, N, N, spec.channels)
        model.predict_batch(np.zeros(shape, np.float32), np.zeros((batch, 1, 2, spec.channels), np.float32))
        if spec.gridsize == 1:
            x, pos = diffraction[np.unique(nn), ..., None] * f, None
        else:
            x = np.moveaxis(diffraction[nn], 1, -1) * f
            pos = np.swapaxes(groups["offsets"].values, 1, 2)[:, None].astype(np.float32)
        engine, bare = [], []
        for _ in range(repeat):
            with dask.config.set(scheduler="threads"):
                seconds, inputs = _engine(ds, groups, path, block_groups, batch)
            engine.append(seconds)
            bare.append(_bare(model, x, pos, batch))
        del x, pos
        out[label] = {"inputs": inputs, "engine": min(engine), "bare": min(bare)}
    return out


def _engine(ds, groups, path: str, block_groups: int, batch: int) -> tuple[float, int]:
    """Seconds of the inference stage as the pipeline runs it: plan, compute, store to Zarr."""
    import dask.array as da
    import zarr

    from ptychozarr.inference import infer

    t0 = time.perf_counter()
    result = infer(ds, groups, path, crop=CROP, block_groups=block_groups, batch_size=batch)
    patches = result["patches"].data
    target = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=patches.shape,
        dtype=patches.dtype,
        chunks=(patches.chunks[0][0], CROP, CROP),
    )
    da.store(patches, target, lock=False)
    return time.perf_counter() - t0, int(result.sizes["patch"])


def run_compare(npz: str, models: dict[str, str], output: str) -> dict:
    """The whole comparison; wall, stages and the time outside them."""
    t0 = time.perf_counter()
    from ptychozarr.pipeline import compare

    compare(npz, models, output_dir=output, quiet=True, save_npz=False, save_npz_aligned=False)
    wall = time.perf_counter() - t0
    stages = json.loads((Path(output) / "run.json").read_text())["stages"]
    return {"wall": wall, "stages": stages}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--points", type=int, default=SEED_POINTS)
    parser.add_argument("--orders", nargs="+", default=["random", "raster"], choices=["random", "raster"])
    parser.add_argument("--block-groups", type=int, default=BLOCK)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--repeat", type=int, default=3, help="engine and bare alternated; fastest kept")
    parser.add_argument("--skip-compare", action="store_true", help="measure the inference stage only")
    parser.add_argument(
        "--formats", nargs="+", default=["keras", "onnx"], choices=["keras", "onnx"], help="model formats"
    )
    parser.add_argument("--json")
    parser.add_argument("--workdir", help="where to keep data (default: a temporary folder)")
    args = parser.parse_args(argv)
    rows, stage_rows = [], []
    with tempfile.TemporaryDirectory(prefix="ptychozarr-fastpath-", dir=args.workdir) as tmp:
        work = Path(tmp)
        keras_models = measure(make_models, work).value
        models = dict(keras_models) if "keras" in args.formats else {}
        if "onnx" in args.formats:
            models.update(onnx_twins(keras_models))
        scans = prepare(work, args.points)
        for order in args.orders:
            arms = measure(
                run_infer,
                scans[order],
                models,
                str(work / f"infer-{order}"),
                args.block_groups,
                args.batch_size,
                args.repeat,
            ).value
            bare_total = sum(a["bare"] for a in arms.values())
            for label, a in arms.items():
                rows.append(
                    {
                        "order": order,
                        "arm": label,
                        "inputs": a["inputs"],
                        "engine infer s": a["engine"],
                        "bare s": a["bare"],
                        "infer / bare": ratio(a["engine"], a["bare"]),
                        "target": "≤ 1.25×",
                    }
                )
            if args.skip_compare:
                continue
            run = measure(run_compare, scans[order], models, str(work / f"compare-{order}")).value
            stages = run["stages"]
            inside = sum(v for k, v in stages.items() if k not in _OUTSIDE)
            stage_rows.append(
                {
                    "order": order,
                    **{k: float(v) for k, v in stages.items()},
                    "stages s": inside,
                    "bare both arms s": bare_total,
                    "stages / bare": ratio(inside, bare_total),
                    "outside stages s": run["wall"] - inside,
                    "wall s": run["wall"],
                }
            )
    print(table(rows))
    if stage_rows:
        print()
        print(table(stage_rows))
        print("\ntargets: stages / bare ≤ 3×, outside stages ≤ 4 s")
    if args.json:
        write_json(args.json, "fastpath", rows + stage_rows)
    return rows + stage_rows


if __name__ == "__main__":
    main()
