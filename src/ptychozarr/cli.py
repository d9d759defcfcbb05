"""The ``ptychozarr`` command line: one subcommand per stage.

Each subcommand is a ``_cmd_<name>(args) -> int`` function registered in :func:`_build_parser`; add a
stage by adding both. Every failure is one line on stderr, with no traceback:

- bad input — any :class:`~ptychozarr.errors.PtychozarrError`, a missing path, or a file where a folder
  is needed (or the reverse) — exit code 2 (as argparse's own usage errors);
- a fault of the machine — disk full (ENOSPC, EDQUOT), the file-size limit (EFBIG: ``SIGXFSZ`` is
  ignored so that such a write fails instead of killing the process), a read-only file system (EROFS),
  no permission (EACCES, EPERM), or not enough memory — exit code 1, naming the path and what to free
  or fix. Nothing is marked complete by a failed run: the same command resumes it.

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from pathlib import Path

from ptychozarr import __version__
from ptychozarr.errors import InvalidParameterError, PtychozarrError
from ptychozarr.io.store import DEFAULT_CHUNK_BYTES
from ptychozarr.models.demo import DEMO_SCAN, TRAIN_SCAN
from ptychozarr.simulate import SPLITS, simulate

__all__ = ["describe", "main"]


def _cmd_simulate(args: argparse.Namespace) -> int:
    path = simulate(
        args.output,
        n_points=args.n_points,
        patch_size=args.patch_size,
        object_size=args.object_size,
        dose=args.dose,
        seed=args.seed,
        split=args.split,
        stored=args.stored,
        legacy=args.legacy,
    )
    print(f"{path}: {args.n_points} patterns of {args.patch_size}×{args.patch_size}, dose {args.dose:g}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ptychozarr.io import ingest, open_dataset

    if not 0 < args.chunk_mb < float("inf"):
        raise InvalidParameterError(f"--chunk-mb {args.chunk_mb:g}: give a positive number of MiB")
    store = ingest(args.input, args.output, overwrite=args.overwrite, chunk_bytes=int(args.chunk_mb * 2**20))
    print(describe(open_dataset(store)))
    return 0


def _cmd_group(args: argparse.Namespace) -> int:
    from ptychozarr.grouping import group
    from ptychozarr.io import open_dataset

    groups = group(open_dataset(args.store), args.gridsize, k=args.k, seed=args.seed)
    print(
        f"{args.store}: {groups.sizes['group']} groups of {groups.sizes['member']} "
        f"(gridsize {args.gridsize}, k {args.k}, seed {args.seed}), "
        f"normaliser f = {groups.attrs['normaliser']:.6g}"
    )
    return 0


# compare_models' flags that only worked around its own memory use: accepted, not needed here
_CHUNK_FLAGS = (
    "--pinn-chunk-size",
    "--baseline-chunk-size",
    "--pinn-predict-batch-size",
    "--baseline-predict-batch-size",
)
# compare_models' debugging flags, accepted with one line saying what they do here
_DEBUG_FLAGS = {
    "save_debug_images": "--save-debug-images: not supported, no MS-SSIM/FRC preprocessing images are "
    "written (the scored crops are in reconstructions_aligned.npz)",
    "baseline_debug_limit": "--baseline-debug-limit: not supported, every group is inferred "
    "(use --n-test-groups for a smaller run)",
    "baseline_debug_dir": "--baseline-debug-dir: not supported, no baseline_debug.npz is written "
    "(the Baseline's patches are in the store under arms/baseline)",
}


def _add_compare(sub) -> None:
    from ptychozarr.config import add_arguments

    p = sub.add_parser(
        "compare",
        help="run models on a scan, stitch, align and score them (compare_models, out of core)",
        description="PtychoPINN's compare_models out of core: infer per block, stitch, align, score, and "
        "write comparison_metrics.csv, FRC curves, comparison_plot.png, NPZs and run.json. The options are "
        "those of a study's [compare] table, with dashes for underscores. compare_models' command line is "
        "accepted as written (--pinn_dir, --baseline_dir, --test_data, --output_dir, --tike_recon_path, "
        "--p_min, …).",
    )
    inputs = p.add_argument_group("inputs")
    inputs.add_argument(
        "--test-data", "--test_data", required=True, type=Path, help="scan NPZ or ingested .zarr store"
    )
    inputs.add_argument(
        "--output-dir", "--output_dir", required=True, type=Path, help="where the store and files go"
    )
    inputs.add_argument(
        "--pinn-model",
        "--pinn-dir",
        "--pinn_dir",
        type=Path,
        help="PINN model: a .keras or .onnx with its sidecar, a wts.h5.zip, or a directory holding one "
        "(compare_models' --pinn_dir)",
    )
    inputs.add_argument(
        "--baseline-model",
        "--baseline-dir",
        "--baseline_dir",
        type=Path,
        help="Baseline model: a .keras or .onnx with its sidecar, a wts.h5.zip, or a directory holding one "
        "(compare_models' --baseline_dir)",
    )
    inputs.add_argument(
        "--model", action="append", default=[], metavar="LABEL=PATH", help="one more model arm (repeatable)"
    )
    inputs.add_argument(
        "--ptychi-recon",
        "--tike-recon-path",
        "--tike_recon_path",
        type=Path,
        help="iterative reconstruction NPZ, pty-chi or tike (compare_models' --tike_recon_path)",
    )
    compat = p.add_argument_group(
        "compare_models compatibility", "Accepted so that compare_models' command lines run unchanged."
    )
    for flag in _CHUNK_FLAGS:
        compat.add_argument(flag, type=int, help="not needed: the engine sizes its blocks by itself")
    compat.add_argument("--save-debug-images", action="store_true", help="not supported (one line says so)")
    compat.add_argument("--baseline-debug-limit", type=int, help="not supported (one line says so)")
    compat.add_argument("--baseline-debug-dir", type=Path, help="not supported (one line says so)")
    compat.add_argument("--verbose", action="store_true", help="debug lines on the console")
    compat.add_argument(
        "--console-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="console level (default INFO; ignored with --quiet or --verbose)",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_compare)


def _compat_lines(args) -> list[str]:
    """One line for each compare_models flag given that is not needed or not supported here."""
    lines = [
        f"{flag} is not needed here: the engine sizes its blocks by itself (see --block-groups and "
        "--memory-budget); ignored"
        for flag in _CHUNK_FLAGS
        if getattr(args, flag.strip("-").replace("-", "_")) is not None
    ]
    return lines + [line for name, line in _DEBUG_FLAGS.items() if getattr(args, name) not in (None, False)]


def _models(args) -> dict[str, Path]:
    models = {}
    if args.pinn_model:
        models["PtychoPINN"] = args.pinn_model
    if args.baseline_model:
        models["Baseline"] = args.baseline_model
    for item in args.model:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise InvalidParameterError(f"--model {item!r}: give LABEL=PATH")
        if label in models:
            raise InvalidParameterError(f"--model {item!r}: the label {label!r} is already used")
        models[label] = Path(path)
    return models


def _cmd_compare(args) -> int:
    from ptychozarr.config import CompareConfig, given_options
    from ptychozarr.pipeline import run_compare

    for line in _compat_lines(args):
        logging.getLogger("ptychozarr").warning("%s", line)
    _check_output_dir(args.output_dir)
    config = CompareConfig.from_options(
        args.test_data, _models(args), args.output_dir, args.ptychi_recon, given_options(args), where="flag"
    )
    result = run_compare(config)
    _print_result(result, quiet=config.run.quiet)
    return 1 if result.errors else 0


def _check_output_dir(path: Path) -> None:
    """Refuse an output folder that names a file (it is created when missing)."""
    if path.exists() and not path.is_dir():
        raise InvalidParameterError(f"--output-dir {path}: is a file; give a folder (created when missing)")


def _print_result(result, *, quiet: bool) -> None:
    """The metrics table and where the files are; with ``quiet`` only the arms' errors (on stderr)."""
    from ptychozarr.report import format_table

    for label, error in result.errors.items():
        print(f"warning: {label}: {error}", file=sys.stderr)
    if quiet:
        return
    print(format_table(result.arms))
    if "metrics_csv" in result.run["outputs"]:
        print(f"\nmetrics: {result.run['outputs']['metrics_csv']}")
    if "plot" in result.run["outputs"]:
        print(f"plot:    {result.run['outputs']['plot']}")
    print(f"store:   {result.store}")
    print(f"run:     {result.output_dir / 'run.json'}")


