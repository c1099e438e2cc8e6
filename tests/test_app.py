"""The Gradio app on a tiny random Llama (real SmolLM2 tokenizer): tab handlers called directly, then
the launched app driven through gradio_client (compress -> inspect -> evaluate -> chat)."""
import inspect
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
import app  # noqa: E402
from conftest import tiny_chat_llama  # noqa: E402
from ui import runs as R  # noqa: E402
from ui.chat import STATS, build_prompt  # noqa: E402
from ui.store import ModelStore  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's queue vs pandas 3
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
CALIB = dict(calib_samples=4, calib_len=64, ppl_windows=1)  # tiny calibration: seconds per run
FAST_OPTIONS = {"olica_calibrate_layers": 1, "olica_calibrate_rank": 4}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama saved with the default model's tokenizer (and chat template)."""
    model, tok = tiny_chat_llama()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tabs():
    return _tabs()


def _tabs():
    from types import SimpleNamespace

    ctx = app.Context(ModelStore("cpu"))
    return SimpleNamespace(ctx=ctx, compress=app.CompressTab(ctx), inspect=app.InspectTab(ctx),
                           evaluate=app.EvaluateTab(ctx), chat=app.ChatTab(ctx), runs=app.RunsTab(ctx))


def last(generator):
    """The final yield of a streaming handler."""
    out = None
    for out in generator:
        pass
    return out


def refusal(fn, *args, outputs: int, status: int, **kwargs) -> str:
    """Bad input, both ways: the handler itself raises gr.Error (what the named endpoints give
    scripts), and the page's version of it shows the same message as ⚠ status text; returns it."""
    from ui.common import WARN, on_page

    def call(f):
        return last(f(*args, **kwargs)) if inspect.isgeneratorfunction(f) else f(*args, **kwargs)

    with pytest.raises(gr.Error) as err:
        call(fn)
    shown = call(on_page(fn, outputs, status))
    assert shown[status] == f"{WARN} {err.value.message}"
    return shown[status]


def _checksum(model):
    return sum(float(p.detach().double().sum()) for p in model.parameters()), len(list(model.parameters()))


def _compress(t, session, folder, method="layerdrop", ratio=0.3, allocation=None, per_layer="", **kw):
    from compression.methods import METHODS

    allocation = allocation or (METHODS[method].allocations[0] if method in METHODS else "uniform")
    kw = {**CALIB, **kw}
    options = {**FAST_OPTIONS, **kw.pop("options", {})}
    return last(t.compress.compress(session, folder, method, ratio, allocation, per_layer, options=options, **kw))


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
    from ui.compress_tab import CUSTOM, CompressTab, calibration_spec

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


# ------------------------------------------------------------------------------------ other tabs
@pytest.fixture(scope="module")
def compressed(tabs, tiny_folder):
    session = R.Session()
    _compress(tabs, session, tiny_folder, "slicegpt", 0.3)
    return session


def test_inspect_without_runs_and_with_bad_run(tabs, compressed):
    assert "No run yet" in tabs.inspect.inspect(R.Session(), None)[2]
    assert "unknown run" in refusal(tabs.inspect.inspect, compressed, "r99", outputs=9, status=2)
    out = tabs.inspect.inspect(compressed, "r1", 7, "mlp_input")  # layer clamped to the last one
    assert out[0]["value"] == 1 and "value" not in out[1]  # only changed values are sent back
    assert "held-out" in out[2]  # the per-layer errors were measured on tokens the fit never saw
    assert "MLP input (PCA basis)" in [a.text for a in out[3].layout.annotations]  # a panel per spectrum
    assert out[4].data[0].type == "heatmap"


def test_inspect_overlays_a_second_run_and_switches_axes(tabs, compressed, tiny_folder):
    if "r2" not in compressed.runs:
        _compress(tabs, compressed, tiny_folder, "modegpt", 0.3, "uniform")
    out = tabs.inspect.inspect(compressed, "r2", "1", "", "fraction", True, "r1")
    assert [c[1] for c in out[8]["choices"]] == ["none", "r1"]
    assert any("r1" in t.name for t in out[6].data) and any(t.name == "r1" for t in out[7].data)
    assert max(out[3].data[0].x) == pytest.approx(1.0)  # fraction of components
    assert out[5].layout.yaxis.type == "log"
    assert tabs.inspect.inspect(compressed, "r1", 0, "", "bogus", False, "none")[3].data  # bad axis: index


def test_inspect_measures_block_influence_the_method_did_not(tabs, compressed):
    assert compressed.get("r1").report.get("block_influence") is None  # SliceGPT does not use it
    fig = tabs.inspect.influence(compressed, "r1")
    assert len(fig.data) == 2 and "dense model" in fig.layout.title.subtitle.text


