"""Runs that outlive the page (#28): each finished run saved under the runs root in the CLI's layout and
again after healing, the saved runs listed and loaded after a reload (marked as loaded), the Space's
session-only runs with a one-click download, the Runs table as CSV and JSON, the zip's weights in
fp32 / bf16 / fp16, and the run summary that follows the run picker. Tiny random Llama, handlers called
directly; fixtures in conftest.py."""
import copy
import csv
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

import app  # noqa: E402
from app_helpers import _compress, last, refusal  # noqa: E402
from hardening_helpers import upload  # noqa: E402
from ui import runs as R  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
SAVED_NAME = re.compile(r"r[0-9]+-[0-9]{8}-[0-9]{6}(-[0-9]+)?")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A runs root of this test's own."""
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setenv("COMPRESSION_RUNS_ROOT", str(folder))
    monkeypatch.delenv("SPACE_ID", raising=False)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def saved_model(folder: Path):
    from compression.models import load_model

    return load_model(str(folder), "cpu", safetensors_only=True)[0]


# --- 1. every finished run is saved, in the CLI's layout, and again after healing --------------------
def test_a_finished_run_is_saved_in_the_cli_layout_and_again_after_healing(tabs, tiny_folder, root):
    session = R.Session()
    _, status, summary, _, _ = _compress(tabs, session, tiny_folder, "slicegpt", 0.3)
    run = session.get("r1")
    assert SAVED_NAME.fullmatch(run.saved), run.saved  # the run id and a time stamp, nothing typed
    folder = root / run.saved
    assert run.saved in status and "saved as" in status and summary["saved_as"] == run.saved
    names = {f.name for f in folder.iterdir()}
    assert {"report.json", "config.json", "README.md", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert json.loads((folder / "report.json").read_text())["export"]["format"] in ("native", "remote_code")
    ids = torch.randint(0, 100, (1, 12))
    before = logits(saved_model(folder), ids)
    torch.testing.assert_close(before, logits(run.model, ids), atol=1e-5, rtol=1e-5)

    _, status, _ = last(tabs.compress.heal(session, "r1", tokens=512, lora_rank=0, seq_len=64, ppl_windows=0))
    assert status.startswith("✔ healed") and run.saved in status
    assert sorted(p.name for p in root.iterdir()) == [run.saved]  # saved again in its own folder
    assert json.loads((folder / "report.json").read_text())["heal"]["tokens"] > 0
    after = logits(saved_model(folder), ids)
    torch.testing.assert_close(after, logits(run.model, ids), atol=1e-5, rtol=1e-5)  # the healed weights
    assert not torch.allclose(after, before, atol=1e-4)


def test_a_failed_save_keeps_the_run_and_says_so(tabs, tiny_folder, root, monkeypatch):
    from compression import pipeline

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save", full)
    session = R.Session()
    _, status, summary, dropdown, _ = _compress(tabs, session, tiny_folder, "layerdrop", 0.3)
    assert status.startswith("✔ **r1**") and "⚠ not saved" in status and "No space left on device" in status
    run = session.get("r1")
    assert run.model is not None and run.saved == "" and dropdown["value"] == "r1" and summary["run"] == "r1"
    assert not list(root.iterdir())


# --- 2. the saved runs are listed after a reload, and a loaded run says where it came from --------------
def test_saved_runs_are_listed_newest_first_and_load_marked_as_loaded(tabs, compressed, root, monkeypatch):
    from compression import pipeline

    run = compressed.get("r1")
    pipeline.save(root / "r1-20260101-000000", run.model, run.tokenizer, run.report)
    report = (root / "r1-20260101-000000" / "report.json").read_text()
    for i in range(55):  # more than the picker shows: report-only folders, older than the one above
        (root / f"old{i:02d}").mkdir()
        (root / f"old{i:02d}" / "report.json").write_text(report)
        os.utime(root / f"old{i:02d}" / "report.json", (1e9 + i, 1e9 + i))
    (root / "broken").mkdir()
    (root / "broken" / "report.json").write_text("{not json")
    (root / ".r9-x.save-1-abc").mkdir()  # a save in progress (hidden): never listed
    (root / ".r9-x.save-1-abc" / "report.json").write_text(report)

    picker = tabs.runs.saved_choices()
    names = [name for _, name in picker["choices"]]
    assert names[0] == picker["value"] == "r1-20260101-000000"  # newest first
    assert len(names) == 50 and names[1:4] == ["old54", "old53", "old52"]
    assert "broken" not in names and not any(n.startswith(".") for n in names)
    assert "slicegpt" in picker["choices"][0][0]
    assert tabs.runs.saved_choices("old53")["value"] == "old53"  # a pick stays while listed
    assert tabs.runs.saved_choices("old00")["value"] == "r1-20260101-000000"  # not among the newest 50

    from ui.runs_tab import RunsTab

    monkeypatch.setenv("COMPRESSION_MAX_REPORT_MB", "0.0001")  # the existing report cap applies
    assert RunsTab(tabs.ctx).saved_choices()["choices"] == []
    monkeypatch.delenv("COMPRESSION_MAX_REPORT_MB")

    fresh = R.Session()  # a page reload: a new session
    md, dropdown, _ = tabs.runs.load_listed(fresh, "r1-20260101-000000")
    loaded = fresh.get("r1")
    assert "model and report" in md and "loaded from r1-20260101-000000" in md
    assert loaded.origin == "loaded from r1-20260101-000000"
    assert "loaded from r1-20260101-000000" in dropdown["choices"][0][0]
    rows = tabs.runs.view(fresh)[0]
    assert rows[0][-2] == "loaded from r1-20260101-000000"
    assert tabs.compress.selected_summary(fresh, "r1")["origin"] == "loaded from r1-20260101-000000"


# --- 3. on a Space: runs live in the session, and the download is one click ---------------------------
def test_on_a_space_runs_live_in_the_session_and_download_is_one_click(tabs, tiny_folder, monkeypatch):
    from ui.page import Page
    from ui.runs_tab import ZIP_BUTTON

    monkeypatch.delenv("COMPRESSION_RUNS_ROOT", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert R.runs_root() is None
    with gr.Blocks() as demo:
        page, state, run_dd = Page(), gr.State(R.Session), gr.Dropdown(choices=[])
        with gr.Tabs():
            with gr.Tab("Runs") as tab:
                c = tabs.runs.build()
        tabs.runs.wire(page, c, tab, state, run_dd, [])
    assert "only in this browser session" in c.where.value and "loses them" in c.where.value
    assert isinstance(c.dl_file, gr.DownloadButton) and c.dl_file.elem_id == ZIP_BUTTON
    assert any(ZIP_BUTTON in str(fn.js or "") for fn in demo.fns.values())  # clicked once the zip is ready
    assert tabs.runs.saved_choices()["choices"] == []

    import ui.run_saving

    monkeypatch.delenv("SPACE_ID")  # the tiny model is a local folder, which a Space refuses
    monkeypatch.setattr(ui.run_saving, "runs_root", lambda: None)  # ...so the Space's missing root alone
    session = R.Session()
    _, status, _, _, _ = _compress(tabs, session, tiny_folder, "layerdrop", 0.3)
    assert status.startswith("✔") and "saved" not in status and session.get("r1").saved == ""


# --- 4. the Runs table as CSV and JSON -----------------------------------------------------------------
def test_runs_table_downloads_as_csv_and_json_without_formulas(tabs, compressed):
    from ui.runs_tab import RUN_COLUMNS

    session = R.Session()
    assert tabs.runs.tables(session) == (None, None)
    session.add(copy.copy(compressed.get("r1")))
    hostile = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)"]
    for i, name in enumerate(hostile, start=2):
        session.add(R.Run(f"r{i}", name, copy.deepcopy(compressed.get("r1").report)))
    csv_file, json_file = tabs.runs.tables(session)
    assert session.workdir in Path(csv_file).parents and session.workdir in Path(json_file).parents
    assert (Path(csv_file).name, Path(json_file).name) == ("runs.csv", "runs.json")
    with open(csv_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == RUN_COLUMNS and len(rows) == 6
    assert [r[1] for r in rows[2:]] == ["'" + name for name in hostile]
    assert float(rows[1][RUN_COLUMNS.index("params (M)")]) == tabs.runs.view(session)[0][0][5]
    records = json.loads(Path(json_file).read_text())
    assert [r["model"] for r in records[1:]] == hostile and records[0]["run"] == "r1"
    assert records[0]["origin"] == "compressed in this session"


# --- 5. the zip's weights in fp32, bf16 or fp16 -------------------------------------------------------
def _zip_members(path) -> dict[str, int]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: i.file_size for i in zf.infolist()}


def _weights_bytes(members: dict[str, int]) -> int:
    return sum(size for name, size in members.items() if name.endswith(".safetensors"))


def test_zip_weights_cast_to_fp16_load_back_close_to_fp32(tabs, compressed, tmp_path):
    from safetensors import safe_open

    full = _zip_members(tabs.runs.download(compressed, "r1", "fp32"))
    path = Path(tabs.runs.download(compressed, "r1", "fp16"))
    assert path.name == "r1-slicegpt-fp16.zip"
    half = _zip_members(path)
    assert 0.45 < _weights_bytes(half) / _weights_bytes(full) < 0.55  # about half the size
    with zipfile.ZipFile(path) as zf:
        zf.extractall(tmp_path / "fp16")
        data = path.read_bytes()
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((tmp_path / "fp16" / "report.json").read_text())["export"]["dtype"] == "float16"
    for file in (tmp_path / "fp16").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}

    fresh = R.Session()
    md, _, _ = tabs.runs.load_saved(fresh, upload("r1.zip", data), "")
    assert "model and report" in md
    ids = torch.randint(0, 100, (1, 12))
    original, loaded = logits(compressed.get("r1").model, ids), logits(fresh.get("r1").model, ids)
    assert not torch.equal(original, loaded)  # the weights really went through fp16
    torch.testing.assert_close(loaded, original, atol=2e-2, rtol=2e-2)

    bf16 = Path(tabs.runs.download(compressed, "r1", "bf16"))
    with zipfile.ZipFile(bf16) as zf:
        assert json.loads(zf.read("config.json"))["dtype"] == "bfloat16"
        assert json.loads(zf.read("report.json"))["export"]["dtype"] == "bfloat16"
    assert "choose the weights' precision" in refusal(tabs.runs.download, compressed, "r1", "int4",
                                                      outputs=1, status=1)


