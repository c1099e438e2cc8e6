"""The Evaluate tab stops within seconds in every stage, its table downloads as CSV and JSON, and a
compressed model that is not faster than dense gets a line on why (issue #28). Handlers called
directly on a tiny random Llama (fixtures: conftest.py); the models are slowed by a sleep before every
forward where a stage must last long enough to be stopped in."""
import contextlib
import csv
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
from app_helpers import last  # noqa: E402
from conftest import tiny_model  # noqa: E402

from compression.evaluate import speed_side_by_side  # noqa: E402
from ui import evaluate_tab as E  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

STOPPED_WITHIN = 3.0  # seconds from Stop to a free model slot


@contextlib.contextmanager
def slowed(*models, seconds: float):
    """Every forward of ``models`` sleeps ``seconds`` first (a stage of a small model made long);
    yields the list of forwards so far (one entry each)."""
    forwards = []

    def sleep(*_):
        forwards.append(1)
        time.sleep(seconds)
    handles = [m.register_forward_pre_hook(sleep) for m in models]
    try:
        yield forwards
    finally:
        for handle in handles:
            handle.remove()


def _zero_shot_task():
    try:
        from compression.zeroshot import available_tasks
        return "arc_easy" if "arc_easy" in available_tasks() else None
    except Exception:  # noqa: BLE001  lm-eval or its task data missing
        return None


# ------------------------------------------------------------------------------------ the speed stage
def test_speed_rounds_report_every_step_and_stop_within_a_forward():
    small, large = tiny_model(layers=1), tiny_model(layers=3)
    calls = []
    speed_side_by_side({"a": small, "b": large}, prompt_len=8, new_tokens=3, rounds=2,
                       progress=lambda f, m="": calls.append((f, m)))
    steps = list(dict.fromkeys(calls))  # each step is reported once, then repeated between forwards
    assert [m for _, m in steps] == ["warm-up, a", "warm-up, b", "round 1/2, a", "round 1/2, b", "round 2/2, a",
                                     "round 2/2, b", "memory, a", "memory, b", "done"]
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1][0] == 1.0
    assert len(calls) > len(steps)  # the report repeats after every forward: a stop check there

    forwards = []
    large.register_forward_pre_hook(lambda *_: forwards.append(1))

    class Stop(Exception):
        pass

    def stop_in_second_round(fraction, message=""):
        if message.startswith("round 2"):
            raise Stop

    with pytest.raises(Stop):
        speed_side_by_side({"a": small, "b": large}, prompt_len=8, new_tokens=50, rounds=3,
                           progress=stop_in_second_round)
    assert len(forwards) == 1 + 51  # warm-up and round 1 of b: nothing after the stop


def test_the_zero_shot_stop_check_hears_only_forwards_of_its_own_thread():
    model, calls = tiny_model(), []
    beat = E.Heartbeat(lambda fraction, message="": calls.append((fraction, message)))
    beat(0.5, "zero-shot arc_easy")
    ids = torch.zeros((1, 4), dtype=torch.long)
    with torch.no_grad(), E.beating(model, beat):
        model(ids)  # lm-eval's forward, in the job's thread: the report repeats (a Stop raises here)
        other = threading.Thread(target=lambda: model(ids))  # another session's chat on the shared model
        other.start()
        other.join()
    with torch.no_grad():
        model(ids)  # after the block: no hook left
    assert calls == [(0.5, "zero-shot arc_easy")] * 2


# ------------------------------------------------------------------------------------ Stop, every stage
STAGES = {"perplexity": dict(ppl_windows=16, tasks=[], limit=0, measure_speed=False),
          "zero-shot": dict(ppl_windows=0, tasks=["arc_easy"], limit=400, measure_speed=False),
          "speed": dict(ppl_windows=0, tasks=[], limit=0, measure_speed=True)}
