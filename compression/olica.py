"""Olica: orthogonal decomposition of attention products and linear calibration of pruned MLPs
(structured pruning without retraining).

- Value-output: W_V W_O of each head (each kv group with GQA; the published code assumes full
  multi-head attention) is one unit. Its activation-weighted orthogonal decomposition is computed on one
  factor (eig of W_Vᵀ C W_V, then the SVD of a (hd × G·D) core) instead of on the (D × G·D) product;
  the leading components are kept and both factors rewritten (:func:`ops.vo_decomposition`).
- Query-key: with RoPE, W_Q W_Kᵀ is not position-free, so we keep whole rotary pairs scored by the
  activation-weighted norms of their q and k columns (see README for the measured comparison).
- MLP: intermediate neurons pruned by an activation-aware importance ‖z_j‖ · ‖W_down[:, j]‖.
- Linear calibration: on the layers whose pruned-MLP residual R = f_dense(X) − f_pruned(X) is best
  predicted linearly from the MLP input X, fit R ≈ X W by ridge regression, keep a rank-r factorisation
  of W (optimal under the input weighting: SVD of C^{1/2} W) and add it as a parallel branch. Its
  parameters are paid for by pruning a few more neurons in every layer, so the budget holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import prepare_sequential, record_inputs
from .rewrite import compress_attention
from .ops import relative_error, select_inputs, select_outputs, sqrt_psd
from .plan import Allocation
from .report import LayerReport, Report


@dataclass
class OlicaConfig:
    """ratio: fraction of block parameters removed; allocation spreads it over layers.

    attn_share: attention sparsity relative to the layer's (1.0 = same fraction as the MLP; the MLP
        takes up whatever attention does not, so each layer still meets its target).
    calibrate_layers / calibrate_rank: linear calibration on this many layers with this rank
        (0 layers switches it off); ridge: λ relative to the mean eigenvalue of XᵀX/n.
    """

    ratio: float = 0.25
    allocation: Allocation = field(default_factory=Allocation)
    attn_share: float = 1.0
    calibrate_layers: int = 8
    calibrate_rank: int = 64
    ridge: float = 1e-3
    error_batches: int = 2
    batch_size: int = 8

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 0.9:
            raise ValueError(f"ratio must be in [0, 0.9], got {self.ratio}")
        if self.attn_share < 0:
            raise ValueError("attn_share must be >= 0")
        if self.calibrate_layers < 0 or self.calibrate_rank < 0:
            raise ValueError("calibrate_layers and calibrate_rank must be >= 0")
        if isinstance(self.allocation, str):
            self.allocation = Allocation(kind=self.allocation)


# --- math ---------------------------------------------------------------------------------------------

def neuron_importance(z_sq: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """‖z_j‖·‖W_down[:, j]‖ per intermediate neuron; z_sq: Σ z_j² over tokens (m,), w_down (D, m)."""
    return z_sq.double().clamp_min(0).sqrt() * w_down.double().norm(dim=0)


def ridge_fit(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """W = (XᵀX + λI)⁻¹ XᵀR with λ = ridge · mean eigenvalue of XᵀX; gram (d, d), cross (d, D)."""
    g = gram.double()
    lam = ridge * g.diagonal().mean()
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device),
                              cross.double())


def weighted_low_rank(w: torch.Tensor, gram: torch.Tensor, rank: int):
    """Best rank-r A B ≈ W under the input weighting, i.e. minimising ‖X(W − AB)‖_F.

    With C = XᵀX: SVD of C^{1/2} W = U S Vᵀ; A = C^{-1/2} U_r S_r, B = V_rᵀ. Returns (A (d, r), B (r, D)).
    """
    root, inv_root = sqrt_psd(gram, eps=1e-12 * float(gram.diagonal().max()))
    u, s, vt = torch.linalg.svd(root @ w.double(), full_matrices=False)
    return inv_root @ (u[:, :rank] * s[:rank]), vt[:rank]


def residual_sq(gram: torch.Tensor, cross: torch.Tensor, r_sq: float, w: torch.Tensor) -> float:
    """‖R − XW‖² / n from second moments: gram XᵀX/n, cross XᵀR/n, r_sq ‖R‖²/n."""
    w = w.double()
    return r_sq - 2 * float((w * cross.double()).sum()) + float((w * (gram.double() @ w)).sum())


def explained(gram: torch.Tensor, cross: torch.Tensor, r_sq: float, w: torch.Tensor) -> float:
    """1 − ‖R − XW‖² / ‖R‖²: how much of the residual a linear map of the input predicts."""
    return 1.0 - residual_sq(gram, cross, r_sq, w) / max(r_sq, 1e-30)


# --- orchestration --------------------------------------------------------------------------------------

def layer_sizes(attn, mlp, sparsity: float, attn_share: float, extra_mlp_cut: int) -> dict[str, int]:
    """Inner widths for a layer at ``sparsity``: attention at ``attn_share`` × sparsity, the MLP takes
    the rest of the layer's budget, minus ``extra_mlp_cut`` neurons that pay for calibration branches."""
    d_in, D = attn.q_proj.in_features, attn.o_proj.out_features
    H, Hkv, hd, m = attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.gate_proj.out_features
    p_qk, p_vo = d_in * (H + Hkv) * hd, d_in * Hkv * hd + H * hd * D
    p_mlp = m * (2 * mlp.gate_proj.in_features + mlp.down_proj.out_features)
    s_attn = min(0.95, attn_share * sparsity)
    s_mlp = (sparsity * (p_qk + p_vo + p_mlp) - s_attn * (p_qk + p_vo)) / p_mlp
    s_mlp = min(max(s_mlp, 0.0), 0.95)
    keep = 1.0 - s_attn
    return {"qk_pairs": max(1, round(keep * hd / 2)), "v_dim": max(1, round(keep * hd)),
            "mlp_dim": max(1, round((1 - s_mlp) * m) - extra_mlp_cut)}


