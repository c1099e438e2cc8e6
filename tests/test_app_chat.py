"""The Inspect, Evaluate, Chat and Runs tabs of the Gradio app on one compressed run of a tiny random
Llama (real SmolLM2 tokenizer), handlers called directly, then the launched app driven through
gradio_client (compress -> inspect -> evaluate -> chat). Shared helpers: app_helpers.py; fixtures
(tiny_folder, tabs, compressed: SliceGPT at 0.3, compressed once per test run): conftest.py."""
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
import app  # noqa: E402
from app_helpers import _compress, _free_port, last, refusal  # noqa: E402
from ui import runs as R  # noqa: E402
from ui.chat import STATS, build_prompt  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's queue vs pandas 3
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


# ------------------------------------------------------------------------------------ other tabs
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
                   "prefill tokens/s (median of 5 alternating rounds at batch 1; min – max)",
                   "decode tokens/s (median of 5 alternating rounds at batch 1; min – max)"):
        assert metric in table, metric
    for speed in ("prefill", "decode"):  # median (min – max, n rounds) for both models
        row = table[f"{speed} tokens/s (median of 5 alternating rounds at batch 1; min – max)"]
        assert all(re.fullmatch(r"[\d,.]+ \([\d,.]+ – [\d,.]+, 5 rounds\)", cell) for cell in row[1:3]), row
    assert not any("_rounds" in name or name.endswith(("_min", "_max")) for name in table)
    assert table["block parameters"][3].startswith("-") and table["weights (MB)"][1].endswith("MB")
    kept = compressed.get("r1").report["evaluation"]["ppl"]
    assert kept["windows"] == 1 and len(kept["dense_ci"]) == 2  # both intervals kept: the Runs plot draws them


def test_chat_streams_both_models_with_same_seed(tabs, compressed):
    chat = tabs.chat.chat
    steps = list(chat(compressed, "Hello!", [], [], "r1", "", temperature=0.8, max_new_tokens=6, seed=3))
    assert len(steps) >= 2
    dense, comp, unused2, unused3, cleared = steps[-1]
    assert cleared == "" and dense[0] == {"role": "user", "content": "Hello!"} and unused2 == unused3 == []
    # on the page the message box is emptied by the first step only: what the user types meanwhile stays
    paged = list(tabs.chat.chat_page(compressed, "Hello!", [], [], "r1", "", 0.8, 0.9, 6, 1.1, 3))
    assert paged[0][-1] == "" and all(step[-1] == {"__type__": "update"} for step in paged[1:])
    assert [STATS.sub("", h[-1]["content"]) for h in paged[-1][:2]] == [STATS.sub("", h[-1]["content"]) for h in (dense, comp)]
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


def test_runs_table_and_pareto(tabs, compressed):
    rows, pareto, accuracy = tabs.runs.view(compressed)
    from ui.runs_tab import RUN_COLUMNS

    assert rows[0][:3] == ["r1", compressed.get("r1").model_name, "slicegpt"]
    assert len(rows[0]) == len(RUN_COLUMNS) and isinstance(rows[0][5], float)  # params in millions
    names = {t.name for t in pareto.data}
    assert {"slicegpt", "dense"} <= names
    report = compressed.get("r1").report  # smaller and worse than dense: both on the front, a line joins them
    assert ("Pareto front" in names) == (report["ppl_compressed"] > report["ppl_dense"])
    run_trace = next(t for t in pareto.data if t.name == "slicegpt")
    lo, hi = report["evaluation"]["ppl"]["compressed_ci"]  # the measured interval as the error bar
    assert run_trace.error_y.array[0] == pytest.approx(hi - report["ppl_compressed"])


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
