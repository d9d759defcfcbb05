"""The comparison figure: landscape layout, compare_models' colour limits, the alignment it states, text that
neither collides nor leaves the page, and a report that redraws it when its options change."""

import itertools
import math
import shutil

import matplotlib.text
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from ptychozarr.errors import InvalidParameterError
from ptychozarr.metrics import evaluate
from ptychozarr.report import ArmResult, comparison_figure, write_comparison_figure

TRIM = 2  # evaluate's default: the figure shows the region scored


def _scene(shape=(64, 64), arms=("PtychoPINN", "PtyChi")):
    rng = np.random.default_rng(1)
    amp = 0.7 + 0.3 * gaussian_filter(rng.random(shape), 2)
    truth = amp * np.exp(1j * 1.5 * gaussian_filter(rng.standard_normal(shape), 3))
    blurred = gaussian_filter(truth.real, 1.5) + 1j * gaussian_filter(truth.imag, 1.5)
    noisy = truth + 0.05 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    made = {"PtychoPINN": 2.0 * np.exp(0.7j) * noisy, "PtyChi": blurred, "Baseline": 0.5 * blurred.conj()}
    images = {label: made[label] for label in arms}
    results = [
        ArmResult("pinn", "PtychoPINN", evaluate(images["PtychoPINN"], truth), computation_time_s=1.0),
        *(ArmResult(label.lower(), label, evaluate(images[label], truth), offset=(0.5, -0.25))
          for label in arms[1:]),
    ]  # fmt: skip
    return truth, images, results


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def figure(scene):
    """The figure of ``scene`` with a pixel size, its 60² scored region strided to 30², drawn once."""
    truth, arms, results = scene
    fig = comparison_figure(truth, arms, results, title="dose 1e3", pixel_size_m=10e-9, max_side=32)
    fig.canvas.draw()
    return fig


def _panels(fig) -> dict[int, list]:
    """The image panels of each row (0 amplitude, 1 phase, 2 and 3 the errors), truth first."""
    rows = {}
    for ax in fig.subfigs[0].axes:
        if ax.images and ax.get_subplotspec() is not None:
            rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax)
    return rows


def _scored(image: np.ndarray) -> np.ndarray:
    return image[TRIM:-TRIM, TRIM:-TRIM]


def _less_plane(phase: np.ndarray) -> np.ndarray:
    """``phase`` less its least-squares plane, fitted with numpy's lstsq."""
    rows, cols = np.indices(phase.shape)
    design = np.stack([cols.ravel(), rows.ravel(), np.ones(phase.size)], axis=1)
    coef = np.linalg.lstsq(design, phase.ravel(), rcond=None)[0]
    return phase - (design @ coef).reshape(phase.shape)


def _shown(truth, arms) -> dict[str, dict[str, np.ndarray]]:
    """What the amplitude and phase rows should show, computed here: the scored region, the amplitude
    scaled to the truth's mean, each phase less its own plane."""
    t = _scored(truth)
    out = {"truth": {"amplitude": np.abs(t), "phase": _less_plane(np.angle(t))}}
    for label, arm in arms.items():
        a = _scored(arm)
        out[label] = {
            "amplitude": np.abs(a) * np.abs(t).mean() / np.abs(a).mean(),
            "phase": _less_plane(np.angle(a)),
        }
    return out


def test_figure_is_landscape_and_written_atomically(scene, tmp_path):
    truth, arms, results = scene
    path = write_comparison_figure(tmp_path / "comparison_plot.png", truth, arms, results, title="t", dpi=40)
    assert [p.name for p in tmp_path.iterdir()] == ["comparison_plot.png"]
    width, height = Image.open(path).size
    assert width > height


@pytest.mark.parametrize("shape", [(64, 64), (40, 100), (100, 40)])
@pytest.mark.parametrize("arms", [("PtychoPINN",), ("PtychoPINN", "PtyChi", "Baseline")])
def test_figure_is_landscape_for_any_image_shape_and_number_of_arms(shape, arms):
    truth, images, results = _scene(shape, arms)
    fig = comparison_figure(truth, images, results, title="t")
    width, height = fig.get_size_inches()
    assert width > height


