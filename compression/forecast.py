"""Parameter forecast of a plan before any work: what a config will leave of a model.

Used by the app's live forecast and by callers that want to check a target is reachable. Numbers come
from block shapes alone (:func:`compression.modeling.spec_params`), so they are exact for uniform and
manual plans; automatic allocation keeps the mean sparsity, hence the same count up to rounding, and
layer dropping by ratio assumes equal-sized blocks (true for every supported architecture).
"""
from __future__ import annotations

from .arch import count_params, view
from .layerdrop import LayerDropConfig, block_sizes, layers_to_drop
from .modegpt import MoDeGPTConfig
from .modeling import dense_spec, spec_params
from .olica import OlicaConfig
from .slicegpt import SliceGPTConfig, plan_widths, sliced_specs


def _shrunk_spec(base, sparsity: float, attn_share: float = 1.0) -> dict:
    """Dense block spec with inner widths cut as MoDeGPT/Olica cut them at ``sparsity``."""
    spec = dense_spec(base)
    hd, m = spec["qk_dim"], spec["mlp_dim"]
    D = base.hidden_size
    H = base.num_attention_heads
    Hkv = getattr(base, "num_key_value_heads", None) or H
    p_attn = D * (H + Hkv) * hd + D * Hkv * hd + H * hd * D
    p_mlp = 3 * D * m
    s_attn = min(0.95, attn_share * sparsity)
    s_mlp = min(max((sparsity * (p_attn + p_mlp) - s_attn * p_attn) / p_mlp, 0.0), 0.95)
    spec.update(qk_dim=2 * max(1, round((1 - s_attn) * hd / 2)), v_dim=max(1, round((1 - s_attn) * hd)),
                mlp_dim=max(1, round((1 - s_mlp) * m)))
    return spec


def forecast(model, config) -> dict[str, int | float]:
    """``{"params", "block_params", "ratio"}`` that ``compress(model, config, ...)`` will leave."""
    mv = view(model)
    base = mv.config
    total, blocks = count_params(model), count_params(mv.layers)
    sizes = block_sizes(mv)
    if isinstance(config, LayerDropConfig):
        if config.layers is not None:
            config.validate_for(len(sizes))
            drop = config.layers
        else:  # equal blocks: which ones go does not change the count
            drop = layers_to_drop(list(range(len(sizes))), sizes, config.ratio)
        new_blocks = blocks - sum(sizes[i] for i in drop)
    elif isinstance(config, SliceGPTConfig):
        new_blocks = sum(spec_params(s, base) for s in sliced_specs(base, plan_widths(config, base)))
    elif isinstance(config, (MoDeGPTConfig, OlicaConfig)):
        L = len(sizes)
        alloc = config.allocation
        phi = alloc.per_layer if alloc.kind == "manual" else [config.ratio] * L
        share = getattr(config, "attn_share", 1.0)
        new_blocks = sum(spec_params(_shrunk_spec(base, p, share), base) for p in phi)
    else:
        raise TypeError(f"no forecast for {type(config).__name__}")
    return {"params": total - blocks + new_blocks, "block_params": new_blocks,
            "ratio": 1 - new_blocks / blocks if blocks else 0.0}
