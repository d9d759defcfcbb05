"""Study configs: normalised conditions, paths kept inside the output folder, inputs and types checked
before any run, another study's files kept. Runs here compare an iterative NPZ only (no model), so each
takes a second or two."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ptychozarr.cli import main
from ptychozarr.study import MANIFEST, study

COMPARE = "[compare]\nstitch_crop_size = 8\nskip_registration = true\n"


@pytest.fixture(scope="module")
def recon(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recon") / "recon.npz"
    np.savez(path, reconstructed_object=np.ones((160, 160), np.complex64))
    return path


def _run(name, dose=1000, view='"dense"', split='"test"', *, data, recon, extra="") -> str:
    return (
        f'[[run]]\nname = "{name}"\ndose = {dose}\nview = {view}\nsplit = {split}\n'
        f'test_data = "{data}"\nptychi_recon = "{recon}"\n{extra}'
    )


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(capsys, tmp_path: Path, text: str, needle: str, *flags) -> str:
    """Write ``text`` as a study TOML, run it: exit 2, one line naming ``needle``, nothing written."""
    config = tmp_path / "study.toml"
    config.write_text(text)
    before = _files(tmp_path)
    assert main(["study", str(config), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert _files(tmp_path) == before
    return lines[0]


def test_conditions_that_name_one_folder_are_refused(small_npz, recon, tmp_path, capsys):
    def two(a, b):
        return (
            COMPARE
            + _run("a", data=small_npz, recon=recon, **a)
            + _run("b", data=small_npz, recon=recon, **b)
        )

    _refused(capsys, tmp_path, two({}, {"dose": "1000.0"}), "same dose, view, split")
    _refused(capsys, tmp_path, two({}, {"dose": "1e3"}), "same dose, view, split")
    _refused(capsys, tmp_path, two({}, {"view": '"./dense"'}), "same dose, view, split")
    _refused(capsys, tmp_path, two({}, {"split": '"test/"'}), "same dose, view, split")
    _refused(capsys, tmp_path, two({"extra": "repeat = 1\n"}, {"extra": 'repeat = "1"\n'}), "same dose")
    same_name = COMPARE + 2 * _run("a", data=small_npz, recon=recon).replace('"dense"', '"sparse"', 1)
    _refused(capsys, tmp_path, same_name.replace('"sparse"', '"dense"', 1), "two runs are named 'a'")
    dotted = two({}, {"extra": 'repeat = "store.zarr"\n'})
    _refused(capsys, tmp_path, dotted, "inside the folder of the run without a repeat")


@pytest.mark.parametrize(
    ("top", "run", "needle"),
    [
        ('output_dir = "../elsewhere"\n', {}, "`output_dir` = '../elsewhere' leaves"),
        ('output_dir = "/tmp/elsewhere"\n', {}, "`output_dir` = '/tmp/elsewhere' leaves"),
        ("", {"view": '"../../up"'}, "`view` = '../../up' must name one folder"),
        ("", {"split": '"/abs"'}, "`split` = '/abs' must name one folder"),
        ("", {"extra": 'repeat = "../x"\n'}, "`repeat` = '../x' must name one folder"),
        ("", {"view": '"a/b"'}, "`view` = 'a/b' must name one folder"),
        ("", {"view": '".."'}, "`view` = '..' must name one folder"),
        ("", {"split": '".hidden"'}, "must not start with '.'"),
    ],
    ids=["output-up", "output-abs", "view-up", "split-abs", "repeat-up", "view-nested", "view-dotdot", "dot"],
)
def test_paths_that_leave_the_output_folder_are_refused(small_npz, recon, tmp_path, capsys, top, run, needle):
    _refused(capsys, tmp_path, top + COMPARE + _run("a", data=small_npz, recon=recon, **run), needle)


def test_a_symbolic_link_out_of_the_output_folder_is_refused(small_npz, recon, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "study_out").mkdir()
    (tmp_path / "study_out" / "dose_1000").symlink_to(outside, target_is_directory=True)
    _refused(capsys, tmp_path, COMPARE + _run("a", data=small_npz, recon=recon), "outside")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("run = 5\n", "`run` must be [[run]] tables, not an integer"),
        ('[run]\nname = "a"\n', "`run` is one table; write each run as an array table [[run]]"),
        ("run = [1, 2]\n", "of non-tables"),
        ("compare = 5\n" + "{run}", "`compare` must be a [compare] table"),
        ("output_dir = 5\n" + "{run}", "`output_dir` must be a non-empty path string"),
        ("{run:dose=[1, 2]}", "`dose` must be a number (e.g. 1000), not an array"),
        ('{run:dose="1000"}', "`dose` must be a number (e.g. 1000), not a string"),
        ("{run:dose=true}", "`dose` must be a number (e.g. 1000), not a boolean"),
        ("{run:dose=-5}", "`dose` must be a positive number"),
        ("{run:dose=nan}", "`dose` must be a positive number"),
        ("{run:view=3}", "`view` must be a string, not an integer"),
        ('{run:view=""}', "`view` = '' must name one folder"),
        ("{run:split={a = 1}}", "`split` must be a string, not a table"),
        ("{run:name=3}", "`name` must be a non-empty string"),
        ("{run:test_data=5}", "`test_data` must be a path string"),
        ("{run:extra=repeat = 1.5\n}", "`repeat` must be a string, not a float"),
        ("{compare:stitch_crop_size = 7\n}", "stitch"),
        ("{compare:stich_crop_size = 8\n}", "did you mean 'stitch_crop_size'"),
    ],
)
def test_values_of_the_wrong_type_are_one_line(small_npz, recon, tmp_path, capsys, text, needle):
    if text.startswith("{run:") or text.startswith("{compare:"):
        kind, _, spec = text[1:-1].partition(":")
        if kind == "compare":
            text = f"[compare]\n{spec}" + _run("a", data=small_npz, recon=recon)
        else:
            key, _, value = spec.partition("=")
            fields = {"dose": "1000", "view": '"dense"', "split": '"test"'}
            body = _run("a", data=small_npz, recon=recon, **({key: value} if key in fields else {}))
            if key == "name":
                body = body.replace('name = "a"', f"name = {value}")
            elif key == "test_data":
                body = body.replace(f'test_data = "{small_npz}"', f"test_data = {value}")
            elif key == "extra":
                body += value
            text = body
    text = text.replace("{run}", _run("a", data=small_npz, recon=recon))
    _refused(capsys, tmp_path, text, needle)


def test_every_runs_inputs_are_checked_before_the_first_run(small_npz, recon, tmp_path, capsys):
    ok = _run("first", data=small_npz, recon=recon)
    missing = _run("second", view='"sparse"', data=tmp_path / "absent.npz", recon=recon)
    _refused(capsys, tmp_path, COMPARE + ok + missing, "run 'second': `test_data`")
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    _refused(capsys, tmp_path, COMPARE + ok + missing.replace("absent.npz", "folder.npz"), "is a folder")
    no_recon = _run("second", view='"sparse"', data=small_npz, recon=tmp_path / "absent_recon.npz")
    _refused(capsys, tmp_path, COMPARE + ok + no_recon, "`ptychi_recon`")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    bad = _run("second", view='"sparse"', data=small_npz, recon=tmp_path / "bad.npz")
    _refused(capsys, tmp_path, COMPARE + ok + bad, "run 'second'")


@pytest.mark.slow
def test_a_study_runs_normalised_conditions_and_keeps_another_studys_files(
    small_npz, recon, tmp_path, capsys
):
    text = (
        'output_dir = "out"\n'
        + COMPARE
        + _run("a", dose="1000.0", view='"./dense"', data=small_npz, recon=recon)
    )
    config = tmp_path / "study.toml"
    config.write_text(text)
    runs = study(config, quiet=True)
    assert [r.status for r in runs] == ["ok"]
    out = tmp_path / "out"
    assert (out / "dose_1000" / "dense" / "test" / "comparison_metrics.csv").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["study_config"] == str(config)
    first = manifest["execution_results"][0]
    assert (first["dose"], first["view"]) == (1000, "dense")
    assert not [p for p in os.listdir(out) if p.startswith(".ptychozarr.lock") and not p.endswith("takeover")]

    study(config, quiet=True)  # the same study again: its own files are replaced
    before = (out / MANIFEST).read_text()
    other = tmp_path / "other.toml"
    other.write_text(text)
    assert main(["study", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"holds the results of the study {config}" in lines[0] and "--force" in err
    assert (out / MANIFEST).read_text() == before
    assert main(["study", str(other), "--quiet", "--force"]) == 0
    assert json.loads((out / MANIFEST).read_text())["study_config"] == str(other)


def _registration_runs():
    from ptychozarr.report import ArmResult
    from ptychozarr.report.study import StudyRun

    metrics = {"ms_ssim": (0.6, 0.4), "mae": (0.05, 0.3)}
    note = "ambiguous correlation: confidence 0.53 < 0.6 (a second peak at 47% of the main one)"
    arms = [
        ArmResult("pinn", "PtychoPINN", dict(metrics), None, registered=False, registration_note=note),
        ArmResult("baseline", "Baseline", dict(metrics), (-0.6, -0.34), registered=True),
        ArmResult("ptychi", "PtyChi", dict(metrics), None, registered=False),
    ]
    return [StudyRun(1000, "dense", "test", 0, arms, name="r1")]


def test_every_arms_registration_state_is_in_the_summary_and_the_deltas(tmp_path):
    from ptychozarr.report.study import deltas, write_study_outputs

    runs = _registration_runs()
    write_study_outputs(tmp_path, runs)
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    job = summary["jobs"][0]
    assert job["registration"]["Baseline"] == "registered"  # the short form stays as it was
    detail = job["registration_detail"]
    assert detail["Baseline"] == {
        "state": "registered", "offset": [-0.6, -0.34], "confidence": None, "reason": None
    }  # fmt: skip
    assert detail["PtychoPINN"]["state"] == "rejected"
    assert detail["PtychoPINN"]["confidence"] == pytest.approx(0.53)
    assert "second peak" in detail["PtychoPINN"]["reason"]
    assert detail["PtyChi"] == {"state": "unregistered", "offset": None, "confidence": None, "reason": None}
    markdown = (tmp_path / "metrics_summary.md").read_text()
    assert "| Model | State | Offset (dy, dx) px | Confidence | Reason |" in markdown
    assert "| Baseline | registered | (-0.60, -0.34) |" in markdown
    assert "| PtychoPINN | rejected |  | 0.5300 | ambiguous correlation" in markdown
    table = deltas(runs)
    row = table.iloc[0]
    assert row["registration_PtychoPINN"] == "rejected (confidence 0.53)"
    assert row["registration_Baseline"] == "registered (-0.60, -0.34) px"
    assert row["registration_iterative"] == "unregistered"
    assert "registration_PtychoPINN" in (tmp_path / "study_deltas.csv").read_text().splitlines()[0]


def test_a_recorded_confidence_is_preferred_and_an_arm_without_scores_has_no_state():
    from ptychozarr.report import ArmResult
    from ptychozarr.report.study import registration_state

    arm = ArmResult("baseline", "Baseline", {"mae": (0.1, 0.2)}, (0.5, 0.25), registered=True)
    arm.registration_confidence = 0.73
    assert registration_state(arm) == {
        "state": "registered", "offset": [0.5, 0.25], "confidence": 0.73, "reason": None
    }  # fmt: skip
    assert registration_state(ArmResult("pinn", "PtychoPINN"))["state"] == ""
    assert registration_state(None)["state"] == ""


def test_quiet_study_prints_nothing(small_npz, recon, tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text('output_dir = "out"\n' + COMPARE + _run("a", data=small_npz, recon=recon))
    assert main(["study", str(config)]) == 0
    assert "1 ok, 0 partial, 0 failed of 1 runs" in capsys.readouterr().out  # the summary table
    assert main(["study", str(config), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_the_example_writes_its_runs_where_ptychopinns_summariser_looks(tmp_path):
    """PtychoPINN's study reporters read ``<hub>/analysis/comparison_manifest.json`` and each run's
    ``<hub>/analysis/dose_<dose>/<view>/<split>/comparison_metrics.csv``."""
    import tomllib

    from ptychozarr.report import run_dir
    from ptychozarr.study import EXAMPLE, _output_dir

    config = tomllib.loads(EXAMPLE)
    out = _output_dir(config, tmp_path / "study.toml", tmp_path)
    hub = out.parent
    assert out == hub / "analysis"
    (run,) = config["run"]
    folder = run_dir(out, run["dose"], run["view"], run["split"], run.get("repeat"))
    expected = Path("analysis", f"dose_{run['dose']}", run["view"], run["split"])
    assert folder.relative_to(hub) == expected
    assert f"written to {folder.relative_to(tmp_path)}/" in EXAMPLE  # the example says where, correctly