def test_evaluate_table_states_its_sample(tabs, compressed):
    panel, rows = last(tabs.evaluate.evaluate(compressed, "r1", 1, [], 0, True))
    table = {r[0]: r for r in rows}
    assert "perplexity (wiki, 1 × 1024-token windows; 95% interval)" in table
    assert any(name.startswith("top-1 next-token agreement") for name in table)
    for metric in ("parameters", "block parameters", "weights (MB)", "peak memory (MB)",
                   "prefill tokens/s (median of 5 alternating rounds; min–max)",
                   "decode tokens/s (median of 5 alternating rounds; min–max)"):
        assert metric in table, metric
    for speed in ("prefill", "decode"):  # median (min–max, n rounds) for both models
        row = table[f"{speed} tokens/s (median of 5 alternating rounds; min–max)"]
        assert all(re.fullmatch(r"[\d,.]+ \([\d,.]+–[\d,.]+, 5 rounds\)", cell) for cell in row[1:3]), row
    assert not any("_rounds" in name or name.endswith(("_min", "_max")) for name in table)
    assert table["block parameters"][3].startswith("-") and table["weights (MB)"][1].endswith("MB")
    assert compressed.get("r1").report["evaluation"]["ppl"]["windows"] == 1


def test_chat_streams_both_models_with_same_seed(tabs, compressed):
    chat = tabs.chat.chat
    steps = list(chat(compressed, "Hello!", [], [], "r1", "", temperature=0.8, max_new_tokens=6, seed=3))
    assert len(steps) >= 2
    dense, comp, unused2, unused3, cleared = steps[-1]
    assert cleared == "" and dense[0] == {"role": "user", "content": "Hello!"} and unused2 == unused3 == []
    for history in (dense, comp):
        assert history[-1]["role"] == "assistant" and "tok/s" in history[-1]["content"]
        assert re.search(r"first token \d+\.\d\d s · \d+\.\d tok/s</sub>$", history[-1]["content"])
    again = list(chat(compressed, "Hello!", [], [], "r1", "", temperature=0.8, max_new_tokens=6, seed=3))[-1]
    assert STATS.sub("", again[0][-1]["content"]) == STATS.sub("", dense[-1]["content"])
    turn2 = list(chat(compressed, "More", dense, comp, "r1", "", max_new_tokens=3))[-1]
    assert len(turn2[0]) == 4 and len(turn2[1]) == 4


def test_chat_with_several_runs_in_lockstep(tabs, compressed, tiny_folder):
    if "r2" not in compressed.runs:
        _compress(tabs, compressed, tiny_folder, "modegpt", 0.3, "uniform")
    chat = tabs.chat.chat
    steps = list(chat(compressed, "Hello!", [], [], "r1", "", temperature=0, max_new_tokens=5, seed=1,
                      run_ids=["r2", "r1"]))
    dense, first, second, unused, _ = steps[-1]
    assert len(dense) == len(first) == len(second) == 2 and unused == []
    lengths = [[len(h[-1]["content"]) if h else 0 for h in step[:3]] for step in steps]
    assert all(max(l) > 0 for l in lengths[1:])  # every pane grows from the first steps on: lockstep
    alone = list(chat(compressed, "Hello!", [], [], None, "", temperature=0, max_new_tokens=5, seed=1,
                      run_ids=["r2"]))[-1]
    assert STATS.sub("", alone[1][-1]["content"]) == STATS.sub("", first[-1]["content"])  # same seed, same reply
    dense_only = list(chat(compressed, "Hi", [], [], "r1", tiny_folder, max_new_tokens=3, run_ids=[]))[-1]
    assert len(dense_only[0]) == 2 and dense_only[1] == []
    assert "at most 3 runs" in refusal(chat, compressed, "Hi", [], [], None, "", run_ids=["r1", "r2", "r3", "r4"],
                                       outputs=5, status=5)


def test_chat_panes_name_their_runs_and_chat_agreement(tabs, compressed):
    from ui.chat_tab import pane_label

    dense, first, second, third = tabs.chat.panes(compressed, ["r1"])
    assert dense["label"].startswith("Dense · ") and first["visible"] and not second["visible"] and not third["visible"]
    assert first["label"].startswith("r1 · slicegpt −") and first["value"] == []
    run = compressed.get("r1")
    run.report["agreement_chat"] = {"kl": 0.8712, "top1": 0.6104, "conversations": 16, "tokens": 900}
    try:
        assert pane_label(run).endswith(" · chat KL 0.87, top-1 61%")
    finally:
        run.report["agreement_chat"] = {}
    assert "chat KL" not in pane_label(run)
    picker = tabs.chat.choices(compressed, "r1", ["r2"])
    assert picker["value"] == ["r1"] and ("r1" in [c[1] for c in picker["choices"]])
    assert tabs.chat.choices(compressed, "r1", ["r1", "r2"])["value"] == ["r1", "r2"]  # the selection is kept


