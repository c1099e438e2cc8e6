"""Rewriting attention modules of the compressed format to smaller inner widths (MoDeGPT, Olica)."""
from __future__ import annotations

import torch
from torch import nn

from .arch import partial_rotary
from .ops import head_columns, rotary_pair_scores, select_outputs, set_linear, vo_decomposition
from .timing import stage


def rotary_pairs_refusal(arch, config, model_type: str) -> str | None:
    """MoDeGPT and Olica cut q/k by whole rotary pairs; with partial rotary embeddings (Phi-3 configs
    with partial_rotary_factor < 1) the unrotated dims are not pairs: refused."""
    if config is not None and partial_rotary(config):
        return (f"cutting q/k by whole rotary pairs needs every head dim rotated; this {model_type} config "
                "rotates only part of each head (partial_rotary_factor < 1)")
    return None


def _column_scale(norm, heads: int, hd: int) -> torch.Tensor | None:
    """(heads, hd) factor a q/k norm applies to each output column (per head or whole projection)."""
    return None if norm is None else norm.scale().detach().double().reshape(-1, hd).expand(heads, hd)


def _select_norm(norm, rows: torch.Tensor, heads: int, hd: int, per_head: bool) -> None:
    """Keep a q/k norm's scales for the kept columns ``rows`` (indices into heads·hd); a per-head norm
    gets one scale row per head, since kv groups keep different pairs. Its mean stays over head_dim."""
    if norm is None:
        return
    w = norm.weight.detach().reshape(-1, hd).expand(heads, hd).reshape(-1)[rows]
    norm.weight = nn.Parameter(w.view(heads, -1) if per_head else w, requires_grad=False)


