"""MoDeGPT (Lin et al., 2024, arXiv 2408.09632): modular decomposition without gradients.

Each block is three modules, each rebuilt from calibration correlations to a smaller inner width:
- Type I, MLP: Z = act(X W_gate) ⊙ X W_up, C = ZᵀZ. Keep the k channels with the largest ridge
  leverage scores diag(C (C + λI)⁻¹) (Nyström); W_down ← (SᵀCS)⁺ SᵀC W_down.
- Type II, key-query: keep the same columns of W_Q and W_K chosen by CR-decomposition scores
  ‖C_q^{1/2} e_i‖·‖C_k^{1/2} e_i‖. With RoPE a column is a rotary pair (i, i + d/2); with GQA the
  score of a kv group sums its query heads.
- Type III, value-output: per kv group, the SVD of C^{1/2} W_V W_O (C: block-input correlation).
The math lives in :mod:`compression.ops` and here as small functions; ``compress_modegpt`` walks the
blocks in sequence, so each block is calibrated on the outputs of the already-compressed ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import prepare_sequential, record_inputs
from .rewrite import compress_attention
from .ops import nystrom_mlp, relative_error, select_outputs, set_linear
from .plan import Allocation
from .report import LayerReport, Report


@dataclass
class MoDeGPTConfig:
    """ratio: fraction of decoder-block parameters removed, spread over layers by ``allocation``.

    ridge: λ of the leverage scores, relative to the mean eigenvalue of C (λ = ridge · tr C / m).
    vo_eps: eigenvalues of W_Vᵀ C W_V below vo_eps · max are treated as zero.
    """

    ratio: float = 0.25
    allocation: Allocation = field(default_factory=Allocation)
    ridge: float = 1.0
    vo_eps: float = 1e-8
    error_batches: int = 2
    batch_size: int = 8

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 0.9:
            raise ValueError(f"ratio must be in [0, 0.9], got {self.ratio}")
        if self.ridge <= 0:
            raise ValueError("ridge must be positive")
        if isinstance(self.allocation, str):
            self.allocation = Allocation(kind=self.allocation)

















# --- orchestration -------------------------------------------------------------------------------------

def module_sizes(attn, mlp, sparsity: float) -> dict[str, int]:
    """Inner widths kept at ``sparsity`` (the same fraction for each module, as the paper)."""
    keep = 1.0 - sparsity
    return {"qk_pairs": max(1, round(keep * attn.head_dim / 2)), "v_dim": max(1, round(keep * attn.head_dim)),
            "mlp_dim": max(1, round(keep * mlp.gate_proj.out_features))}


def compress_modegpt(model, config: MoDeGPTConfig, calibration, progress) -> Report:
    if calibration is None:
        raise ValueError("MoDeGPT needs calibration tokens")
    model, mv, inputs, influence, sparsity, calibration_seconds = prepare_sequential(
        model, calibration, config.allocation, config.ratio, config.batch_size, progress)
    L = len(mv.layers)
    n_err = min(config.error_batches, len(inputs))
    hidden, layers = inputs.hidden, []
    for i, layer in enumerate(mv.layers):
        attn, mlp = layer.self_attn, layer.mlp
        params_dense = sum(p.numel() for p in layer.parameters())
        sizes = module_sizes(attn, mlp, sparsity[i])
        kw = inputs.kwargs
        # Attention: correlation of the normalised block input feeds both Type II and Type III.
        a_dense, a_new, g_attn, qk_scores, vo_spectra = compress_attention(
            layer, hidden, kw, sizes["qk_pairs"], sizes["v_dim"])
        mid = [h + a for h, a in zip(hidden, a_new)]
        # MLP: correlation of the intermediate activations (input of down_proj).
        with record_inputs({"z": mlp.down_proj}) as grams:
            m_dense = [layer.mlp_out(x) for x in mid]
        c = grams["z"].mean
        index, w_down, scores = nystrom_mlp(c, mlp.down_proj.weight, sizes["mlp_dim"], config.ridge)
        if sizes["mlp_dim"] < mlp.gate_proj.out_features:
            select_outputs(mlp.gate_proj, index)
            select_outputs(mlp.up_proj, index)
            set_linear(mlp.down_proj, w_down)
        m_new = [layer.mlp_out(x) for x in mid]
        errors = {"attn": relative_error(torch.cat(a_new[:n_err]), torch.cat(a_dense[:n_err])),
                  "mlp": relative_error(torch.cat(m_new[:n_err]), torch.cat(m_dense[:n_err]))}
        hidden = [x + m for x, m in zip(mid, m_new)]
        spectra = {"mlp_corr": torch.linalg.eigvalsh(c.double()).flip(0).tolist(),
                   "attn_input": torch.linalg.eigvalsh(g_attn.double()).flip(0).tolist()}
        spectra.update({f"vo_group{g}": s for g, s in enumerate(vo_spectra)})
        layers.append(LayerReport(
            index=i, params_dense=params_dense,
            params_compressed=sum(p.numel() for p in layer.parameters()),
            sizes={"qk_dim": attn.qk_dim, "v_dim": attn.v_dim, "mlp_dim": mlp.gate_proj.out_features},
            spectra=spectra,
            kept={"mlp_corr": mlp.gate_proj.out_features, **{f"vo_group{g}": attn.v_dim for g in range(len(vo_spectra))}},
            leverage={"scores": scores.tolist(), "kept": index.tolist(),
                      "qk_pair_scores": qk_scores.tolist()},
            errors=errors, influence=None if influence is None else influence[i]))
        progress(0.2 + 0.8 * (i + 1) / L, f"decomposed layer {i + 1}/{L}")
    model.sync_config()
    return Report(method="modegpt", ratio_target=config.ratio, layers=layers, compressed=model,
                  calibration_seconds=calibration_seconds, block_influence=influence,
                  config={"ratio": config.ratio, "allocation": config.allocation.kind,
                          "epsilon": config.allocation.epsilon, "ridge": config.ridge,
                          "layer_sparsity": sparsity})