@pytest.mark.parametrize(("p_min", "p_max"), [(10.0, 90.0), (2.0, 99.5)])
def test_amplitude_and_phase_panels_take_the_percentiles_of_their_own_image(scene, p_min, p_max):
    truth, arms, results = scene
    fig = comparison_figure(truth, arms, results, title="t", p_min=p_min, p_max=p_max)
    rows = _panels(fig)
    expected = _shown(truth, arms)
    for row, quantity in ((0, "amplitude"), (1, "phase")):
        for ax, name in zip(rows[row], ["truth", *arms], strict=True):
            image = expected[name][quantity]
            np.testing.assert_allclose(ax.images[0].get_array(), image, atol=1e-9)
            np.testing.assert_allclose(ax.images[0].get_clim(), np.percentile(image, [p_min, p_max]))


def test_manual_phase_limits_apply_to_their_arm_only(scene):
    truth, arms, results = scene
    fig = comparison_figure(truth, arms, results, title="t", phase_limits={"PtyChi": (-2.0, 1.5)})
    truth_ax, pinn_ax, ptychi_ax = _panels(fig)[1]
    assert ptychi_ax.images[0].get_clim() == (-2.0, 1.5)
    pinn_phase = _shown(truth, arms)["PtychoPINN"]["phase"]
    np.testing.assert_allclose(pinn_ax.images[0].get_clim(), np.percentile(pinn_phase, [10, 90]))
    assert "PtyChi phase [-2, 1.5] rad" in fig.subfigs[0].get_suptitle().replace("\n", " ")


def test_error_rows_share_one_scale(figure):
    rows = _panels(figure)
    for row in (2, 3):
        assert len({ax.images[0].get_clim() for ax in rows[row]}) == 1


@pytest.mark.parametrize("phase_align", ["plane", "mean"])
def test_title_states_the_alignment_and_each_arms_registration(scene, phase_align):
    truth, arms, results = scene
    fig = comparison_figure(truth, arms, results, title="dose 1e3", phase_align=phase_align)
    assert fig.get_suptitle() == "dose 1e3"
    said = fig.subfigs[0].get_suptitle().replace("\n", " ")
    assert f"phase_align_method = {phase_align}" in said
    assert ("least-squares plane" in said) == (phase_align == "plane")
    assert "PtychoPINN not applied" in said and "PtyChi shifted (+0.50, -0.25) px" in said
    assert "60×60 px" in said  # the scored region
    phase = _panels(fig)[1][1].images[0].get_array()
    angle = np.angle(_scored(arms["PtychoPINN"]))
    aligned = _less_plane(angle) if phase_align == "plane" else angle - angle.mean()
    np.testing.assert_allclose(phase, aligned, atol=1e-9)


def test_title_says_when_registration_was_rejected(scene):
    truth, arms, results = scene
    rejected = ArmResult("pinn", "PtychoPINN", results[0].metrics, registered=False, registration_note="weak")
    fig = comparison_figure(truth, {"PtychoPINN": arms["PtychoPINN"]}, [rejected], title="t")
    assert "PtychoPINN rejected (scored unregistered)" in fig.subfigs[0].get_suptitle().replace("\n", " ")
    assert _panels(fig)[0][1].get_title() == "PtychoPINN\nregistration rejected"


def _drawn_texts(fig, monkeypatch) -> list:
    """Every text the renderer draws (tick labels, titles, legend, table cells), with its extent."""
    drawn = []
    original = matplotlib.text.Text.draw

    def record(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)

    monkeypatch.setattr(matplotlib.text.Text, "draw", record)
    fig.canvas.draw()
    monkeypatch.undo()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn]


