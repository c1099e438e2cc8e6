"""Calibration sources (wiki, self-chat, code, text files, mixtures) and chat agreement, on a tiny
random Llama with the default model's tokenizer (it has a chat template)."""
import json

import pytest
import torch

from compression import sources
from compression.data import CalibrationError, TextSpec
from compression.evaluate import ChatReference, chat_agreement
from conftest import tiny_chat_llama

TINY_CHAT = sources.SelfChat(max_new_tokens=6, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_chat_llama()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@pytest.fixture
def small_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SELF_CHAT", TINY_CHAT)
    monkeypatch.setattr(sources, "CHAT_REFERENCE", sources.SelfChat(max_new_tokens=5, batch_size=4))


@pytest.mark.parametrize("text,ok", [("wiki", True), ("self-chat", True), ("code", True), ("wiki+self-chat", True),
                                     ("text:/tmp/x.txt", True), ("hf:wikitext:wikitext-2-raw-v1", True),
                                     ("", False), ("web", False), ("wiki+nope", False), ("text:", False)])
def test_parse(text, ok):
    if ok:
        assert sources.parse(text)
    else:
        with pytest.raises(ValueError):
            sources.parse(text)


def test_wiki_source_gives_the_benchmark_tokens(tiny):
    """The default path must cut exactly the tokens the published benchmark calibrated on."""
    _, tok = tiny
    fit, held, facts = sources.calibration_tokens("wiki", "m", None, tok, 4, 64)
    assert torch.equal(fit, TextSpec(4, 64).batches(tok)) and facts["source"] == "wiki"
    assert held.shape == (2, 64) and not torch.equal(held[0], fit[-1])


def test_mixture_interleaves_parts(tiny):
    _, tok = tiny
    fit, _, facts = sources.calibration_tokens("wiki+code", "m", None, tok, 4, 32)
    wiki = TextSpec(2, 32).batches(tok)
    code = TextSpec(2, 32, source="code").batches(tok)
    assert torch.equal(fit, torch.stack([wiki[0], code[0], wiki[1], code[1]]))
    assert facts["parts"] == ["wiki", "code"]


def test_self_chat_is_the_models_own_replies_cached_and_deterministic(tiny, small_settings, monkeypatch):
    model, tok = tiny
    text = sources.self_chat_text("tiny", model, tok, 200)
    assert "<|im_start|>assistant" in text and sources.chat_prompts("calibration")[0] in text
    fit, _, _ = sources.calibration_tokens("self-chat", "tiny", model, tok, 2, 32)

    def no_generation(*args, **kwargs):
        raise AssertionError("replies must come from the cache")

    monkeypatch.setattr(sources, "generate_replies", no_generation)
    again, _, _ = sources.calibration_tokens("self-chat", "tiny", model, tok, 2, 32)
    assert torch.equal(fit, again)
    assert sources.self_chat_text("tiny", model, tok, 200) == text


def test_generation_reports_every_token_so_a_stop_is_heard_mid_batch(tiny, small_settings):
    """A cancelled job's progress raises; it must be called between tokens, not only between the
    batches of replies (a batch of 16 took 10-45 s on a loaded CPU and held the model slot)."""
    model, tok = tiny
    calls = []

    def progress(fraction, message):
        calls.append((fraction, message))
        if len(calls) == 3:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        sources.self_chat_text("tiny-stop", model, tok, 10_000, progress=progress)
    assert len(calls) == 3 and "token" in calls[-1][1]
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)


def test_prompt_sets_are_disjoint():
    cal, ev = sources.chat_prompts("calibration"), sources.chat_prompts("evaluation")
    assert len(cal) >= 200 and len(ev) >= 16 and not set(cal) & set(ev)


def test_text_file_and_offline_hub_sources(tiny, tmp_path, monkeypatch):
    _, tok = tiny
    file = tmp_path / "mine.txt"
    file.write_text("Some text of my own. " * 200)
    fit, _, _ = sources.calibration_tokens(f"text:{file}", "m", None, tok, 2, 16)
    assert fit.shape == (2, 16)
    with pytest.raises(CalibrationError, match="does not exist"):
        sources.calibration_tokens(f"text:{tmp_path / 'none.txt'}", "m", None, tok, 2, 16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="offline"):
        sources.calibration_tokens("hf:wikitext", "m", None, tok, 2, 16)


def test_chat_agreement_of_a_model_with_itself_and_a_perturbed_copy(tiny):
    import copy

    model, tok = tiny
    torch.manual_seed(1)
    sequences = [torch.randint(0, 1000, (20,)), torch.randint(0, 1000, (14,))]
    reference = ChatReference.build(model, sequences, [8, 5])
    same = chat_agreement(model, reference)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    assert same["tokens"] == (20 - 8) + (14 - 5) and same["conversations"] == 2
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = chat_agreement(other, reference)
    assert moved["kl"] > 1e-4 and moved["top1"] < 1.0
    assert moved["kl_ci"][0] <= moved["kl"] <= moved["kl_ci"][1]


def test_cli_compress_with_self_chat_records_source_and_chat_agreement(tiny, small_settings, tmp_path):
    from compression.__main__ import main

    model, tok = tiny
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["compress", "--model", str(folder), "--method", "modegpt", "--ratio", "0.25",
                 "--calibration", "self-chat", "--calib-samples", "2", "--calib-len", "32",
                 "--eval-windows", "1", "--chat-eval", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "self-chat"
    assert report["agreement_chat"]["kl"] >= 0 and report["agreement_chat"]["conversations"] == 2
    assert main(["compress", "--model", str(folder), "--method", "modegpt", "--ratio", "0.25",
                 "--calibration", "web", "--out", str(tmp_path / "x")]) == 2
    # without --calibration a method gets its own measured default (at least one is not wiki)
    from compression.methods import METHODS

    method = next(m for m in METHODS.values() if m.calibration != "wiki")
    assert main(["compress", "--model", str(folder), "--method", method.name, "--ratio", "0.25",
                 "--calib-samples", "2", "--calib-len", "32", "--eval-windows", "0", "--chat-eval", "0",
                 "--out", str(tmp_path / "default")]) == 0
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["calibration"]["source"] == method.calibration


def test_cli_offload_calibrates_on_wiki_unless_self_chat_is_asked_for(tiny, small_settings, tmp_path, capsys):
    from compression.__main__ import main

    model, tok = tiny
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    base = ["compress", "--model", str(folder), "--method", "modegpt", "--ratio", "0.25", "--offload",
            "--calib-samples", "2", "--calib-len", "32", "--eval-windows", "0", "--chat-eval", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["calibration"]["source"] == "wiki"
    assert "pass --calibration to insist" in capsys.readouterr().err
    assert main([*base, "--calibration", "wiki+self-chat", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["calibration"]["source"] == "wiki+self-chat"
