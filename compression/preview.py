"""The trade-off explorer: what a setting will cost, forecast from one pass over the dense model.

:func:`collect` runs the calibration tokens through the dense model once (block inputs captured once,
each dense block run once on the dense stream) and keeps per layer the statistics every method's
choices are made from: the Gram of the attention input (the input norm's output, D × D), the Gram of
the MLP's intermediate activations z = act(h W_gateᵀ) ⊙ h W_upᵀ (m × m), Block Influence, the energy of
each module's output and of the stream, and 1-D error curves derived from them (one value per kept
width). :func:`predict` then answers any config of any method from those curves alone: the method's
own :meth:`~compression.methods.Method.plan` (automatic allocation from the statistics' Block
Influence, the same scores the method measures on the same tokens) sets the widths, and each layer's
errors are looked up at them — milliseconds per setting, no model.

What the curves are, module by module (``f`` is a relative *squared* error; the reported errors are
relative Frobenius errors, √f, as in every report's ``layers[i].errors``):

- MoDeGPT's MLP — **exact** on the calibration tokens: the channels are kept by ridge leverage
  (:func:`compression.ops.nystrom_mlp`) and down_proj is refitted by least squares. With P the
  leverage order and L the Cholesky factor of P C Pᵀ, the refit error of the first k channels is
  Σ_{j≥k} ‖(W_down Pᵀ L)[:, j]‖² (one factorisation gives every k), divided by tr(W_down C W_downᵀ).
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

The real runs are sequential: each block is calibrated, and its error measured, on the outputs of the
already-compressed blocks before it, while the forecast sees the dense stream everywhere; the real
errors are also measured on held-out sequences, the curves on the calibration tokens (so MoDeGPT's
refit, fitted in-sample, is forecast too well, more so with few tokens per MLP channel). Per layer,
``predicted_error`` is relative to what the layer's measured errors are relative to (the block's update,
attention + MLP outputs, for the per-block methods; the stream for SliceGPT and layer dropping), and
``stream`` is the error energy the layer injects relative to the stream leaving it, comparable across
methods; a setting's ``total`` is √Σ stream², the forecast the trade-off curve plots.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .arch import ARCHITECTURES, BlockView, count_params, view
from .calibration import Gram, capture_block_inputs, cosine_influence, mlp_activations, mlp_outputs
from .methods import Method, get, method_for
from .modeling import CompressedDecoderLayer, block_math, dense_spec, spec_params
from .modeling_compressed import BlockMath, Shape
from .ops import ridge_leverage
from .plan import MAX_LAYER_SPARSITY
from .rewrite import keep_rotary_pairs

Progress = Callable[[float, str], None]
DEFAULT_RIDGE = 1.0  # MoDeGPT's default leverage ridge: its curve is built by collect
OLICA_RIDGE = 1e-3   # Olica's default calibration ridge: its explained curve too


@dataclass
class LayerStatistics:
    """One block's statistics on the dense stream (plain tensors and lists).

    attn_gram: Gram of the attention input (D × D, float32; None once dropped); mlp_gram: of the MLP's
    intermediate activations (m × m, float32; None once dropped). energy: per-token mean squared norms
    of the block input ``stream_in``, attention output ``attn``, MLP input stream ``mid``, MLP output
    ``mlp``, block output
    ``stream_out`` and update ``update`` (= stream_out − stream_in). drop: relative squared error of the
    stream when the block is dropped. Curves (index = kept width, value = relative squared error):
    ``qk`` (kept rotary pairs per head), ``vo`` (kept value dims per kv group), ``mlp`` ({rule: curve
    over kept channels}: ``"olica"``, ``"modegpt:<ridge>"``), ``slice_mid`` / ``slice_out`` (kept
    directions of the stream entering the MLP / leaving the block).
    """

    index: int
    influence: float
    energy: dict[str, float]
    drop: float
    qk: list[float]
    vo: list[float]
    mlp: dict[str, list[float]]
    slice_mid: list[float]
    slice_out: list[float]
    attn_gram: torch.Tensor | None = None
    mlp_gram: torch.Tensor | None = None
    z_sq: torch.Tensor | None = None       # Σ z_j² / n per channel (Olica's ranking), float64
    w_down: torch.Tensor | None = None     # a reference to down_proj's weight (D × m), for other ridges
    branch: dict | None = None             # Olica's calibration-branch basis (:func:`branch_basis`)
    fits: dict = field(default_factory=dict, repr=False)  # (kept, ridge, rank) -> branch_spectrum


@dataclass
class Statistics:
    """What :func:`predict` needs, from one pass over the dense model (see :func:`collect`)."""

    layers: list[LayerStatistics]
    influence: list[float]
    params_total: int
    params_blocks: int
    tokens: tuple[int, int]
    fingerprint: str
    seconds: float

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        """Bytes of the tensors it holds of its own: the Gram matrices and Olica's cross moments (the
        rest is a few curves per layer; W_down is a reference to the model's weight)."""
        return sum(g.numel() * g.element_size() for lay in self.layers
                   for g in (lay.attn_gram, lay.mlp_gram, (lay.branch or {}).get("cross")) if g is not None)

    def drop_grams(self) -> None:
        """Free the Gram matrices (MoDeGPT curves at a leverage ridge not built yet then fail)."""
        for lay in self.layers:
            lay.attn_gram = lay.mlp_gram = None

    def branch_explained(self, layer: int, kept: int, ridge: float) -> tuple[float, float]:
        """(share of the pruning residual Olica's ridge fit explains, the residual's energy per token)
        for ``layer`` pruned to ``kept`` channels (:func:`explained_curve`, built once per ridge)."""
        lay = self.layers[layer]
        curves = lay.branch.setdefault("explained", {})
        if float(ridge) not in curves:
            curves[float(ridge)] = explained_curve(lay.branch, ridge)
        r_sq = _at(lay.mlp["olica"], kept) * lay.energy["mlp"]
        if kept >= len(curves[float(ridge)]) - 1 or r_sq <= 0:
            return 1.0, 0.0  # nothing pruned: Olica's fit "explains all" of a zero residual
        return 1.0 - (r_sq - _at(curves[float(ridge)], kept)) / max(r_sq, 1e-30), r_sq

    def branch_gain(self, layer: int, kept: int, ridge: float, rank: int) -> float:
        """What a rank-``rank`` branch removes from the residual of ``layer`` (:func:`branch_spectrum`),
        remembered per width."""
        lay = self.layers[layer]
        key = (int(kept), float(ridge), int(rank))
        if key not in lay.fits:
            lay.fits[key] = branch_spectrum(lay.branch, int(kept), ridge, rank)
        return lay.fits[key]

    def mlp_curve(self, layer: int, rule: str, ridge: float = DEFAULT_RIDGE) -> list[float]:
        """The MLP curve of ``layer`` for ``rule`` ("olica" or "modegpt"), built on first use for a
        MoDeGPT leverage ridge other than the default (seconds: one Cholesky per layer)."""
        lay = self.layers[layer]
        key = rule if rule == "olica" else f"modegpt:{float(ridge):g}"
        if key not in lay.mlp:
            if lay.mlp_gram is None or lay.w_down is None:
                raise ValueError(f"no MoDeGPT curve at leverage ridge {ridge:g}: the statistics' Gram "
                                 "matrices were dropped; collect again")
            lay.mlp[key] = nystrom_curve(lay.mlp_gram.double(), lay.w_down, ridge)
        return lay.mlp[key]