SEEN = {"perplexity": ("dense reference", "perplexity and agreement"), "zero-shot": ("zero-shot",),
        "speed": ("round",)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stop_frees_the_slot_within_seconds_and_leaves_the_page_ready(tabs, compressed, stage):
    if stage == "zero-shot" and _zero_shot_task() is None:
        pytest.skip("lm-eval's task data is not installed")
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    with slowed(dense, run.model, seconds=0.1) as forwards:
        steps = tabs.evaluate.evaluate_page(compressed, "r1", **STAGES[stage])
        deadline = time.monotonic() + 120
        panel, begun = "", None
        while begun is None or len(forwards) < begun + 2:  # pulled as gradio does, until the stage runs
            if begun is None and any(word in panel for word in SEEN[stage]):
                begun = len(forwards)  # zero-shot: lm-eval builds its requests before the first forward
            assert time.monotonic() < deadline, f"the {stage} stage never began: {panel}"
            panel, rows, csv_file, json_file, status = next(steps)
            assert status == "" and csv_file["visible"] is False  # no line or file of an earlier run
        assert tabs.ctx.slot.locked()
        assert tabs.evaluate.stop(compressed) == ("", "■ Stopped.")  # the panel is cleared at once
        t0 = time.monotonic()  # the click cancels the stream: nothing pulls it any more
        assert tabs.ctx.slot.acquire(timeout=STOPPED_WITHIN), f"the {stage} stage held the slot after Stop"
        tabs.ctx.slot.release()
        waited = time.monotonic() - t0
        assert not compressed.busy and waited < STOPPED_WITHIN
        again = tabs.evaluate.evaluate_page(compressed, "r1", 0, [], 0, False)
        panel, rows, csv_file, json_file, status = next(again)  # a new run starts clean
        assert status == "" and 'role="progressbar"' in panel
        again.close()
    steps.close()


def test_a_stopped_job_says_so_where_its_stream_is_still_read(tabs, compressed):
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    with slowed(dense, run.model, seconds=0.1):
        steps = tabs.evaluate.evaluate_page(compressed, "r1", 0, [], 0, True)
        next(steps)
        threading.Timer(1.0, compressed.request_stop).start()  # a Stop from elsewhere (the API client gone)
        panel, table, csv_file, json_file, status = last(steps)
    assert panel == "" and status == "■ Stopped." and csv_file["visible"] is False


# ------------------------------------------------------------------------------------ downloads
def test_csv_cells_that_a_spreadsheet_would_run_are_quoted():
    text = E.table_csv([["=HYPERLINK(\"x\")", "+1", "-12.5%", "@SUM(A1)"], ["perplexity", "13.2", "14.1", ""]])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["metric", "dense", "compressed", "Δ %"]
    assert rows[1] == ["'=HYPERLINK(\"x\")", "'+1", "'-12.5%", "'@SUM(A1)"]
    assert rows[2] == ["perplexity", "13.2", "14.1", ""]


def test_the_results_table_downloads_as_csv_and_json(tabs, compressed):
    panel, rows, csv_file, json_file, status = last(tabs.evaluate.evaluate_page(compressed, "r1", 1, [], 0, True))
    workdir = compressed.workdir
    for update in (csv_file, json_file):
        path = Path(update["value"]).resolve()
        assert update["visible"] and workdir in path.parents and path.name.startswith("r1-evaluation.")
    table = list(csv.reader(io.StringIO(Path(csv_file["value"]).read_text(encoding="utf-8"))))
    assert table[0] == E.COLUMNS and [r[0] for r in table[1:]] == [r[0] for r in rows]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in table for cell in row)
    assert any(cell.startswith("'-") or cell.startswith("'+") for row in table for cell in row)  # Δ % kept, quoted
    record = json.loads(Path(json_file["value"]).read_text(encoding="utf-8"))
    assert record["run"] == "r1" and record["rows"] == rows and record["settings"]["ppl_windows"] == 1
    measured = compressed.get("r1").metrics["windows=1 tasks= limit=None"]
    assert record["compressed"]["ppl"] == measured["compressed"]["ppl"]
    assert len(record["dense"]["prefill_tok_s_rounds"]) == E.SPEED_ROUNDS
    assert record["notes"] == [n for n in status.split("\n\n") if n]


# ------------------------------------------------------------------------------------ speed notes
def _speeds(prefill, decode, spread=0.02):
    return {key: v for metric, value in (("prefill_tok_s", prefill), ("decode_tok_s", decode))
            for key, v in ((metric, value), (f"{metric}_min", value * (1 - spread)),
                           (f"{metric}_max", value * (1 + spread)))}


def _facts(head=28_311_552, blocks=30, kv_dense=23_040.0, kv_comp=23_040.0):
    return {"device": "cpu", "threads": 2, "batch": 1, "prompt_len": 128, "new_tokens": 32,
            "dense": {"blocks": blocks, "head_params": head, "kv_bytes": kv_dense},
            "compressed": {"blocks": blocks, "head_params": head, "kv_bytes": kv_comp}}