def _add_study(sub) -> None:
    from ptychozarr.study import EXAMPLE

    p = sub.add_parser(
        "study",
        help="run a grid of compares from a TOML config",
        description="Run every [[run]] of a study TOML into <output_dir>/dose_<dose>/<view>/<split>/ and "
        "write PtychoPINN's study files (comparison_manifest.json, metrics_summary.json/.md) with "
        "study_deltas.* and study_conditions.* beside them; print a summary table. The [compare] table "
        "takes the options of `ptychozarr compare` (underscores for dashes); an unknown key is refused "
        "before any run.",
        epilog="example study.toml:\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, help="the study TOML")
    p.add_argument(
        "--force", action="store_true", help="redo every comparison (default: reuse finished ones)"
    )
    p.add_argument("--quiet", action="store_true", help="print only errors (default: progress lines)")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args) -> int:
    from ptychozarr.report import format_study_table
    from ptychozarr.study import study

    runs = study(args.config, force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(format_study_table(runs))
    return 0 if all(r.status == "ok" for r in runs) else 1


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a reference PINN or Baseline model",
        description="Train a reference model on a scan (streamed from Zarr) and save .keras + JSON sidecar.",
    )
    p.add_argument("--kind", required=True, choices=("pinn", "baseline"), help="which reference model")
    p.add_argument("--data", required=True, type=Path, help="training scan NPZ or .zarr store")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    p.add_argument("--gridsize", type=int, default=2, help="group side of a PINN; C = gridsize² (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="groups per training step (default 16)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument(
        "--final-learning-rate",
        type=float,
        help="cosine-decay the learning rate to this by the last step (default: constant rate)",
    )
    p.add_argument("--threads", type=int, help="TensorFlow threads (default: all cores)")
    p.add_argument(
        "--start-from", type=Path, help="continue training a saved model of the same kind and size"
    )
    p.add_argument("--batch-norm", action="store_true", help="batch normalisation after each convolution")
    p.add_argument("--augment", action="store_true", help="random flips and transposes of each batch")
    p.add_argument("--filters", type=int, default=16, help="filters of the first layer (default 16)")
    p.add_argument("--depth", type=int, default=3, help="encoder levels (default 3)")
    p.add_argument("--dose", type=float, default=1e3, help="photons per pattern of the data (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batches (default 0)")
    p.add_argument("--name", help="model name (default: pinn_gs<G>_n<N> or baseline_n<N>)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from ptychozarr.models import train

    path = train(
        args.kind,
        args.data,
        args.out,
        epochs=args.epochs,
        gridsize=args.gridsize,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        final_learning_rate=args.final_learning_rate,
        threads=args.threads,
        start_from=args.start_from,
        batch_norm=args.batch_norm,
        augment=args.augment,
        filters=args.filters,
        depth=args.depth,
        dose=args.dose,
        seed=args.seed,
        name=args.name,
    )
    print(path)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate a scan and compare the shipped reference models on it",
        description="The main job on an embedded default: simulate a test split, compare the shipped "
        "N=64 reference PINN (gridsize 2) and Baseline on it, print the metrics and where the files are. "
        f"The scan is simulated at {DEMO_SCAN['dose']:.0e} photons per pattern (the study's is 1e3).",
    )
    p.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="(default demo_output)")
    p.add_argument(
        "--n-points",
        type=int,
        default=DEMO_SCAN["n_points"],
        help=f"scan positions (default {DEMO_SCAN['n_points']})",
    )
    p.add_argument("--train", action="store_true", help="train both models here instead (minutes)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of --train (default 3)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ptychozarr.models import demo_weights, train
    from ptychozarr.models.demo import describe_models
    from ptychozarr.pipeline import compare

    out = args.output_dir
    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    scan = out / "scan_test.npz"
    if not scan.exists():
        simulate(scan, **(DEMO_SCAN | {"n_points": args.n_points}))
    if not args.quiet:
        print(f"scan: {scan}")
    if args.train:
        train_scan = out / "scan_train.npz"
        if not train_scan.exists():
            simulate(train_scan, **TRAIN_SCAN)
        common = {
            "epochs": args.epochs,
            "dose": TRAIN_SCAN["dose"],
            "final_learning_rate": 1e-5,
            "augment": True,
            "verbose": not args.quiet,
        }
        models = {
            "PtychoPINN": train("pinn", train_scan, out / "models", gridsize=2, **common),
            "Baseline": train("baseline", train_scan, out / "models", **common),
        }
    else:
        models = {"PtychoPINN": demo_weights("pinn_gs2_n64"), "Baseline": demo_weights("baseline_n64")}
        if not args.quiet:
            print(describe_models())
    result = compare(scan, models, output_dir=out / "compare", quiet=args.quiet)
    _print_result(result, quiet=args.quiet)
    return 1 if result.errors else 0


def describe(ds) -> str:
    """A few lines summarising an ingested dataset (as :func:`ptychozarr.open_dataset` returns it)."""
    diffraction = ds["diffraction"]
    n, size = diffraction.shape[0], diffraction.shape[-1]
    lines = [
        f"{ds.attrs['store']}: {n} patterns of {size}×{size} {diffraction.dtype} "
        f"in chunks of {diffraction.data.chunksize[0]} patterns",
        f"  from {ds.attrs['source']} ({ds.attrs['source_size'] / 2**20:.1f} MiB, "
        f"key {ds.attrs['diffraction_key']!r}, layout {ds.attrs['diffraction_layout']})",
        f"  x in [{float(ds.xcoords.min()):.1f}, {float(ds.xcoords.max()):.1f}], "
        f"y in [{float(ds.ycoords.min()):.1f}, {float(ds.ycoords.max()):.1f}] px",
    ]
    if "objectGuess" in ds:
        lines.append(f"  ground truth objectGuess {ds.sizes['object_y']}×{ds.sizes['object_x']}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptychozarr", description="Out-of-core comparison of ptychography reconstruction models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = commands.add_parser(
        "simulate",
        help="write a synthetic scan following the study's data contract",
        description=(
            "Simulate a scan (structured object, defocused probe behind a diffuser, Poisson noise) into an "
            "NPZ file."
        ),
    )
    simulate.add_argument("output", type=Path, help="NPZ file to write")
    simulate.add_argument("--n-points", type=int, default=5216, help="positions in the file (default 5216)")
    simulate.add_argument("--patch-size", type=int, default=128, help="pattern size N (default 128)")
    simulate.add_argument("--object-size", type=int, default=464, help="object side in pixels (default 464)")
    simulate.add_argument("--dose", type=float, default=1e3, help="photons per pattern (default 1000)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of positions and noise (default 0)")
    simulate.add_argument("--split", choices=SPLITS, default="none", help="half of the object, split by y")
    simulate.add_argument("--stored", action="store_true", help="store members uncompressed (np.savez)")
    simulate.add_argument("--legacy", action="store_true", help="legacy key diff3d, (N,N,M) uint16 counts")
    simulate.set_defaults(func=_cmd_simulate)

    ingest = commands.add_parser(
        "ingest",
        help="stream an NPZ scan into a Zarr store",
        description="Validate an NPZ scan and stream it into a new Zarr v3 store, one block at a time.",
    )
    ingest.add_argument("input", type=Path, help="NPZ scan")
    ingest.add_argument("output", type=Path, help="Zarr store to create")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ingest.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_BYTES / 2**20,
        help=f"target MiB of a diffraction chunk (default {DEFAULT_CHUNK_BYTES / 2**20:g})",
    )
    ingest.set_defaults(func=_cmd_ingest)

    group = commands.add_parser(
        "group",
        help="group scan points with their neighbours",
        description="Draw seeded neighbour groups over the whole scan and store them with the normaliser.",
    )
    group.add_argument("store", type=Path, help="store made by `ptychozarr ingest`")
    group.add_argument(
        "--gridsize", type=int, default=2, help="group side; C = gridsize² members (default 2)"
    )
    group.add_argument("--k", type=int, default=7, help="nearest neighbours to draw from (default 7)")
    group.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    group.set_defaults(func=_cmd_group)
    for add in (_add_train, _add_compare, _add_study, _add_demo):
        add(commands)
    _COMMANDS.update(commands.choices)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> str:
    """One line for arguments the command does not take, with the nearest flag of that command."""
    from ptychozarr.config import suggest

    command = _COMMANDS.get(getattr(args, "command", None), parser)
    known = [s for action in command._actions for s in action.option_strings]
    first = next((a for a in extra if a.startswith("-")), extra[0])
    hint = suggest(first.split("=")[0], known) if first.startswith("-") else ""
    return f"{command.prog}: error: unrecognized arguments: {' '.join(extra)}{hint}"


