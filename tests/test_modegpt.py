"""MoDeGPT: each module on data with a known answer, invariance at full rank, allocation, structure."""
import pytest
import torch
from conftest import logits, tiny_model
from transformers import AutoModelForCausalLM

from compression import compress
from compression.arch import count_params
from compression.modegpt import MoDeGPTConfig
from compression.ops import (eigenvalues, nystrom_mlp, ridge_leverage, rotary_pair_scores, shifted_cond_bound,
                             solve_psd, triangular_inverse, vo_decomposition)
from compression.plan import Allocation, entropic_allocation


def test_nystrom_is_exact_when_activations_live_on_kept_channels():
    torch.manual_seed(0)
    n, m, k, D = 500, 12, 5, 7
    base = torch.randn(n, k, dtype=torch.float64)
    mix = torch.randn(k, m - k, dtype=torch.float64)
    z = torch.cat([base, base @ mix], 1)  # channels k.. are linear in the first k: rank k
    z[:, :k] *= 10  # the first k carry most energy, so leverage picks them
    w_down = torch.randn(D, m, dtype=torch.float64)
    index, w_new, scores = nystrom_mlp(z.T @ z / n, w_down, k, ridge=1e-3)
    assert index.tolist() == list(range(k))
    torch.testing.assert_close(z[:, index] @ w_new.T, z @ w_down.T)
    assert scores.shape == (m,)


def test_shrunk_refit_solves_its_ridge_problem_and_ends_at_the_kept_columns():
    torch.manual_seed(0)
    n, m, k, D = 300, 16, 6, 5
    z = torch.randn(n, m, dtype=torch.float64) * torch.linspace(2, 0.5, m, dtype=torch.float64)
    c, w_down = z.T @ z / n, torch.randn(D, m, dtype=torch.float64)
    index, plain, _ = nystrom_mlp(c, w_down, k, ridge=1.0)
    index_s, shrunk, _ = nystrom_mlp(c, w_down, k, ridge=1.0, shrinkage=0.5)
    assert torch.equal(index, index_s)  # shrinkage changes the refit, never the choice of channels
    c_ss, w_s = c[index][:, index], w_down[:, index]
    mu = 0.5 * c_ss.diagonal().mean()
    # the gradient of ‖Z Wᵀ − Z_S W'ᵀ‖²/n + μ‖W' − W_S‖² vanishes at the shrunk refit, not the plain one
    grad = lambda w: (w @ c_ss - w_down @ c[:, index]) + mu * (w - w_s)  # noqa: E731
    torch.testing.assert_close(grad(shrunk), torch.zeros(D, k, dtype=torch.float64), rtol=0, atol=1e-10)
    assert grad(plain).abs().max() > 1e-3
    _, limit, _ = nystrom_mlp(c, w_down, k, ridge=1.0, shrinkage=1e9)
    torch.testing.assert_close(limit, w_s, rtol=0, atol=1e-6)  # μ → ∞: the channels are just dropped


def test_shrunk_refit_generalises_better_from_a_small_sample():
    """Few tokens per channel: the least-squares refit fits the sample's noise; shrinking it toward
    the kept columns lowers the error on fresh tokens from the same distribution (seeded)."""
    torch.manual_seed(0)
    m, k, D = 48, 24, 8
    mix = torch.randn(m, m, dtype=torch.float64) / m ** 0.5 + torch.eye(m, dtype=torch.float64)
    sample = lambda n: torch.randn(n, m, dtype=torch.float64) @ mix  # noqa: E731  correlated channels
    w_down = torch.randn(D, m, dtype=torch.float64)
    fit, fresh = sample(40), sample(20000)
    errors = {}
    for mu in (0.0, 0.5):
        index, w_new, _ = nystrom_mlp(fit.T @ fit / 40, w_down, k, ridge=1.0, shrinkage=mu)
        errors[mu] = float((fresh[:, index] @ w_new.T - fresh @ w_down.T).norm())
    assert errors[0.5] < 0.9 * errors[0.0]


