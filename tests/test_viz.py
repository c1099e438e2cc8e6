"""Tests for viz/: figures built from a synthetic Report dict (no model, no torch)."""
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


def test_spectrum_all_keys(report):
    fig = viz.spectrum_figure(report, 1)
    assert len(fig.data) == 4  # 2 spectra + 2 cumulative-energy curves
    assert "Layer 1" in fig.layout.title.text
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis2.type != "log"
    # one marker per kept rank, drawn on both rows
    assert sorted(s.x0 for s in fig.layout.shapes) == [5, 5, 9, 9]
    spec = _by_name(fig)["attn_input"]
    assert list(spec.x) == list(range(1, 17))
    assert all(y > 0 for y in spec.y)  # zero and negative clipped for the log axis
    energy = _by_name(fig)["attn_input energy"].y
    assert all(a <= b for a, b in zip(energy, energy[1:]))
    assert energy[-1] == pytest.approx(1.0) and energy[0] == pytest.approx(2 / sum(2.0 ** -k * 2 for k in range(14)))


def test_spectrum_one_key(report):
    fig = viz.spectrum_figure(report, 0, key="mlp_input")
    assert [t.name for t in fig.data] == ["mlp_input", "mlp_input energy"]
    assert {s.x0 for s in fig.layout.shapes} == {9}


@pytest.mark.parametrize("layer, key", [(0, "vo_head0"), (2, None)])
def test_spectrum_missing_is_no_data(report, layer, key):
    fig = viz.spectrum_figure(report, layer, key=key)
    assert "no data" in _annotations(fig) and len(fig.data) == 0


@pytest.mark.parametrize("fn", [viz.spectrum_figure, viz.leverage_figure])
@pytest.mark.parametrize("layer", [4, -1, "1", 1.0])
def test_bad_layer_index_raises(report, fn, layer):
    with pytest.raises(ValueError, match="layer"):
        fn(report, layer)


def test_spectra_overview(report):
    fig = viz.spectra_overview_figure(report, "attn_input")
    assert [t.name for t in fig.data] == ["layer 0", "layer 1", "layer 3"]  # removed layer has none
    assert fig.layout.yaxis.type == "log"
    assert all(max(t.y) == pytest.approx(1.0) for t in fig.data)
    assert len({t.line.color for t in fig.data}) == 3
    assert "no data" in _annotations(viz.spectra_overview_figure(report, "nope"))


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


def test_error_figure(report):
    fig = viz.error_figure(report)
    traces = _by_name(fig)
    assert set(traces) == {"block", "attn", "mlp", "mlp_before_calibration"}
    assert list(traces["block"].x) == [0, 1, 3]  # removed layer 2 skipped
    assert list(traces["block"].y) == pytest.approx([0.1, 0.2, 0.4])
    assert list(traces["mlp_before_calibration"].x) == [3]


def test_influence_figure(report):
    fig = viz.influence_figure(report)
    kept, removed = fig.data
    assert list(kept.x) == [0, 1, 3] and list(removed.x) == [2]
    assert list(removed.y) == [0.01] and kept.marker.color != removed.marker.color
    # falls back to per-layer influence
    report["block_influence"] = None
    kept, removed = viz.influence_figure(report).data
    assert list(kept.y) == pytest.approx([0.1, 0.2, 0.4])


def test_sizes_figure(report):
    fig = viz.sizes_figure(report)
    dense, comp = fig.data
    assert fig.layout.barmode == "group"
    assert list(dense.y) == [1000] * 4 and list(comp.y) == [600, 601, 0, 603]
    assert "mlp_dim = 20" in comp.customdata[0] and comp.customdata[2] == "removed"


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
    lambda r: viz.spectrum_figure(r, 0), lambda r: viz.spectra_overview_figure(r, "attn_input"),
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
