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

import time
from dataclasses import dataclass, field

import torch

from .arch import view
from .calibration import Gram, block_influence, capture_block_inputs, record_inputs
from .modeling import to_compressed
from .ops import ridge_leverage, relative_error, select_inputs, select_outputs, set_linear
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


# --- Type I: MLP by Nyström -------------------------------------------------------------------------

def nystrom_mlp(c: torch.Tensor, w_down: torch.Tensor, keep: int, ridge: float):
    """Channels to keep and the refitted down projection.

    c: (m, m) correlation of the intermediate activations; w_down: (D, m) as in nn.Linear.
    Returns (kept indices (keep,), new down weight (D, keep), leverage scores (m,)).
    """
    c = c.double()
    lam = ridge * c.diagonal().mean()
    scores = ridge_leverage(c, float(lam))
    index = torch.sort(torch.topk(scores, keep).indices).values
    c_ss = c[index][:, index]                       # SᵀCS
    c_s = c[index]                                  # SᵀC    (keep, m)
    refit = torch.linalg.lstsq(c_ss, c_s @ w_down.double().T).solution  # (keep, D)
    return index, refit.T, scores


# --- Type II: key-query by CR decomposition over rotary pairs ---------------------------------------

def rotary_pair_scores(q_diag: torch.Tensor, k_diag: torch.Tensor, groups: int) -> torch.Tensor:
    """CR scores of rotary pairs per kv group.

    q_diag: (H, hd) diagonal of each query head's output correlation; k_diag: (Hkv, hd).
    A pair (i, i + hd/2) has norm² C_ii + C_jj; its score is ‖k pair‖ · Σ_heads in group ‖q pair‖.
    Returns (Hkv, hd/2).
    """
    half = q_diag.shape[-1] // 2
    q_pair = (q_diag[:, :half] + q_diag[:, half:]).clamp_min(0).sqrt()
    k_pair = (k_diag[:, :half] + k_diag[:, half:]).clamp_min(0).sqrt()
    q_group = q_pair.view(k_diag.shape[0], groups, half).sum(1)
    return k_pair * q_group