_COMMANDS: dict[str, argparse.ArgumentParser] = {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptychozarr`` console script; returns the exit code.

    Errors the engine raises on purpose (:class:`~ptychozarr.errors.PtychozarrError`) and unknown flags
    are one line on stderr and exit code 2; faults of the machine (disk full, file-size limit, read-only
    or forbidden path, memory) are one line and exit code 1; Ctrl-C is one line and exit code 130 (the
    run resumes when the same command is given again).
    """
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(_unknown_flags(parser, args, extra), file=sys.stderr)
        return 2
    logger = logging.getLogger("ptychozarr")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("ptychozarr: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(_console_level(args))
    # Past the file-size limit (ulimit -f) the kernel sends SIGXFSZ, which kills the process unless
    # ignored; ignored, the write fails with EFBIG and becomes one line below.
    xfsz = getattr(signal, "SIGXFSZ", None)
    previous = signal.signal(xfsz, signal.SIG_IGN) if xfsz is not None else None
    prefix = f"ptychozarr {args.command}: error:"
    try:
        return args.func(args)
    except PtychozarrError as exc:
        cause = _machine_cause(exc)
        if cause is not None:  # a stage named the path; the fault is still the machine's
            print(f"{prefix} {_one_line(exc)}; {_fault_text(cause)[1]}", file=sys.stderr)
            return 1
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ptychozarr {args.command}: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"{prefix} {_out_of_memory(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        fault = _path_fault(exc, args)
        if fault is None:
            raise  # a bug: keep the traceback
        code, message = fault
        print(f"{prefix} {message}", file=sys.stderr)
        return code
    finally:
        if xfsz is not None:
            signal.signal(xfsz, previous)


class _Stderr(logging.StreamHandler):
    """The console's log handler: writes to ``sys.stderr`` as it is when a line is logged, not as it was
    when the handler was made, so that a caller who replaced stderr for one call (a redirect, a test's
    capture) leaves no handler writing to a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def _console_level(args: argparse.Namespace) -> int:
    """The console's logging level: --quiet, then --verbose, then --console-level (compare_models')."""
    if getattr(args, "quiet", False):
        return logging.ERROR
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return getattr(logging, getattr(args, "console_level", None) or "INFO")


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a multi-line message is joined)."""
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


def _out_of_memory(exc: MemoryError) -> str:
    what = _one_line(exc) if str(exc) else "an allocation failed"
    return (
        f"not enough memory for this run ({what}); lower --block-groups or --tile, set --memory-budget, "
        "and check the scan's positions (the object canvas spans their extent)"
    )


_FULL = (errno.ENOSPC, errno.EDQUOT)
_MACHINE = (*_FULL, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
_WORDED = (
    *_FULL,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
)  # faults whose fix holds however a stage words them
_IN_THE_WAY = (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)


def _chain(exc: BaseException | None):
    """The exception and those that caused it (``from`` or while handling), each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _machine_cause(exc: BaseException) -> OSError | None:
    """The first OSError of the machine (full disk, size limit, read-only, forbidden) in the chain."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _WORDED), None)


def _path_fault(exc: BaseException, args: argparse.Namespace) -> tuple[int, str] | None:
    """(exit code, one line) for an OSError of the machine or of a path in the way, found in the
    exception or what caused it; None for anything else (a bug)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and (
            e.errno in _MACHINE or (e.errno in _IN_THE_WAY and e.filename is not None)
        ):
            return _describe_fault(e, args)
    return None


