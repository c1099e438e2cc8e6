"""MoDeGPT (Lin et al., 2024, arXiv 2408.09632): modular decomposition without gradients.

Each block is three modules, each rebuilt from calibration correlations to a smaller inner width:
- Type I, MLP: Z = act(X W_gate) ⊙ X W_up, C = ZᵀZ. Keep the k channels with the largest ridge
  leverage scores diag(C (C + λI)⁻¹) (Nyström); W_down ← (SᵀCS)⁺ SᵀC W_down, here by default
  shrunk toward W_down's kept columns (``refit_shrinkage``, by default ∝ 1/tokens; 0 gives the
  paper's refit).
- Type II, key-query: keep the same columns of W_Q and W_K chosen by CR-decomposition scores
  ‖C_q^{1/2} e_i‖·‖C_k^{1/2} e_i‖. With RoPE a column is a rotary pair (i, i + d/2); with GQA the
  score of a kv group sums its query heads.
- Type III, value-output: per kv group, the SVD of C^{1/2} W_V W_O (C: block-input correlation).
The math lives in :mod:`compression.ops` and :mod:`compression.rewrite`; ``run`` walks the blocks in
sequence, so each block is calibrated on the outputs of the already-compressed ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from .calibration import Gram, mlp_activations, mlp_outputs, prepare_sequential, resolve_precision
from . import knobs
from .knobs import knob
from .ops import eigenvalues, nystrom_mlp, select_outputs, set_linear
from .plan import LayerwiseConfig, Plan, inner_widths
from .report import LayerReport, Report
from .rewrite import compress_attention
from .timing import stage


@dataclass
class MoDeGPTConfig(LayerwiseConfig):
    """``ratio`` of decoder-block parameters removed, spread over layers by ``allocation``."""

    ridge: float = knob(1.0, kind="float", label="Leverage ridge λ", low=0.0, low_open=True, advanced=True,
                        flag="--leverage-ridge",
                        help="λ of the ridge leverage scores, relative to the mean eigenvalue of the "
                             "MLP correlation; larger → scores closer to the channels' energy")
    refit_shrinkage: float | None = knob(
        None, kind="float", label="Refit shrinkage μ", low=0.0, high=1e6, optional=True, advanced=True,
        help="shrinks the least-squares refit of down_proj toward keeping its columns as they are, relative "
             "to the mean kept-channel energy; 0 = the paper's plain least squares (fits the calibration "
             "sample's noise); empty = automatic, 0.5 × 12,288 / n for n calibration tokens (0.5 at "
             "24 × 512, 0.19 at 64 × 512)")


AUTO_SHRINKAGE = 0.5 * 12_288  # μ · n: 0.5 at 24 × 512 tokens (bench.refit_shrinkage), ∝ 1/n elsewhere


def refit_shrinkage(config: MoDeGPTConfig, tokens: int) -> float:
    """The refit's μ for ``tokens`` calibration tokens: the configured one, else :data:`AUTO_SHRINKAGE`
    / n. The refit's objective is per token, so a prior of fixed weight is μ ∝ 1/n: measured on the
    default model at 0.25, μ = 0.5 cut the held-out perplexity at 24 × 512 tokens (33.06 → 30.73 on 8
    windows) but cost 1.5% at 64 × 512 (29.97 → 30.41 on 32 windows, where μ = 0.15 gave 29.98)."""
    return config.refit_shrinkage if config.refit_shrinkage is not None else AUTO_SHRINKAGE / max(tokens, 1)


def plan(config: MoDeGPTConfig, base, influence: list[float] | None = None) -> Plan:
    """Every module of layer i keeps 1 − φ_i of its inner width (the paper's uniform module split)."""
    return Plan([inner_widths(base, s) for s in config.sparsities(base.num_hidden_layers, influence)])


def run(model, config: MoDeGPTConfig, calibration, progress, held_out=None, influence=None):
    """Compress ``model`` (a private copy) block by block; returns (model, Report).

    held_out: token ids (n, T) on which the per-layer errors are measured; without them the first
    calibration batches are used (in-sample, flagged in the report).
    """
    if calibration is None:
        raise ValueError("MoDeGPT needs calibration tokens")
    s = prepare_sequential(model, config, calibration, held_out, progress, influence)
    model, mv, inputs, probe = s.model, s.view, s.inputs, s.probe
    specs = plan(config, mv.config, s.influence).specs
    L = len(mv.layers)
    hidden, layers = inputs.hidden, []
    for i, layer in enumerate(mv.layers):
        attn, mlp = layer.self_attn, layer.mlp
        params_dense = sum(p.numel() for p in layer.parameters())
        spec = specs[i]
        p_attn = probe.attention(layer)
        # Attention: correlation of the normalised block input feeds both Type II and Type III.
        a_dense, a_new, g_attn, qk_scores, vo_spectra = compress_attention(
            layer, hidden, inputs.kwargs_for(i), spec["qk_dim"] // 2, spec["v_dim"], probe.dense_batches)
        mid = [h + a for h, a in zip(hidden, a_new)]
        errors = {"attn": probe.attention_error(layer, p_attn, a_new, a_dense)}
        # MLP: correlation of the intermediate activations z (input of down_proj). z is computed once:
        # the cut MLP's output is the new down_proj applied to z's kept channels.
        p_mlp = probe.mlp(layer)
        h_mid, z = mlp_activations(layer, mid)
        gram = Gram.of(z)
        c, mu = gram.mean, refit_shrinkage(config, gram.count)
        with stage("errors"):
            m_dense = mlp_outputs(layer, h_mid[:probe.dense_batches], z)
        single = resolve_precision(None, c.device) == "mixed"  # the Grams' own precision
        with stage("decompositions"):
            index, w_down, scores = nystrom_mlp(c, mlp.down_proj.weight, spec["mlp_dim"], config.ridge, mu,
                                                single)
        cut = spec["mlp_dim"] < mlp.gate_proj.out_features
        if cut:
            select_outputs(mlp.gate_proj, index)
            select_outputs(mlp.up_proj, index)
            set_linear(mlp.down_proj, w_down)
        m_new = mlp_outputs(layer, h_mid, z, index if cut else None)
        del z, h_mid
        errors["mlp"] = probe.mlp_error(layer, p_mlp, m_new, m_dense, index if cut else None)
        hidden = [x + m for x, m in zip(mid, m_new)]
        with stage("decompositions"):
            spectra = {"mlp_corr": eigenvalues(c, single).tolist(),
                       "attn_input": eigenvalues(g_attn, single).tolist()}
        spectra.update({f"vo_group{g}": s for g, s in enumerate(vo_spectra)})
        layers.append(LayerReport(
            index=i, params_dense=params_dense,
            params_compressed=sum(p.numel() for p in layer.parameters()),
            sizes={"qk_dim": attn.qk_dim, "v_dim": attn.v_dim, "mlp_dim": mlp.gate_proj.out_features},
            spectra=spectra,
            kept={"mlp_corr": mlp.gate_proj.out_features,
                  **{f"vo_group{g}": attn.v_dim for g in range(len(vo_spectra))}},
            leverage={"scores": scores.tolist(), "kept": index.tolist(),
                      "qk_pair_scores": qk_scores.tolist()},
            errors=errors, influence=None if s.influence is None else s.influence[i]))
        progress(0.2 + 0.8 * (i + 1) / L, f"layer {i + 1}/{L}: attention (CR, SVD) and MLP (Nyström)")
    model.sync_config()
    return model, Report(method="modegpt", ratio_target=config.ratio, layers=layers,
                         calibration_seconds=s.seconds, block_influence=s.influence,
                         config={**knobs.values(config), "layer_sparsity": s.sparsity},
                         extra={"errors_measured_on": probe.where, "refit_shrinkage": mu})