@pytest.mark.parametrize(
    ("shape", "arms", "pixel_size_m"),
    [
        ((64, 64), ("PtychoPINN", "PtyChi"), 10e-9),
        ((40, 100), ("PtychoPINN", "PtyChi", "Baseline"), None),
        ((100, 40), ("PtychoPINN",), 10e-9),
    ],
)
def test_no_text_collides_or_leaves_the_figure(monkeypatch, shape, arms, pixel_size_m):
    truth, images, results = _scene(shape, arms)
    fig = comparison_figure(truth, images, results, title="a scan: 1000 patterns", pixel_size_m=pixel_size_m)
    texts = _drawn_texts(fig, monkeypatch)
    assert len(texts) > 50  # titles, tick labels, legend and table cells
    page = fig.bbox
    for text, box in texts:
        assert page.x0 - 0.5 <= box.x0 and box.x1 <= page.x1 + 0.5, f"{text!r} leaves the page sideways"
        assert page.y0 - 0.5 <= box.y0 and box.y1 <= page.y1 + 0.5, f"{text!r} leaves the page"
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        overlap_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        overlap_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{a!r} overlaps {b!r}"


def test_colour_bars_are_as_tall_as_their_panel_and_beside_it(figure):
    renderer = figure.canvas.get_renderer()
    panels = [ax for axes in _panels(figure).values() for ax in axes]
    assert len(panels) == 3 + 3 + 2 + 2
    for ax in panels:
        image, bar = ax.get_window_extent(renderer), ax.images[0].colorbar.ax.get_window_extent(renderer)
        assert bar.height == pytest.approx(image.height, abs=1.0)
        assert bar.y0 == pytest.approx(image.y0, abs=1.0)
        assert 0 <= bar.x0 - image.x1 < 0.1 * image.width


def _table(fig) -> dict:
    table = fig.subfigs[1].subfigs[1].axes[0].tables[0]
    return {(r, c): cell.get_text().get_text() for (r, c), cell in table.get_celld().items()}


