"""The model card (README.md) that pipeline.save writes from a real tiny-model run's report (issue 20)."""
import re

import pytest
import yaml
from conftest import tiny_model

from compression import LayerDropConfig, compress
from compression.card import base_model, escape, model_card
from compression.modegpt import MoDeGPTConfig
from compression.pipeline import DenseCache, Stages, measure_against, save

EVIL = "evil/*bold*_[link](http://x)<script>`code`"


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def _saved_card(model, config, tokens, folder, name="smollm2-135m", measure=True) -> tuple[str, dict]:
    """Compress ``model``, measure perplexity and agreement on two windows, save; (card, report)."""
    dense = tiny_model("llama")
    out = compress(model, config, tokens)
    out.report.model = name
    if measure:
        stages = Stages(lambda f, m: None, {"dense reference": 1, "compressed perplexity and agreement": 1})
        measured = measure_against(name, dense, out.model, tokens[:2], DenseCache(), stages)
        out.report.evaluation["ppl"], out.report.agreement = measured["ppl"], measured["agreement"]
    save(folder, out.model, None, out.report)
    return (folder / "README.md").read_text(), out.report.to_dict()


def test_save_writes_a_card_for_a_remote_code_result(tokens, tmp_path):
    card, report = _saved_card(tiny_model("llama"), MoDeGPTConfig(ratio=0.3), tokens, tmp_path / "m")
    assert report["export"]["format"] == "remote_code"
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert {"modegpt", "compressed", "training-free", "custom_code"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "packaged copy of HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "from_pretrained(\"path/to/this/folder\", trust_remote_code=True)" in card
    assert "modeling\\_compressed" not in card and "`modeling_compressed.py`" in card
    ppl = report["evaluation"]["ppl"]
    assert f"2 windows × {tokens.shape[1]} tokens" in card
    assert f"dense {ppl['dense']:.4g} (95% CI {ppl['dense_ci'][0]:.4g} – {ppl['dense_ci'][1]:.4g})" in card
    assert f"compressed {ppl['compressed']:.4g}" in card
    agreement = report["agreement"]
    assert f"KL(dense ‖ compressed) {agreement['kl']:.4g} nats" in card
    assert f"top-1 agreement {agreement['top1']:.1%}" in card
    cal = report["calibration"]
    assert f"{cal['samples']} samples × {cal['seq_len']} tokens" in card and cal["fingerprint"] in card
    assert f"achieved {report['ratio_achieved']:.1%}" in card and "target 30.0%" in card


def test_native_results_load_with_plain_transformers(tokens, tmp_path):
    card, report = _saved_card(tiny_model("llama"), LayerDropConfig(ratio=0.3), tokens, tmp_path / "m",
                               name=str(tmp_path), measure=False)
    assert report["export"]["format"] == "native"
    assert "from_pretrained(\"path/to/this/folder\")" in card and "trust_remote_code" not in card
    assert "base_model" not in _front_matter(card), "a local folder is not a hub model"
    assert "custom_code" not in _front_matter(card)["tags"]
    assert "Not evaluated" in card


def test_zero_shot_and_heal_records_appear_with_their_settings(tokens, tmp_path):
    out = compress(tiny_model("llama"), LayerDropConfig(ratio=0.3), tokens)
    report = out.report.to_dict()
    report["export"] = {"format": "native", "reason": "blocks dropped"}
    report["evaluation"]["zero_shot"] = {"dense": 0.516, "compressed": 0.471, "compressed_stderr": 0.012,
                                         "tasks": ["arc_easy", "piqa"], "limit": 50}  # the app's record
    report["heal"] = {"tokens": 16384, "steps": 8, "ppl_before": 30.0, "ppl_after": 21.5}
    card = model_card(report)
    assert "mean over arc\\_easy, piqa; at most 50 items per task" in card
    assert "dense 0.516, compressed 0.471 ± 0.012 (stderr)" in card
    assert "16,384 tokens in 8 steps; perplexity 30 → 21.5" in card
    report["evaluation"]["zero_shot"]["n"] = 100
    assert "n = 100 items" in model_card(report)


def test_names_and_warnings_from_reports_are_escaped(tokens):
    out = compress(tiny_model("llama"), LayerDropConfig(ratio=0.3), tokens)
    report = out.report.to_dict()
    report.update(model=EVIL, warnings=["<img src=x onerror=alert(1)>\n# heading"],
                  export={"format": "remote_code", "reason": "[x](javascript:alert(1))"})
    card = model_card(report)
    body = card.split("---\n", 2)[2]
    for raw in ("*bold*", "[link](", "<script>", "`code`", "](javascript", "\n# heading"):
        assert raw not in body, raw
    assert not re.search(r"(?<!\\)<img", body) and "\\<img" in body
    assert escape(EVIL) in body and "\\<script\\>" in body
    assert "base_model" not in _front_matter(card)


@pytest.mark.parametrize("name, expected", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("a/b/c", None),
    ("gpt2\n- evil: tag", None),
])
def test_base_model_only_for_hub_ids(name, expected):
    assert base_model(name) == expected
