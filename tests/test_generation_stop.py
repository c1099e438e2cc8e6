"""Every generation ends within seconds of a Stop, a cancelled request or its time limit: the chat's
replies, the comparison's worker thread, and generate itself (issue #27); a stopped comparison says
"■ stopped" where a model had not answered (issue #28). Tiny random Llama with the default model's
tokenizer (fixtures: conftest.py), slowed by a sleep before every forward so that a reply lasts long."""
import contextlib
import os
import threading
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
from app_helpers import last  # noqa: E402
from conftest import tiny_chat_llama  # noqa: E402

from ui import chat as C  # noqa: E402
from ui.chat_tab import STOPPED_CELL, stopped_table  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

ENDS_WITHIN = 3.0  # seconds from Stop to the end of a generation
SLOW = 0.05  # seconds of sleep before every forward: a 512-token reply takes half a minute


@contextlib.contextmanager
def slowed(*models, seconds: float = SLOW):
    handles = [m.register_forward_pre_hook(lambda *_: time.sleep(seconds)) for m in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Puller:
    """Pulls a streaming handler in a thread, as gradio does, until it ends or :meth:`cancel`
    (gradio's cancel: the stream is simply no longer pulled)."""

    def __init__(self, steps):
        self.steps, self.last, self.pulls = steps, None, 0
        self.cancelled, self.ended = threading.Event(), threading.Event()
        threading.Thread(target=self._pull, daemon=True).start()

    def _pull(self):
        try:
            for out in self.steps:
                self.last, self.pulls = out, self.pulls + 1
                if self.cancelled.is_set():
                    return
        finally:
            self.ended.set()

    def wait_for(self, pulls: int, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while self.pulls < pulls and not self.ended.is_set():
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)

    def cancel(self):
        self.cancelled.set()


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_llama()


def test_generate_ends_within_a_token_of_its_stop_flag(tiny):
    model, tok = tiny
    prompt = C.build_prompt(tok, [], "Tell me a long story.", True)
    stop = threading.Event()
    halt = C.Halt(stop)
    replies = []
    with slowed(model):
        worker = threading.Thread(target=lambda: replies.extend(
            C.generate(model, tok, prompt, C.Sampling(temperature=0, max_new_tokens=512), halt=halt)), daemon=True)
        worker.start()
        time.sleep(1.0)
        stop.set()
        t0 = time.monotonic()
        worker.join(ENDS_WITHIN)
        assert not worker.is_alive(), "generate kept running after its stop flag was set"
    assert time.monotonic() - t0 < ENDS_WITHIN and halt.reason == "stopped"
    assert 0 < replies[-1][1] < 512  # it had begun, and did not run to the token cap


def test_generate_ends_at_its_time_limit_and_the_reply_says_so(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(C, "MAX_GENERATION_SECONDS", 1.0)
    with slowed(model):
        t0 = time.monotonic()
        histories = last(C.chat_stream([(model, tok)], [[]], "Tell me a long story.",
                                       C.Sampling(temperature=0, max_new_tokens=512)))
    assert time.monotonic() - t0 < 1.0 + ENDS_WITHIN
    reply = histories[0][-1]["content"]
    assert "<sub>cut at the 1 s time limit · " in reply and C.STATS.search(reply)  # stripped from later prompts
    assert C.Halt().seconds == 1.0


def test_stop_ends_a_long_chat_within_seconds_and_frees_the_session(tabs, compressed):
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    with slowed(dense, run.model):
        puller = Puller(tabs.chat.chat(compressed, "Tell me a long story.", [], [], "r1", "", temperature=0,
                                       max_new_tokens=512))
        puller.wait_for(pulls=5)
        status, panel, table = tabs.chat.stopped(compressed, None)
        assert status == "■ Stopped." and panel == ""
        t0 = time.monotonic()
        assert puller.ended.wait(ENDS_WITHIN), "the chat kept generating after Stop"
    assert time.monotonic() - t0 < ENDS_WITHIN and not compressed.busy
    compressed.end_job(compressed.start_job(wait=0))  # the session takes a new job at once
    dense_reply = puller.last[0][-1]["content"]
    assert int(C.STATS.search(dense_reply).group(0).split("<sub>")[1].split(" tokens")[0]) < 512


def test_stopped_compare_frees_the_slot_and_marks_what_was_not_answered(tabs, compressed):
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    with slowed(dense, run.model):
        puller = Puller(tabs.chat.compare(compressed, ["r1"], "", 0.0, 0.9, 96, 1.1, 0, True))
        puller.wait_for(pulls=3)
        puller.cancel()  # the click cancels the stream ...
        shown = puller.last[1]["value"]  # ... and sends the table the page holds
        status, panel, table = tabs.chat.stopped(compressed, shown)
        t0 = time.monotonic()
        assert tabs.ctx.slot.acquire(timeout=ENDS_WITHIN), "the comparison held the model slot after Stop"
        tabs.ctx.slot.release()
    assert time.monotonic() - t0 < ENDS_WITHIN and status == "■ Stopped." and panel == ""
    rows = table["value"]["data"]
    assert table["value"]["headers"] == shown["headers"] and [r[0] for r in rows] == [r[0] for r in shown["data"]]
    assert all(cell for row in rows for cell in row)  # no empty cell is left without a word
    assert all(row[2] == STOPPED_CELL for row in rows)  # the compressed column had not begun
    assert rows[-1][1] == STOPPED_CELL and rows[0][1] not in ("", STOPPED_CELL)  # dense: the first reply began


def test_a_compare_stopped_while_read_ends_with_every_unanswered_cell_marked(tabs, compressed):
    run = compressed.get("r1")
    dense, _ = tabs.ctx.store.get(run.model_name)
    with slowed(dense, run.model):
        steps = tabs.chat.compare(compressed, ["r1"], "", 0.0, 0.9, 96, 1.1, 0, True)
        next(steps)
        threading.Timer(1.0, compressed.request_stop).start()
        status, table = last(steps)
    assert status.startswith("■ Stopped")
    assert all(row[2] == STOPPED_CELL for row in table["value"]["data"])


def test_stopped_table_reads_the_page_table_and_caps_it():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([["Hi", "Hello there", ""], ["Bye", "", None]], columns=["prompt", "dense", "r1 · x"])
    update = stopped_table(frame)
    assert update["value"]["headers"] == ["prompt", "dense", "r1 · x"]
    assert update["value"]["data"] == [["Hi", "Hello there", STOPPED_CELL], ["Bye", STOPPED_CELL, STOPPED_CELL]]
    assert stopped_table(None) == gr.update() and stopped_table({"headers": ["prompt"], "data": []}) == gr.update()
    many = {"headers": ["prompt", "dense"], "data": [["p", ""]] * 1000}
    assert len(stopped_table(many)["value"]["data"]) == 64


def test_the_chat_tab_stop_cancels_both_streams_and_rewrites_the_table(tiny_folder):
    import app

    demo = app.build_app(tiny_folder, device="cpu")
    fns = list(demo.fns.values())
    compare = next(fn for fn in fns if getattr(fn.fn, "__name__", "") == "compare")
    cancel = next(fn for fn in fns if compare._id in (fn.cancels or []))
    assert {getattr(demo.fns[i].fn, "__name__", "") for i in cancel.cancels} == {"chat_page", "compare"}  # the page's events
    stop = next(fn for fn in fns if getattr(fn.fn, "__name__", "") == "stopped" and fn.targets == cancel.targets)
    table = compare.outputs[1]
    assert isinstance(table, gr.Dataframe) and table in stop.inputs and table in stop.outputs
    assert isinstance(stop.inputs[0], gr.State)  # the session, whose jobs hear the stop flag
