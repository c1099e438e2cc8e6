"""Error curves of the trade-off explorer (:mod:`compression.preview`): for each module, its
error at every kept width from one pass of statistics on the dense stream.

What the curves are, module by module (``f`` is a relative *squared* error; the reported errors are
relative Frobenius errors, √f, as in every report's ``layers[i].errors``):

- MoDeGPT's MLP — **exact** on the calibration tokens: the channels are kept by ridge leverage
  (:func:`compression.ops.nystrom_mlp`) and down_proj is refitted by least squares. With P the
  leverage order and L the Cholesky factor of P C Pᵀ, the refit error of the first k channels is
  Σ_{j≥k} ‖(W_down Pᵀ L)[:, j]‖² (one factorisation gives every k), divided by tr(W_down C W_downᵀ).
  That is the plain least-squares refit (``refit_shrinkage=0``); the default shrunk refit gives up a
  little of the in-sample fit (this curve is its lower bound there) for a better held-out one.
- Olica's MLP — **exact** on the calibration tokens: neurons kept by ‖z_j‖·‖W_down[:, j]‖ with no
  refit, so the error is the dropped part of the output energy, Σ_{i,j dropped} (W_downᵀW_down)_ij C_ij.
  Its linear calibration branches: which layers get one is **exact** (the share of the pruning
  residual a ridge fit on the MLP input explains, from the input's Gram and its cross moment with z,
  :func:`explained_curve`); what a rank-r branch removes is **approximate** (the ridge's shrinkage term
  left out, :func:`branch_spectrum`).
- Value-output per kv group — **exact** on the calibration tokens: the rewrite
  (:func:`compression.ops.vo_decomposition`) leaves the attention pattern as it is and changes each
  head's W_O by a known low-rank term, so the output's error is a quadratic form in the Gram of
  o_proj's input (the heads' contexts), summed into one curve over the kept value dims
  (:func:`vo_curve`).
- Query-key rotary-pair cuts — **measured** on dense inputs of a few calibration sequences (a copy of
  each attention cut to every kept width, :func:`qk_curve`): exact there, an estimate for the rest;
  ``qk_sequences=0`` falls back to a **proxy** from the pair scores (the discarded share of the squared
  CR scores, :func:`score_curve`: a logit error, not the output's). The attention error combines the
  two as √(f_vo + f_qk), as if the value and the pattern errors were uncorrelated (a **proxy** when
  both are cut).
- SliceGPT — a **proxy**: the discarded eigenvalue mass of the residual stream's PCA entering the MLP
  and leaving the block, relative to the stream (the real run slices in a rotated basis built from the
  already-sliced stream, and its per-layer "block" error accumulates over layers).
- Layer dropping — **exact** on dense inputs: dropping block i leaves its input, so the stream loses
  ‖x_out − x_in‖² / ‖x_out‖²; which blocks go comes from the same Block Influence the method uses.
"""
from __future__ import annotations

import copy
import math

import torch

from .ops import eigenvalues, ridge_leverage
from .rewrite import keep_rotary_pairs


def at(curve: list[float], kept: int) -> float:
    """A curve's value at ``kept`` (clipped to its ends)."""
    return curve[min(max(int(kept), 0), len(curve) - 1)]


