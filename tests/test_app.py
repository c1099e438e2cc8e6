"""The Gradio app's Compress tab on a tiny random Llama (real SmolLM2 tokenizer), its handlers called
directly: compress against the forecast, refusals as status text, calibration sources, stop, the
per-layer editor and presets, healing. The other tabs and the launched app: test_app_chat.py; shared
helpers: app_helpers.py, fixtures (tiny_folder, tabs): conftest.py."""
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
from app_helpers import CALIB, FAST_OPTIONS, _checksum, _compress, last, refusal  # noqa: E402
from ui import runs as R  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's queue vs pandas 3
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


# ------------------------------------------------------------------------------------ Compress tab
def test_model_info_and_bad_models(tabs, tiny_folder, tmp_path):
    md, layers = tabs.compress.model_info(tiny_folder)
    assert layers == 2 and "llama" in md
    md, layers = tabs.compress.model_info("./no/such/model")
    assert layers == 0 and "does not exist" in md  # the old model's info is replaced by the reason
    md, _ = tabs.compress.model_info("nonexistent/model")
    assert "not found" in md and "offline" in md  # not a network failure
    (tmp_path / "empty").mkdir()
    assert "without config.json" in tabs.compress.model_info(str(tmp_path / "empty"))[0]
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    assert "unsupported architecture 'gpt2'" in tabs.compress.model_info(str(tmp_path / "gpt2"))[0]


@pytest.mark.parametrize("method,allocation,per_layer", [
    ("layerdrop", "manual", "1"), ("slicegpt", "uniform", ""), ("slicegpt", "manual", "0.1,0.5"),
    ("modegpt", "auto", ""), ("olica", "manual", "0.2,0.4")])
def test_compress_matches_forecast_and_leaves_dense_untouched(tabs, tiny_folder, method, allocation, per_layer):
    session = R.Session()
    dense, _ = tabs.ctx.store.get(tiny_folder)
    before = _checksum(dense)
    md = tabs.compress.forecast(tiny_folder, method, 0.3, allocation, per_layer, False)
    assert "Forecast" in md and "⚠" not in md
    panel, status, summary, dropdown, returned = _compress(tabs, session, tiny_folder, method,
                                                           allocation=allocation, per_layer=per_layer)
    assert status.startswith("✔") and returned is session and summary["run"] == "r1"
    assert 'role="progressbar"' in panel and 'aria-valuenow="100"' in panel
    assert dropdown["value"] == "r1" and summary["method"] == method
    config = tabs.compress._config(tiny_folder, method, 0.3, allocation, per_layer, False, options=FAST_OPTIONS)
    from ui.forms import forecast_numbers

    fc = forecast_numbers(tabs.ctx.store, tiny_folder, config)
    if method != "olica" and allocation != "auto":  # exact: one plan feeds the forecast and the run
        assert summary["params_compressed"] == fc["params"]
    assert abs(summary["params_compressed"] - fc["params"]) <= 0.03 * summary["block_params_dense"]
    assert summary["ppl_compressed"] > 0 and summary["ppl_dense"] > 0
    assert _checksum(dense) == before, "the shared dense model must never change"
    run = session.get("r1")
    assert run.model is not dense
    out = tabs.inspect.inspect(session, "r1", 1)
    figures = [*out[3:8], tabs.inspect.influence(session, "r1")]
    assert len(figures) == 6 and all(hasattr(f, "to_plotly_json") for f in figures)


def test_forecast_shows_problems_without_raising(tabs, tiny_folder):
    assert "cannot reach" in tabs.compress.forecast(tiny_folder, "layerdrop", 0.9, "auto", "", False)
    assert "needs 2 per-layer values" in tabs.compress.forecast(tiny_folder, "modegpt", 0.3, "manual", "0.1", False)
    assert "⚠" in tabs.compress.forecast("./missing/model", "slicegpt", 0.3, "uniform", "", False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="layerdrop", ratio=0.9), "cannot reach"),
    (dict(method="slicegpt", ratio=0.95), r"\[0, 0.9\]"),
    (dict(method="modegpt", allocation="manual", per_layer="0.1,0.2,0.3"), "needs 2 per-layer"),
    (dict(method="modegpt", allocation="manual", per_layer="0.1,abc"), "cannot read"),
    (dict(method="layerdrop", allocation="manual", per_layer="0,1"), "cannot drop every layer"),
    (dict(method="slicegpt", allocation="auto"), "supports allocation"),
    (dict(method="nope"), "unknown method"),
    (dict(method="modegpt", epsilon=float("nan"), allocation="auto"), "epsilon must be a finite number"),
    (dict(method="modegpt", options={"modegpt_ridge": float("nan")}), "ridge must be a finite number"),
    (dict(method="olica", options={"olica_ridge": -1.0}), "ridge must be in"),
    (dict(method="modegpt", options={"modegpt_refit_shrinkage": "lots"}), "Refit shrinkage μ must be a number or empty"),
    (dict(method="modegpt", options={"modegpt_refit_shrinkage": "-1"}), "refit_shrinkage must be in"),
    (dict(method="modegpt", batch_size=0), "batch_size must be in"),
    (dict(calib_text="Far too little text."), "calibration"),
    (dict(calib_samples=100000, calib_len=2048), "calibration"),
])
def test_bad_input_is_readable_status_text(tabs, tiny_folder, kwargs, message):
    session = R.Session()
    shown = refusal(_compress, tabs, session, tiny_folder, outputs=5, status=1, **kwargs)
    assert re.search(message, shown) and not session.runs
    from ui.common import on_page

    panel, status, summary, runs, state = on_page(_compress, 5, 1, (0,))(tabs, session, tiny_folder, **kwargs)
    assert panel == "" and status == shown and summary == runs == state == {"__type__": "update"}


