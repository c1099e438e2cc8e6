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

from dataclasses import dataclass

import torch

from . import knobs
from .calibration import Gram, mlp_activations, mlp_outputs, prepare_sequential
from .knobs import knob
from .ops import eigenvalues, select_inputs, select_outputs, sqrt_psd
from .plan import LayerwiseConfig, Plan, inner_widths
from .report import LayerReport, Report
from .rewrite import compress_attention
from .timing import stage


@dataclass
class OlicaConfig(LayerwiseConfig):
    """``ratio`` of block parameters removed, spread over layers by ``allocation``; the calibration
    branches are paid for out of the same budget."""

    attn_share: float = knob(1.0, kind="float", label="Attention share", low=0.0, high=10.0,
                             advanced=True, help="attention sparsity relative to the layer's; the MLP "
                                                 "takes the rest of the layer's budget")
    calibrate_layers: int = knob(8, kind="int", label="Calibrated layers", low=0, high=1024,
                                 help="layers given a linear-calibration branch (0: off)")
    calibrate_rank: int = knob(64, kind="int", label="Calibration rank", low=1, high=65536, advanced=True,
                               help="rank of each calibration branch")
    ridge: float = knob(1e-3, kind="float", label="Calibration ridge", low=0.0, low_open=True, advanced=True,
                        flag="--calibration-ridge",
                        help="ridge of the calibration regression, relative to the mean eigenvalue "
                             "of the MLP input correlation")