def _output_of(args: argparse.Namespace) -> str:
    """Where the command writes, for a fault whose exception names no file."""
    for name in ("output_dir", "output", "out", "store"):
        value = getattr(args, name, None)
        if value is not None:
            return str(value)
    return "the output folder"


def _fault_text(exc: OSError) -> tuple[str, str]:
    """(what happened, what to do) for an OSError of the machine."""
    resume = "then run the same command again to resume"
    code = exc.errno
    if code in _FULL:
        what = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        return what, f"free space on that disk (or write to another one), {resume}"
    if code == errno.EFBIG:
        import resource  # POSIX only, as EFBIG from a file-size limit

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        now = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        return (
            f"file too large: past this process's file-size limit (ulimit -f, now {now}) or the file "
            "system's largest file",
            f"raise the limit (ulimit -f unlimited), {resume}",
        )
    if code == errno.EROFS:
        return "read-only file system", "write to a folder on a writable disk"
    if code == errno.EPERM:
        return (
            "operation not permitted (by the file system or the file's flags)",
            "give a path on a file system that allows it",
        )
    return "permission denied", "let this user write there (read, for an input) or give another path"


def _describe_fault(exc: OSError, args: argparse.Namespace) -> tuple[int, str]:
    path = exc.filename if exc.filename is not None else _output_of(args)
    code = exc.errno
    if code in _MACHINE:
        what, fix = _fault_text(exc)
        return 1, f"{path}: {what}; {fix}"
    if code == errno.EISDIR:
        return 2, f"{path}: is a folder where a file is needed; give a file"
    if code == errno.ENOENT:
        return 2, f"{path}: no such file or folder; check the path (and that its folder exists)"
    return 2, f"{path}: a file is in the way where a folder is needed; remove it or give another path"
