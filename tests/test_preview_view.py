"""The Compress tab's error forecast: nothing until measured, then a redraw per setting without a
compression, with a run's measured errors and the session's runs drawn over."""
import pytest

gr = pytest.importorskip("gradio")
from app_helpers import _compress, last  # noqa: E402
from ui import forms  # noqa: E402
from ui import runs as R  # noqa: E402
from ui.preview_view import NO_CALIBRATION, NOT_YET  # noqa: E402

CAL = (4, 64, "wiki", "", None)  # samples, length, source, text, upload


def _draw(tabs, session, folder, ratio=0.25, run_id=None, method="modegpt", allocation="uniform"):
    options = [k.default for _, k in forms.option_knobs()]
    return tabs.compress.preview.draw(session, folder, method, ratio, allocation, "", False, 0.1, *CAL, run_id,
                                      *options)


def test_forecast_waits_for_measure_then_follows_the_ratio(tabs, tiny_folder):
    session = R.Session()
    note, errors, tradeoff = _draw(tabs, session, tiny_folder)
    assert note == NOT_YET
    out = last(tabs.compress.preview.measure(session, tiny_folder, *CAL))
    assert out[1].startswith("✔")
    low, high = (_draw(tabs, session, tiny_folder, r) for r in (0.1, 0.4))
    total = lambda note: float(note.split("**")[1])  # noqa: E731
    assert 0 < total(low[0]) < total(high[0])
    bars = [t for t in high[1].data if t.type == "bar"]
    assert bars and len(bars[0].y) == tabs.ctx.store.info(tiny_folder).num_layers  # one value per layer
    assert len(high[2].data[0].x) >= 5  # the curve over target ratios


def test_a_run_is_drawn_over_its_forecast(tabs, tiny_folder):
    session = R.Session()
    last(tabs.compress.preview.measure(session, tiny_folder, *CAL))
    _, status, summary, *_ = _compress(tabs, session, tiny_folder, method="modegpt", ratio=0.25, allocation="uniform")
    run_id = summary["run"]
    note, errors, tradeoff = _draw(tabs, session, tiny_folder, 0.25, run_id)
    assert f"measured errors of {run_id}" in note
    assert len(errors.data) > len(_draw(tabs, session, tiny_folder, 0.25)[1].data)
    assert any(t.mode and "markers" in t.mode for t in tradeoff.data)  # the run as a measured point


def test_bad_settings_are_said_not_raised(tabs, tiny_folder):
    session = R.Session()
    last(tabs.compress.preview.measure(session, tiny_folder, *CAL))
    note, *_ = _draw(tabs, session, tiny_folder, allocation="manual")
    assert note.startswith("⚠")


def test_unusable_calibration_is_not_a_second_error_message(tabs, tiny_folder):
    """The Compress status already names a bad calibration; the forecast note says it waits, once."""
    options = [k.default for _, k in forms.option_knobs()]
    note, *_ = tabs.compress.preview.draw(R.Session(), tiny_folder, "modegpt", 0.25, "uniform", "", False, 0.1,
                                          4, 64, "custom", "", None, None, *options)
    assert note == NO_CALIBRATION


def test_best_allocation_by_forecast_fills_manual_values(tabs, tiny_folder):
    session = R.Session()
    options = [k.default for _, k in forms.option_knobs()]
    with pytest.raises(gr.Error, match="Measure first"):  # not measured at this calibration
        tabs.compress.preview.best(session, tiny_folder, "modegpt", 0.25, 3, 48, "wiki", "", None, *options)
    last(tabs.compress.preview.measure(session, tiny_folder, *CAL))
    allocation, text, note = tabs.compress.preview.best(session, tiny_folder, "modegpt", 0.25, *CAL, *options)
    values = [float(v) for v in text.split(",")]
    assert allocation == "manual" and len(values) == tabs.ctx.store.info(tiny_folder).num_layers
    assert abs(sum(values) / len(values) - 0.25) < 0.01 and "Best by forecast" in note
