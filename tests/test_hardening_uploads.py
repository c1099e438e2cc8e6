"""Issue #27, uploads: weights are checked against their config (never random weights) and configs are
no larger than the served model; an uploaded chat template never runs. Tiny random models only."""
import json
import os
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from conftest import tiny_model  # noqa: E402
from ui import runs as R  # noqa: E402
from ui import weights_check as W  # noqa: E402
from ui.chat import build_prompt  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

from hardening_helpers import (LOOPS, dense_folder, empty_safetensors, loaded, refused_load,
                               report_for, run_members, tabs, upload, zip_bytes)  # noqa: E402,F401  (fixtures by name)


# --- High: uploaded weights must match their config; configs no larger than the served model ----------
def test_the_issues_zip_of_an_empty_safetensors_and_a_big_config_is_refused(tabs, dense_folder):
    """646 KB: hidden 2048 × 6 layers, no tensors; it loaded as "model and report" with random weights."""
    data = zip_bytes(run_members(dense_folder, config={"hidden_size": 2048, "intermediate_size": 8192,
                                                       "num_hidden_layers": 6, "num_attention_heads": 32,
                                                       "num_key_value_heads": 32},
                                 weights=empty_safetensors()))
    message = refused_load(tabs, data)
    assert "6 layers" in message and "has 2" in message


def test_missing_tensors_are_an_error_never_random_weights(tabs, dense_folder):
    message = refused_load(tabs, zip_bytes(run_members(dense_folder, weights=empty_safetensors())))
    assert "do not match its config.json" in message and "missing" in message


def test_a_misshaped_tensor_is_an_error(tabs, dense_folder):
    from safetensors.torch import load_file, save

    weights = load_file(str(Path(dense_folder) / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = torch.zeros(64, 100)  # the config says 64 × 128
    message = refused_load(tabs, zip_bytes(run_members(dense_folder, weights=save(weights))))
    assert name in message and "64×100" in message and "64×128" in message


def test_a_config_larger_than_twice_the_served_model_is_refused(tabs, dense_folder):
    data = zip_bytes(run_members(dense_folder, config={"hidden_size": 192, "intermediate_size": 384},
                                 weights=empty_safetensors()))
    message = refused_load(tabs, data)
    assert "parameters, over 2 ×" in message


def test_weights_outside_model_safetensors_are_not_counted(tabs, dense_folder):
    """transformers reads model.safetensors (or what an index names), so other files cannot fill gaps."""
    real = (Path(dense_folder) / "model.safetensors").read_bytes()
    data = zip_bytes(run_members(dense_folder, weights=empty_safetensors(), **{"other.safetensors": real}))
    assert "missing" in refused_load(tabs, data)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"\xff" * 64, (10**12).to_bytes(8, "little") + b"{}",
                                     (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}  '])
def test_a_bad_safetensors_header_gives_a_clear_message(tabs, dense_folder, garbage):
    message = refused_load(tabs, zip_bytes(run_members(dense_folder, weights=garbage)))
    assert "model.safetensors is not a valid safetensors file" in message


def test_a_damaged_zip_gives_a_clear_message(tabs, dense_folder):
    data = bytearray(zip_bytes({"report.json": json.dumps(report_for(dense_folder)).encode(),
                                "notes.txt": b"n" * 5000}))
    at = data.index(b"n" * 100)
    data[at:at + 100] = b"m" * 100  # the stored data no longer matches its CRC
    assert "the zip is damaged" in refused_load(tabs, bytes(data))


def test_check_weights_against_a_served_model(tmp_path):
    model = tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path)
    params = W.check_weights(tmp_path)
    assert params == sum(p.numel() for p in model.parameters())
    assert W.check_weights(tmp_path, W.Served("base", params, 2)) == params
    with pytest.raises(R.RunError, match="over 2 ×"):
        W.check_weights(tmp_path, W.Served("base", params // 3, 2))
    with pytest.raises(R.RunError, match="has 2 layers; the model it compresses \\(base\\) has 0"):
        W.check_weights(tmp_path, W.Served("base", params, 0))


def test_sharded_weights_are_checked_through_their_index(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    assert W.check_weights(tmp_path) == sum(p.numel() for p in model.parameters())
    name, shard = next(iter(sorted(index["weight_map"].items())))
    tensors = load_file(str(tmp_path / shard))
    del tensors[name]
    save_file(tensors, str(tmp_path / shard))  # the index still names it, the shard lacks it
    with pytest.raises(R.RunError, match="missing"):
        W.check_weights(tmp_path)
    index["weight_map"][name] = "../outside.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(R.RunError, match="does not map tensors to safetensors files of the run"):
        W.check_weights(tmp_path)


def test_a_good_upload_still_loads_with_the_same_weights(tabs, dense_folder):
    session = loaded(tabs, dense_folder)
    dense, _ = tabs.ctx.store.get(dense_folder)
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(session.get("r1").model(ids).logits, dense(ids).logits)


def test_an_upload_of_a_model_the_app_cannot_serve_loads_as_its_report(tabs, dense_folder):
    members = run_members(dense_folder)
    members["report.json"] = json.dumps(report_for("./no/such/model")).encode()
    session = R.Session()
    md, _, _ = tabs.runs.load_saved(session, upload("run.zip", zip_bytes(members)), "")
    assert "report only" in md and "not available here" in md and session.get("r1").model is None


# --- High: an uploaded chat template never runs; the dense model's is used -----------------------------
def _in_thread(fn, timeout: float):
    out, errors = [], []

    def target():
        try:
            out.append(fn())
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "still rendering the uploaded chat template"
    if errors:
        raise errors[0]
    return out[0]


def test_an_uploaded_chat_template_with_nested_loops_never_runs(tabs, dense_folder):
    session = R.Session()
    data = zip_bytes(run_members(dense_folder, **{"chat_template.jinja": LOOPS.encode()}))
    md, _, _ = tabs.runs.load_saved(session, upload("run.zip", data), "")
    assert "model and report" in md and "dense model's chat template" in md

    def chat():
        out = None
        for out in tabs.chat.chat(session, "Hi", [], [], None, "", 0.0, 0.9, 4, 1.1, 0, True, run_ids=["r1"]):
            pass
        return out

    dense_pane, run_pane = _in_thread(chat, 60)[:2]
    assert run_pane[0]["content"] == "Hi" and run_pane[-1]["role"] == "assistant"
    assert not session.busy  # the session can start its next job

    def compare():
        out = None
        for out in tabs.chat.compare(session, ["r1"], "", 0.0, 0.9, 4, 1.1, 0, True, prompts=["Hi"]):
            pass
        return out

    _in_thread(compare, 60)
    assert tabs.ctx.slot.acquire(timeout=5)  # the model slot is free
    tabs.ctx.slot.release()


def test_the_run_pane_prompt_is_rendered_with_the_dense_template(dense_folder):
    from transformers import AutoTokenizer

    from ui.chat_tab import templates

    dense_tok = AutoTokenizer.from_pretrained(dense_folder)
    run_tok = AutoTokenizer.from_pretrained(dense_folder)
    run_tok.chat_template = LOOPS
    own, theirs = templates((None, dense_tok), 1)
    ids = build_prompt(run_tok, [], "Hi", True, theirs)
    assert torch.equal(ids, build_prompt(dense_tok, [], "Hi", True, own))
