"""Right or refused: every bad input and every fault of the machine is one line on stderr, never a traceback.

Bad input (a file that breaks its contract, a path in the way) is exit code 2 before any work; a fault of
the machine (disk full, file-size limit, read-only or forbidden folder, memory) is exit code 1 naming the
path and what to free. The bad files are made here by small generators; nothing planted in them may run.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from ptychozarr import cli
from ptychozarr.cli import main
from ptychozarr.errors import InvalidScanError, ModelMismatchError
from ptychozarr.models import ModelSpec, build_baseline, build_pinn, read_spec, save_keras
from ptychozarr.models.keras_model import load_keras
from ptychozarr.stages.infer import attempt_seconds
from ptychozarr.stages.iterative import check_metadata, read_reconstruction

M = 8
FLAGS = ["--stitch-crop-size", str(M), "--block-groups", "96", "--skip-registration", "--quiet"]
LOG_PREFIX = "ptychozarr: "  # the CLI's logging lines (none at --quiet unless an error is logged)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny gridsize-2 PINN and a tiny Baseline for the 32×32 scan (untrained)."""
    import keras

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("hostile-models")
    pinn = ModelSpec("pinn", 32, 2, False, None, "amp_phase", name="tiny-pinn")
    base = ModelSpec("baseline", 32, 1, False, None, "amp_phase", name="tiny-baseline")
    return {
        "pinn": save_keras(build_pinn(32, 2, filters=4, depth=2), pinn, folder / "pinn"),
        "baseline": save_keras(build_baseline(32, filters=4, depth=2), base, folder / "baseline"),
    }


def _error_lines(err: str) -> list[str]:
    """stderr without the CLI's log lines and TensorFlow's start-up chatter."""
    noise = (LOG_PREFIX, "WARNING: All log messages", "I0000", "W0000", "E0000", "To enable the following")
    return [line for line in err.splitlines() if line.strip() and not line.startswith(noise)]