def test_single_precision_nystrom_is_float32_where_the_shifts_bound_the_condition_and_float64_else():
    torch.manual_seed(0)
    n, m, k, D = 2000, 96, 60, 12
    z = torch.randn(n, m, dtype=torch.float64) * torch.logspace(0, -2, m, dtype=torch.float64)
    c, w_down = z.T @ z / n, torch.randn(D, m, dtype=torch.float64)
    index, exact, scores = nystrom_mlp(c, w_down, k, ridge=1.0, shrinkage=0.5)
    index_s, single, scores_s = nystrom_mlp(c, w_down, k, ridge=1.0, shrinkage=0.5, single=True)
    assert torch.equal(index, index_s) and single.dtype == scores_s.dtype == torch.float64
    assert 0 < (scores_s - scores).abs().max() < 1e-5  # it ran in float32, at float32's accuracy
    assert 0 < (single - exact).abs().max() / exact.abs().max() < 1e-5
    # no bound, float64 (the same bits as without single): the paper's refit (μ = 0), a tiny ridge's scores
    plain, plain_single = nystrom_mlp(c, w_down, k, 1.0), nystrom_mlp(c, w_down, k, 1.0, single=True)
    assert torch.equal(plain[1], plain_single[1]) and not torch.equal(plain[2], plain_single[2])
    tiny, tiny_single = nystrom_mlp(c, w_down, k, 1e-6, 0.5), nystrom_mlp(c, w_down, k, 1e-6, 0.5, single=True)
    assert torch.equal(tiny[2], tiny_single[2]) and not torch.equal(tiny[1], tiny_single[1])
    assert shifted_cond_bound(10.0, 0.5) == 21.0 and shifted_cond_bound(1.0, 0.0) == float("inf")


def test_ridge_leverage_is_the_definition_also_for_a_rank_deficient_correlation():
    torch.manual_seed(0)
    z = torch.randn(40, 60, dtype=torch.float64) * torch.logspace(0, -3, 60, dtype=torch.float64)
    c = z.T @ z / 40  # rank 40 of 60
    for lam in (1e-6, 1e-2, 10.0):
        expected = torch.linalg.solve(c + lam * torch.eye(60, dtype=torch.float64), c).diagonal()
        torch.testing.assert_close(ridge_leverage(c, lam), expected, rtol=1e-9, atol=1e-12)


def test_eigenvalues_are_the_spectrum_descending_in_float64():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    spectrum = torch.logspace(2, -8, 50, dtype=torch.float64)  # ten decades, as activation spectra span
    c = (q * spectrum) @ q.T
    vals = eigenvalues(c)
    assert vals.dtype == torch.float64
    torch.testing.assert_close(vals, spectrum, rtol=1e-6, atol=1e-12)
    assert eigenvalues(c.float()).dtype == torch.float64  # a float32 statistic is widened first


def test_single_precision_eigenvalues_err_by_about_float32_rounding_of_the_largest():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    spectrum = torch.logspace(2, -8, 300, dtype=torch.float64)
    c = (q * spectrum) @ q.T
    vals = eigenvalues(c, single=True)
    assert vals.dtype == torch.float64 and torch.all(vals[:-1] >= vals[1:])
    error = (vals - spectrum).abs().max()
    assert error < 300 * 6e-8 * spectrum[0]  # n · eps32 · λ_max: LAPACK's bound
    assert error > 1e-12 * spectrum[0]  # and it did run in float32 (float64 would be ~1e-14)


def test_triangular_inverse_inverts_a_cholesky_factor():
    torch.manual_seed(0)
    z = torch.randn(100, 40, dtype=torch.float64)
    factor = torch.linalg.cholesky(z.T @ z)
    inverse = triangular_inverse(factor)
    torch.testing.assert_close(inverse @ factor, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(inverse, inverse.tril())


def test_solve_psd_is_cholesky_when_well_posed_and_least_squares_when_singular():
    torch.manual_seed(0)
    z = torch.randn(200, 30, dtype=torch.float64)
    a, b = z.T @ z, torch.randn(30, 5, dtype=torch.float64)
    torch.testing.assert_close(solve_psd(a, b), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    low = torch.randn(30, 12, dtype=torch.float64)
    singular = low @ low.T  # rank 12: Cholesky's pivots collapse, least squares truncates
    rhs = singular @ torch.randn(30, 5, dtype=torch.float64)
    x = solve_psd(singular, rhs)
    torch.testing.assert_close(x, torch.linalg.lstsq(singular, rhs).solution)
    torch.testing.assert_close(singular @ x, rhs, rtol=1e-8, atol=1e-8)
    nearly = singular + 1e-14 * torch.eye(30, dtype=torch.float64)  # Cholesky passes, on roundoff pivots
    assert int(torch.linalg.cholesky_ex(nearly)[1]) == 0
    torch.testing.assert_close(solve_psd(nearly, rhs), torch.linalg.lstsq(nearly, rhs).solution)


def test_rotary_pair_scores_sum_query_heads_per_group():
    q = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 4.0, 0.0, 0.0]])  # two query heads, hd 4
    k = torch.tensor([[1.0, 1.0, 0.0, 3.0]])                         # one kv group
    scores = rotary_pair_scores(q, k, groups=2)
    # pair 0 = dims (0, 2), pair 1 = dims (1, 3)
    expected = torch.tensor([[1.0 * (2.0 + 0.0), 2.0 * (0.0 + 2.0)]])
    torch.testing.assert_close(scores, expected)