def head_columns(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Column indices inside a head for kept pairs: [pairs, pairs + hd/2] (rotate-half order)."""
    return torch.cat([pairs, pairs + head_dim // 2])


def keep_rotary_pairs(attn, gram: torch.Tensor, keep_pairs: int) -> torch.Tensor:
    """Cut q_proj/k_proj to ``keep_pairs`` rotary pairs per head; returns the scores (Hkv, hd/2)."""
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    g = gram.double()
    wq = attn.q_proj.weight.double().view(H, hd, -1)   # (H, hd, d_in)
    wk = attn.k_proj.weight.double().view(Hkv, hd, -1)
    q_diag = torch.einsum("hid,de,hie->hi", wq, g, wq)  # diag(W_qᵀ G W_q) per head
    k_diag = torch.einsum("hid,de,hie->hi", wk, g, wk)
    if attn.q_proj.bias is not None:  # biases shift the outputs: add their second moment
        q_diag += attn.q_proj.bias.double().view(H, hd) ** 2
        k_diag += attn.k_proj.bias.double().view(Hkv, hd) ** 2
    scores = rotary_pair_scores(q_diag, k_diag, attn.num_key_value_groups)
    if keep_pairs >= hd // 2:
        return scores
    pairs = torch.sort(torch.topk(scores, keep_pairs, dim=-1).indices, dim=-1).values  # (Hkv, r)
    k_rows = torch.cat([g_ * hd + head_columns(pairs[g_], hd) for g_ in range(Hkv)])
    q_rows = torch.cat([h * hd + head_columns(pairs[h // attn.num_key_value_groups], hd)
                        for h in range(H)])
    select_outputs(attn.q_proj, q_rows)
    select_outputs(attn.k_proj, k_rows)
    attn.qk_dim = 2 * keep_pairs
    attn.register_buffer("rope_index", pairs.to(attn.q_proj.weight.device))
    return scores


# --- Type III: value-output by SVD, per kv group -----------------------------------------------------

def vo_decomposition(w_v: torch.Tensor, w_o: torch.Tensor, gram: torch.Tensor, keep: int,
                     eps: float = 1e-8):
    """Low-rank value-output of one kv group, weighted by the input correlation.

    w_v: (d_in, hd) value projection of the group; w_o: (hd, G·D) its query heads' output projections
    side by side; gram: (d_in, d_in). Minimises ‖C^{1/2}(W_V W_O − W_V' W_O')‖ with rank ``keep``,
    computed on the small factor: C^{1/2} W_V = U₁ S₁ V₁ᵀ (from eig of W_Vᵀ C W_V), then the SVD of
    S₁ V₁ᵀ W_O = U₂ S₂ V₂ᵀ; W_V' = W_V V₁ S₁⁻¹ U₂ₖ, W_O' = S₂ₖ V₂ₖᵀ.
    Returns (map M (hd, keep) with W_V' = W_V M, W_O' (keep, G·D), singular values S₂).
    """
    w_v, w_o = w_v.double(), w_o.double()
    vals, v1 = torch.linalg.eigh(w_v.T @ gram.double() @ w_v)
    s1 = vals.clamp_min(eps * vals.max().clamp_min(1e-30)).sqrt()
    u2, s2, v2t = torch.linalg.svd((s1[:, None] * v1.T) @ w_o, full_matrices=False)
    m = (v1 / s1[None, :]) @ u2[:, :keep]
    return m, s2[:keep, None] * v2t[:keep], s2


def compress_value_output(attn, gram: torch.Tensor, keep: int) -> list[list[float]]:
    """Rewrite v_proj/o_proj to ``keep`` value dims per kv group; returns each group's spectrum."""
    H, Hkv, hd, G = attn.num_heads, attn.num_kv_heads, attn.v_dim, attn.num_key_value_groups
    wv = attn.v_proj.weight.double().view(Hkv, hd, -1)          # (Hkv, hd, d_in)
    wo = attn.o_proj.weight.double().view(-1, H, hd)             # (d_mid, H, hd)
    new_v, new_b, new_o, spectra = [], [], [], []
    for g in range(Hkv):
        heads = range(g * G, (g + 1) * G)
        w_o = torch.cat([wo[:, h, :].T for h in heads], dim=1)  # (hd, G·d_mid)
        m, w_o_new, s2 = vo_decomposition(wv[g].T, w_o, gram, keep)
        new_v.append((wv[g].T @ m).T)                            # (keep, d_in)
        if attn.v_proj.bias is not None:
            new_b.append(attn.v_proj.bias.double().view(Hkv, hd)[g] @ m)
        new_o.extend(w_o_new.view(keep, G, -1).unbind(1))       # per head (keep, d_mid)
        spectra.append((s2 ** 2).tolist())
    set_linear(attn.v_proj, torch.cat(new_v), torch.cat(new_b) if new_b else None)
    set_linear(attn.o_proj, torch.cat([o.T for o in new_o], dim=1))
    attn.v_dim = keep
    return spectra


# --- orchestration -------------------------------------------------------------------------------------

def module_sizes(attn, mlp, sparsity: float) -> dict[str, int]:
    """Inner widths kept at ``sparsity`` (the same fraction for each module, as the paper)."""
    keep = 1.0 - sparsity
    return {"qk_pairs": max(1, round(keep * attn.head_dim / 2)), "v_dim": max(1, round(keep * attn.head_dim)),
            "mlp_dim": max(1, round(keep * mlp.gate_proj.out_features))}


def compress_modegpt(model, config: MoDeGPTConfig, calibration, progress) -> Report:
    if calibration is None:
        raise ValueError("MoDeGPT needs calibration tokens")
    model = to_compressed(model)
    mv = view(model)
    L = len(mv.layers)
    t0 = time.perf_counter()
    inputs = capture_block_inputs(mv, calibration, config.batch_size)
    influence = block_influence(mv, inputs, lambda f, m: progress(0.2 * f, m)) \
        if config.allocation.needs_influence else None
    sparsity = config.allocation.sparsities(config.ratio, L, influence)
    calibration_seconds = time.perf_counter() - t0
    n_err = min(config.error_batches, len(inputs))
    hidden, layers = inputs.hidden, []
    for i, layer in enumerate(mv.layers):
        attn, mlp = layer.self_attn, layer.mlp
        params_dense = sum(p.numel() for p in layer.parameters())
        sizes = module_sizes(attn, mlp, sparsity[i])
        kw = inputs.kwargs
        # Attention: correlation of the normalised block input feeds both Type II and Type III.
        with record_inputs({"attn": attn.q_proj}) as grams:
            a_dense = [layer.attention_out(h, k) for h, k in zip(hidden, kw)]
        g_attn = grams["attn"].mean
        qk_scores = keep_rotary_pairs(attn, g_attn, sizes["qk_pairs"])
        vo_spectra = compress_value_output(attn, g_attn, sizes["v_dim"]) \
            if sizes["v_dim"] < attn.v_dim else []
        a_new = [layer.attention_out(h, k) for h, k in zip(hidden, kw)]
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