def _one_line(err: str, needle: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _in_process(capsys, argv, code: int, needle: str) -> str:
    assert main([str(a) for a in argv]) == code
    return _one_line(capsys.readouterr().err, needle)


def _cli(args, *, preexec_fn=None, wrap=(), env=None):
    return subprocess.run(
        [*wrap, sys.executable, "-m", "ptychozarr", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
        env={**os.environ, **(env or {})},
    )


def _compare(npz, model, out, *extra):
    return ["compare", "--test-data", npz, "--pinn-model", model, "--output-dir", out, *FLAGS, *extra]


# -- generators of bad model files -------------------------------------------------------------------


def _with_sidecar(path: Path, spec_from: Path) -> Path:
    shutil.copy(spec_from.with_suffix(".json"), path.with_suffix(".json"))
    return path


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    """Copy a .keras archive with its config.json edited by ``edit(config)``."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _lambda_model(folder: Path, function, name: str) -> Path:
    """A 32×32, C=4 network with a Lambda layer (amp and phase outputs), saved as ``name.keras``."""
    import keras

    inp = keras.Input((32, 32, 4))
    x = keras.layers.Lambda(function)(inp)
    net = keras.Model(inp, [keras.layers.Conv2D(1, 1)(x), keras.layers.Conv2D(1, 1)(x)])
    path = folder / f"{name}.keras"
    net.save(path)
    return path


def _planted(folder: Path) -> Path:
    return folder / "PLANTED_CODE_RAN"


def bad_model(kind: str, folder: Path, good: Path) -> Path:
    """A model file of ``kind`` beside a copy of ``good``'s sidecar; planted code touches _planted()."""
    marker = _planted(folder)
    path = folder / f"{kind}.keras"
    if kind == "named_lambda":

        def double(x):  # saved by name only: Keras would look the name up at load time
            return x * 2

        path = _lambda_model(folder, double, kind)
    elif kind == "bytecode_lambda":
        path = _lambda_model(folder, lambda x: x * 3, kind)  # its bytecode is stored in the file
    elif kind == "os_system_lambda":

        def to_os_system(config):
            for layer in config["config"]["layers"]:
                if layer["class_name"] == "Lambda":
                    layer["config"]["function"] = {
                        "module": "os", "class_name": "function", "config": "system",
                        "registered_name": "function",
                    }  # fmt: skip
                    layer["config"]["arguments"] = {"command": f"touch {marker}"}

        _rewrite_config(_lambda_model(folder, lambda x: x, "plain"), path, to_os_system)
    elif kind == "os_system_activation":

        def to_activation(config):
            conv = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
            conv["config"]["activation"] = {
                "module": "os",
                "class_name": "function",
                "config": "system",
                "registered_name": "function",
            }

        _rewrite_config(good, path, to_activation)
    elif kind == "bundle_renamed":
        with zipfile.ZipFile(path, "w") as zf:
            for member in (
                "manifest.dill",
                "diffraction_to_obj/model.keras",
                "diffraction_to_obj/params.dill",
            ):
                zf.writestr(member, b"\x80\x04planted")
    elif kind == "zip_without_config":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model.weights.h5", b"")
    elif kind == "deep_config":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("config.json", "[" * 100_000 + "]" * 100_000)
    elif kind == "not_a_zip":
        path.write_bytes(b"\x00" * 100)
    elif kind == "pickled_probe":
        shutil.copy(good, path)

        class Planted:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        np.save(path.with_suffix(".probe.npy"), np.array([Planted()], dtype=object), allow_pickle=True)
    elif kind == "sidecar_text_N":
        shutil.copy(good, path)
        meta = json.loads(good.with_suffix(".json").read_text())
        meta["spec"]["N"] = "32"
        path.with_suffix(".json").write_text(json.dumps(meta))
        return path
    return _with_sidecar(path, good)


BAD_MODELS = {
    "named_lambda": "Lambda layer",
    "bytecode_lambda": "Lambda layer",
    "os_system_lambda": "Lambda layer",
    "os_system_activation": "os.system",
    "bundle_renamed": "PtychoPINN bundle",
    "zip_without_config": "no config.json",
    "not_a_zip": "not a zip archive",
    "deep_config": "not valid JSON",
    "pickled_probe": "pickled",
    "sidecar_text_N": "spec field 'N'",
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_a_model_file_that_could_run_code_is_refused_before_any_work(
    kind, models, small_npz, tmp_path, capsys
):
    folder = tmp_path / "models"
    folder.mkdir()
    path = bad_model(kind, folder, models["pinn"])
    out = tmp_path / "out"
    line = _in_process(capsys, _compare(small_npz, path, out), 2, BAD_MODELS[kind])
    assert str(path.with_suffix("")) in line  # names the file (.keras, .json or .probe.npy)
    assert not (out / "store.zarr").exists()  # refused before any work
    with pytest.raises(ModelMismatchError, match=BAD_MODELS[kind]):
        load_keras(path)  # the loader itself refuses it too
    assert not _planted(folder).exists()


def test_a_model_of_keras_objects_only_still_loads(models):
    spec, _ = read_spec(models["pinn"])
    assert spec.N == 32
    assert load_keras(models["pinn"]).spec == spec


# -- iterative NPZ ----------------------------------------------------------------------------------


def _recon(path: Path, small_npz: Path, **members) -> Path:
    with np.load(small_npz) as f:
        obj = f["objectGuess"]
    np.savez(path, reconstructed_object=obj, **members)
    return path


BAD_RECONS = {
    "time_text": ({"reconstruction_time": "twelve"}, "'reconstruction_time' must be one number"),
    "time_array": ({"reconstruction_time": np.arange(3.0)}, "'reconstruction_time' must be one number"),
    "time_nan": ({"reconstruction_time": np.nan}, "'reconstruction_time' is nan"),
    "time_negative": ({"reconstruction_time": -1.0}, "'reconstruction_time' is -1.0"),
    "algorithm_array": ({"algorithm": np.arange(2)}, "'algorithm' must be one string"),
}


@pytest.mark.parametrize("kind", BAD_RECONS)
def test_an_iterative_npz_with_bad_metadata_is_one_line(kind, models, small_npz, tmp_path, capsys):
    members, needle = BAD_RECONS[kind]
    recon = _recon(tmp_path / f"{kind}.npz", small_npz, **members)
    out = tmp_path / "out"
    line = _in_process(
        capsys, [*_compare(small_npz, models["pinn"], out), "--ptychi-recon", recon], 2, needle
    )
    assert f"--ptychi-recon {recon}" in line
    assert not (out / "store.zarr").exists()
    for check in (read_reconstruction, check_metadata):
        with pytest.raises(InvalidScanError, match=needle):
            check(recon)


def test_an_iterative_npz_without_ground_truth_is_refused_in_one_line(models, small_npz, tmp_path, capsys):
    with np.load(small_npz) as f:
        np.savez(tmp_path / "no_truth.npz", **{k: f[k] for k in f.files if k != "objectGuess"})
    recon = _recon(tmp_path / "recon.npz", small_npz, reconstruction_time=np.array(["1", "2"]))
    argv = [*_compare(tmp_path / "no_truth.npz", models["pinn"], tmp_path / "out"), "--ptychi-recon", recon]
    _in_process(capsys, argv, 2, "'reconstruction_time' must be one number")
    assert not (tmp_path / "out" / "run.json").exists()


def test_good_iterative_metadata_is_read(small_npz, tmp_path):
    recon = _recon(tmp_path / "r.npz", small_npz, reconstruction_time=np.array([12.5]), algorithm="tike")
    _, seconds, label = read_reconstruction(recon)
    assert (seconds, label) == (12.5, "Tike")
    recon = _recon(tmp_path / "s.npz", small_npz, reconstruction_time=np.int64(3), algorithm=b"lsqml")
    assert read_reconstruction(recon)[1:] == (3.0, "PtyChi")


# -- faults of the machine --------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec


@pytest.mark.slow
def test_the_file_size_limit_is_one_line_exit_1_and_the_run_resumes(models, small_npz, tmp_path):
    out = tmp_path / "out"
    args = _compare(small_npz, models["pinn"], out)
    done = _cli(args, preexec_fn=_file_size_limit(100 * 1024))  # SIGXFSZ would kill it: -25
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_line(done.stderr, "file too large")
    assert str(out) in line and "ulimit -f" in line and "102400 bytes" in line
    assert not (out / "run.json").exists() and not (out / "comparison_metrics.csv").exists()
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "comparison_metrics.csv").exists()


def _private_tmpfs(mountpoint: Path, options: str) -> list[str]:
    """A command prefix that runs the rest in a private mount namespace with a tmpfs on ``mountpoint``."""
    mountpoint.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mountpoint}"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm) for a small or read-only file system")
    return [
        "unshare",
        "-rm",
        "sh",
        "-c",
        f'mount -t tmpfs -o {options} tmpfs {mountpoint} && exec "$@"',
        "sh",
    ]