def test_compare_on_prompts_fills_a_table(tabs, compressed):
    panel, update = last(tabs.chat.compare(compressed, ["r1"], "", 0.0, 0.9, 500, 1.1, 0, True,
                                           prompts=["Hi", "Bye"]))
    table = update["value"]
    assert 'aria-valuenow="100"' in panel and table["headers"][:2] == ["prompt", "dense"]
    assert update["column_widths"] == ["16%", "42.0%", "42.0%"]
    assert table["headers"][2].startswith("r1 · slicegpt")
    assert [row[0] for row in table["data"]] == ["Hi", "Bye"] and all(all(row[1:]) for row in table["data"])
    many = [f"Prompt {i}" for i in range(12)]
    steps = tabs.chat.compare(compressed, ["r1"], "", 0.0, 0.9, 96, 1.1, 0, True, prompts=many)
    next(steps)
    compressed.request_stop()
    panel, update = last(steps)
    assert panel.startswith("■") and len(update["value"]["data"]) == 12  # Stop keeps the rows so far
    assert tabs.ctx.slot.acquire(timeout=30)
    tabs.ctx.slot.release()


@pytest.mark.parametrize("message,kwargs,error", [
    ("  ", {}, "type a message"),
    ("word " * 4000, {}, "the limit is 8,000"),           # 20,000 characters
    ("token " * 1300, {}, "tokens; the limit is 1,024"),
    ("Hi", {"max_new_tokens": 100_000}, "max new tokens must be in"),
    ("Hi", {"temperature": float("nan")}, "temperature must be in"),
])
def test_chat_input_is_capped(tabs, compressed, message, kwargs, error):
    shown = refusal(tabs.chat.chat, compressed, message, [], [], "r1", "", outputs=5, status=5, **kwargs)
    assert error in shown


def test_chat_without_a_run_answers_with_the_dense_model(tabs, tiny_folder):
    dense, comp, *_ = list(tabs.chat.chat(R.Session(), "Hi", [], [], None, tiny_folder, max_new_tokens=3))[-1]
    assert len(dense) == 2 and comp == []


def test_build_prompt_uses_the_chat_template(tabs, tiny_folder):
    _, tok = tabs.ctx.store.get(tiny_folder)
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\n<sub>1 tokens · 2.0 tok/s</sub>"}]
    text = tok.decode(build_prompt(tok, history, "c", True)[0])
    assert "<|im_start|>assistant" in text and "tok/s" not in text
    assert tok.decode(build_prompt(tok, history, "c", False)[0]).endswith("User: c\nAssistant:")


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


def test_runs_table_and_pareto(tabs, compressed):
    rows, pareto, accuracy = tabs.runs.view(compressed)
    from ui.runs_tab import RUN_COLUMNS

    assert rows[0][:3] == ["r1", compressed.get("r1").model_name, "slicegpt"]
    assert len(rows[0]) == len(RUN_COLUMNS) and isinstance(rows[0][5], float)  # params in millions
    assert {"slicegpt", "dense", "Pareto front"} <= {t.name for t in pareto.data}


def test_session_close_and_unload_free_models(tabs, tiny_folder):
    session = R.Session()
    _compress(tabs, session, tiny_folder)
    folder = session.workdir
    tabs.ctx.sessions["abc"] = session
    app.unload(tabs.ctx, type("Request", (), {"session_hash": "abc"})())
    assert not session.runs and not folder.exists() and "abc" not in tabs.ctx.sessions


def test_session_keeps_a_bounded_number_of_models(tabs, tiny_folder):
    session = R.Session()
    for _ in range(R.Session.keep_models + 1):
        _compress(tabs, session, tiny_folder)
    live = [r.id for r in session.runs.values() if r.model is not None]
    assert live == [f"r{i}" for i in range(2, R.Session.keep_models + 2)]