def prune_mlp(mlp, index: torch.Tensor) -> None:
    select_outputs(mlp.gate_proj, index)
    select_outputs(mlp.up_proj, index)
    select_inputs(mlp.down_proj, index)


def add_branch(mlp, a: torch.Tensor, b: torch.Tensor) -> None:
    """Parallel low-rank branch h ↦ (h A) B, stored as two bias-free Linears."""
    from .ops import new_linear

    like = mlp.down_proj.weight
    mlp.branch_in = new_linear(a.T, like)   # (r, d_mid)
    mlp.branch_out = new_linear(b.T, like)  # (d_out, r)


def compress_olica(model, config: OlicaConfig, calibration, progress) -> Report:
    if calibration is None:
        raise ValueError("Olica needs calibration tokens")
    model, mv, inputs, influence, sparsity, calibration_seconds = prepare_sequential(
        model, calibration, config.allocation, config.ratio, config.batch_size, progress)
    L = len(mv.layers)
    n_cal = min(config.calibrate_layers, L) if config.ratio > 0 else 0
    rank = config.calibrate_rank
    first = mv.layers[0]
    branch_params = n_cal * rank * (first.mlp.gate_proj.in_features + first.mlp.down_proj.out_features)
    per_neuron = 2 * first.mlp.gate_proj.in_features + first.mlp.down_proj.out_features
    extra_cut = -(-branch_params // (per_neuron * L))  # ceil: neurons each layer gives up
    n_err = min(config.error_batches, len(inputs))
    hidden, layers, fits = inputs.hidden, [], []
    for i, layer in enumerate(mv.layers):
        attn, mlp, kw = layer.self_attn, layer.mlp, inputs.kwargs
        params_dense = sum(p.numel() for p in layer.parameters())
        sizes = layer_sizes(attn, mlp, sparsity[i], config.attn_share, extra_cut if n_cal else 0)
        a_dense, a_new, g_attn, qk_scores, vo_spectra = compress_attention(
            layer, hidden, kw, sizes["qk_pairs"], sizes["v_dim"])
        mid = [h + a for h, a in zip(hidden, a_new)]
        with record_inputs({"x": mlp.gate_proj, "z": mlp.down_proj}) as grams:
            m_dense = [layer.mlp_out(x) for x in mid]
        g_x, z_sq = grams["x"].mean, grams["z"].mean.diagonal()
        scores = neuron_importance(z_sq, mlp.down_proj.weight)
        index = torch.sort(torch.topk(scores, min(sizes["mlp_dim"], scores.numel())).indices).values
        if index.numel() < scores.numel():
            prune_mlp(mlp, index)
        m_new = [layer.mlp_out(x) for x in mid]
        # Second moments of the pruned MLP's residual against its input, for linear calibration.
        norm = layer.post_attention_layernorm
        cross = sum(norm(x).double().flatten(0, 1).T @ (md - mn).double().flatten(0, 1)
                    for x, md, mn in zip(mid, m_dense, m_new)) / grams["x"].count
        r_sq = sum(float((md - mn).double().pow(2).sum()) for md, mn in zip(m_dense, m_new)) / grams["x"].count
        dense_sq = sum(float(md.double().pow(2).sum()) for md in m_dense) / grams["x"].count
        w = ridge_fit(g_x, cross, config.ridge) if n_cal else None
        fits.append({"gram": g_x, "cross": cross, "r_sq": r_sq, "dense_sq": dense_sq, "w": w,
                     "explained": explained(g_x, cross, r_sq, w) if n_cal else 0.0})
        errors = {"attn": relative_error(torch.cat(a_new[:n_err]), torch.cat(a_dense[:n_err])),
                  "mlp": (r_sq / max(dense_sq, 1e-30)) ** 0.5}  # over all calibration tokens
        hidden = [x + m for x, m in zip(mid, m_new)]
        spectra = {"attn_input": torch.linalg.eigvalsh(g_attn.double()).flip(0).tolist()}
        spectra.update({f"vo_group{g}": s for g, s in enumerate(vo_spectra)})
        layers.append(LayerReport(
            index=i, params_dense=params_dense, spectra=spectra,
            kept={f"vo_group{g}": attn.v_dim for g in range(len(vo_spectra))},
            leverage={"scores": scores.tolist(), "kept": index.tolist(),
                      "qk_pair_scores": qk_scores.tolist()},
            errors=errors, influence=None if influence is None else influence[i]))
        progress(0.2 + 0.7 * (i + 1) / L, f"pruned layer {i + 1}/{L}")
    chosen = sorted(range(L), key=lambda j: fits[j]["explained"], reverse=True)[:n_cal]
    for j in chosen:
        fit = fits[j]
        a, b = weighted_low_rank(fit["w"], fit["gram"], rank)
        add_branch(mv.layers[j].mlp, a, b)
        after = residual_sq(fit["gram"], fit["cross"], fit["r_sq"], a @ b)
        layers[j].errors["mlp_before_calibration"] = layers[j].errors["mlp"]
        layers[j].errors["mlp"] = (max(after, 0.0) / max(fit["dense_sq"], 1e-30)) ** 0.5
    for j, layer in enumerate(mv.layers):
        spec = layer.spec()
        layers[j].sizes = {k: spec[k] for k in ("qk_dim", "v_dim", "mlp_dim", "branch_rank")}
        layers[j].params_compressed = sum(p.numel() for p in layer.parameters())
    progress(1.0, "linear calibration done")
    model.sync_config()
    return Report(method="olica", ratio_target=config.ratio, layers=layers, compressed=model,
                  calibration_seconds=calibration_seconds, block_influence=influence,
                  config={"ratio": config.ratio, "allocation": config.allocation.kind,
                          "epsilon": config.allocation.epsilon, "attn_share": config.attn_share,
                          "calibrate_layers": n_cal, "calibrate_rank": rank, "ridge": config.ridge,
                          "calibrated": sorted(chosen), "layer_sparsity": sparsity},
                  extra={"explained_by_linear_fit": [f["explained"] for f in fits]})