@pytest.mark.slow
def test_a_full_disk_is_one_line_exit_1_naming_the_folder(models, small_npz, tmp_path):
    disk = tmp_path / "disk"
    wrap = _private_tmpfs(disk, "size=1400k")
    out = disk / "out"
    done = _cli(_compare(small_npz, models["pinn"], out), wrap=wrap)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_line(done.stderr, "no space left on the device")
    assert str(out) in line and "free space" in line


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line_exit_1(models, small_npz, tmp_path):
    if os.geteuid() != 0:  # permissions hold: a folder this user may not write
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
        try:
            done = _cli(_compare(small_npz, models["pinn"], parent / "out"))
        finally:
            parent.chmod(0o755)
        needle = "permission denied"
    else:  # root ignores permissions: a read-only file system instead
        parent = tmp_path / "ro"
        done = _cli(_compare(small_npz, models["pinn"], parent / "out"), wrap=_private_tmpfs(parent, "ro"))
        needle = "read-only file system"
    assert done.returncode == 1, done.stderr[-3000:]
    assert str(parent / "out") in _one_line(done.stderr, needle)


def test_an_output_folder_that_is_a_file_is_refused(models, small_npz, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _in_process(capsys, _compare(small_npz, models["pinn"], tmp_path / "file"), 2, "--output-dir")
    _in_process(capsys, _compare(small_npz, models["pinn"], tmp_path / "file" / "out"), 2, "output-dir")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
def test_positions_far_out_are_one_line_not_a_memory_error_traceback(models, small_npz, tmp_path):
    with np.load(small_npz) as f:
        members = {k: f[k] for k in f.files}
    for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start"):
        members[key] = members[key] * 1e12
    np.savez(tmp_path / "far.npz", **members)
    done = _cli(_compare(tmp_path / "far.npz", models["pinn"], tmp_path / "out"))
    assert done.returncode in (1, 2), done.stderr[-3000:]  # 2 once the positions are checked first
    assert "Traceback" not in done.stderr
    assert len(_error_lines(done.stderr)) == 1, done.stderr[-3000:]


# -- the mapping itself, through a command that raises ------------------------------------------------


def _raising(exc):
    def simulate(*args, **kwargs):
        raise exc

    return simulate


MAPPED = [
    (
        OSError(errno.ENOSPC, "No space left on device", "/data/out/x.npz"),
        1,
        "/data/out/x.npz: no space left",
    ),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "NAMED: no space left"),  # no filename: the output
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 1, "disk quota exceeded"),
    (OSError(errno.EFBIG, "File too large", "/data/x"), 1, "/data/x: file too large"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 1, "/ro/x: read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "/root/x: permission denied"),
    (PermissionError(errno.EPERM, "Operation not permitted", "/x"), 1, "/x: operation not permitted"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/x"), 2, "/no/x: no such file"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), 2, "/f/x: a file is in the way"),
    (
        MemoryError("Unable to allocate 7.3 EiB"),
        1,
        "not enough memory for this run (Unable to allocate 7.3 EiB)",
    ),
]


@pytest.mark.parametrize(("exc", "code", "needle"), MAPPED, ids=[str(m[0]) or "memory" for m in MAPPED])
def test_faults_of_the_machine_map_to_one_line(exc, code, needle, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "simulate", _raising(exc))
    line = _in_process(capsys, ["simulate", "NAMED"], code, needle)
    assert line.startswith("ptychozarr simulate: error: ")


def test_a_fault_wrapped_by_a_library_is_found_in_the_chain(monkeypatch, capsys):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/chunk")
        except OSError as inner:
            raise RuntimeError("store write failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    monkeypatch.setattr(cli, "simulate", _raising(wrapped))
    _in_process(capsys, ["simulate", "out.npz"], 1, "/data/chunk: no space left on the device")


@pytest.mark.parametrize(
    "exc",
    [ValueError("a bug"), OSError(errno.EIO, "I/O error", "/x"), FileNotFoundError(errno.ENOENT, "gone")],
)
def test_a_bug_keeps_its_traceback(exc, monkeypatch):
    monkeypatch.setattr(cli, "simulate", _raising(exc))
    with pytest.raises(type(exc)):
        main(["simulate", "out.npz"])


def test_sigxfsz_is_ignored_only_while_the_command_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(
        cli, "simulate", lambda *a, **k: seen.append(signal.getsignal(signal.SIGXFSZ)) or Path("x")
    )
    before = signal.getsignal(signal.SIGXFSZ)
    assert main(["simulate", "out.npz", "--n-points", "4"]) == 0
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGXFSZ) == before


# -- computation time over a resumed inference --------------------------------------------------------


def test_attempt_seconds_run_from_each_start_to_its_last_block():
    ends = np.array([10.5, 11.0, np.nan, 20.25, 20.75])
    assert attempt_seconds([10.0, 20.0], ends, now=21.0) == [1.0, 1.0]
    assert attempt_seconds([10.0, 15.0, 20.0], ends, now=22.0) == [1.0, 0.0, 2.0]  # 15: killed before a block


@pytest.mark.slow
def test_computation_time_of_a_resumed_inference_sums_every_attempt(models, small_npz, tmp_path):
    args = _compare(small_npz, models["pinn"], tmp_path / "out")
    killed = _cli(args, env={"PTYCHOZARR_KILL_AFTER_BLOCKS": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    patches = zarr.open_group(str(tmp_path / "out" / "store.zarr"), mode="r")["arms/pinn/patches"]
    ends = patches["block_end"][:]
    assert np.isfinite(ends).sum() >= 2
    first = float(np.nanmax(ends) - patches.attrs["attempts"][0])
    assert first > 0
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    patches = zarr.open_group(str(tmp_path / "out" / "store.zarr"), mode="r")["arms/pinn/patches"]
    attempts = patches.attrs["attempt_seconds"]
    assert len(attempts) == 2 and attempts[0] == pytest.approx(first, abs=1e-3)
    assert patches.attrs["seconds"] == pytest.approx(sum(attempts), abs=2e-3)
    assert patches.attrs["seconds"] > attempts[1]  # not the last attempt alone
    with open(tmp_path / "out" / "comparison_metrics.csv") as fh:
        row = next(line for line in fh if line.startswith("PtychoPINN,computation_time_s"))
    assert float(row.split(",")[4]) == pytest.approx(patches.attrs["seconds"], abs=1e-3)


# -- flags of the other commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ingest", "SCAN", "OUT/s.zarr", "--chunk-mb", "nan"], "--chunk-mb nan"),
        (["ingest", "SCAN", "OUT/s.zarr", "--chunk-mb", "inf"], "--chunk-mb inf"),
        (
            ["train", "--kind", "baseline", "--data", "SCAN", "--out", "OUT/t", "--learning-rate", "-1"],
            "learning_rate",
        ),
        (["train", "--kind", "baseline", "--data", "SCAN", "--out", "OUT/t", "--filters", "0"], "filters=0"),
        (["train", "--kind", "pinn", "--data", "SCAN", "--out", "OUT/t", "--depth", "0"], "depth=0"),
        (["train", "--kind", "pinn", "--data", "SCAN", "--out", "OUT/t", "--dose", "nan"], "dose=nan"),
        (["simulate", "OUT/missing/folder/s.npz", "--n-points", "8"], "no such file or folder"),
    ],
)
def test_bad_flags_of_other_commands_are_one_line(argv, needle, small_npz, tmp_path, capsys):
    argv = [a.replace("SCAN", str(small_npz)).replace("OUT", str(tmp_path)) for a in argv]
    _in_process(capsys, argv, 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ingest_overwrite_never_deletes_what_is_not_a_store(small_npz, tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    (tmp_path / "notes.txt").write_text("precious")
    for target in (folder, tmp_path / "notes.txt"):
        _in_process(capsys, ["ingest", small_npz, target, "--overwrite"], 2, "is not one (no zarr.json)")
    assert (folder / "thesis.tex").read_text() == (tmp_path / "notes.txt").read_text() == "precious"
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(small_npz), str(store)]) == 0
    assert main(["ingest", str(small_npz), str(store), "--overwrite"]) == 0  # a store is replaced


def test_simulate_never_replaces_a_folder_or_a_device(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for target in ("fifo", "folder"):
        _in_process(capsys, ["simulate", tmp_path / target, "--n-points", "8"], 2, "not a regular file")
    assert (tmp_path / "folder").is_dir() and not (tmp_path / "fifo").is_file()


def _worded(errno_code: int):
    from ptychozarr.errors import StoreError

    try:
        try:
            raise OSError(errno_code, os.strerror(errno_code), "/data/out")
        except OSError as exc:
            raise StoreError(f"cannot create the output dir /data/out: {exc.strerror}") from None
    except StoreError as exc:
        return exc


@pytest.mark.parametrize(
    ("code", "exit_code", "needle"),
    [
        (errno.EROFS, 1, "cannot create the output dir /data/out: Read-only file system; write to a folder"),
        (errno.ENOSPC, 1, "No space left on device; free space on that disk"),
        (errno.EPERM, 2, "cannot create the output dir /data/out: Operation not permitted"),
    ],
)
def test_a_fault_a_stage_words_keeps_its_words_and_exit_1(code, exit_code, needle, monkeypatch, capsys):
    monkeypatch.setattr(cli, "simulate", _raising(_worded(code)))
    _in_process(capsys, ["simulate", "out.npz"], exit_code, needle)


# -- refused before any work: positions, iterative metadata, paths in the way -------------------------


def _scan_with(small_npz: Path, path: Path, *, drop=(), scale: float = 1.0, **replace) -> Path:
    """A copy of ``small_npz`` without the keys ``drop``, its coordinates times ``scale``."""
    with np.load(small_npz) as f:
        members = {k: f[k] for k in f.files if k not in drop}
    for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start"):
        members[key] = members[key] * scale
    members.update(replace)
    np.savez(path, **members)
    return path


@pytest.mark.parametrize("truth", [True, False], ids=["with-objectGuess", "without-objectGuess"])
def test_positions_far_outside_the_object_are_refused_before_any_work(truth, models, small_npz, tmp_path):
    far = _scan_with(small_npz, tmp_path / "far.npz", scale=1e12, drop=() if truth else ("objectGuess",))
    out = tmp_path / "out"
    done = _cli(_compare(far, models["pinn"], out))
    assert done.returncode == 2, done.stderr[-3000:]
    line = _one_line(done.stderr, "positions must be in object pixels")
    assert str(far) in line and "xcoords/ycoords" in line and " px canvas" in line
    assert ("objectGuess" in line) and (("8×" in line) == truth)
    assert not out.exists()  # refused before the lock, the store or any arm


def test_positions_that_are_not_finite_are_refused_naming_the_key(models, small_npz, tmp_path, capsys):
    with np.load(small_npz) as f:
        x = f["xcoords"].copy()
    x[5] = np.inf
    bad = _scan_with(small_npz, tmp_path / "inf.npz", xcoords=x)
    line = _in_process(capsys, _compare(bad, models["pinn"], tmp_path / "out"), 2, "NaN or inf")
    assert str(bad) in line and "'xcoords'" in line and "index 5" in line
    assert not (tmp_path / "out").exists()


def test_far_positions_in_a_store_are_refused_too(small_npz, tmp_path):
    from ptychozarr.errors import InvalidScanError as ScanError
    from ptychozarr.io import ingest
    from ptychozarr.preflight import MAX_CANVAS, check_positions

    store = ingest(_scan_with(small_npz, tmp_path / "far.npz", scale=1e9), tmp_path / "far.zarr")
    with pytest.raises(ScanError, match=r"px canvas, more than 8× the 160 px side of objectGuess"):
        check_positions(store, M, 32)
    side = check_positions(small_npz, M, 32)  # the scan as simulated: within its 160 px object
    assert M < side <= 160 + M and side < MAX_CANVAS


def test_bad_iterative_metadata_without_ground_truth_is_refused_before_ingest(
    models, small_npz, tmp_path, capsys
):
    scan = _scan_with(small_npz, tmp_path / "no_truth.npz", drop=("objectGuess",))
    out = tmp_path / "out"
    for members, needle in BAD_RECONS.values():
        recon = _recon(tmp_path / "recon.npz", small_npz, **members)
        _in_process(capsys, [*_compare(scan, models["pinn"], out), "--ptychi-recon", recon], 2, needle)
        assert not out.exists()  # no lock, no store.zarr, no data


def test_ingest_overwrite_from_python_replaces_only_a_store(small_npz, tmp_path):
    from ptychozarr.errors import InvalidParameterError
    from ptychozarr.io import ingest

    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    (tmp_path / "notes.txt").write_text("precious")
    os.symlink(folder, tmp_path / "link")
    for target in (folder, tmp_path / "notes.txt", tmp_path / "link"):
        with pytest.raises(InvalidParameterError, match=r"is not one \(no zarr.json\)") as caught:
            ingest(small_npz, target, overwrite=True)
        assert str(target) in str(caught.value) and "\n" not in str(caught.value)
    assert (folder / "thesis.tex").read_text() == (tmp_path / "notes.txt").read_text() == "precious"
    assert (tmp_path / "link").is_symlink()
    store = ingest(small_npz, tmp_path / "s.zarr")
    (store / "stale").write_text("old")
    assert ingest(small_npz, store, overwrite=True) == store  # a store is replaced
    assert (store / "zarr.json").is_file() and not (store / "stale").exists()


def test_an_output_dir_below_a_file_names_the_file(models, small_npz, tmp_path, capsys):
    from ptychozarr.errors import StoreError
    from ptychozarr.runtime import output_lock

    afile = tmp_path / "afile"
    afile.write_text("x")
    for below in (afile / "out", afile / "a" / "b"):
        line = _in_process(capsys, _compare(small_npz, models["pinn"], below), 2, "is a file, not a folder")
        assert f"{afile} is a file" in line and f"{below} is a file" not in line
        with pytest.raises(StoreError, match=f"{afile} is a file"):
            with output_lock(below):
                pass
    line = _in_process(capsys, _compare(small_npz, models["pinn"], afile), 2, "is a file")
    assert str(afile) in line
    with pytest.raises(StoreError, match=f"output dir {afile} is a file, not a folder"):
        with output_lock(afile):
            pass
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
