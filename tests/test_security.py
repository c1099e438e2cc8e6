"""The app and the CLI facing hostile or broken input (issue: a crafted run cannot touch the server,
and bad input never costs a result). App cases go through the tab handlers and, for the named
endpoints scripts use, through gradio_client; everything runs on a tiny random model."""
import json
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

import app  # noqa: E402
from hardening_helpers import zip_bytes  # noqa: E402
from app_helpers import CALIB, _compress, _free_port, _tabs, last, refusal  # noqa: E402,F401
from ui import runs as R  # noqa: E402
from ui.common import on_page  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def tabs():
    return _tabs()


def upload(name: str, data: bytes) -> str:
    """Put ``data`` where gradio stores uploads and return its path (what gr.File hands the handler)."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"test-{random.getrandbits(48):x}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return str(folder / name)


def good_report(session) -> dict:
    return json.loads(json.dumps(session.get("r1").report))


def refused_load(tabs, session, upload_path=None, folder="") -> str:
    """Load Run's refusal: raised for scripts, ⚠ text in its status on the page (see app_helpers.refusal)."""
    return refusal(tabs.runs.load_saved, session, upload_path, folder, outputs=3, status=0)


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


# --- 1. a crafted report cannot steer where the app writes ---------------------------------------
def test_crafted_method_in_a_zip_cannot_write_outside(tabs, compressed, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    before = tree(victim)
    report = good_report(compressed)
    report["method"] = f"../../../../../../..{victim}"
    crafted = upload("run.zip", zip_bytes({"report.json": json.dumps(report).encode()}))
    session = R.Session()
    assert "report.method must be one of" in refused_load(tabs, session, crafted)
    assert not session.runs
    # downloads are named from the app's run id only, even for a run whose report was tampered with
    run = compressed.get("r1")
    run.report["method"] = f"../../../../../../..{victim}"
    try:
        assert "report.method" in refusal(tabs.runs.download, compressed, "r1", outputs=1, status=1)
    finally:
        run.report["method"] = "slicegpt"
    assert victim.exists() and tree(victim) == before and (victim / "keep.txt").read_text() == "precious"
    path = Path(tabs.runs.download(compressed, "r1"))
    assert compressed.workdir in path.parents and path.name == "r1-slicegpt.zip"


def test_download_and_load_roundtrip(tabs, compressed):
    path = tabs.runs.download(compressed, "r1")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())  # fast: stored
    assert {"config.json", "report.json", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    fresh = R.Session()
    md, dropdown, returned = tabs.runs.load_saved(fresh, upload("r1.zip", Path(path).read_bytes()), "")
    assert "model and report" in md and dropdown["value"] == "r1" and returned is fresh
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(compressed.get("r1").model(ids).logits, fresh.get("r1").model(ids).logits, atol=1e-5)
    md, _, _ = tabs.runs.load_saved(fresh, upload("report.json", json.dumps(good_report(compressed)).encode()), "")
    assert "report only" in md and "slicegpt" in tabs.inspect.inspect(fresh, "r2")[2]
    assert "no longer in memory" in refusal(tabs.runs.download, fresh, "r2", outputs=1, status=1)


# --- 2. the folder box is confined to the runs root -------------------------------------------------
@pytest.mark.parametrize("folder", ["../../", "/etc/passwd", "/etc", "..", "a/../../b", "~", "/tmp"])
def test_folder_box_never_leaves_the_runs_root(tabs, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_RUNS_ROOT", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    session = R.Session()
    shown = refused_load(tabs, session, None, folder)
    assert "passwd" not in shown and "root:" not in shown
    assert not session.runs


def test_existing_and_missing_paths_give_the_same_answer(tabs, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_RUNS_ROOT", str(tmp_path))
    (tmp_path / "plain").mkdir()
    answers = set()
    for name in ("plain", "missing", "etc/passwd"):
        answers.add(refused_load(tabs, R.Session(), None, name))
    assert len(answers) == 1  # nothing tells whether a path exists


def test_folder_loading_works_under_the_root_and_is_off_on_a_space(tabs, compressed, tmp_path, monkeypatch):
    from compression import pipeline

    run = compressed.get("r1")
    pipeline.save(tmp_path / "mine", run.model, run.tokenizer, run.report)
    monkeypatch.setenv("COMPRESSION_RUNS_ROOT", str(tmp_path))
    assert "model and report" in tabs.runs.load_saved(R.Session(), None, "mine")[0]
    monkeypatch.delenv("COMPRESSION_RUNS_ROOT")
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert "switched off" in refused_load(tabs, R.Session(), None, "mine")


def test_json_content_is_never_echoed(tabs):
    secret = upload("report.json", json.dumps({"SECRET_KEY_123": "hunter2"}).encode())
    shown = refused_load(tabs, R.Session(), secret)
    assert "SECRET" not in shown and "hunter2" not in shown


def test_a_path_that_was_never_uploaded_is_refused(tabs, tmp_path):
    outside = tmp_path / "report.json"
    outside.write_text("{}")
    for path in (str(outside), "/etc/passwd", "../../../etc/passwd"):
        assert "not uploaded through this app" in refused_load(tabs, R.Session(), path)


# --- 3. reports of the wrong shape are refused and change nothing ---------------------------------
@pytest.mark.parametrize("mutate,field", [
    (lambda r: [r], "JSON object"),
    (lambda r: {**r, "params_compressed": "many"}, "params_compressed"),
    (lambda r: {**r, "layers": {"0": 1}}, "layers"),
    (lambda r: {**r, "layers": [{"index": 0, "errors": {"attn": "bad"}}]}, r"layers\[0\].errors"),
    (lambda r: {**r, "layers": [{"index": 0, "spectra": {"x": [1, None]}}]}, r"layers\[0\].spectra"),
    (lambda r: {**r, "block_influence": [float("inf")]}, "block_influence"),
    (lambda r: {**r, "model": 5}, "model"),
])
def test_malformed_reports_are_refused(tabs, compressed, mutate, field):
    session = R.Session()
    _compress(tabs, session, app_tiny(compressed))
    before = list(session.runs)
    data = json.dumps(mutate(good_report(compressed)))
    assert re.search(field, refused_load(tabs, session, upload("report.json", data.encode())))
    assert list(session.runs) == before
    tabs.inspect.inspect(session, None)  # Inspect and Runs still work for the session
    tabs.runs.view(session)


def app_tiny(session) -> str:
    return session.get("r1").model_name


# --- fuzz: random, truncated, huge, mis-typed files never crash and never write outside -------------
def test_fuzz_load_run(tabs, compressed, tmp_path):
    rng = random.Random(0)
    good = good_report(compressed)
    zipped = Path(tabs.runs.download(compressed, "r1")).read_bytes()
    session = R.Session()
    watched = [Path(tempfile.gettempdir()), Path.cwd(), Path(tmp_path).parent]
    before = {p for folder in watched for p in folder.iterdir()}

    def mutations():
        raw = json.dumps(good).encode()
        yield "report.json", raw[: rng.randrange(len(raw))]                       # truncated JSON
        yield "report.json", bytes(rng.getrandbits(8) for _ in range(512))        # noise
        yield "report.json", json.dumps({**good, "layers": [{"index": 0}] * 5000}).encode()  # too many
        yield "report.json", json.dumps({**good, "warnings": ["x" * 5000]}).encode()
        yield "report.json", b"[" * 100_000                                       # deep nesting
        for key in rng.sample(sorted(good), 6):
            yield "report.json", json.dumps({**good, key: rng.choice([None, "x", -1, [], {}, 1e309])}).encode()
        yield "run.zip", zipped[: len(zipped) // 2]                               # truncated zip
        yield "run.zip", zip_bytes({"../evil.json": b"{}", "report.json": json.dumps(good).encode()})
        yield "run.zip", zip_bytes({"sub/report.json": json.dumps(good).encode()})
        yield "run.zip", zip_bytes({f"f{i}.json": b"{}" for i in range(100)})
        yield "run.zip", zip_bytes({"report.json": b"{not json"})
        yield "run.zip", zip_bytes({"config.json": b"{}"})                          # no report
        yield "run.zip", zip_bytes({"report.json": json.dumps(good).encode(), "config.json": b"{broken"})
        yield "run.txt", b"hello"

    page = on_page(tabs.runs.load_saved, 3, 0)
    for name, data in mutations():  # a readable refusal is the expected outcome; nothing else raises
        assert page(session, upload(name, data), "")[0][0] in "✔⚠"
    after = {p for folder in watched for p in folder.iterdir()}
    assert after - before <= {tmp_path, session.workdir}  # nothing new outside the session's folder
    for run in session.runs.values():  # anything accepted is a valid report
        tabs.inspect.inspect(session, run.id)


def test_upload_size_is_capped(tabs, monkeypatch):
    monkeypatch.setenv("COMPRESSION_MAX_UPLOAD_MB", "0.001")
    big = upload("report.json", b" " * 4096)
    assert "over the limit" in refused_load(tabs, R.Session(), big)


# --- calibration text: only the offered sources, uploads read in memory ----------------------------
@pytest.mark.parametrize("source,path,message", [
    ("text:/etc/passwd", None, "must be one of"),          # the library's file source is not offered
    ("hf:some/dataset", None, "must be one of"),           # nor the network
    ("wiki+text:/etc/hosts", None, "must be one of"),
    ("custom", "/etc/passwd", "not uploaded through this app"),
    ("custom", "../../../etc/passwd", "not uploaded through this app"),
])
def test_calibration_never_reads_server_files(tabs, tiny_folder, source, path, message):  # noqa: F811
    session = R.Session()
    shown = refusal(_compress, tabs, session, tiny_folder, calib_source=source, calib_file=path, outputs=5, status=1)
    assert message in shown and "root:" not in shown and not session.runs


def test_calibration_upload_is_capped(tabs, tiny_folder, monkeypatch):  # noqa: F811
    from ui import calibration_form

    monkeypatch.setattr(calibration_form, "MAX_CALIB_FILE_BYTES", 1024)
    big = upload("big.txt", b"word " * 1000)
    assert "over the limit" in refusal(_compress, tabs, R.Session(), tiny_folder, calib_source="custom",
                                       calib_file=big, outputs=5, status=1)


@pytest.mark.parametrize("run_ids,message", [
    (["../../etc/passwd"], "unknown run"), ([{"path": "/etc/passwd"}], "unknown run"),
    (["r1", "r1", "r99"], "unknown run"), ([f"r{i}" for i in range(10_000)], "at most 3 runs"),
    (list(range(10_000)), "unknown run"), ("r99", "unknown run"),
])
def test_chat_run_ids_are_checked(tabs, compressed, run_ids, message):
    shown = refusal(tabs.chat.chat, compressed, "Hi", [], [], None, "", run_ids=run_ids, outputs=5, status=5)
    assert message in shown and "passwd" not in shown


# --- the named endpoints keep their parameter names, and refuse through gradio_client too -----------
def test_load_run_and_download_endpoints_through_gradio_client(tiny_folder, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    demo = app.build_app(tiny_folder, device="cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"upload", "folder"} <= {p["parameter_name"] for p in api["/load_run"]["parameters"]}
        assert {"run_id"} <= {p["parameter_name"] for p in api["/download"]["parameters"]}
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
        crafted = tmp_path / "run.zip"
        report = {"method": f"../../../../../../..{victim}", "layers": []}
        crafted.write_bytes(zip_bytes({"report.json": json.dumps(report).encode()}))
        with pytest.raises(Exception, match="report.method must be one of"):
            client.predict(upload=handle_file(str(crafted)), folder="", api_name="/load_run")
        with pytest.raises(Exception, match="no run yet|not in the list of choices"):
            client.predict(run_id="r1", api_name="/download")
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        with pytest.raises(Exception, match="leaves|folder name|no saved run|switched off"):
            client.predict(upload=None, folder="../../", api_name="/load_run")
    finally:
        demo.close()


# --- CLI: checks before work, safe output folders, one-line errors -------------------------------------
def cli(*args):
    from compression.__main__ import main

    return main(list(args))


@pytest.mark.parametrize("extra,message", [
    (["--calib-batch", "-1"], "batch_size must be in"),
    (["--method", "olica", "--calibration-ridge", "nan"], "ridge must be a finite number"),
    (["--method", "modegpt", "--epsilon", "nan", "--allocation", "auto"], "epsilon must be a finite number"),
    (["--method", "modegpt", "--leverage-ridge", "0"], "ridge must be in"),
    (["--method", "modegpt", "--refit-shrinkage", "-0.5"], "refit_shrinkage must be in"),
    (["--method", "modegpt", "--refit-shrinkage", "1e308"], "refit_shrinkage must be in"),
    (["--method", "olica", "--refit-shrinkage", "1"], "--refit-shrinkage does not apply to olica"),
    (["--method", "modegpt", "--calibration-ridge", "1"], "--calibration-ridge does not apply to modegpt"),
    (["--method", "slicegpt", "--leverage-ridge", "1"], "--leverage-ridge does not apply to slicegpt"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--calib-samples", "100000"], "the limit is 16,777,216"),
    (["--method", "layerdrop", "--calib-samples", "40000", "--calib-len", "512"], "the limit is"),
    (["--calibration", "web"], "unknown calibration source"),
    (["--push-to-hub", "me/x"], "offline mode is on"),
])
def test_cli_rejects_bad_numbers_before_loading(extra, message, capsys, tmp_path, monkeypatch):
    import compression.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["compress", "--method", "modegpt", "--ratio", "0.25", "--out", str(tmp_path / "o")]
    if "--method" in extra:
        args = ["compress", "--ratio", "0.25", "--out", str(tmp_path / "o")]
    assert cli(*args, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_out_must_be_new_or_empty(tiny_folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    import compression.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    file = tmp_path / "file"
    file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.safetensors").write_text("old")
    base = ["compress", "--model", tiny_folder, "--method", "layerdrop", "--ratio", "0.5"]
    assert cli(*base, "--out", str(file)) == 2 and "is not a folder" in capsys.readouterr().err
    assert cli(*base, "--out", str(full)) == 2 and "--force" in capsys.readouterr().err
    assert (full / "old.safetensors").read_text() == "old"


def test_cli_force_replaces_the_folder_whole(tiny_folder, tmp_path, capsys):  # noqa: F811
    full = tmp_path / "full"
    full.mkdir()
    (full / "stale-00001-of-00002.safetensors").write_text("old weights")
    args = ["compress", "--model", tiny_folder, "--method", "layerdrop", "--ratio", "0.5", "--calib-samples", "4",
            "--calib-len", "64", "--eval-windows", "1", "--out", str(full), "--force"]
    assert cli(*args) == 0
    names = sorted(p.name for p in full.iterdir())
    assert "stale-00001-of-00002.safetensors" not in names and "report.json" in names
    report = json.loads((full / "report.json").read_text())
    assert report["export"]["format"] == "native"  # layer dropping keeps the plain Llama class
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full")]  # no temporary leftovers


def test_cli_eval_json_to_a_folder_fails_before_evaluating(tiny_folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    import compression.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli("eval", "--model", tiny_folder, "--json", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


def test_cli_os_errors_are_one_line(tiny_folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    import compression.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")  # a path through a file fails for every user, root included
    code = cli("compress", "--model", tiny_folder, "--method", "layerdrop", "--ratio", "0.5",
               "--out", str(tmp_path / "file" / "sub" / "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0]


# --- degenerate calibration and held-out errors ----------------------------------------------------
def test_degenerate_calibration_is_flagged():
    from conftest import tiny_model

    from compression import MoDeGPTConfig, compress

    tokens = torch.full((4, 16), 7)  # one token repeated: 64 tokens, 1 distinct, hidden size 64
    _, report = compress(tiny_model(), MoDeGPTConfig(ratio=0.2), tokens)
    assert any("distinct tokens" in w for w in report.warnings)
    assert report.calibration["distinct_tokens"] == 1


def test_held_out_tokens_are_never_fitted_and_errors_are_measured_on_them():
    from conftest import tiny_model

    from compression import MoDeGPTConfig, compress

    torch.manual_seed(0)
    fit, probe_a, probe_b = (torch.randint(0, 128, (8, 32)) for _ in range(3))
    model = tiny_model()
    out_a, rep_a = compress(model, MoDeGPTConfig(ratio=0.3), fit, held_out=probe_a)
    out_b, rep_b = compress(model, MoDeGPTConfig(ratio=0.3), fit, held_out=probe_b)
    _, rep_in = compress(model, MoDeGPTConfig(ratio=0.3), fit)
    for p, q in zip(out_a.parameters(), out_b.parameters()):
        assert torch.equal(p, q)  # the held-out tokens do not change the fit
    assert rep_a.layers[1].errors != rep_b.layers[1].errors  # but they are what the errors measure
    assert rep_a.extra["errors_measured_on"] == "held-out"
    assert rep_in.extra["errors_measured_on"] == "calibration (in-sample)"
    assert rep_in.layers[1].errors["mlp"] < rep_a.layers[1].errors["mlp"]  # in-sample looks better


# --- files: atomic writes, errors that name the file ---------------------------------------------------
def test_corrupt_cache_and_results_name_the_file(tmp_path):
    from compression.files import FileError, read_json, write_json_atomic
    from compression.pipeline import DenseCache

    cache_file = tmp_path / "dense_metrics.json"
    cache_file.write_text("{trunc")
    with pytest.raises(FileError, match=str(cache_file)):
        DenseCache(cache_file).get("anything")
    results = tmp_path / "results.json"
    write_json_atomic(results, {"rows": [1]})
    assert read_json(results) == {"rows": [1]} and [p.name for p in tmp_path.iterdir()].count("results.json") == 1
    results.write_text('{"rows": [')
    with pytest.raises(FileError, match="results.json is not valid JSON"):
        read_json(results)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from compression import files

    target = tmp_path / "results.json"
    files.write_json_atomic(target, {"v": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        files.write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("make", [
    lambda: __import__("compression").MoDeGPTConfig(ratio=float("nan")),
    lambda: __import__("compression").MoDeGPTConfig(ridge=-1.0),
    lambda: __import__("compression").MoDeGPTConfig(batch_size=0),
    lambda: __import__("compression").OlicaConfig(ridge=float("inf")),
    lambda: __import__("compression").OlicaConfig(calibrate_rank=0),
    lambda: __import__("compression").SliceGPTConfig(damping=float("nan")),
    lambda: __import__("compression").SliceGPTConfig(slicing=1.0),
    lambda: __import__("compression").LayerDropConfig(ratio=-0.1),
    lambda: __import__("compression").MoDeGPTConfig(allocation="auto", epsilon=0.0),
    lambda: __import__("compression").MoDeGPTConfig(batch_size=2.5),
])
def test_configs_reject_non_finite_and_out_of_range(make):
    with pytest.raises(ValueError):
        make()


def test_fewer_calibration_tokens_than_the_mlp_width_warns_for_mlp_fitting_methods():
    from conftest import tiny_model

    from compression import LayerDropConfig, MoDeGPTConfig, compress

    model = tiny_model()
    width = model.config.intermediate_size
    few = torch.randint(0, 100, (1, width - 8))       # above the hidden size, below the MLP width
    enough = torch.randint(0, 100, (2, width))
    warned = lambda report: any("MLP width" in w for w in report.warnings)  # noqa: E731
    assert warned(compress(model, MoDeGPTConfig(ratio=0.2), few).report)
    assert not warned(compress(model, MoDeGPTConfig(ratio=0.2), enough).report)
    assert not warned(compress(model, LayerDropConfig(ratio=0.3), few).report)