# --- the curves -----------------------------------------------------------------------------------

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
    import copy

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


def _sequences(batch: torch.Tensor | None, kwargs: dict, n: int):
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
    vals = torch.linalg.eigvalsh(gram.double()).flip(0).clamp_min(0)
    return _fractions(_reverse_cumsum(vals))


# --- collecting ---------------------------------------------------------------------------------

def compressed_view(block: BlockView, base, math: BlockMath, shape: Shape):
    """A dense :class:`CompressedDecoderLayer` reading ``block``'s own modules (nothing copied but a
    fused projection's parts), so the methods' helpers (``attention_out``, ``mlp.inner``) run on it;
    the model is left untouched. (:func:`compression.modeling.to_compressed` does this for every block
    in place.)"""
    if isinstance(block.module, CompressedDecoderLayer):
        return block.module
    with torch.device("meta"):
        layer = CompressedDecoderLayer(base, dense_spec(base, block.index), block.index, math)
    target = BlockView(block.index, layer, ARCHITECTURES["compressed_decoder"])
    for part, linear in block.projections(shape).items():
        target.set(part, linear)
    for part in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm"):
        source = block.get(part)
        if source is not None:
            target.get(part).weight = source.weight
    return layer.eval()


def _cross(x: list[torch.Tensor], z: list[torch.Tensor]) -> torch.Tensor:
    """Σ xᵀz over the batches (D × m, float64), each batch's product in the statistics precision."""
    from .calibration import resolve_precision

    dtype = torch.float32 if resolve_precision(None, x[0].device) == "mixed" else torch.float64
    flat = lambda t: t.to(dtype).flatten(0, 1)  # noqa: E731
    return sum((flat(a).T @ flat(b)).double() for a, b in zip(x, z))