def test_vo_decomposition_matches_weighted_svd_of_the_product():
    torch.manual_seed(0)
    d, hd, D, keep = 10, 4, 9, 2
    x = torch.randn(300, d, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    gram = x.T @ x / 300
    w_v, w_o = torch.randn(d, hd, dtype=torch.float64), torch.randn(hd, D, dtype=torch.float64)
    m, w_o_new, s = vo_decomposition(w_v, w_o, gram, keep)
    # Direct: the best rank-k fit of X W_V W_O is the truncated SVD of C^{1/2} W_V W_O.
    evals, evecs = torch.linalg.eigh(gram)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    u, sv, vt = torch.linalg.svd(root @ w_v @ w_o)
    best = u[:, :keep] @ torch.diag(sv[:keep]) @ vt[:keep]
    torch.testing.assert_close(root @ w_v @ m @ w_o_new, best)
    torch.testing.assert_close(s, sv[:hd])
    m_full, w_full, _ = vo_decomposition(w_v, w_o, gram, hd)  # full rank: exact product
    torch.testing.assert_close(w_v @ m_full @ w_full, w_v @ w_o)


def test_full_rank_reproduces_dense_logits(model, tokens):
    ref = logits(model, tokens)
    out, report = compress(model, MoDeGPTConfig(ratio=0.0), tokens)
    torch.testing.assert_close(logits(out, tokens), ref, rtol=1e-4, atol=1e-4)


def test_compression_keeps_rope_pairs_and_gqa_groups(tokens, tmp_path):
    model = tiny_model("llama", layers=2)
    out, report = compress(model, MoDeGPTConfig(ratio=0.5), tokens)
    attn = out.model.layers[0].self_attn
    hd = attn.head_dim
    assert attn.qk_dim == 8 and attn.rope_index.shape == (2, 4)  # 2 kv groups x 4 kept pairs
    assert attn.q_proj.out_features == 4 * 8 and attn.k_proj.out_features == 2 * 8
    assert attn.v_dim == 8 and attn.o_proj.in_features == 4 * 8
    assert int(attn.rope_index.max()) < hd // 2
    assert report.ratio_achieved == pytest.approx(0.5, abs=0.03)
    assert all(l.errors["mlp"] < 1 and l.errors["attn"] < 1 for l in report.layers)
    ref = logits(out, tokens)
    out.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, tokens), ref)
    assert torch.equal(reloaded.model.layers[0].self_attn.rope_index, attn.rope_index)
    assert count_params(reloaded) == report.params_compressed