# --- 6. the run summary shows the run the picker shows ----------------------------------------------
def test_the_summary_follows_the_run_picker(tabs, tiny_folder, root):
    from compression import pipeline

    session = R.Session()
    _compress(tabs, session, tiny_folder, "layerdrop", 0.3)
    _, _, summary, dropdown, _ = _compress(tabs, session, tiny_folder, "slicegpt", 0.3)
    assert summary["run"] == dropdown["value"] == "r2"
    first = session.get("r1")
    pipeline.save(root / "first", first.model, first.tokenizer, first.report)
    _, dropdown, _ = tabs.runs.load_saved(session, None, "first")  # r3: a copy of r1; the summary said r2
    assert dropdown["value"] == "r3"

    demo = app.build_app(tiny_folder, device="cpu")
    picker = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and (b.label or "").startswith("Run ("))
    report = next(b for b in demo.blocks.values() if isinstance(b, gr.JSON) and b.label == "report")
    follow = [fn for fn in demo.fns.values() if report in fn.outputs
              and (picker._id, "change") in [(getattr(b, "_id", b), e) for b, e in fn.targets]]
    assert len(follow) == 1, "a change of the run picker redraws the summary"
    shown = follow[0].fn(session, dropdown["value"])
    assert shown["run"] == "r3" and shown["method"] == "layerdrop" and shown["origin"] == "loaded from first"
    assert follow[0].fn(session, "r1")["run"] == "r1" and follow[0].fn(R.Session(), None) is None
    healed = [fn for fn in demo.fns.values()
              if report in fn.outputs and getattr(fn.fn, "__name__", "") == "selected_summary"]
    assert len(healed) == 2  # also after a heal, which changes the selected run's report