def test_figure_draws_the_metrics_table_and_frc_thresholds(scene, figure):
    results = scene[2]
    amp_ax, phase_ax = figure.subfigs[1].subfigs[0].axes[:2]
    cells = _table(figure)
    row_of = {text: r for (r, c), text in cells.items() if c == 0}
    ssim = results[1].metrics["ssim"]
    assert cells[(row_of["SSIM"], 2)] == f"{ssim[0]:.4g} / {ssim[1]:.4g}"
    assert cells[(row_of["registration"], 1)] == "unregistered"
    assert cells[(row_of["registration"], 2)] == "registered"
    n = 64 - 2 * TRIM  # the scored side
    r50 = results[0].metrics["frc50"][0]
    assert cells[(row_of["FRC 0.5 (nm)"], 1)].split(" / ")[0] == f"{n * 10 / r50:.4g}"
    assert results[1].metrics["frc50"] == (43.0, 43.0)  # PtyChi's curves never fall below 0.5 ...
    assert cells[(row_of["FRC 0.5 (rings)"], 2)] == "≥43 / ≥43"  # ... which reads as a bound
    assert cells[(row_of["FRC 0.5 (nm)"], 2)] == f"≤{n * 10 / 43:.4g} / ≤{n * 10 / 43:.4g}"
    nyquist = n // 2 + 1
    r = np.arange(n) - n // 2
    rings = np.round(np.sqrt(r[:, None] ** 2 + r[None, :] ** 2)).astype(int).ravel()
    count = np.bincount(rings)[:nyquist]
    for ax, part in ((amp_ax, 0), (phase_ax, 1)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert {"0.5", "1/7", "half-bit", "1-bit"} <= set(lines)
        expected = (0.2071 + 1.9102 / np.sqrt(count)) / (1.2071 + 0.9102 / np.sqrt(count))
        np.testing.assert_allclose(lines["half-bit"].get_ydata(), expected)
        one_bit = (0.5 + 2.4142 / np.sqrt(count)) / (1.5 + 1.4142 / np.sqrt(count))
        np.testing.assert_allclose(lines["1-bit"].get_ydata(), one_bit)
        plain = lines["_PtychoPINN, no window"]  # out of the legend, whose title names the styles
        np.testing.assert_allclose(plain.get_ydata(), results[0].metrics["frc"][part][:nyquist])
        hann = lines["PtychoPINN"]
        np.testing.assert_allclose(hann.get_ydata(), results[0].metrics["frc_hann"][part])
        assert all(len(line.get_xdata()) <= nyquist for line in lines.values())
        assert ax.get_xlim()[1] == n // 2
    legend = figure.subfigs[1].subfigs[0].legends[0]
    entries = [t.get_text() for t in legend.get_texts()]
    assert entries == ["PtychoPINN", "PtyChi", "half-bit", "1-bit", "0.5", "1/7"]
    assert "dashed: no window (compare_models)" in legend.get_title().get_text()
    r50_hann = results[1].metrics["frc50_hann"]  # blurred PtyChi crosses 0.5 when windowed
    assert all(0 < v < n // 2 for v in r50_hann)
    assert cells[(row_of["FRC 0.5, Hann (rings)"], 2)] == f"{r50_hann[0]:.4g} / {r50_hann[1]:.4g}"
    assert cells[(row_of["FRC 0.5, Hann (nm)"], 2)].split(" / ")[0] == f"{n * 10 / r50_hann[0]:.4g}"
    assert "FRC ½-bit, Hann (rings)" in row_of and "FRC 1-bit, Hann (nm)" in row_of


def test_figure_writes_none_for_a_windowed_curve_that_never_crosses(scene):
    truth, arms, results = scene
    never = ArmResult("pinn", "PtychoPINN", results[0].metrics | {"frc50_hann": (math.nan, 3.0)})
    fig = comparison_figure(truth, {"PtychoPINN": arms["PtychoPINN"]}, [never], title="t", max_side=16)
    cells = _table(fig)
    row = next(r for (r, c), text in cells.items() if c == 0 and text == "FRC 0.5, Hann (rings)")
    assert cells[(row, 1)] == "none / 3"


def test_figure_strides_large_images(figure):
    shapes = {ax.images[0].get_array().shape for axes in _panels(figure).values() for ax in axes}
    assert shapes == {(30, 30)}


def test_figure_refuses_an_arm_that_does_not_match_its_truth_and_an_unknown_alignment(scene):
    truth, arms, results = scene
    with pytest.raises(InvalidParameterError, match="PtyChi"):
        comparison_figure(truth, arms | {"PtyChi": arms["PtyChi"][:-1]}, results, title="t")
    with pytest.raises(InvalidParameterError, match="phase_align 'median'"):
        comparison_figure(truth, arms, results, title="t", phase_align="median")


# --- the report redraws the figure when its options change ---------------------------------------------


def test_lone_phase_bound_is_refused():
    from ptychozarr.config import OutputOptions

    with pytest.raises(InvalidParameterError, match="give both or neither"):
        OutputOptions(pinn_phase_vmin=-1.0)


@pytest.mark.slow
def test_report_redraws_the_figure_when_its_options_change(small_npz, tiny_models, tiny_run, tmp_path):
    from conftest import TINY_FLAGS

    from ptychozarr.pipeline import compare

    out = shutil.copytree(tiny_run.output_dir, tmp_path / "run")
    plot = out / "comparison_plot.png"
    models = {"PtychoPINN": tiny_models["pinn"], "Baseline": tiny_models["baseline"]}

    def run(**options):
        drawn = plot.stat().st_mtime_ns
        done = compare(small_npz, models, output_dir=out, **(TINY_FLAGS | options))
        return "report" in done.run["reused"], plot.stat().st_mtime_ns != drawn

    assert run() == (True, False)  # same options: the figure is reused
    assert run(p_min=5.0) == (False, True)  # a new percentile: redrawn
    assert run(p_min=5.0) == (True, False)
    limits = {"p_min": 5.0, "pinn_phase_vmin": -1.0, "pinn_phase_vmax": 1.0}
    assert run(**limits) == (False, True)
    assert run(**limits, phase_align_method="mean") == (False, True)