def test_calibration_sources_are_the_offered_ones_only(tabs, tiny_folder):
    from ui.calibration_form import CUSTOM, calibration_spec
    from ui.compress_tab import CompressTab

    assert calibration_spec(4, 64, "code", "", None).source == "code"
    assert calibration_spec(4, 64, "", "", None).source == "wiki"  # API callers from before the picker
    from compression.methods import METHODS

    assert [CompressTab.default_source(m) for m in METHODS] == [m.calibration for m in METHODS.values()]
    assert calibration_spec(4, 64, "", "some text", None).text == "some text"
    assert calibration_spec(4, 64, "wiki", "ignored unless custom", None).text is None
    assert calibration_spec(4, 64, CUSTOM, " mine ", None).text == "mine"
    for bad, message in (("text:/etc/passwd", "must be one of"), ("hf:wikitext", "must be one of"),
                         (CUSTOM, "type the text or upload")):
        with pytest.raises(ValueError, match=message):
            calibration_spec(4, 64, bad, "", None)


def test_calibration_source_is_used_and_reported(tabs, tiny_folder):
    session = R.Session()
    _, status, summary, _, _ = _compress(tabs, session, tiny_folder, "modegpt", allocation="uniform",
                                         calib_source="code", ppl_windows=0)
    cal = session.get("r1").report["calibration"]
    assert cal["source"] == "code" and cal["tokens"] == 4 * 64 and cal["fingerprint"]
    assert "calibration: code · 4 × 64 = 256 tokens" in status and summary["calibration"].startswith("code")


def test_uploaded_calibration_text_is_read_in_memory(tabs, tiny_folder, tmp_path):
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"test-calib-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    text = "A plain sentence about rivers, hills and the weather in spring. " * 200
    good, latin1, binary, other = (folder / "mine.txt", folder / "latin.txt", folder / "bin.txt", folder / "x.csv")
    good.write_text(text, encoding="utf-8")
    latin1.write_bytes("café ".encode("latin-1") * 500)
    binary.write_bytes(b"abc\x00def" * 100)
    other.write_text(text)
    session = R.Session()
    _, status, _, _, _ = _compress(tabs, session, tiny_folder, "modegpt", allocation="uniform",
                                   calib_source="custom", calib_file=str(good), ppl_windows=0)
    assert "calibration: custom text" in status and session.get("r1").report["calibration"]["source"] == "text"
    for path, message in ((latin1, "not UTF-8 text"), (binary, "binary data"), (other, "as a .txt file"),
                          (tmp_path / "elsewhere.txt", "not uploaded through this app")):
        assert message in refusal(_compress, tabs, R.Session(), tiny_folder, outputs=5, status=1,
                                  calib_source="custom", calib_file=str(path))