def keep_rotary_pairs(attn, gram: torch.Tensor, keep_pairs: int) -> torch.Tensor:
    """Cut q_proj/k_proj (and their norms) to ``keep_pairs`` rotary pairs per head; returns the scores
    (Hkv, hd/2). A q/k norm's scale weighs each column's second moment (its RMS factor is shared by the
    columns of a head, so it does not change the ranking)."""
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    g = gram.double()
    wq = attn.q_proj.weight.double().view(H, hd, -1)   # (H, hd, d_in)
    wk = attn.k_proj.weight.double().view(Hkv, hd, -1)
    q_diag = torch.einsum("hid,de,hie->hi", wq, g, wq)  # diag(W_qᵀ G W_q) per head
    k_diag = torch.einsum("hid,de,hie->hi", wk, g, wk)
    if attn.q_proj.bias is not None:  # biases shift the outputs: add their second moment
        q_diag += attn.q_proj.bias.double().view(H, hd) ** 2
        k_diag += attn.k_proj.bias.double().view(Hkv, hd) ** 2
    if attn.q_norm is not None:
        q_diag = q_diag * _column_scale(attn.q_norm, H, hd) ** 2
        k_diag = k_diag * _column_scale(attn.k_norm, Hkv, hd) ** 2
    scores = rotary_pair_scores(q_diag, k_diag, attn.num_key_value_groups)
    if keep_pairs >= hd // 2:
        return scores
    pairs = torch.sort(torch.topk(scores, keep_pairs, dim=-1).indices, dim=-1).values  # (Hkv, r)
    k_rows = torch.cat([g_ * hd + head_columns(pairs[g_], hd) for g_ in range(Hkv)])
    q_rows = torch.cat([h * hd + head_columns(pairs[h // attn.num_key_value_groups], hd)
                        for h in range(H)])
    select_outputs(attn.q_proj, q_rows)
    select_outputs(attn.k_proj, k_rows)
    per_head = attn.qk_norm == "head"
    _select_norm(attn.q_norm, q_rows, H, hd, per_head)
    _select_norm(attn.k_norm, k_rows, Hkv, hd, per_head)
    attn.qk_dim = 2 * keep_pairs
    attn.register_buffer("rope_index", pairs.to(attn.q_proj.weight.device))
    return scores


def fold_value_bias(attn) -> None:
    """Move v_proj's bias to o_proj's, exactly: each row of softmax weights sums to one, so a value
    bias b reaches the output as the constant Σ_h W_O,h b_g(h) whatever the tokens. The low-rank
    rewrite then sees only W_V x (the bias is not weighted by the input correlation, so cutting it with
    the values loses it: Qwen2's value biases are large)."""
    Hkv, hd, G = attn.num_kv_heads, attn.v_dim, attn.num_key_value_groups
    b = attn.v_proj.bias.detach().double().view(Hkv, hd).repeat_interleave(G, dim=0)  # (H, hd)
    const = attn.o_proj.weight.double() @ b.reshape(-1)                              # (d_mid,)
    if attn.o_proj.bias is not None:
        const = const + attn.o_proj.bias.double()
    like = attn.o_proj.weight
    attn.o_proj.bias = nn.Parameter(const.to(like.device, like.dtype), requires_grad=False)
    attn.v_proj.bias = nn.Parameter(torch.zeros_like(attn.v_proj.bias), requires_grad=False)


def compress_value_output(attn, gram: torch.Tensor, keep: int) -> list[list[float]]:
    """Rewrite v_proj/o_proj to ``keep`` value dims per kv group; returns each group's spectrum."""
    if attn.v_proj.bias is not None:
        fold_value_bias(attn)
    H, Hkv, hd, G = attn.num_heads, attn.num_kv_heads, attn.v_dim, attn.num_key_value_groups
    wv = attn.v_proj.weight.double().view(Hkv, hd, -1)          # (Hkv, hd, d_in)
    wo = attn.o_proj.weight.double().view(-1, H, hd)             # (d_mid, H, hd)
    new_v, new_o, spectra = [], [], []
    for g in range(Hkv):
        heads = range(g * G, (g + 1) * G)
        w_o = torch.cat([wo[:, h, :].T for h in heads], dim=1)  # (hd, G·d_mid)
        m, w_o_new, s2 = vo_decomposition(wv[g].T, w_o, gram, keep)
        new_v.append((wv[g].T @ m).T)                            # (keep, d_in)
        new_o.extend(w_o_new.view(keep, G, -1).unbind(1))       # per head (keep, d_mid)
        spectra.append((s2 ** 2).tolist())
    zero_bias = None if attn.v_proj.bias is None else attn.v_proj.bias.new_zeros(Hkv * keep)
    set_linear(attn.v_proj, torch.cat(new_v), zero_bias)
    set_linear(attn.o_proj, torch.cat([o.T for o in new_o], dim=1))
    attn.v_dim = keep
    return spectra


def compress_attention(layer, hidden: list, kwargs: list, qk_pairs: int, v_dim: int, dense_batches: int = 0):
    """Cut one block's attention to ``qk_pairs`` rotary pairs and ``v_dim`` value dims per kv group,
    from the correlation of its normalised input over the calibration batches.

    The correlation is taken from the input norm's output directly (what q/k/v read), so the dense
    attention runs only on the first ``dense_batches`` batches (for in-sample errors; 0 with a
    held-out probe). Returns (dense outputs of those batches, new outputs, input correlation,
    rotary-pair scores, VO spectra).
    """
    from .calibration import Gram

    attn = layer.self_attn
    with stage("statistics"):
        gram = Gram.of([layer.input_layernorm(h) for h in hidden]).mean
    with stage("errors"):
        dense = [layer.attention_out(h, k) for h, k in zip(hidden[:dense_batches], kwargs)]
    with stage("decompositions"):
        qk_scores = keep_rotary_pairs(attn, gram, qk_pairs)
        vo_spectra = compress_value_output(attn, gram, v_dim) if v_dim < attn.v_dim else []
    with stage("forwards"):
        new = [layer.attention_out(h, k) for h, k in zip(hidden, kwargs)]
    return dense, new, gram, qk_scores, vo_spectra
