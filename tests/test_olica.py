"""Olica: invariance at full rank, fast VO decomposition, linear calibration, budget, reload."""
import pytest
import torch
from conftest import logits, tiny_model
from transformers import AutoModelForCausalLM

from compression import compress
from compression.arch import count_params
from compression.olica import (OlicaConfig, explained, neuron_importance, ridge_fit,
                               weighted_low_rank)
from compression.ops import vo_decomposition


def test_full_rank_reproduces_dense_logits(model, tokens):
    ref = logits(model, tokens)
    out, report = compress(model, OlicaConfig(ratio=0.0), tokens)
    torch.testing.assert_close(logits(out, tokens), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 3])
def test_fast_vo_decomposition_equals_direct_decomposition_of_product(groups):
    """The one-factor route gives the same rank-k product as an SVD of the full weighted product."""
    torch.manual_seed(groups)
    d, hd, D, keep = 24, 6, 20, 3
    x = torch.randn(500, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    gram = x.T @ x / 500
    w_v = torch.randn(d, hd, dtype=torch.float64)
    w_o = torch.randn(hd, groups * D, dtype=torch.float64)
    m, w_o_new, s = vo_decomposition(w_v, w_o, gram, keep)
    u, sv, vt = torch.linalg.svd(x @ w_v @ w_o, full_matrices=False)   # direct, on activations
    direct = u[:, :keep] * sv[:keep] @ vt[:keep]
    torch.testing.assert_close(x @ w_v @ m @ w_o_new, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s[:keep] ** 2 * 500, sv[:keep] ** 2)


def test_linear_calibration_recovers_planted_relation():
    torch.manual_seed(0)
    n, d, D, r = 2000, 16, 12, 3
    x = torch.randn(n, d, dtype=torch.float64)
    w_true = torch.randn(d, r, dtype=torch.float64) @ torch.randn(r, D, dtype=torch.float64)
    resid = x @ w_true + 0.01 * torch.randn(n, D, dtype=torch.float64)
    gram, cross, r_sq = x.T @ x / n, x.T @ resid / n, float(resid.pow(2).sum()) / n
    w = ridge_fit(gram, cross, 1e-6)
    a, b = weighted_low_rank(w, gram, r)
    assert explained(gram, cross, r_sq, a @ b) > 0.999
    assert explained(gram, cross, r_sq, torch.zeros_like(w)) == pytest.approx(0.0)
    before = (resid.pow(2).sum()).item()
    after = (resid - x @ a @ b).pow(2).sum().item()
    assert after < 1e-3 * before


def test_neuron_importance_is_activation_times_weight_norm():
    z_sq = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[3.0, 0.0, 5.0], [4.0, 2.0, 0.0]])
    torch.testing.assert_close(neuron_importance(z_sq, w), torch.tensor([10.0, 2.0, 0.0], dtype=torch.float64))


def test_calibration_branch_lowers_mlp_error_and_budget_holds(tokens, tmp_path):
    model = tiny_model("llama", layers=3)
    out, report = compress(model, OlicaConfig(ratio=0.3, calibrate_layers=2, calibrate_rank=4), tokens)
    calibrated = report.config["calibrated"]
    assert len(calibrated) == 2
    for j in calibrated:
        e = report.layers[j].errors
        assert e["mlp"] < e["mlp_before_calibration"]
        assert report.layers[j].sizes["branch_rank"] == 4
    assert report.ratio_achieved >= 0.3 - 0.02  # branches are paid for by pruned neurons
    ref = logits(out, tokens)
    out.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == report.params_compressed


def test_without_calibration_no_branches(tokens):
    out, report = compress(tiny_model("qwen2"), OlicaConfig(ratio=0.2, calibrate_layers=0), tokens)
    assert all(l.sizes["branch_rank"] == 0 for l in report.layers)
    assert report.config["calibrated"] == []


def test_dropped_part_is_the_pruned_mlps_residual():
    from compression.olica import dropped_part

    torch.manual_seed(0)
    z, w = torch.randn(2, 5, 12), torch.randn(4, 12)
    kept = torch.tensor([0, 3, 4, 9])
    pruned = torch.nn.functional.linear(z[..., kept], w[:, kept])
    assert torch.allclose(pruned + dropped_part(w, kept)(z), torch.nn.functional.linear(z, w), atol=1e-5)
    assert dropped_part(w, torch.arange(12))(z).abs().max() == 0  # nothing dropped, nothing added