def test_a_slower_prefill_gets_its_likely_reason_from_the_numbers():
    dense = {"block_params": 106_168_896, **_speeds(800.0, 28.0)}
    comp = {"block_params": 79_626_816, **_speeds(760.0, 31.0)}
    notes = E.speed_notes(dense, comp, _facts())
    assert len(notes) == 1 and "\n" not in notes[0]  # decode is faster: no line for it
    note = notes[0]
    assert note.startswith("⚠ prefill is not faster than dense (0.95×")
    assert "at batch 1 with 128-token prompts on cpu (2 threads)" in note
    assert "20% fewer weights per token would give 1.25×" in note  # (106.2 + 28.3) / (79.6 + 28.3)
    assert "the output head (28.3M parameters)" in note and "the number of blocks (30, " in note
    assert "KV cache" not in note and "noise" not in note  # a prefill line; the rounds do not overlap


def test_a_slower_decode_names_what_did_not_shrink_and_overlapping_rounds():
    dense = {"block_params": 106_168_896, **_speeds(800.0, 28.0, spread=0.1)}
    comp = {"block_params": 79_626_816, **_speeds(900.0, 27.5, spread=0.1)}
    note, = E.speed_notes(dense, comp, _facts())
    assert note.startswith("⚠ decode is not faster") and "decoding one token per sequence at batch 1" in note
    assert "the KV cache (22.5 KB a token) read over up to 160 cached tokens" in note
    assert "the rounds overlap" in note
    shrunk = E.speed_notes(dense, comp, _facts(kv_comp=11_520.0, blocks=30))[0]
    assert "KV cache" not in shrunk  # the compressed cache is smaller: not claimed as unchanged
    little = {"block_params": 105_000_000, **_speeds(780.0, 27.0)}
    assert "too little to show" in E.speed_notes(dense, little, _facts())[0]
    assert E.speed_notes(dense, {"block_params": 79_626_816, **_speeds(900.0, 31.0)}, _facts()) == []


def test_speed_facts_are_measured_on_the_models(tabs, compressed):
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    d, c = E.speed_facts(dense), E.speed_facts(run.model)
    assert d["blocks"] == len(dense.model.layers) and d["head_params"] == dense.lm_head.weight.numel()
    cache_width = 2 * dense.config.num_hidden_layers * dense.config.num_key_value_heads * \
        (dense.config.hidden_size // dense.config.num_attention_heads)
    assert d["kv_bytes"] == cache_width * torch.finfo(dense.dtype).bits // 8
    assert c["blocks"] >= 1 and c["kv_bytes"] > 0


# ------------------------------------------------------------------------------------ wiring
def test_the_tab_wires_stop_downloads_and_keeps_the_endpoint(tiny_folder):
    import app

    demo = app.build_app(tiny_folder, device="cpu")
    fns = list(demo.fns.values())
    api = next(fn for fn in fns if fn.api_name == "evaluate")
    assert [type(o) for o in api.outputs] == [gr.HTML, gr.Dataframe]  # scripts get (progress, table) as before
    page = next(fn for fn in fns if getattr(fn.fn, "__name__", "") == "evaluate_page")
    assert [type(o) for o in page.outputs][2:] == [gr.DownloadButton, gr.DownloadButton, gr.Markdown]
    cancel = next(fn for fn in fns if page._id in (fn.cancels or []))
    stop = next(fn for fn in fns if getattr(fn.fn, "__name__", "") == "stop" and fn.targets == cancel.targets)
    assert stop.outputs == page.outputs[:1] + page.outputs[-1:]  # the progress panel and the status line


def test_the_table_gives_each_range_one_precision_and_no_settings_rows():
    """Intervals and spreads at one precision for both ends, the timing's batch in the row name."""
    dense = {"ppl": 13.93, "ppl_ci": [13.5, 14.41], "prefill_tok_s": 860.0, "prefill_tok_s_rounds": [850.0, 870.0],
             "prefill_tok_s_min": 6.7731, "prefill_tok_s_max": 129.3, "batch": 1}
    comp = {**dense, "ppl": 49053.47, "ppl_ci": [49053.47, 49053.47], "ppl_windows": 4, "speed_rounds": 2}
    rows = {r[0].split(" (")[0]: r for r in E.compare_rows(dense, comp)}
    assert "batch" not in rows  # a setting, not a result
    speed = next(r for name, r in rows.items() if name.startswith("prefill"))
    assert "(6.8 – 129.3, 2 rounds)" in speed[1] and "at batch 1" in speed[0]
    ppl = rows["perplexity"]
    assert ppl[1].endswith("[13.50 – 14.41]") and ppl[2].endswith("[49053 – 49053]")