# ------------------------------------------------------------------------------------ the whole app
def test_app_declares_named_endpoints_on_one_queue(tiny_folder):
    demo = app.build_app(tiny_folder, device="cpu")
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    for name in ("compress", "inspect", "evaluate", "chat", "load_run", "download", "heal"):
        assert name in fns, name
    for name in ("compress", "evaluate", "chat"):
        assert fns[name].concurrency_id == app.ACCEL and fns[name].concurrency_limit == 1
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State))
    assert state.delete_callback is R.Session.close
    # the Runs plots are redrawn when their tab is opened (drawn hidden, the legend came back clipped)
    runs_tab = next(b for b in demo.blocks.values() if isinstance(b, gr.Tab) and b.label == "Runs")
    redraw = [fn for fn in demo.fns.values() if (runs_tab._id, "select") in [(getattr(b, "_id", b), e) for b, e in fn.targets]]
    assert redraw and {type(o) for o in redraw[0].outputs} == {gr.Dataframe, gr.Plot}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_folder):
    from gradio_client import Client

    demo = app.build_app(tiny_folder, device="cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, Client(demo.local_url, verbose=False)
    demo.close()


def test_gradio_client_compress_inspect_evaluate_chat(served, tiny_folder):
    demo, client = served
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/compress", "/inspect", "/evaluate", "/chat", "/load_run", "/download"} <= set(api)
    params = [p["parameter_name"] for p in api["/compress"]["parameters"]]
    assert {"model_name", "method", "ratio", "modegpt_ridge", "olica_calibrate_rank"} <= set(params)
    assert params[-3:] == ["calib_source", "calib_file", "chat_eval"]  # added last: positional calls still work
    _, status, summary, run_dd = client.predict(
        model_name=tiny_folder, method="modegpt", ratio=0.3, allocation="uniform", calib_samples=4,
        calib_len=64, ppl_windows=1, calib_source="code", api_name="/compress")
    assert status.startswith("✔") and summary["run"] == "r1" and run_dd["value"] == "r1"
    assert summary["calibration"].startswith("code")
    inspected = client.predict(run_id="r1", layer=1, api_name="/inspect")
    assert "modegpt" in inspected[2] and all(p is not None for p in inspected[3:8])
    tasks = _one_task()
    _, table = client.predict(run_id="r1", ppl_windows=1, tasks=tasks, limit=2, measure_speed=False,
                              api_name="/evaluate")
    metrics = [row[0] for row in table["data"]]
    assert any(m.startswith("perplexity (wiki, 1 ×") for m in metrics) and "parameters" in metrics
    if tasks:
        assert any(m.startswith(f"zero-shot {tasks[0]}") for m in metrics)
    dense, comp, _, _, cleared = client.predict(message="Hi", dense_history=[], compressed_history=[],
                                                run_id="r1", max_new_tokens=8, api_name="/chat")
    assert cleared == "" and "tok/s" in str(dense[-1]["content"]) and "tok/s" in str(comp[-1]["content"])
    with pytest.raises(Exception, match="type a message"):  # scripts still get a failure
        client.predict(message=" ", run_id="r1", api_name="/chat")
    with pytest.raises(Exception, match="cannot reach"):
        client.predict(model_name=tiny_folder, method="layerdrop", ratio=0.9, allocation="auto",
                       api_name="/compress")
    _, status, _, _ = client.predict(model_name=tiny_folder, method="layerdrop", ratio=0.3, allocation="manual",
                                     per_layer="0", calib_samples=4, calib_len=64, ppl_windows=0,
                                     api_name="/compress")  # still usable after an error
    assert status.startswith("✔ **r2**")
    dense, first, second, third, _ = client.predict(message="Hi", run_ids=["r1", "r2"], max_new_tokens=8,
                                                    api_name="/chat")
    assert len(dense) == len(first) == len(second) == 2 and third == []


def test_cancelled_client_job_frees_the_slot_within_seconds(served, tiny_folder):
    import time

    demo, client = served
    job = client.submit(model_name=tiny_folder, method="modegpt", ratio=0.3, allocation="uniform",
                        calib_samples=256, calib_len=256, ppl_windows=8, api_name="/compress")
    deadline = time.time() + 60
    while not demo.ctx.slot.locked() and time.time() < deadline:  # wait until it really runs
        time.sleep(0.1)
    assert demo.ctx.slot.locked()
    job.cancel()
    t0 = time.time()
    _, status, _, _ = client.predict(model_name=tiny_folder, method="layerdrop", ratio=0.3, allocation="manual",
                                     per_layer="0", calib_samples=4, calib_len=64, ppl_windows=0,
                                     api_name="/compress")
    waited = time.time() - t0
    assert status.startswith("✔") and waited < 20, f"the cancelled job kept the model slot for {waited:.0f} s"


def _one_task():
    try:
        from compression.zeroshot import available_tasks
        return ["arc_easy"] if "arc_easy" in available_tasks() else []
    except Exception:  # noqa: BLE001  zero-shot not installed: the rest still runs
        return []