def test_kept_pairs_attention_equals_dense_attention_on_those_pairs(tokens):
    """Zeroing the dropped pairs' q/k rows in the dense model must give the compressed logits."""
    dense = tiny_model("qwen2", layers=1)
    reference = tiny_model("qwen2", layers=1)
    cfg = MoDeGPTConfig(ratio=0.25)
    out = compress(dense, cfg, tokens).model
    attn = out.model.layers[0].self_attn
    ref_attn = reference.model.layers[0].self_attn
    hd, G = 16, 2
    with torch.no_grad():
        for h in range(4):
            kept = torch.cat([attn.rope_index[h // G], attn.rope_index[h // G] + hd // 2])
            drop = torch.ones(hd, dtype=torch.bool); drop[kept] = False
            ref_attn.q_proj.weight.view(4, hd, -1)[h][drop] = 0
            ref_attn.q_proj.bias.view(4, hd)[h][drop] = 0
        for g in range(2):
            kept = torch.cat([attn.rope_index[g], attn.rope_index[g] + hd // 2])
            drop = torch.ones(hd, dtype=torch.bool); drop[kept] = False
            ref_attn.k_proj.weight.view(2, hd, -1)[g][drop] = 0
            ref_attn.k_proj.bias.view(2, hd)[g][drop] = 0
        # compare only the QK part: give both models the compressed model's V/O and MLP
    from compression.modeling import to_compressed
    ref_c = to_compressed(reference)
    ref_layer, layer = ref_c.model.layers[0], out.model.layers[0]
    ref_layer.self_attn.v_proj, ref_layer.self_attn.o_proj = layer.self_attn.v_proj, layer.self_attn.o_proj
    ref_layer.self_attn.v_dim = layer.self_attn.v_dim
    ref_layer.mlp = layer.mlp
    torch.testing.assert_close(logits(ref_c, tokens), logits(out, tokens), rtol=1e-4, atol=1e-4)


def test_entropic_allocation_hits_target_and_orders_by_influence():
    influence = [0.30, 0.05, 0.10, 0.02, 0.50, 0.20]
    phi = entropic_allocation(influence, 0.3, epsilon=0.1, max_layer=0.8)
    assert sum(phi) / len(phi) == pytest.approx(0.3)
    assert max(phi) <= 0.8 + 1e-12 and min(phi) >= 0
    order = sorted(range(6), key=lambda i: influence[i])
    assert [phi[i] for i in order] == sorted(phi, reverse=True)
    flat = entropic_allocation(influence, 0.3, epsilon=1e6)
    assert flat == pytest.approx([0.3] * 6)
    greedy = entropic_allocation(influence, 0.3, epsilon=1e-3, max_layer=0.8)
    assert greedy[3] == pytest.approx(0.8) and greedy[1] == pytest.approx(0.8)


def test_auto_allocation_report_sums_to_target(tokens):
    model = tiny_model("mistral", tied=False, layers=4)
    out, report = compress(model, MoDeGPTConfig(ratio=0.3, allocation=Allocation("auto", epsilon=0.05)), tokens)
    phi = report.config["layer_sparsity"]
    assert sum(phi) / 4 == pytest.approx(0.3)
    assert len(set(round(p, 6) for p in phi)) > 1  # really non-uniform
    assert report.ratio_achieved == pytest.approx(0.3, abs=0.04)
    assert report.block_influence is not None and len(report.block_influence) == 4


def test_manual_allocation_length_checked(tokens):
    with pytest.raises(ValueError, match="2 values for 3 layers"):
        compress(tiny_model(), MoDeGPTConfig(ratio=0.2, allocation=Allocation("manual", per_layer=(0.1, 0.2))), tokens)


def test_a_value_bias_costs_nothing_when_values_are_cut(tokens):
    """Qwen2 has large value biases. They reach the output as a constant (softmax rows sum to one), so
    they move to o_proj exactly: the compressed attention errs by the same amount with or without one."""
    import copy

    from compression.arch import view
    from compression.calibration import capture_block_inputs
    from compression.modeling import to_compressed
    from compression.rewrite import compress_attention

    errors = []
    for scale in (0.0, 3.0):
        model = to_compressed(tiny_model("qwen2", layers=1))
        mv = view(model)
        attn = mv.layers[0].self_attn
        with torch.no_grad():
            attn.v_proj.bias.copy_(scale * torch.randn(attn.v_proj.bias.shape, generator=torch.Generator().manual_seed(1)))
        inputs = capture_block_inputs(mv, tokens, 8)
        layer = copy.deepcopy(mv.layers[0])
        dense, new, *_ = compress_attention(layer, inputs.hidden, inputs.kwargs_for(0), attn.head_dim // 2,
                                            attn.head_dim // 2, dense_batches=len(inputs.hidden))
        errors.append(torch.cat([n - d for n, d in zip(new, dense)]).norm().item())
    assert errors[1] == pytest.approx(errors[0], rel=1e-5) and errors[0] > 0
    assert layer.self_attn.o_proj.bias is not None and not layer.self_attn.v_proj.bias.any()


def test_qwen2_plan_counts_the_folded_bias():
    from compression.forecast import forecast

    model = tiny_model("qwen2", layers=2)
    compressed, report = compress(model, MoDeGPTConfig(ratio=0.4), torch.randint(0, 100, (4, 32)))
    assert forecast(model, MoDeGPTConfig(ratio=0.4))["params"] == count_params(compressed) == report.params_compressed


def test_unequal_qk_and_v_widths_reach_the_fused_kernel_with_the_same_logits(tokens, monkeypatch):
    """Uniform 0.3 on head_dim 16 keeps 6 rotary pairs (q/k 12) and 11 value dims: SDPA gets q, k and
    v padded to one width (its fused CPU kernel needs that) and answers as eager attention does, in a
    full forward and in cached greedy decoding."""
    out, _ = compress(tiny_model("llama"), MoDeGPTConfig(ratio=0.3), tokens)
    attn = out.model.layers[0].self_attn
    assert (attn.qk_dim, attn.v_dim) == (12, 11)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    ids = tokens[:2, :12]
    assert out.model.config._attn_implementation == "sdpa"
    fused, fused_gen = logits(out, ids), out.generate(ids[:, :6], max_new_tokens=6, do_sample=False)
    assert seen and all(len(set(dims)) == 1 for dims in seen)
    out.model.config._attn_implementation = "eager"
    assert torch.allclose(fused, logits(out, ids), atol=1e-5)
    assert torch.equal(fused_gen, out.generate(ids[:, :6], max_new_tokens=6, do_sample=False))
