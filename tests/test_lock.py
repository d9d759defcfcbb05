"""The output lock: one holder at a time under races, stale locks of this host only, one-line refusals."""

import json
import multiprocessing
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from ptychozarr.errors import StoreError
from ptychozarr.runtime import LOCK_NAME, output_lock

RACERS = 4
TRIALS = 200
HELD = 0.002  # seconds a winner holds the lock
JITTER = 0.002  # seconds by which the racers' attempts spread at most


def _racer(tmp: str, barrier) -> None:
    """One racer: per trial, wait for the others, try the trial's lock, record when it held it."""
    jitter = random.Random(os.getpid())
    for trial in range(TRIALS):
        folder, log = Path(tmp, f"t{trial}"), os.path.join(tmp, f"t{trial}.log")
        barrier.wait()
        time.sleep(jitter.uniform(0, JITTER))  # arrivals spread as processes starting at once are
        try:
            with output_lock(folder):
                entered = time.monotonic()
                time.sleep(HELD)
                left = time.monotonic()
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{entered:.9f} {left:.9f} {os.getpid()}\n".encode())
                os.close(fd)
        except StoreError:
            pass  # refused: another holder runs
    os._exit(0)


def _dead_pid() -> int:
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def _stale_lock(folder: Path, pid: int) -> None:
    record = {"host": socket.gethostname(), "pid": pid, "started": "2000-01-01T00:00:00+00:00", "token": "x"}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def _races(tmp_path: Path, *, stale: bool) -> tuple[int, int, int]:
    """Race ``RACERS`` processes for each of ``TRIALS`` folders, all starting each trial at once.

    Returns the trials with overlapping holders, the trials with no holder and the holders in all.
    """
    ctx = multiprocessing.get_context("fork")
    dead = _dead_pid()
    for trial in range(TRIALS):
        (tmp_path / f"t{trial}").mkdir()
        if stale:
            _stale_lock(tmp_path / f"t{trial}", dead)
    barrier = ctx.Barrier(RACERS)
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), barrier)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * RACERS
    overlapping = empty = holders = 0
    for trial in range(TRIALS):
        log = tmp_path / f"t{trial}.log"
        lines = log.read_text().splitlines() if log.exists() else []
        spans = sorted(tuple(map(float, line.split()[:2])) for line in lines)
        holders += len(spans)
        empty += not spans
        overlapping += any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
        assert not (tmp_path / f"t{trial}" / LOCK_NAME).exists()  # every holder released it
    return overlapping, empty, holders


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock-present"])
def test_racing_processes_never_hold_the_folder_together(tmp_path, stale):
    overlapping, empty, holders = _races(tmp_path, stale=stale)
    print(f"{'stale' if stale else 'fresh'}: {overlapping} of {TRIALS} trials with two holders at once, "
          f"{holders} holders in all")  # fmt: skip
    assert overlapping == 0
    assert empty == 0  # a stale lock is always taken over by someone


def test_a_live_lock_of_this_host_is_refused_and_a_dead_one_taken_over(tmp_path):
    _stale_lock(tmp_path, os.getpid())
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    record["started"] = "2999-01-01T00:00:00+00:00"
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(StoreError, match=f"in use by process {os.getpid()}"):
        with output_lock(tmp_path):
            pass
    _stale_lock(tmp_path, _dead_pid())
    with output_lock(tmp_path) as path:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not path.exists()
    assert sorted(os.listdir(tmp_path)) == [f"{LOCK_NAME}.takeover"]  # no temporary file left


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    record = {"host": "node-elsewhere", "pid": _dead_pid(), "started": "2000-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(StoreError) as info:
        with output_lock(tmp_path):
            pass
    message = str(info.value)
    assert "node-elsewhere" in message and f"remove {tmp_path / LOCK_NAME}" in message
    assert "\n" not in message
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == record


def test_a_lock_without_a_record_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(StoreError, match="holds no lock record; remove it"):
        with output_lock(tmp_path):
            pass


# -- through the command line: exit 2, one line, nothing written -------------------------------------


@pytest.fixture(scope="module")
def recon(tmp_path_factory) -> Path:
    """An iterative reconstruction of the small scan's object size: a compare needing no model."""
    path = tmp_path_factory.mktemp("recon") / "recon.npz"
    np.savez(path, reconstructed_object=np.ones((160, 160), np.complex64))
    return path


def _one_line(capsys, argv, needle) -> str:
    from ptychozarr.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_lock_refusals_on_the_command_line(small_npz, recon, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = ["compare", "--test-data", small_npz, "--ptychi-recon", recon, "--quiet"]
    args = [*inputs, "--output-dir", out]
    (out / LOCK_NAME).mkdir(parents=True)
    _one_line(capsys, args, "is a folder")
    (out / LOCK_NAME).rmdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "2000-01-01"}))
    line = _one_line(capsys, args, "on host node-elsewhere")
    assert f"remove {out / LOCK_NAME}" in line
    assert sorted(os.listdir(out)) == [LOCK_NAME]
    afile = tmp_path / "afile"
    afile.write_text("")
    _one_line(capsys, [*inputs, "--output-dir", afile], "is a file")
