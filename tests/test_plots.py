"""ww_core.plots: ESD and alpha plots (matplotlib, Agg backend; no torch needed)."""

import math
import sys

import numpy as np
import pytest

import ww_core
from helpers import heavy_tailed
from ww_core import plots

pytestmark = pytest.mark.core
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(3)
    sd = {
        "fc1.weight": (rng.standard_normal((300, 150)) / np.sqrt(300)).astype(np.float32),
        "fc2.weight": heavy_tailed(rng, (400, 200)),
        "out/proj:weird name.weight": heavy_tailed(rng, (64, 200)),
    }
    return ww_core.analyze(sd, keep_evals=True)


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot(1, 1, 1)


def _fit_line(ax):
    lines = [l for l in ax.get_lines() if l.get_gid() == "powerlaw-fit"]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_esd_axes_and_fitted_slope(result, name):
    layer = result[name]
    assert layer.ok and layer.evals is not None
    ax = plots.plot_esd(layer, _axes())
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    x, y = (np.asarray(v, dtype=float) for v in _fit_line(ax).get_data())
    slopes = np.diff(np.log(y)) / np.diff(np.log(x))
    np.testing.assert_allclose(slopes, -layer.alpha, rtol=0, atol=1e-6)
    assert x[0] == pytest.approx(layer.xmin, rel=1e-9)
    assert x[-1] == pytest.approx(layer.xmax, rel=1e-9)
    # normalised to the tail mass: the integral of the line from xmin to infinity equals the
    # share of (plotted) eigenvalues >= xmin
    ev = layer.evals[layer.evals > plots.EVALS_THRESH]
    area = y[0] * x[0] / (layer.alpha - 1)
    assert area == pytest.approx(np.mean(ev >= layer.xmin), rel=1e-9)
    xmin_lines = [l for l in ax.get_lines() if l.get_gid() == "xmin"]
    assert len(xmin_lines) == 1
    assert xmin_lines[0].get_xdata()[0] == pytest.approx(layer.xmin)
    assert name in ax.get_title() and f"{layer.alpha:.3f}" in ax.get_title()
    # histogram bars are log-spaced
    widths = np.array([p.get_width() for p in ax.patches])
    lefts = np.array([p.get_x() for p in ax.patches])
    ratios = (lefts + widths) / lefts
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)


def test_esd_needs_evals(result):
    layer = ww_core.result.replace(result["fc1"], evals=None)
    with pytest.raises(ValueError, match="keep_evals=True"):
        plots.plot_esd(layer, _axes())
    ax = plots.plot_esd(layer, _axes(), evals=result["fc1"].evals)
    assert ax.get_xscale() == "log"


def test_esd_failed_fit_has_no_line(result):
    layer = ww_core.result.replace(result["fc1"], alpha=math.nan, status="failed",
                                   flags=("fit-failed",))
    ax = plots.plot_esd(layer, _axes())
    assert not [l for l in ax.get_lines() if l.get_gid() == "powerlaw-fit"]
    assert "fit-failed" in ax.get_title()


def test_plot_alphas(result):
    ax = plots.plot_alphas(result, _axes())
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == result.names
    alphas = np.array([layer.alpha for layer in result.layers])
    n = len(alphas)
    assert n == 3 and np.isfinite(alphas).all() and not any(layer.flags for layer in result.layers)
    # the polyline through the layers: x = model order, y = each layer's alpha
    (series,) = [l for l in ax.get_lines() if len(l.get_xdata()) == n]
    np.testing.assert_array_equal(series.get_xdata(), np.arange(n))
    np.testing.assert_allclose(series.get_ydata(), alphas, rtol=0, atol=0)
    # one blue marker per layer at (index, alpha); no flagged (red) marker
    points = {c.get_label(): np.asarray(c.get_offsets(), dtype=float) for c in ax.collections}
    np.testing.assert_allclose(points["alpha"], np.column_stack([np.arange(n), alphas]), rtol=0, atol=0)
    assert points["flagged layer"].size == 0
    # y axis from 0 to 8 (the floor of the top, above every alpha), plus 2 %
    assert ax.get_ylim() == pytest.approx((0.0, 8.0 * 1.02))
    assert ax.get_title() == f"alpha by layer (3 layers, mean alpha {alphas.mean():.2f})"
    # bands at 2 and 6
    hlines = {round(l.get_ydata()[0], 6) for l in ax.get_lines() if len(set(l.get_ydata())) == 1}
    assert {2.0, 6.0} <= hlines


def test_plot_alphas_with_failed_and_huge(result):
    layers = [ww_core.result.replace(result["fc1"], alpha=math.nan, flags=("fit-failed",)),
              ww_core.result.replace(result["fc2"], alpha=50.0, flags=("under-trained",)),
              result["fc2"]]
    res = ww_core.result.AnalysisResult(layers=layers)
    ax = plots.plot_alphas(res, _axes())
    assert ax.get_ylim() == pytest.approx((0.0, 20.0 * 1.02))          # capped at 20, not 50 * 1.08
    points = {c.get_label(): np.asarray(c.get_offsets(), dtype=float) for c in ax.collections}
    np.testing.assert_allclose(points["alpha > 20 (clipped)"], [[1.0, 20.0]])  # the huge one, at the cap
    np.testing.assert_allclose(points["alpha"], [[2.0, result["fc2"].alpha]])
    assert points["flagged layer"].size == 0
    # the failed fit: no point, a dotted vertical line at its index
    assert [tuple(l.get_xdata()) for l in ax.get_lines() if l.get_linestyle() == ":" and len(l.get_xdata())] \
        == [(0, 0)]


def test_save_plots(result, tmp_path):
    paths = plots.save_plots(result, tmp_path / "out")
    assert paths[0].name == "alpha_by_layer.png"
    assert [p.name for p in paths[1:]] == ["esd_fc1.png", "esd_fc2.png",
                                           "esd_out_proj_weird_name.png"]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_plots_without_evals(tmp_path):
    rng = np.random.default_rng(0)
    res = ww_core.analyze({"fc.weight": rng.standard_normal((100, 50))})
    with pytest.raises(ValueError, match="keep_evals"):
        plots.save_plots(res, tmp_path)


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"ww-callbacks\[plot\]"):
        plots.require_matplotlib()