# --- in a real browser: pick a saved run, load it, and each download is one click ----------------------
@pytest.mark.slow
def test_in_the_browser_a_saved_run_loads_and_each_download_is_one_click(compressed, tiny_folder, root):
    import shutil

    from app_helpers import _free_port

    from compression import pipeline

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip(f"Chromium not found at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api")
    run = compressed.get("r1")
    pipeline.save(root / "kept", run.model, run.tokenizer, run.report)
    demo = app.build_app(tiny_folder, device="cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                        **app.launch_options())
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(240_000)
            page.goto(demo.local_url)
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function("() => [...document.querySelectorAll('input')].some(i => i.value.startsWith('kept · '))")
            page.get_by_role("button", name="Load saved run").click()
            page.get_by_text("loaded from kept").locator("visible=true").first.wait_for()  # not the hidden table cell
            with page.expect_download() as zipped:  # one click: the zip is made, then it downloads
                page.get_by_role("button", name="Download the selected run").click()
            assert zipped.value.suggested_filename == "r1-slicegpt-fp32.zip"
            with page.expect_download() as table:
                page.get_by_role("button", name="Runs table as CSV").click()
            assert table.value.suggested_filename == "runs.csv"
            assert "loaded from kept" in Path(table.value.path()).read_text()
            browser.close()
    finally:
        demo.close()
