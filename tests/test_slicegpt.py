"""SliceGPT: invariance at zero slicing, PCA helper, sizes, save -> reload."""
import pytest
import torch
from conftest import logits, tiny_model
from transformers import AutoModelForCausalLM

from compression import compress
from compression.arch import count_params, view
from compression.modeling import to_compressed
from compression.ops import pca
from compression.slicegpt import SliceGPTConfig, fold_norms, plan_widths


def test_norm_folding_alone_keeps_logits(model, tokens):
    ref = logits(model, tokens)
    compressed = to_compressed(model)
    for layer in compressed.model.layers:
        fold_norms(layer)
        assert layer.input_layernorm.weight is None
    torch.testing.assert_close(logits(compressed, tokens), ref, rtol=1e-5, atol=1e-5)


def test_zero_slicing_full_rotation_keeps_logits(model, tokens):
    ref = logits(model, tokens)
    out, report = compress(model, SliceGPTConfig(slicing=0.0), tokens)
    assert out.model.layers[0].attn_skip is not None  # really rotated, not skipped
    rot = out.model.layers[1].attn_skip.weight
    assert not torch.allclose(rot, torch.eye(rot.shape[0]), atol=1e-3)
    torch.testing.assert_close(logits(out, tokens), ref, rtol=1e-4, atol=1e-4)


def test_pca_recovers_planted_components():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    scales = torch.tensor([5.0, 3.0, 1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    x = torch.randn(20000, 6, dtype=torch.float64) * scales @ basis.T
    vals, vecs = pca(x.T @ x / x.shape[0])
    assert torch.allclose(vals[:3], scales[:3] ** 2, rtol=0.05)
    for j in range(3):  # each leading component matches a planted direction up to sign
        assert abs(float(vecs[:, j] @ basis[:, j])) > 0.999


def test_slicing_sizes_and_reload(tokens, tmp_path):
    model = tiny_model("qwen2", layers=3)
    dense_params = count_params(model)
    out, report = compress(model, SliceGPTConfig(slicing=0.25), tokens)
    d = plan_widths(SliceGPTConfig(slicing=0.25), view(out).config)[0]
    assert d == 48
    specs = [layer.spec() for layer in out.model.layers]
    assert [(s["d_in"], s["d_mid"], s["d_out"]) for s in specs] == [(64, 48, 48), (48, 48, 48), (48, 48, 64)]
    assert out.lm_head.weight is out.model.embed_tokens.weight  # the tied head stays tied
    assert report.params_compressed == count_params(out) < dense_params
    assert [l.kept["mlp_input"] for l in report.layers] == [48, 48, 48]
    assert all(0 <= l.errors["block"] < 1 for l in report.layers)
    ref = logits(out, tokens)
    gen = out.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False)
    out.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == report.params_compressed
    assert torch.equal(reloaded.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False), gen)


def test_ratio_finds_width_reaching_target(tokens):
    model = tiny_model("llama", layers=3)
    out, report = compress(model, SliceGPTConfig(ratio=0.3), tokens)
    assert report.ratio_achieved >= 0.3
    wider = report.config["widths"][0] + 8  # one step wider would miss the target
    from compression.modeling import spec_params
    from compression.slicegpt import sliced_specs
    base = view(out).config
    dense = sum(p.numel() for p in tiny_model("llama", layers=3).model.layers.parameters())
    assert 1 - sum(spec_params(s, base) for s in sliced_specs(base, [wider] * 3)) / dense < 0.3


def test_per_layer_widths(tokens):
    out, report = compress(tiny_model("mistral", tied=False), SliceGPTConfig(widths=(56, 40, 48)), tokens)
    assert [l.sizes["d_mid"] for l in report.layers] == [56, 40, 48]


def test_bad_config():
    with pytest.raises(ValueError, match="exactly one"):
        SliceGPTConfig(slicing=0.1, ratio=0.1)
    with pytest.raises(ValueError, match="widths must be 3"):
        compress(tiny_model(), SliceGPTConfig(widths=(8, 8)), torch.randint(0, 100, (2, 8)))
