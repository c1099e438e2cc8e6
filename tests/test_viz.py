"""Tests for viz/: figures built from a synthetic Report dict (no model, no torch)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

import viz

ROOT = Path(__file__).resolve().parents[1]
KEPT_CHANNELS = [0, 2, 3, 5, 7, 8, 9, 11, 13, 14, 16, 17, 19, 21, 22, 24, 26, 27, 29, 31]  # 20 of 32


def _layer(i, removed=False):
    if removed:
        return dict(index=i, removed=True, params_dense=1000, params_compressed=0, sizes={}, spectra={},
                    kept={}, leverage={}, errors={"block": 9.9}, influence=0.01)  # stale error: must be skipped
    # 14 positive descending eigenvalues, then a zero and a negative (numerical noise)
    spectrum = [2.0 ** (-k) * (i + 1) for k in range(14)] + [0.0, -1e-9]
    errors = {"block": 0.1 * (i + 1), "attn": 0.05, "mlp": 0.2}
    if i == 3:
        errors["mlp_before_calibration"] = 0.5
    return dict(index=i, removed=False, params_dense=1000, params_compressed=600 + i,
                sizes={"d_mid": 12, "mlp_dim": 20},
                spectra={"attn_input": spectrum, "mlp_input": [v / 2 for v in spectrum[:12]]},
                kept={"attn_input": 5, "mlp_input": 9},
                leverage={"scores": [((c * 7) % 32) / 32 + 0.01 for c in range(32)], "kept": KEPT_CHANNELS},
                errors=errors, influence=0.1 * (i + 1))


@pytest.fixture
def report():
    return dict(method="slicegpt", params_dense=4000, params_compressed=2400,
                block_influence=[0.3, 0.2, 0.01, 0.4],
                layers=[_layer(0), _layer(1), _layer(2, removed=True), _layer(3)])


def _annotations(fig):
    return [a.text for a in fig.layout.annotations]


def _by_name(fig):
    return {t.name: t for t in fig.data}


def _vlines(fig):
    return [(s.x0, s.xref) for s in fig.layout.shapes if s.x0 == s.x1]


def test_spectrum_one_panel_per_kind_with_its_own_kept_marker(report):
    fig = viz.spectrum_figure(report, 1)
    assert len(fig.data) == 4  # 2 spectra + 2 cumulative-energy curves
    assert "Layer 1" in fig.layout.title.text
    titles = _annotations(fig)
    assert "attention input" in titles and "MLP input (PCA basis)" in titles
    # a marker per panel, on that panel's own x axis, at its kept rank
    assert sorted(_vlines(fig)) == [(5, "x"), (9, "x2")]
    assert "kept 5/16" in " ".join(titles) and "kept 9/12" in " ".join(titles)
    spec = _by_name(fig)["attn_input"]
    assert list(spec.x) == list(range(1, 17))
    assert all(y > 0 for y in spec.y)  # zero and negative clipped for the log axis
    assert fig.layout[spec.yaxis.replace("y", "yaxis")].type == "log"
    energy = _by_name(fig)["attn_input energy"]
    assert fig.layout[energy.yaxis.replace("y", "yaxis")].type != "log"
    assert all(a <= b for a, b in zip(energy.y, energy.y[1:]))
    assert energy.y[-1] == pytest.approx(1.0)
    assert energy.y[0] == pytest.approx(2 / sum(2.0 ** -k * 2 for k in range(14)))


def test_spectrum_fraction_axis_puts_every_spectrum_on_0_to_1(report):
    fig = viz.spectrum_figure(report, 0, x_axis="fraction")
    for name in ("attn_input", "mlp_input"):
        x = list(_by_name(fig)[name].x)
        assert x[-1] == pytest.approx(1.0) and x[0] == pytest.approx(1 / len(x))
    assert sorted(x for x, _ in _vlines(fig)) == pytest.approx([5 / 16, 9 / 12])
    with pytest.raises(ValueError, match="x_axis"):
        viz.spectrum_figure(report, 0, x_axis="log")


@pytest.mark.parametrize("key, title", [("mlp_corr", "MLP activation correlation (Nyström)"),
                                        ("attn_input", "attention input"),
                                        ("vo_group2", "value–output, kv group 2"), ("odd_key", "odd key")])
def test_spectrum_titles_are_plain_words(key, title):
    assert viz.spectrum_title(key) == title


def test_spectrum_one_key(report):
    fig = viz.spectrum_figure(report, 0, key="mlp_input")
    assert [t.name for t in fig.data] == ["mlp_input", "mlp_input energy"]
    assert [x for x, _ in _vlines(fig)] == [9]


@pytest.mark.parametrize("layer, key", [(0, "vo_head0"), (2, None)])
def test_spectrum_missing_is_no_data(report, layer, key):
    fig = viz.spectrum_figure(report, layer, key=key)
    assert "no data" in _annotations(fig) and len(fig.data) == 0


@pytest.mark.parametrize("fn", [viz.spectrum_figure, viz.leverage_figure])
@pytest.mark.parametrize("layer", [4, -1, "1", 1.0])
def test_bad_layer_index_raises(report, fn, layer):
    with pytest.raises(ValueError, match="layer"):
        fn(report, layer)


def test_spectra_overview_is_a_layer_heat_map_with_the_layer_outlined(report):
    fig = viz.spectra_overview_figure(report, "attn_input", layer=1)
    heat, kept = fig.data
    assert heat.type == "heatmap" and list(heat.y) == [0, 1, 2, 3]
    assert all(v is None for v in heat.z[2])  # the removed layer is a blank row of its own
    live = [row for row in heat.z if row[0] is not None]
    assert all(row[0] == pytest.approx(0.0) for row in live)  # log10(λ/λ_max) of the top one
    assert all(max(v for v in row if v is not None) <= 0 for row in live)
    assert list(kept.x) == [5, 5, 5] and list(kept.y) == [0, 1, 3]
    (box,) = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (box.y0, box.y1) == (0.5, 1.5)
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.range == (-0.5, 3.5)
    assert not [s for s in viz.spectra_overview_figure(report, "attn_input").layout.shapes if s.type == "rect"]
    assert "no data" in _annotations(viz.spectra_overview_figure(report, "nope"))


def test_spectra_overview_says_what_the_ticks_and_the_dark_cells_mean(report):
    fig = viz.spectra_overview_figure(report, "attn_input", layer=1)
    key = fig.layout.title.subtitle.text
    assert "white tick: the layer's kept rank" in key and "red box: layer 1" in key
    assert "darkest" in key and "numerically zero" in key and "blank row" in key
    bar = fig.data[0].colorbar
    assert list(bar.tickvals) == [0, -3, -6, -9, -12] and bar.ticktext[-1].startswith("≤")
    assert "red box" not in viz.spectra_overview_figure(report, "attn_input").layout.title.subtitle.text


def test_leverage_partition(report):
    fig = viz.leverage_figure(report, 0)
    kept, dropped = fig.data
    assert kept.name == "kept (20)" and dropped.name == "dropped (12)"
    assert set(kept.customdata) == set(KEPT_CHANNELS)
    assert set(kept.customdata) | set(dropped.customdata) == set(range(32))
    assert len(kept.customdata) + len(dropped.customdata) == 32
    # merged by rank, scores are sorted descending
    merged = sorted(list(zip(kept.x, kept.y)) + list(zip(dropped.x, dropped.y)))
    assert [r for r, _ in merged] == list(range(32))
    assert all(a[1] >= b[1] for a, b in zip(merged, merged[1:]))
    assert "no data" in _annotations(viz.leverage_figure(report, 2))


def test_leverage_log_scale(report):
    assert viz.leverage_figure(report, 0).layout.yaxis.type != "log"
    assert viz.leverage_figure(report, 0, log_y=True).layout.yaxis.type == "log"


def test_error_figure(report):
    fig = viz.error_figure(report)
    traces = _by_name(fig)
    assert set(traces) == {"block", "attn", "mlp", "mlp_before_calibration"}
    assert list(traces["block"].x) == [0, 1, 3]  # removed layer 2 skipped
    assert list(traces["block"].y) == pytest.approx([0.1, 0.2, 0.4])
    assert list(traces["mlp_before_calibration"].x) == [3]
    # integer ticks from 0, and no room for a −1 or 4 tick
    assert (fig.layout.xaxis.tick0, fig.layout.xaxis.dtick, fig.layout.xaxis.range) == (0, 1, (-0.5, 3.5))


def test_error_figure_overlays_a_second_run(report):
    other = {**report, "layers": [{**lay, "errors": {"block": 1.0}} for lay in report["layers"]]}
    fig = viz.error_figure(report, other, names=("r1", "r2"))
    traces = _by_name(fig)
    assert {"block · r1", "block · r2", "attn · r1"} <= set(traces)
    assert traces["block · r2"].line.dash == "dash" and traces["block · r1"].line.dash == "solid"
    assert list(traces["block · r2"].y) == [1.0, 1.0, 1.0]


def test_error_figure_names_dropped_layers_and_an_overlay_without_errors(report):
    """A layer-dropping run has no per-module errors (its dropped blocks are gone, the rest untouched):
    overlaid, it drew nothing and said nothing; the subtitle now says why."""
    dropped = {**report, "layers": [{**lay, "errors": {}, "removed": lay["index"] in (1, 2)}
                                    for lay in report["layers"]]}
    fig = viz.error_figure(report, dropped, names=("r1", "r2"))
    assert all("r2" not in t.name for t in fig.data)  # nothing to draw for it...
    note = fig.layout.title.subtitle.text
    assert "r2: layers 1, 2 dropped" in note and "no per-module errors" in note  # ...and it says so
    assert "r1: layer 2 dropped" in note
    alone = viz.error_figure(dropped)
    assert "no data" in _annotations(alone) and "layers 1, 2 dropped" in alone.layout.title.subtitle.text
    plain = {**report, "layers": [{**lay, "removed": False} for lay in report["layers"]]}
    assert not viz.error_figure(plain).layout.title.subtitle.text  # nothing missing, nothing said


def test_influence_figure(report):
    fig = viz.influence_figure(report)
    kept, removed = fig.data
    assert list(kept.x) == [0, 1, 3] and list(removed.x) == [2]
    assert list(removed.y) == [0.01] and kept.marker.color != removed.marker.color
    # falls back to per-layer influence
    report["block_influence"] = None
    kept, removed = viz.influence_figure(report).data
    assert list(kept.y) == pytest.approx([0.1, 0.2, 0.4])


def test_influence_measured_elsewhere_fills_a_report_without_any(report):
    report["block_influence"] = None
    report["layers"] = [{**lay, "influence": None} for lay in report["layers"]]
    assert "no data" in _annotations(viz.influence_figure(report))
    fig = viz.influence_figure(report, [0.5, 0.1, 0.2, 0.3], source="dense model, computed here")
    assert fig.layout.title.subtitle.text == "dense model, computed here"
    assert sum(len(t.x) for t in fig.data) == 4
    # the method's own scores win over ones measured elsewhere
    report["block_influence"] = [0.3, 0.2, 0.01, 0.4]
    assert list(viz.influence_figure(report, [9.0] * 4).data[1].y) == [0.01]


def test_sizes_figure(report):
    fig = viz.sizes_figure(report)
    dense, comp = fig.data
    assert fig.layout.barmode == "group"
    assert list(dense.y) == [1000] * 4 and list(comp.y) == [600, 601, 0, 603]
    assert "mlp_dim = 20" in comp.customdata[0] and comp.customdata[2] == "removed"
    assert fig.layout.xaxis.range == (-0.5, 3.5)


def test_sizes_figure_overlays_a_second_run(report):
    other = {**report, "layers": [{**lay, "params_compressed": 100} for lay in report["layers"]]}
    dense, first, second = viz.sizes_figure(report, other, names=("r1", "r2")).data
    assert (first.name, second.name) == ("r1", "r2") and list(second.y) == [100] * 4


def _runs():
    # (params, ppl): non-dominated are (50, 30), (70, 20), (90, 12), (100, 10)
    pts = [("dense", 100, 10.0), ("slicegpt", 90, 12.0), ("slicegpt", 70, 25.0), ("modegpt", 70, 20.0),
           ("modegpt", 80, 21.0), ("olica", 50, 30.0), ("olica", 60, 40.0), ("layerdrop", 95, 13.0)]
    return [dict(method=m, params=p, ppl=q, ratio=1 - p / 100) for m, p, q in pts]


def test_pareto_front(report):
    runs = _runs()
    runs.append(dict(method="olica", params_compressed=55, ppl_compressed=26.0, label="alt keys"))
    fig = viz.pareto_figure(runs)
    traces = _by_name(fig)
    assert set(traces) == {"dense", "slicegpt", "modegpt", "olica", "layerdrop", "Pareto front"}
    assert traces["dense"].marker.symbol == "star"
    assert len(traces["olica"].x) == 3 and "alt keys" in traces["olica"].text
    front = traces["Pareto front"]
    assert list(zip(front.x, front.y)) == [(50, 30.0), (55, 26.0), (70, 20.0), (90, 12.0), (100, 10.0)]
    assert front.line.dash == "dash" and fig.layout.yaxis.type == "log"


def test_accuracy_front():
    runs = [dict(method="a", params=p, zero_shot_avg=acc) for p, acc in
            [(10, 0.40), (20, 0.38), (30, 0.50), (40, 0.50), (50, 0.60)]]
    fig = viz.accuracy_figure(runs)
    front = _by_name(fig)["Pareto front"]
    assert list(zip(front.x, front.y)) == [(10, 0.40), (30, 0.50), (50, 0.60)]
    assert fig.layout.yaxis.type != "log"
    assert "no data" in _annotations(viz.accuracy_figure(runs, key="missing"))


SIZE = 123_872_256  # the one-run case a user met: ticks "123.872255M … 123.872257M", y from −0.5


def _range(axis):
    return tuple(axis.range)


def test_accuracy_of_one_run_is_centred_with_its_interval_and_no_front():
    run = dict(method="modegpt", params=SIZE, zero_shot_avg=0.45, zero_shot_avg_stderr=0.03, label="r1")
    fig = viz.accuracy_figure([run])
    lo, hi = _range(fig.layout.xaxis)
    assert lo < SIZE < hi and hi - lo >= 0.05 * SIZE  # room around the point, not a millionth of it
    (point,) = fig.data  # no "Pareto front" entry for a front of one run
    assert point.error_y.array[0] == pytest.approx(1.96 * 0.03)
    assert point.error_y.arrayminus[0] == pytest.approx(1.96 * 0.03)
    ylo, yhi = _range(fig.layout.yaxis)
    assert 0 <= ylo < 0.45 - 1.96 * 0.03 and 0.45 + 1.96 * 0.03 < yhi <= 1  # the bar fits, inside [0, 1]


def test_accuracy_axis_and_bars_stay_within_0_and_1():
    runs = [dict(method="dense", params=SIZE, zero_shot_avg=0.02, zero_shot_avg_ci=[-0.05, 0.09]),
            dict(method="olica", params=SIZE * 0.8, zero_shot_avg=0.99, zero_shot_avg_stderr=0.02)]
    fig = viz.accuracy_figure(runs)
    assert _range(fig.layout.yaxis) == pytest.approx((0.0, 1.0))
    dense, olica = fig.data[:2]
    assert dense.error_y.arrayminus[0] == pytest.approx(0.02) and dense.error_y.array[0] == pytest.approx(0.07)
    assert olica.error_y.array[0] == pytest.approx(0.01)  # 0.99 + 1.96·0.02 cut at 1


def test_perplexity_of_one_run_has_its_interval_on_a_padded_log_axis():
    run = dict(method="slicegpt", params=SIZE, ppl=25.0, ppl_ci=[22.0, 29.0])
    fig = viz.pareto_figure([run, dict(method="olica", params=SIZE, ppl=None)])
    (point,) = fig.data
    assert (point.error_y.array[0], point.error_y.arrayminus[0]) == pytest.approx((4.0, 3.0))
    assert fig.layout.yaxis.type == "log"
    ylo, yhi = _range(fig.layout.yaxis)  # log10 units on a log axis
    assert ylo < math.log10(22.0) and math.log10(29.0) < yhi and yhi - ylo < 1
    lo, hi = _range(fig.layout.xaxis)
    assert lo < SIZE < hi and hi - lo >= 0.05 * SIZE
    assert "95% interval 22.00 – 29.00" in point.text[0]  # one precision for both ends


def test_runs_without_intervals_have_no_error_bars():
    fig = viz.pareto_figure(_runs())
    assert all(t.error_y.array is None for t in fig.data)


@pytest.mark.parametrize("lo, hi, text", [(57.538, 161.1, "57.5 – 161.1"), (0.41234, 0.488, "0.412 – 0.488"),
                                           (1234.4, 2345.6, "1234 – 2346"), (0.0, 0.0, "0.000 – 0.000")])
def test_a_range_has_one_precision(lo, hi, text):
    assert viz.range_text(lo, hi) == text


def test_loss_figure():
    losses = [3.0 - 0.1 * i for i in range(12)]
    fig = viz.loss_figure(losses, tokens=[512 * (i + 1) for i in range(12)])
    assert list(fig.data[0].x) == [512 * (i + 1) for i in range(12)]
    assert list(fig.data[0].y) == pytest.approx(losses)
    assert len(fig.data) == 2 and fig.data[1].y[0] == pytest.approx(3.0)  # raw + EMA
    assert list(viz.loss_figure([1.0, 0.5]).data[0].x) == [1, 2]
    with pytest.raises(ValueError, match="tokens"):
        viz.loss_figure(losses, tokens=[1, 2])


@pytest.mark.parametrize("make", [
    lambda r: viz.spectrum_figure(r, 0), lambda r: viz.spectra_overview_figure(r, "attn_input", 0),
    lambda r: viz.leverage_figure(r, 0), viz.error_figure, viz.influence_figure, viz.sizes_figure,
    lambda r: viz.pareto_figure([]), lambda r: viz.accuracy_figure([]), lambda r: viz.loss_figure([]),
])
def test_empty_report_is_no_data(make):
    fig = make(dict(method="dense", layers=[], block_influence=None))
    assert "no data" in _annotations(fig) and len(fig.data) == 0
    assert fig.layout.template.layout.plot_bgcolor == "white"  # plotly_white template


def test_accepts_object_with_to_dict(report):
    class FakeReport:
        def to_dict(self):
            return report
    assert len(viz.error_figure(FakeReport()).data) == 4


def test_viz_does_not_import_torch_or_compression():
    code = "import viz, sys; bad = [m for m in ('torch', 'compression') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