def test_self_chat_calibration_and_chat_agreement(tabs, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    session = R.Session()
    _, status, _, _, _ = _compress(tabs, session, tiny_folder, "modegpt", allocation="uniform",
                                   calib_source="wiki+self-chat", ppl_windows=0, chat_eval=2)
    report = session.get("r1").report
    assert report["calibration"]["source"] == "wiki+self-chat" and "calibration: wiki+self-chat" in status
    assert list((tmp_path / "cache" / "self_chat").glob("*.json"))  # generated once, then cached
    assert report["agreement_chat"]["conversations"] == 2 and "on chat replies (2 conversations)" in status


def test_degenerate_calibration_warns_in_report_and_status(tabs, tiny_folder):
    session = R.Session()
    text = " ".join(["the"] * 3000)  # one repeated word: far fewer distinct tokens than the hidden size
    _, status, summary, _, _ = _compress(tabs, session, tiny_folder, "modegpt", calib_text=text,
                                         allocation="uniform", ppl_windows=0)
    warnings = session.get("r1").report["warnings"]
    assert any("distinct tokens" in w for w in warnings)
    assert "⚠" in status and "distinct tokens" in status


def test_stop_cancels_cleanly(tabs, tiny_folder):
    session = R.Session()
    dense, _ = tabs.ctx.store.get(tiny_folder)
    before = _checksum(dense)
    steps = tabs.compress.compress(session, tiny_folder, "modegpt", 0.3, "uniform", "", **CALIB)
    next(steps)  # the job is running
    tabs.compress.stop(session)
    outs = list(steps)
    assert outs[-1][1].startswith("■") and outs[-1][2] == {"stopped": True}
    assert not session.runs and _checksum(dense) == before
    assert _compress(tabs, session, tiny_folder)[1].startswith("✔")  # the app stays usable


def test_closing_the_stream_stops_the_job_and_frees_the_slot(tabs, tiny_folder):
    """What gradio does when a client cancels or disconnects: it stops pulling the generator."""
    session = R.Session()
    steps = tabs.compress.compress(session, tiny_folder, "modegpt", 0.3, "uniform", "",
                                   calib_samples=64, calib_len=256, ppl_windows=4)
    next(steps)
    flag = next(iter(session._jobs))
    steps.close()
    assert flag.is_set() and not session.busy
    assert tabs.ctx.slot.acquire(timeout=30), "the model slot must be free within seconds"
    tabs.ctx.slot.release()
    assert not session.runs


def test_default_per_layer_and_method_switch(tabs):
    unchanged = {"__type__": "update"}
    c = tabs.compress
    assert c.default_per_layer("modegpt", "manual", 0.25, 3, "") == "0.25,0.25,0.25"
    assert c.default_per_layer("modegpt", "manual", 0.25, 3, "0.1,0.2,0.3") == unchanged
    assert c.default_per_layer("layerdrop", "manual", 0.25, 3, "0.1,0.2,0.3") == ""  # no parse error
    assert c.default_per_layer("modegpt", "manual", 0.25, 3, "1,2") == "0.25,0.25,0.25"
    assert c.default_per_layer("layerdrop", "manual", 0.25, 3, "2") == unchanged
    assert c.default_per_layer("layerdrop", "auto", 0.25, 3, "x") == unchanged
    update, note, slicing, per_layer, presets, epsilon, *groups = c.layout("layerdrop", "uniform")
    assert update["value"] == "auto"
    assert "Block Influence" in note and not slicing["visible"] and not per_layer["visible"]
    assert not presets["visible"]
    from compression.methods import METHODS

    assert [g["visible"] for g in groups] == [name == "layerdrop" for name in METHODS]
    _, _, slicing, per_layer, presets, epsilon, *groups = c.layout("modegpt", "auto")
    assert epsilon["visible"] and not slicing["visible"]
    assert c.layout("slicegpt", "manual")[3]["visible"] and c.layout("slicegpt", "manual")[4]["visible"]
    assert c.achieved_target("modegpt", "manual", "0.1,0.3", 0.25)["value"] == 0.2
    assert "value" not in c.achieved_target("modegpt", "manual", "0.1,0.3", 0.2)  # unchanged: no new value


def test_slider_values_and_drop_indices_follow_the_text():
    from ui import forms

    assert forms.slider_values("0.1, 0.2", 2) == [0.1, 0.2]
    assert forms.slider_values("0.1", 2) is None and forms.slider_values("0.1,0.99", 2) is None
    assert forms.slider_values("a,b", 2) is None
    assert forms.drop_indices("3, 0, 9", 4) == [0, 3] and forms.drop_indices("0.5", 4) == []
    assert forms.values_text([0.1, 0.25]) == "0.10,0.25" and forms.indices_text([3, 1]) == "1,3"


def test_per_layer_editor_shows_one_slider_per_layer_and_follows_usable_text(tabs):
    from ui import forms

    c = tabs.compress
    row, box, *sliders = c.editor_layout(30, "modegpt", "manual")
    assert row["visible"] and not box["visible"] and len(sliders) == forms.MAX_SLIDERS
    assert [s["visible"] for s in sliders] == [i < 30 for i in range(forms.MAX_SLIDERS)]
    row, box, *sliders = c.editor_layout(3, "layerdrop", "manual")
    assert not row["visible"] and box["visible"] and box["choices"] == [0, 1, 2]
    assert not c.editor_layout(3, "modegpt", "auto")[0]["visible"]
    assert not c.editor_layout(forms.MAX_SLIDERS + 1, "modegpt", "manual")[0]["visible"]  # text field alone
    box, *values = c.editor_values("0.1,0.2", "modegpt", 2)
    assert values[:2] == [0.1, 0.2] and values[2] == {"__type__": "update"}
    assert c.editor_values("0.1,", "modegpt", 2)[1] == {"__type__": "update"}  # half-typed: nothing moves
    assert c.editor_values("2, 0", "layerdrop", 3)[0] == [0, 2]
    # a slider already at its value is left alone: a late echo of the text never sets back a typed value
    box, *values = c.editor_values("0.10,0.40", "modegpt", 2, 0.3, 0.4)
    assert values[0] == 0.1 and values[1] == {"__type__": "update"}
    assert list(c.editor_values("0.10,0.40", "modegpt", 2, 0.1, 0.4)[1:3]) == [{"__type__": "update"}] * 2
    assert c.slider_text(2, 0.1, 0.25, 0.5) == "0.10,0.25"


def test_presets_fill_the_per_layer_values(tabs, tiny_folder):
    c = tabs.compress
    text, note = c.preset(tiny_folder, "modegpt", "uniform", 0, 0.3)
    assert text == "0.30,0.30" and note.startswith("✔")
    text, _ = c.preset(tiny_folder, "modegpt", "automatic (Block Influence)", 0, 0.3)
    values = [float(v) for v in text.split(",")]
    assert sum(values) / 2 == pytest.approx(0.3, abs=0.01) and values[0] != values[1]
    influence = tabs.ctx.store.block_influence(tiny_folder)  # cached: same numbers, no recompute
    assert influence == tabs.ctx.store.block_influence(tiny_folder) and len(influence) == 2
    update, note = c.preset(tiny_folder, "modegpt", "spare first/last k", 1, 0.3)  # 2 layers, k=1: none left
    assert update == {"__type__": "update"} and note.startswith("⚠") and "k <" in note
    text, note = c.preset(tiny_folder, "layerdrop", "automatic (Block Influence)", 0, 0.4)
    assert text == str(min(range(2), key=influence.__getitem__))
    assert c.preset(tiny_folder, "layerdrop", "uniform", 0, 0.4)[1].startswith("⚠")
    assert "mean" in c.preset(tiny_folder, "modegpt", "uniform", 0, 5.0)[1]


def test_spare_first_and_last_k_keeps_the_mean():
    from ui import forms

    values = forms.preset_values("spare first/last k", 10, 0.2, 2)
    assert values[:2] == [0, 0] and values[-2:] == [0, 0] and sum(values) / 10 == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lower the mean"):
        forms.preset_values("spare first/last k", 10, 0.6, 2)
    assert forms.preset_drops("spare first/last k", 0.2, 1, [0.0, 5, 5, 0.1, 0.0], [1] * 5) == [3]


def test_heal_changes_only_the_runs_model(tabs, tiny_folder):
    pytest.importorskip("peft")
    session = R.Session()
    _compress(tabs, session, tiny_folder, "slicegpt", 0.3)
    dense, _ = tabs.ctx.store.get(tiny_folder)
    before, run_before = _checksum(dense), _checksum(session.get("r1").model)
    _, status, figure = last(tabs.compress.heal(session, "r1", tokens=512, lora_rank=2, seq_len=64, ppl_windows=1))
    assert status.startswith("✔ healed **r1**") and "ppl" in status and len(figure.data) >= 1
    record = session.get("r1").report["heal"]
    assert record["steps"] == 2 and record["ppl_after"] == session.get("r1").report["ppl_compressed"]
    assert _checksum(dense) == before and _checksum(session.get("r1").model) != run_before
    assert "below one optimizer step" in refusal(tabs.compress.heal, session, "r1", tokens=10, lora_rank=2,
                                                 seq_len=64, ppl_windows=0, outputs=3, status=1)


def test_an_optional_number_option_is_a_text_box_whose_empty_value_means_automatic(tabs, tiny_folder):
    """A gr.Number cannot be empty (it shows and sends 0, which for the refit shrinkage is the paper's
    least squares, not the automatic default): optional numbers are text boxes, empty = None."""
    import gradio as gr
    from compression.modegpt import MoDeGPTConfig
    from ui import forms
    from ui.page import option_control

    knob = next(k for m, k in forms.option_knobs() if m == "modegpt" and k.name == "refit_shrinkage")
    box = option_control(knob)
    assert isinstance(box, gr.Textbox) and box.value == "" and box.placeholder == "automatic"
    assert isinstance(option_control(next(k for m, k in forms.option_knobs() if k.name == "ridge")), gr.Number)
    config = lambda value: tabs.compress._config(tiny_folder, "modegpt", 0.3, "uniform", "", False,  # noqa: E731
                                                 options={"modegpt_refit_shrinkage": value})
    assert config("").refit_shrinkage is None and config("  ").refit_shrinkage is None
    assert config("0").refit_shrinkage == 0.0 and config(0.25).refit_shrinkage == 0.25
    assert MoDeGPTConfig().refit_shrinkage is None
