"""The README's Python examples run as written, and each stage in them runs the model once."""

import re
from pathlib import Path

import pytest
import zarr

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _one_pass(patches: zarr.Array, batch_size: int = 32) -> int:
    """Model calls that predicting every block of stored patches once takes (the last batch padded)."""
    rows, block = patches.shape[0], patches.chunks[0]
    sizes = [min(block, rows - start) for start in range(0, rows, block)]
    return sum(-(-n // batch_size) for n in sizes)


@pytest.fixture
def model_calls(before_model_call):
    """Sizes of the batches the model is called with, while the test runs."""
    calls = []
    before_model_call(calls.append)
    return calls


def test_readme_has_the_api_examples():
    blocks = _python_blocks()
    assert len(blocks) == 2
    assert "store=" in blocks[0] and "pz.evaluate" in blocks[0] and "pz.compare" in blocks[1]


@pytest.mark.slow
def test_readme_api_examples_run_each_stage_once(tmp_path, monkeypatch, model_calls):
    monkeypatch.chdir(tmp_path)
    first, second = _python_blocks()
    namespace: dict = {}

    exec(compile(first, "README.md: Python API, block 1", "exec"), namespace)
    assert namespace["scores"]["ssim"][0] > 0
    assert len(model_calls) == _one_pass(zarr.open_array("pinn.zarr/patches/patches", mode="r"))

    model_calls.clear()
    exec(compile(second, "README.md: Python API, block 2", "exec"), namespace)
    arms = [namespace["result"].arms, namespace["again"].arms]
    assert [a.label for a in arms[0]] == ["PtychoPINN", "Baseline"] and arms[0] == arms[1]
    stored = [
        zarr.open_array(f"out/store.zarr/arms/{key}/patches/patches", mode="r")
        for key in ("pinn", "baseline")
    ]
    assert len(model_calls) == sum(_one_pass(p) for p in stored)  # the second run reuses every stage
    assert {"infer:pinn", "infer:baseline"} <= set(namespace["again"].run["reused"])


def test_readme_shows_the_study_example_of_the_help():
    from ptychozarr.study import EXAMPLE

    assert EXAMPLE in README.read_text()