def _cholesky(g: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a PSD matrix, with a growing diagonal jitter if it is singular."""
    factor, info = torch.linalg.cholesky_ex(g)
    jitter = float(g.diagonal().mean().clamp_min(1e-30)) * 1e-12
    while int(info):
        shifted = g.clone()
        shifted.diagonal().add_(jitter)
        factor, info = torch.linalg.cholesky_ex(shifted)
        jitter *= 100
    return factor


def _fractions(tail: torch.Tensor) -> list[float]:
    """A tail-energy vector (index k: what is lost keeping the first k) as fractions of the whole."""
    total = float(tail[0])
    return (tail / total).clamp(0.0, 1.0).tolist() if total > 0 else [0.0] * tail.numel()


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """[Σ_{j≥0} x_j, Σ_{j≥1} x_j, ..., x_{n-1}, 0] (n + 1 values)."""
    return torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1)])


def nystrom_curve(c: torch.Tensor, w_down: torch.Tensor, ridge: float) -> list[float]:
    """MoDeGPT's MLP: relative squared refit error for every number of kept channels k = 0..m.

    Channels are kept in ridge-leverage order P (as :func:`compression.ops.nystrom_mlp`, λ = ridge ·
    mean diag C) and down_proj is refitted by least squares. With G = P C Pᵀ = L Lᵀ the first k
    columns of Z Pᵀ span the first k columns of its orthogonal factor, so the refit leaves
    Σ_{j≥k} ‖(W_down Pᵀ L)[:, j]‖², exactly; the whole, tr(W_down C W_downᵀ), is the k = 0 value."""
    c = c.double()
    scores = ridge_leverage(c, float(ridge * c.diagonal().mean()))
    order = torch.argsort(scores, descending=True, stable=True)
    factor = _cholesky(c[order][:, order])
    b = w_down.double()[:, order] @ factor                        # (D, m)
    return _fractions(_reverse_cumsum(b.square().sum(0)))


def olica_order(z_sq: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Olica's neuron ranking, most important first (:func:`compression.olica.neuron_importance`)."""
    from .olica import neuron_importance

    return torch.argsort(neuron_importance(z_sq, w_down), descending=True, stable=True)


def pruning_curve(c: torch.Tensor, w_down: torch.Tensor, z_sq: torch.Tensor) -> list[float]:
    """Olica's MLP: relative squared error for every number of kept neurons k = 0..m.

    Neurons are kept by ‖z_j‖·‖W_down[:, j]‖ (:func:`compression.olica.neuron_importance`) and
    nothing is refitted, so dropping the tail T loses Σ_{i,j∈T} (WᵀW)_ij C_ij of the output energy:
    with H = (WᵀW) ⊙ C in that order, the tail sums Σ_{i≥k} (H_ii + 2 Σ_{j>i} H_ij), exactly."""
    w = w_down.double()
    order = olica_order(z_sq, w)
    wo = w[:, order]
    h = (wo.T @ wo) * c.double()[order][:, order]
    per_row = h.diagonal() + 2 * torch.triu(h, diagonal=1).sum(1)
    return _fractions(_reverse_cumsum(per_row))


def vo_curve(attn, gram: torch.Tensor, context: torch.Tensor, energy: float | None = None,
             eps: float = 1e-8) -> list[float]:
    """Value-output: the attention output's relative squared error for every number of kept value dims
    v = 0..head_dim (all kv groups alike), exact on the calibration tokens.

    Per group, :func:`compression.ops.vo_decomposition` writes W_V W_O = V₁S₁⁻¹ (U₂S₂V₂ᵀ) and keeps the
    leading v terms of the core's SVD, so the rewrite changes W_O,h of each head h of the group by
    ΔW_h = −Σ_{j≥v} s_j a_j b_{j,h}ᵀ (a_j = V₁S₁⁻¹u_j, b_{j,h} head h's slice of V₂'s column j). The
    attention pattern is untouched, so the output changes by Σ_h c_h ΔW_h, c_h head h's context (the
    input of o_proj); its energy over the tokens is a quadratic form in ``context``, the Gram of
    o_proj's input (H·hd × H·hd, value biases taken out). With Ψ_jj' the (j, j') terms summed over
    groups and heads, the error keeping v is Σ_{j,j'≥v} Ψ_jj', relative to ``energy`` (the dense
    attention output's per-token energy, biases included; default: its value part, the v = 0 term)."""
    H, Hkv, hd, G = attn.num_heads, attn.num_kv_heads, attn.v_dim, attn.num_key_value_groups
    wv = attn.v_proj.weight.double().view(Hkv, hd, -1)
    wo = attn.o_proj.weight.double().view(-1, H, hd)
    D = wo.shape[0]
    k = context.double().view(H, hd, H, hd)
    scaled_a, b = [], []  # per head: s_j a_j (hd × hd, columns j) and b_{j,h} (hd × D, rows j)
    g_ = gram.double()
    for g in range(Hkv):
        w_o = torch.cat([wo[:, h, :].T for h in range(g * G, (g + 1) * G)], dim=1)   # (hd, G·D)
        vals, v1 = torch.linalg.eigh(wv[g] @ g_ @ wv[g].T)
        s1 = vals.clamp_min(eps * vals.max().clamp_min(1e-30)).sqrt()
        u2, s2, v2t = torch.linalg.svd((s1[:, None] * v1.T) @ w_o, full_matrices=False)
        a = (v1 / s1[None, :]) @ u2 * s2[None, :]
        for t in range(G):
            scaled_a.append(a)
            b.append(v2t[:, t * D:(t + 1) * D])
    psi = torch.zeros(hd, hd, dtype=torch.float64)
    for h in range(H):
        for h2 in range(H):
            psi += (scaled_a[h].T @ k[h, :, h2, :] @ scaled_a[h2]) * (b[h] @ b[h2].T)
    psi = (psi + psi.T) / 2
    per_row = psi.diagonal() + 2 * torch.triu(psi, diagonal=1).sum(1)
    lost = _reverse_cumsum(per_row)
    if energy is None:
        return _fractions(lost)
    return (lost / max(energy, 1e-30)).clamp(0.0, 1.0).tolist()


def score_curve(scores: torch.Tensor) -> list[float]:
    """Query-key, the cheap proxy (``collect(..., qk_sequences=0)``): for every number of kept rotary
    pairs r = 0..hd/2, the share of Σ score² in the pairs each kv group drops (the lowest-scored, as
    :func:`compression.rewrite.keep_rotary_pairs` keeps the highest). Were pairs uncorrelated, a pair's
    share of the logits' energy is about its score²: a relative squared *logit* error, not the output's."""
    energy = scores.double().square().sort(dim=-1, descending=True).values  # (Hkv, hd/2)
    return _fractions(_reverse_cumsum(energy.sum(0)))


def qk_curve(layer, gram: torch.Tensor, hidden: list, kwargs: list, dense: list, points: int = 33) -> list[float]:
    """Query-key: the attention output's relative squared error for every number of kept rotary pairs
    r = 0..hd/2 (values unchanged), measured by cutting a copy of the attention with
    :func:`compression.rewrite.keep_rotary_pairs` and running it on ``hidden`` (a few dense block
    inputs) against their ``dense`` attention outputs: exact on those tokens, where measured. At most
    ``points`` widths are run (every one for head_dim ≤ 64), the rest interpolated linearly."""
    half = layer.self_attn.head_dim // 2
    energy = sum(float(d.double().square().sum()) for d in dense)
    step = max(1, math.ceil(half / max(points - 1, 1)))
    measured = {half: 0.0}
    for r in sorted({*range(1, half, step), half - 1} - {0}):
        attn = copy.deepcopy(layer.self_attn)
        keep_rotary_pairs(attn, gram, r)
        lost = 0.0
        for h, kw, d in zip(hidden, kwargs, dense):
            a = attn(layer.input_layernorm(h), position_embeddings=kw["position_embeddings"],
                     attention_mask=kw.get("attention_mask"))[0]
            if layer.attn_output_norm is not None:
                a = layer.attn_output_norm(a)
            lost += float((a.double() - d.double()).square().sum())
        measured[r] = lost / max(energy, 1e-30)
    known = sorted(measured)
    curve = [measured[known[0]]] + [0.0] * half  # r = 0 never planned (whole pairs, at least one)
    for lo, hi in zip(known, known[1:]):
        for r in range(lo, hi + 1):
            t = (r - lo) / (hi - lo)
            curve[r] = (1 - t) * measured[lo] + t * measured[hi]
    return [min(max(v, 0.0), 1.0) for v in curve]


def sequences(batch: torch.Tensor | None, kwargs: dict, n: int):
    """The first ``n`` sequences of a captured batch and its keyword arguments (tensors whose first dim
    is the batch's are cut; broadcast ones, batch dim 1, are kept)."""
    size = batch.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size and size > 1:
            return v[:n]
        return tuple(cut(x) for x in v) if isinstance(v, tuple) else v
    return batch[:n], {k: cut(v) for k, v in kwargs.items()}


def branch_basis(gram_x: torch.Tensor, cross: torch.Tensor, w_down: torch.Tensor, order: torch.Tensor) -> dict:
    """What Olica's calibration branch of a layer is forecast from: the eigenvalues Λ and the cross
    moment Uᵀ XᵀZ/n of the MLP input X (G = XᵀX/n = U Λ Uᵀ) with the channels in Olica's ``order``
    (so any pruning's dropped channels are a suffix; float32), and W_down (a reference)."""
    vals, vecs = torch.linalg.eigh(gram_x.double())
    return {"eigvals": vals.clamp_min(0), "scale": float(gram_x.diagonal().double().mean()),
            "cross": (vecs.T @ cross.double())[:, order].float(), "w_down": w_down, "order": order}


def _ridge_weights(basis: dict, ridge: float) -> tuple[torch.Tensor, float]:
    lam = ridge * basis["scale"]
    return basis["eigvals"], lam


def explained_curve(basis: dict, ridge: float) -> list[float]:
    """Olica's linear calibration of a layer pruned to its first k channels, k = 0..m: the energy per
    token its ridge fit explains of the residual, exactly (on the dense MLP input).

    The residual R = Z_T W_Tᵀ of the dropped channels T has cross moment c' = Uᵀ XᵀR/n = M_T W_Tᵀ
    (M = Uᵀ XᵀZ/n, :func:`branch_basis`), and the ridge fit W = U (Λ + λ)⁻¹ c' explains
    Σ_i ω_i ‖c'_i‖², ω_i = 2/(λ_i + λ) − λ_i/(λ_i + λ)²; that is ⟨M_Tᵀ Ω M_T, W_Tᵀ W_T⟩, a sum over the
    tail block of one m × m matrix, so one pass gives every k (as :func:`pruning_curve`)."""
    lam_i, lam = _ridge_weights(basis, ridge)
    omega = 2 / (lam_i + lam) - lam_i / (lam_i + lam) ** 2
    m, w = basis["cross"].double(), basis["w_down"].double()[:, basis["order"]]
    h = (m.T @ (omega[:, None] * m)) * (w.T @ w)
    return _reverse_cumsum(h.diagonal() + 2 * torch.triu(h, diagonal=1).sum(1)).tolist()


def branch_spectrum(basis: dict, kept: int, ridge: float, rank: int) -> float:
    """The residual energy a rank-``rank`` calibration branch removes from a layer pruned to its first
    ``kept`` channels: the best rank-r factorisation of the ridge fit under the input weighting keeps
    the top r eigenvalues of YᵀY, Y = Λ^{1/2}(Λ + λ)⁻¹ c' (c' as in :func:`explained_curve`); the
    residual after the branch is the residual before minus their sum, up to a term of order λ (the
    ridge's shrinkage) left out."""
    if kept >= basis["order"].numel():
        return 0.0
    tail = basis["w_down"][:, basis["order"][kept:]].to(basis["cross"].dtype)
    c = (basis["cross"][:, kept:] @ tail.T).double()   # (D, D) in the eigenbasis of G
    lam_i, lam = _ridge_weights(basis, ridge)
    y = (lam_i.sqrt() / (lam_i + lam))[:, None] * c
    return float(torch.linalg.eigvalsh(y.T @ y).flip(0).clamp_min(0)[:rank].sum())


def eigen_curve(gram: torch.Tensor) -> list[float]:
    """The share of a Gram matrix's eigenvalue mass outside its top d directions, d = 0..D."""
    vals = eigenvalues(gram).clamp_min(0)
    return _fractions(_reverse_cumsum(vals))