def _energy(batches: list[torch.Tensor]) -> tuple[float, int]:
    """Σ ‖row‖² over every token of ``batches`` (float64) and the token count."""
    total = sum(float(b.double().square().sum()) for b in batches)
    return total, sum(b.numel() // b.shape[-1] for b in batches)


def fingerprint(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def collect(model, calibration_tokens: torch.Tensor, batch_size: int = 8, progress: Progress | None = None,
            keep_grams: bool = True, qk_sequences: int = 2) -> Statistics:
    """One pass over the dense ``model`` on ``calibration_tokens`` (N, T): per layer the Gram matrices,
    Block Influence, energies and error curves :func:`predict` reads (see the module docstring).

    The model is not changed. keep_grams: keep the two Gram matrices per layer (float32; SmolLM2-135M:
    about 320 MB) so MoDeGPT curves at other leverage ridges can be built later; without them only the
    default ridge is forecast. qk_sequences: calibration sequences the query-key cuts are run on (one
    attention forward per kept width and layer, :func:`qk_curve`); 0 uses the pair-score proxy
    (:func:`score_curve`) instead. A streamed (offloaded) model is not supported."""
    progress = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    mv = view(model)
    base, shape = mv.config, mv.shape
    math_ = BlockMath.of(base, block_math(base, mv.arch))
    progress(0.0, "capturing block inputs")
    inputs = capture_block_inputs(mv, calibration_tokens, batch_size)
    hidden, layers, L = inputs.hidden, [], len(mv.layers)
    for i, block in enumerate(mv.blocks):
        layer = compressed_view(block, base, math_, shape)
        attn = layer.self_attn
        x = [layer.input_layernorm(h) for h in hidden]
        g_attn = Gram.of(x).mean
        del x
        kwargs = inputs.kwargs_for(i)
        context = Gram(attn.num_heads * attn.v_dim, g_attn.device)
        bias = None if attn.v_proj.bias is None else \
            attn.v_proj.bias.detach().view(attn.num_kv_heads, -1).repeat_interleave(attn.num_key_value_groups, 0)
        hook = attn.o_proj.register_forward_pre_hook(
            lambda module, args: context.add(args[0] if bias is None else args[0] - bias.reshape(-1)))
        try:
            a = [layer.attention_out(h, kw) for h, kw in zip(hidden, kwargs)]
        finally:
            hook.remove()
        if qk_sequences:
            probe = [_sequences(hidden[0], kwargs[0], qk_sequences)]
            qk = qk_curve(layer, g_attn, [p[0] for p in probe], [p[1] for p in probe],
                          [a[0][:qk_sequences]])
        else:
            qk = score_curve(keep_rotary_pairs(attn, g_attn, attn.head_dim // 2))  # all kept: scores only
        mid = [h + y for h, y in zip(hidden, a)]
        h_mid, z = mlp_activations(layer, mid)
        gram_z = Gram.of(z)
        c = gram_z.mean
        z_sq = sum(zb.square().sum(dim=(0, 1), dtype=torch.float64) for zb in z) / gram_z.count
        g_x = Gram.of(h_mid).mean
        cross = _cross(h_mid, z) / gram_z.count
        m = mlp_outputs(layer, h_mid, z)
        del h_mid, z
        out = [y + w for y, w in zip(mid, m)]
        e_in, n = _energy(hidden)
        e_attn, e_mid, e_mlp, e_out = _energy(a)[0], _energy(mid)[0], _energy(m)[0], _energy(out)[0]
        e_update = _energy([o - h for o, h in zip(out, hidden)])[0]
        bi = sum(cosine_influence(h, o)[0] for h, o in zip(hidden, out)) / n
        slice_mid, slice_out = eigen_curve(Gram.of(mid).mean), eigen_curve(Gram.of(out).mean)
        del a, m, mid
        w_down = layer.mlp.down_proj.weight.detach()
        basis = branch_basis(g_x, cross, w_down, olica_order(z_sq, w_down))
        basis["explained"] = {OLICA_RIDGE: explained_curve(basis, OLICA_RIDGE)}
        del cross
        layers.append(LayerStatistics(
            index=i, influence=bi,
            energy={"stream_in": e_in / n, "attn": e_attn / n, "mid": e_mid / n, "mlp": e_mlp / n,
                    "stream_out": e_out / n,
                    "update": e_update / n},
            drop=e_update / max(e_out, 1e-30), qk=qk, vo=vo_curve(attn, g_attn, context.mean, e_attn / n),
            mlp={"olica": pruning_curve(c, w_down, z_sq),
                 f"modegpt:{DEFAULT_RIDGE:g}": nystrom_curve(c, w_down, DEFAULT_RIDGE)},
            slice_mid=slice_mid, slice_out=slice_out,
            attn_gram=g_attn.float() if keep_grams else None, mlp_gram=c.float() if keep_grams else None,
            z_sq=z_sq, w_down=w_down if keep_grams else None, branch=basis))
        hidden = out
        progress((i + 1) / L, f"layer {i + 1}/{L}: statistics and error curves")
    return Statistics(layers=layers, influence=[lay.influence for lay in layers],
                      params_total=count_params(model), params_blocks=count_params(mv.layers),
                      tokens=tuple(calibration_tokens.shape), fingerprint=fingerprint(calibration_tokens),
                      seconds=time.perf_counter() - t0)


# --- the cache ------------------------------------------------------------------------------------

@dataclass
class StatisticsCache:
    """Statistics kept in memory per (model identity, calibration source, samples, length), at most
    ``size`` of them (the oldest goes first). No global state: the app holds one per process."""

    size: int = 2
    entries: dict = field(default_factory=dict)

    @staticmethod
    def key(name: str, spec) -> tuple:
        """The key of model ``name`` calibrated by ``spec`` (a :class:`compression.data.TextSpec`)."""
        from .pipeline import model_identity

        text = None if spec.text is None else hashlib.sha256(spec.text.encode()).hexdigest()[:16]
        return (model_identity(name), spec.source if text is None else f"text:{text}",
                int(spec.num_samples), int(spec.seq_len))

    def get(self, name: str, spec) -> Statistics | None:
        return self.entries.get(self.key(name, spec))

    def put(self, name: str, spec, statistics: Statistics) -> Statistics:
        key = self.key(name, spec)
        self.entries.pop(key, None)
        self.entries[key] = statistics
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        return statistics

    def get_or_collect(self, name: str, model, spec, tokens: Callable[[], torch.Tensor] | torch.Tensor,
                       batch_size: int = 8, progress: Progress | None = None) -> Statistics:
        """The cached statistics, or :func:`collect` on ``tokens`` (the tensor, or a function giving
        it, called only on a miss) and remembered."""
        found = self.get(name, spec)
        if found is not None:
            (progress or (lambda f, m: None))(1.0, "cached")
            return found
        fit = tokens() if callable(tokens) else tokens
        return self.put(name, spec, collect(model, fit, batch_size, progress))


# --- predicting -----------------------------------------------------------------------------------

# What predict's "attn" and "mlp" lists hold, in words (SliceGPT's are the two slices of the stream).
MODULE_LABELS = {"attn": "attention", "mlp": "MLP", "predicted_error": "block update"}
SLICED_LABELS = {"attn": "stream into the MLP (sliced)", "mlp": "block output (sliced)",
                 "predicted_error": "stream"}


def _at(curve: list[float], kept: int) -> float:
    return curve[min(max(int(kept), 0), len(curve) - 1)]


def _mlp_rule(config) -> tuple[str, float] | None:
    """Which channel rule a per-block config's MLP follows: ("modegpt", ridge) keeps channels by ridge
    leverage and refits; ("olica", 0) prunes by importance. Keyed by config type (the methods' own)."""
    from .modegpt import MoDeGPTConfig
    from .olica import OlicaConfig

    if isinstance(config, MoDeGPTConfig):
        return "modegpt", float(config.ridge)
    if isinstance(config, OlicaConfig):
        return "olica", 0.0
    return None


def _combine(attn_f: float, mlp_f: float, energy: dict) -> tuple[float, float]:
    """(relative squared error of the block's update, error energy over the stream leaving the block)
    from the modules' relative squared errors, weighted by their output energies."""
    lost = attn_f * energy["attn"] + mlp_f * energy["mlp"]
    return lost / max(energy["attn"] + energy["mlp"], 1e-30), lost / max(energy["stream_out"], 1e-30)


def _calibrate(statistics: Statistics, config, base_config, specs: list, modules: dict) -> tuple[dict, list[int]]:
    """Olica's calibration branches: the layers whose pruning residual a linear map explains best get
    a rank-r branch (:func:`explained_curve`, :func:`branch_spectrum`); their MLP error in ``modules`` becomes the residual after it.
    Returns ({layer: MLP error before}, the calibrated layers)."""
    from .olica import branch_cost

    n_cal, _, _ = branch_cost(config, base_config)
    if not n_cal or not modules:
        return {}, []
    fits = {i: statistics.branch_explained(i, specs[i]["mlp_dim"], config.ridge) for i in modules}
    chosen = sorted(fits, key=lambda j: fits[j][0], reverse=True)[:n_cal]
    before = {}
    for j in chosen:
        r_sq, energy = fits[j][1], statistics.layers[j].energy["mlp"]
        gain = statistics.branch_gain(j, specs[j]["mlp_dim"], config.ridge, config.calibrate_rank) if r_sq else 0.0
        before[j] = modules[j][1]
        modules[j][1] = max(r_sq - gain, 0.0) / max(energy, 1e-30)
    return before, sorted(chosen)


def predict(statistics: Statistics, config, base_config) -> dict:
    """Forecast of ``config`` (any method's) from ``statistics``: ``params``, ``block_params``, ``ratio``
    (as :func:`compression.forecast.forecast`), per layer ``predicted_error``, ``attn``, ``mlp`` and
    ``stream`` (relative errors, 0 for an untouched module; see the module docstring), ``total``
    (√Σ stream²), ``sizes`` (the planned widths; None for a dropped block), ``sparsity`` (the
    per-layer sparsity of the per-block methods' plans, else None), ``dropped`` (block indices) and
    ``labels`` (what "attn", "mlp" and "predicted_error" hold, in words: SliceGPT's are the two slices
    of the stream). Widths come from ``method.plan(config,
    base_config, statistics.influence)``, the one place widths are set."""
    method = method_for(config)
    L = statistics.num_layers
    if base_config.num_hidden_layers != L:
        raise ValueError(f"statistics have {L} layers, the model {base_config.num_hidden_layers}")
    plan = method.plan(config, base_config, statistics.influence)
    blocks = sum(spec_params(s, base_config) for s in plan.specs if s is not None) + plan.extra_params
    rule = _mlp_rule(config)
    attn, mlp, per_layer, stream, sizes, modules = [], [], [], [], [], {}
    for i, (lay, spec) in enumerate(zip(statistics.layers, plan.specs)):
        sizes.append(None if spec is None else {k: spec[k] for k in ("d_mid", "d_out", "qk_dim", "v_dim", "mlp_dim")})
        if spec is not None and not spec.get("attn_skip"):  # a per-block rewrite: module errors
            mlp_f = 0.0 if rule is None else _at(statistics.mlp_curve(i, *rule), spec["mlp_dim"])
            modules[i] = [min(_at(lay.vo, spec["v_dim"]) + _at(lay.qk, spec["qk_dim"] // 2), 1.0), mlp_f]
    before, calibrated = _calibrate(statistics, config, base_config, plan.specs, modules) if rule and rule[0] == "olica" \
        else ({}, [])
    for i, (lay, spec) in enumerate(zip(statistics.layers, plan.specs)):
        e = lay.energy
        if spec is None:  # dropped: the stream keeps the block's input
            attn.append(1.0), mlp.append(1.0), per_layer.append(math.sqrt(lay.drop)), stream.append(lay.drop)
        elif i not in modules:  # sliced residual stream (SliceGPT)
            f_mid, f_out = _at(lay.slice_mid, spec["d_mid"]), _at(lay.slice_out, spec["d_out"])
            s = (f_mid * e["mid"] + f_out * e["stream_out"]) / max(e["stream_out"], 1e-30)
            attn.append(math.sqrt(f_mid)), mlp.append(math.sqrt(f_out))
            per_layer.append(math.sqrt(min(s, 1.0))), stream.append(s)
        else:
            attn_f, mlp_f = modules[i]
            update, s = _combine(attn_f, mlp_f, e)
            attn.append(math.sqrt(attn_f)), mlp.append(math.sqrt(mlp_f))
            per_layer.append(math.sqrt(update)), stream.append(s)
    sparsity = config.sparsities(L, statistics.influence) if hasattr(config, "sparsities") else None
    sliced = any(s is not None and s.get("attn_skip") for s in plan.specs)
    return {"params": statistics.params_total - statistics.params_blocks + blocks, "block_params": blocks,
            "ratio": 1 - blocks / statistics.params_blocks if statistics.params_blocks else 0.0,
            "predicted_error": per_layer, "attn": attn, "mlp": mlp, "stream": [math.sqrt(s) for s in stream],
            "total": math.sqrt(sum(stream)), "sizes": sizes, "sparsity": sparsity,
            "dropped": [i for i, s in enumerate(plan.specs) if s is None], "calibrated": calibrated,
            "mlp_before_calibration": [math.sqrt(before[i]) if i in before else None for i in range(L)],
            "labels": SLICED_LABELS if sliced else MODULE_LABELS}


def measured_errors(report, statistics: Statistics | None = None) -> dict:
    """A report's (or its dict's) measured per-layer errors in :func:`predict`'s layout, to draw over a
    forecast: ``attn``, ``mlp``, ``predicted_error``'s counterpart ``per_layer`` (the block update's
    error from attn and mlp weighted by the dense output energies of ``statistics``, equal weights
    without them; SliceGPT's "block" error as it is) and, with ``statistics``, ``stream`` and ``total``
    as :func:`predict` defines them (a dropped block counts what dropping it loses on the dense stream).
    None where the report has no value (dropped blocks, methods that measure none)."""
    report = report.to_dict() if hasattr(report, "to_dict") else report
    layers = report.get("layers") or []
    attn, mlp, per_layer, stream = [], [], [], []
    for i, lay in enumerate(layers):
        errors = lay.get("errors") or {}
        a, m = errors.get("attn"), errors.get("mlp")
        e = statistics.layers[i].energy if statistics is not None else None
        attn.append(a), mlp.append(m)
        s = None
        if lay.get("removed"):
            per_layer.append(None)
            s = statistics.layers[i].drop if statistics is not None else None
        elif "block" in errors:
            per_layer.append(errors["block"])
            s = errors["block"] ** 2
        elif a is not None and m is not None:
            w_attn, w_mlp = (e["attn"], e["mlp"]) if e is not None else (1.0, 1.0)
            lost = a * a * w_attn + m * m * w_mlp
            per_layer.append(math.sqrt(lost / max(w_attn + w_mlp, 1e-30)))
            s = lost / max(e["stream_out"], 1e-30) if e is not None else None
        else:
            per_layer.append(None)
            s = 0.0 if statistics is not None and not errors else None
        stream.append(s)
    out = {"attn": attn, "mlp": mlp, "per_layer": per_layer}
    if statistics is not None:
        known = [s for s in stream if s is not None]
        out["stream"] = [None if s is None else math.sqrt(s) for s in stream]
        out["total"] = math.sqrt(sum(known)) if known else None
    return out


# --- ranking allocations by forecast ----------------------------------------------------------------

def _method(method) -> Method:
    return method if isinstance(method, Method) else get(method)


def allocation_candidates(method, ratio: float, num_layers: int, options: dict | None = None,
                          epsilons=(0.02, 0.05, 0.1, 0.2, 0.5), spare=(1, 2, 3, 4, 6, 8)) -> list[tuple[str, object]]:
    """(label, config) of the allocations :func:`best_allocation` compares at ``ratio``: uniform,
    automatic at each ε, and manual plans that spare the first or last k layers (sparsity 0 there, the
    rest raised to keep the mean). ``options``: the method's other knob values."""
    m = _method(method)
    if "auto" not in m.allocations or not m.has_knob("layer_sparsity"):
        raise ValueError(f"{m.label} has no per-layer allocation to rank")
    base = {**(options or {}), "ratio": ratio}
    out = [("uniform", m.make_config({**base, "allocation": "uniform"}))]
    out += [(f"auto ε={e:g}", m.make_config({**base, "allocation": "auto", "epsilon": e})) for e in epsilons]
    for k in spare:
        rest = ratio * num_layers / (num_layers - k) if k < num_layers else math.inf
        if rest > MAX_LAYER_SPARSITY:
            continue
        for side, spared in (("first", range(k)), ("last", range(num_layers - k, num_layers))):
            values = tuple(0.0 if i in spared else rest for i in range(num_layers))
            out.append((f"spare {side} {k}", m.make_config({**base, "allocation": "manual",
                                                            "layer_sparsity": values})))
    return out


def best_allocation(statistics: Statistics, method, ratio: float, base_config, options: dict | None = None,
                    **candidates) -> tuple[object, list[dict]]:
    """The allocation with the lowest forecast ``total`` among :func:`allocation_candidates` at
    ``ratio``: (its config, every candidate as {"label", "total", "params", "config"} sorted best
    first). Candidates whose parameters exceed uniform's by more than 0.5 % of the blocks are skipped,
    so a cheaper forecast error is never bought with parameters."""
    rows = []
    for label, config in allocation_candidates(method, ratio, statistics.num_layers, options, **candidates):
        p = predict(statistics, config, base_config)
        rows.append({"label": label, "total": p["total"], "params": p["params"], "config": config})
    budget = rows[0]["params"] + 0.005 * statistics.params_blocks
    fair = sorted((r for r in rows if r["params"] <= budget), key=lambda r: r["total"])
    return fair[0]["config"], fair + [r for r in rows if r["params"] > budget]


# --- the trade-off curve ------------------------------------------------------------------------------

TRADEOFF_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 13))  # 0.05 .. 0.6


def tradeoff_curve(statistics: Statistics, method, base_config, options: dict | None = None,
                   ratios=TRADEOFF_RATIOS) -> list[dict]:
    """The forecast at each target ratio for ``method`` with its other knob values ``options``: rows
    {"ratio", "total", "params"} for :func:`viz.tradeoff_figure`. Ratios the method cannot reach are
    left out; manual per-layer values in ``options`` are dropped (the curve varies the target)."""
    m = _method(method)
    values = {k: v for k, v in (options or {}).items() if k not in ("layer_sparsity", "layers", "widths", "slicing")}
    if values.get("allocation") == "manual":
        values["allocation"] = "uniform"
    rows = []
    for r in ratios:
        try:
            p = predict(statistics, m.make_config({**values, "ratio": r}), base_config)
        except ValueError:
            continue
        rows.append({"ratio": r, "total": p["total"], "params": p["params"]})
    return rows


def run_point(report, statistics: Statistics, label: str | None = None) -> dict:
    """A finished run as a measured point of the trade-off figure: the ratio it achieved, its measured
    ``total`` (:func:`measured_errors`), its label and wiki perplexity (None if not measured)."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    return {"ratio": data.get("ratio_achieved"), "total": measured_errors(data, statistics).get("total"),
            "label": label or f"{data.get('method', '?')} {data.get('ratio_target')}",
            "ppl": data.get("ppl_compressed")}