def branch_cost(config: OlicaConfig, base) -> tuple[int, int, int]:
    """(calibrated layers, parameters of their branches, MLP channels every layer gives up for them)."""
    L, D = base.num_hidden_layers, base.hidden_size
    n_cal = min(config.calibrate_layers, L) if config.ratio > 0 else 0
    params = n_cal * config.calibrate_rank * 2 * D
    per_channel = 3 * D
    return n_cal, params, (-(-params // (per_channel * L)) if n_cal else 0)  # ceil


def plan(config: OlicaConfig, base, influence: list[float] | None = None) -> Plan:
    """Attention at ``attn_share`` × φ_i, the MLP the rest, minus the channels that pay for branches
    (whose layers are only known after fitting, hence ``extra_params``)."""
    _, params, cut = branch_cost(config, base)
    sparsity = config.sparsities(base.num_hidden_layers, influence)
    return Plan([inner_widths(base, s, config.attn_share, cut) for s in sparsity], extra_params=params)


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

def dropped_part(w_down: torch.Tensor, kept: torch.Tensor):
    """z ↦ what the channels not in ``kept`` add through ``w_down`` (D, m): the pruned MLP's residual
    (bias-free: the bias stays with the pruned MLP)."""
    mask = torch.ones(w_down.shape[1], dtype=torch.bool, device=w_down.device)
    mask[kept.to(w_down.device)] = False
    index, w = mask.nonzero().squeeze(1), w_down[:, mask].clone()  # (dropped,), (D, dropped)

    def apply(z: torch.Tensor) -> torch.Tensor:
        with stage("forwards"):
            return torch.nn.functional.linear(z[..., index.to(z.device)], w.to(z.device, z.dtype))
    return apply


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


def run(model, config: OlicaConfig, calibration, progress, held_out=None, influence=None):
    """Compress ``model`` (a private copy) block by block; returns (model, Report).

    held_out: token ids (n, T) on which the per-layer errors are measured (see MoDeGPT's ``run``).
    """
    if calibration is None:
        raise ValueError("Olica needs calibration tokens")
    s = prepare_sequential(model, config, calibration, held_out, progress, influence)
    model, mv, inputs, probe = s.model, s.view, s.inputs, s.probe
    specs = plan(config, mv.config, s.influence).specs
    n_cal, _, _ = branch_cost(config, mv.config)
    rank, L = config.calibrate_rank, len(mv.layers)
    hidden, layers, fits, probe_fits = inputs.hidden, [], [], []
    for i, layer in enumerate(mv.layers):
        attn, mlp, kw, spec = layer.self_attn, layer.mlp, inputs.kwargs_for(i), specs[i]
        params_dense = sum(p.numel() for p in layer.parameters())
        p_attn = probe.attention(layer)
        a_dense, a_new, g_attn, qk_scores, vo_spectra = compress_attention(
            layer, hidden, kw, spec["qk_dim"] // 2, spec["v_dim"], probe.dense_batches)
        mid = [h + a for h, a in zip(hidden, a_new)]
        errors = {"attn": probe.attention_error(layer, p_attn, a_new, a_dense)}
        p_mlp = probe.mlp(layer)
        # The MLP runs once: the pruned MLP's output is down_proj on the kept channels of the same z.
        h_mid, z = mlp_activations(layer, mid)
        # Where down_proj writes to the stream as is, the dense output is the pruned one plus what the
        # dropped channels wrote: one (D × dropped) product instead of a second full down_proj.
        linear = layer.mlp_output_norm is None
        m_dense = None if linear else mlp_outputs(layer, h_mid, z)
        gram_x = Gram.of(h_mid)
        g_x = gram_x.mean
        with stage("statistics"):
            z_sq = sum(zb.square().sum(dim=(0, 1), dtype=torch.float64) for zb in z) / gram_x.count  # Σ z_j² / n
        scores = neuron_importance(z_sq, mlp.down_proj.weight)
        index = torch.sort(torch.topk(scores, min(spec["mlp_dim"], scores.numel())).indices).values
        cut = index.numel() < scores.numel()
        dropped = dropped_part(mlp.down_proj.weight, index) if cut and linear else None
        if cut:
            prune_mlp(mlp, index)
        m_new = mlp_outputs(layer, h_mid, z, index if cut else None)
        if m_dense is None:
            m_dense = m_new if dropped is None else [m + dropped(zb) for m, zb in zip(m_new, z)]
        del z
        with stage("statistics"):
            fit = residual_moments(h_mid, m_dense, m_new, g_x)
        with stage("decompositions"):
            fit["w"] = ridge_fit(fit["gram"], fit["cross"], config.ridge) if n_cal else None
            fit["explained"] = explained(fit["gram"], fit["cross"], fit["r_sq"], fit["w"]) if n_cal else 0.0
        fits.append(fit)
        if p_mlp is None:  # in-sample: the calibration moments themselves
            probe_fits.append(fit)
            errors["mlp"] = (fit["r_sq"] / max(fit["dense_sq"], 1e-30)) ** 0.5
        else:
            errors["mlp"] = probe.mlp_error(layer, p_mlp, None, None, index if cut else None)
            with stage("errors"):
                probe_fits.append(residual_moments(probe.mlp_in, p_mlp, probe.mlp_new))
        hidden = [x + m for x, m in zip(mid, m_new)]
        del h_mid, m_dense, m_new
        with stage("decompositions"):
            spectra = {"attn_input": eigenvalues(g_attn).tolist()}
        spectra.update({f"vo_group{g}": s for g, s in enumerate(vo_spectra)})
        layers.append(LayerReport(
            index=i, params_dense=params_dense, spectra=spectra,
            kept={f"vo_group{g}": attn.v_dim for g in range(len(vo_spectra))},
            leverage={"scores": scores.tolist(), "kept": index.tolist(),
                      "qk_pair_scores": qk_scores.tolist()},
            errors=errors, influence=None if s.influence is None else s.influence[i]))
        progress(0.2 + 0.7 * (i + 1) / L, f"layer {i + 1}/{L}: attention and MLP pruning")
    chosen = sorted(range(L), key=lambda j: fits[j]["explained"], reverse=True)[:n_cal]
    for j in chosen:
        with stage("decompositions"):
            a, b = weighted_low_rank(fits[j]["w"], fits[j]["gram"], rank)
        add_branch(mv.layers[j].mlp, a, b)
        pf = probe_fits[j]
        after = residual_sq(pf["gram"], pf["cross"], pf["r_sq"], a @ b)
        layers[j].errors["mlp_before_calibration"] = layers[j].errors["mlp"]
        layers[j].errors["mlp"] = (max(after, 0.0) / max(pf["dense_sq"], 1e-30)) ** 0.5
    for j, layer in enumerate(mv.layers):
        spec = layer.spec()
        layers[j].sizes = {k: spec[k] for k in ("qk_dim", "v_dim", "mlp_dim", "branch_rank")}
        layers[j].params_compressed = sum(p.numel() for p in layer.parameters())
    progress(1.0, "linear calibration done")
    model.sync_config()
    return model, Report(method="olica", ratio_target=config.ratio, layers=layers,
                         calibration_seconds=s.seconds, block_influence=s.influence,
                         config={**knobs.values(config), "calibrate_layers": n_cal,
                                 "layer_sparsity": s.sparsity, "calibrated": sorted(chosen)},
                         extra={"explained_by_linear_fit": [f["explained"] for f in fits],
                                "errors_measured_on": probe.where})


def residual_moments(inputs: list, dense: list, pruned: list, gram: torch.Tensor | None = None) -> dict:
    """Second moments of the pruned MLP's residual R = dense − pruned against its input X, per token:
    gram XᵀX/n (or the one given), cross XᵀR/n, r_sq ‖R‖²/n and dense_sq ‖dense‖²/n, summed in
    float64 over batches; each batch's cross product in the statistics precision (float32 under
    "mixed", as the Gram matrices; :mod:`compression.calibration`)."""
    from .calibration import resolve_precision

    n = sum(x.shape[0] * x.shape[1] for x in inputs)
    mixed = resolve_precision(None, inputs[0].device) == "mixed"
    flat = lambda t: (t.float() if mixed else t.double()).flatten(0, 1)  # noqa: E731  (b, T, d) -> (b·T, d)
    if gram is None:
        gram = sum((flat(x).T @ flat(x)).double() for x in inputs) / n
    cross = sum((flat(x).T @ flat(d - p)).double() for x, d, p in zip(inputs, dense, pruned)) / n
    r_sq = sum(float((d - p).double().pow(2).sum()) for d, p in zip(dense, pruned)) / n
    dense_sq = sum(float(d.double().pow(2).sum()) for d in dense) / n
    return {"gram": gram, "cross": cross, "r_sq": r_sq, "dense_sq": dense_sq}
