"""Architectures beyond Llama: Qwen3, Gemma 2, Gemma 3, Phi-3, OLMo 2 (tiny random configs).

Conversion to the compressed format is exact; every method that accepts an architecture leaves the
logits unchanged at zero compression and saves/reloads identically at 0.3; the others refuse with a
reason (:func:`compression.arch.refusal`).
"""
import copy

import pytest
import torch
from conftest import NEW_ARCHS, logits, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from compression import LayerDropConfig, compress
from compression.arch import count_params, view
from compression.methods import refusal
from compression.modegpt import MoDeGPTConfig
from compression.modeling import CompressedForCausalLM, spec_params, to_compressed
from compression.olica import OlicaConfig
from compression.ops import head_columns
from compression.rewrite import keep_rotary_pairs
from compression.slicegpt import SliceGPTConfig

METHODS = {
    "layerdrop": lambda r: LayerDropConfig(ratio=r),
    "slicegpt": lambda r: SliceGPTConfig(slicing=r),
    "modegpt": lambda r: MoDeGPTConfig(ratio=r),
    "olica": lambda r: OlicaConfig(ratio=r, calibrate_layers=1, calibrate_rank=4),
}
REFUSED = {("gemma2", "slicegpt"), ("gemma3_text", "slicegpt"), ("olmo2", "slicegpt")}
ACCEPTED = [(kind, m) for kind in NEW_ARCHS for m in METHODS if (kind, m) not in REFUSED]


def _run(model, config, tokens):
    out = compress(model, config, tokens)
    return (out.model, out.report) if hasattr(out, "model") and hasattr(out, "report") else (out.compressed, out)


@pytest.mark.parametrize("kind", NEW_ARCHS)
def test_conversion_is_exact_and_reloads(kind, tokens, tmp_path):
    model = tiny_model(kind)
    ref, dense_params = logits(model, tokens), count_params(model)
    gen = model.generate(tokens[:2, :6], max_new_tokens=12, do_sample=False)  # past the sliding window
    compressed = to_compressed(model)
    assert torch.equal(logits(compressed, tokens), ref)
    assert count_params(compressed) == dense_params
    assert torch.equal(compressed.generate(tokens[:2, :6], max_new_tokens=12, do_sample=False), gen)
    base = compressed.model.config
    assert all(spec_params(layer.spec(), base) == count_params(layer) for layer in compressed.model.layers)
    compressed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CompressedForCausalLM)
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == dense_params


@pytest.mark.parametrize("kind, method", ACCEPTED)
def test_zero_compression_keeps_logits(kind, method, tokens):
    model = tiny_model(kind)
    ref = logits(model, tokens)
    out, report = _run(model, METHODS[method](0.0), tokens)
    if method == "slicegpt":  # a full PCA rotation: exact up to float rounding, skip matrices added
        torch.testing.assert_close(logits(out, tokens), ref, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(logits(out, tokens), ref)
        assert report.params_compressed == report.params_dense


@pytest.mark.parametrize("kind, method", ACCEPTED)
def test_compressed_model_saves_and_reloads(kind, method, tokens, tmp_path):
    model = tiny_model(kind)
    dense = logits(model, tokens)
    out, report = _run(model, METHODS[method](0.3), tokens)
    ref = logits(out, tokens)
    assert not torch.allclose(ref, dense)
    assert report.params_compressed < report.params_dense
    out.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == report.params_compressed == count_params(out)


@pytest.mark.parametrize("kind", NEW_ARCHS)
def test_every_method_is_accepted_or_refused_with_a_reason(kind):
    config = tiny_config(kind)
    for method in METHODS:
        reason = refusal(config, method)
        if (kind, method) in REFUSED:
            assert reason and "\n" not in reason and kind in reason
        else:
            assert reason is None
    assert refusal(to_compressed(tiny_model(kind)).config, "slicegpt") == refusal(config, "slicegpt")


def test_partial_rotary_phi3_converts_exactly_and_refuses_pair_cutting(tokens):
    model = tiny_model("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
    ref = logits(model, tokens)
    assert torch.equal(logits(to_compressed(model), tokens), ref)
    for method in ("modegpt", "olica"):
        assert "partial_rotary_factor" in refusal(model.config, method)
    assert refusal(model.config, "slicegpt") is None


@pytest.mark.parametrize("kind", NEW_ARCHS)
def test_cut_rotary_pairs_equal_zeroed_columns(kind, tokens):
    """Keeping r rotary pairs (q/k norms sliced in step, their mean still over the original width)
    computes exactly what the dense model computes with the other q/k columns zeroed."""
    cut = to_compressed(tiny_model(kind))
    zeroed = copy.deepcopy(cut)
    for layer, dense_layer in zip(view(cut).layers, view(zeroed).layers):
        attn = layer.self_attn
        d_in = attn.q_proj.in_features
        gram = torch.randn(d_in, 2 * d_in, dtype=torch.float64)
        keep_rotary_pairs(attn, gram @ gram.T, keep_pairs=attn.head_dim // 2 - 3)
        hd, groups = attn.head_dim, attn.num_key_value_groups
        for proj, heads in ((dense_layer.self_attn.q_proj, attn.num_heads), (dense_layer.self_attn.k_proj, attn.num_kv_heads)):
            mask = torch.ones(heads * hd, dtype=torch.bool)
            per_group = groups if heads == attn.num_heads else 1
            for h in range(heads):
                mask[h * hd + head_columns(attn.rope_index[h // per_group], hd)] = False
            with torch.no_grad():
                proj.weight[mask] = 0
    assert attn.qk_dim < attn.head_dim
    torch.testing.assert_close(logits(cut, tokens), logits(zeroed, tokens), rtol=1e-4, atol=1e-4)
    assert all(spec_params(layer.spec(), cut.model.config) == count_params(layer) for layer in cut.model.layers)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "phi3", "olmo2"])
def test_the_cli_compresses_each_new_architecture_and_the_reload_has_the_reported_size(kind, tmp_path):
    """The issue's done-when: tiny Qwen3, Gemma 3, Phi-3 and OLMo 2 through ``python -m compression
    compress`` with MoDeGPT and Olica; the saved folder reloads with the report's parameter count."""
    import json

    from transformers import AutoTokenizer

    from compression.__main__ import main
    from compression.models import DEFAULT_MODEL, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(DEFAULT_MODEL))
    torch.manual_seed(0)
    folder = tmp_path / kind
    AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    for method, extra in (("modegpt", []), ("olica", ["--calibrate-layers", "1", "--calibrate-rank", "4"])):
        out = tmp_path / method
        assert main(["compress", "--model", str(folder), "--method", method, "--ratio", "0.3", "--calibration", "wiki",
                     "--calib-samples", "4", "--calib-len", "64", "--eval-windows", "0", "--chat-eval", "0",
                     *extra, "--out", str(out)]) == 0, method
        report = json.loads((out / "report.json").read_text())
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert count_params(reloaded) == report["params_compressed"] < report["params_dense"], method
