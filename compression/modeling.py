"""The compressed-model format, project side: conversion from any table architecture and block shapes.

The model classes live in :mod:`compression.modeling_compressed`, which imports nothing from this
project (a saved folder carries it); this module adds what needs the architecture table:
:func:`to_compressed`, :func:`dense_spec` (a block's shape dict before compression) and
:func:`spec_params` (its parameter count, the forecast before any work).
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import ARCHITECTURES, Arch, BlockView, arch_for, view
from .modeling_compressed import (MLP, Attention, BlockMath, CompressedConfig,  # noqa: F401  (re-exported)
                                  CompressedDecoderLayer, CompressedForCausalLM, RMSNorm, Shape,
                                  eager_attention, rotate_half)


def _sliding_window(base, layer_idx: int) -> int | None:
    """The window of layer ``layer_idx``: per layer type where the config has them, else model-wide."""
    window = getattr(base, "sliding_window", None)
    types = getattr(base, "layer_types", None)
    if types is None or layer_idx >= len(types):
        return window
    return window if types[layer_idx] == "sliding_attention" else None


def dense_spec(base, layer_idx: int = 0) -> dict:
    """The spec of an unmodified block ``layer_idx`` of ``base``."""
    arch, shape = arch_for(base), Shape.of(base)
    bias = bool(getattr(base, "attention_bias", False))
    return {"d_in": shape.hidden, "d_mid": shape.hidden, "d_out": shape.hidden,
            "qk_dim": shape.head_dim, "v_dim": shape.head_dim, "mlp_dim": shape.intermediate,
            "qkv_bias": bias or arch.qkv_bias, "o_bias": bias,
            "mlp_bias": bool(getattr(base, "mlp_bias", False)),
            "pre_norm": arch.attn_norm is not None, "post_norm": arch.attn_post_norm is not None,
            "qk_norm": arch.qk_norm, "sliding_window": _sliding_window(base, layer_idx)}


def block_math(base, arch: Arch) -> dict:
    """The model-wide block maths of ``base`` (see :class:`BlockMath`), read through its table row."""
    value = lambda name: None if name is None else getattr(base, name, None)  # noqa: E731
    scalar = value(arch.query_scalar) or Shape.of(base).head_dim
    return {"act": getattr(base, arch.act), "norm_eps": getattr(base, "rms_norm_eps", 1e-6),
            "attn_scale": scalar ** -0.5, "norm_offset": arch.norm_offset, "norm_upcast": arch.norm_upcast,
            "attn_softcap": value(arch.attn_softcap), "logit_softcap": value(arch.logit_softcap)}


def spec_params(spec: dict, base) -> int:
    """Parameters of a block with shape ``spec``: a forecast before any compression work."""
    shape = Shape.of(base)
    heads, kv = shape.heads, shape.kv_heads
    d_in, d_mid, d_out, m = spec["d_in"], spec["d_mid"], spec["d_out"], spec["mlp_dim"]
    qk, v = spec["qk_dim"], spec["v_dim"]
    n = d_in * (heads + kv) * qk + d_in * kv * v + heads * v * d_mid      # q, k, v, o
    n += 2 * d_mid * m + m * d_out                                         # gate, up, down
    n += spec.get("branch_rank", 0) * (d_mid + d_out)                      # low-rank branch
    n += d_in * d_mid * bool(spec.get("attn_skip")) + d_mid * d_out * bool(spec.get("mlp_skip"))
    n += (d_in + d_mid) * (spec.get("pre_norm", True) and spec.get("norm_scale", True))
    n += (d_mid + d_out) * spec.get("post_norm", False)
    if spec.get("qk_norm") == "proj" or spec.get("qk_norm_per_head"):
        n += (heads + kv) * qk                                             # one scale per q/k column
    elif spec.get("qk_norm") == "head":
        n += 2 * qk                                                        # shared by all heads
    if spec.get("qkv_bias"):
        n += (heads + kv) * qk + kv * v
    n += d_mid * spec.get("o_bias", False) + (2 * m + d_out) * spec.get("mlp_bias", False)
    return n


def _adopt_norm(target: nn.Module | None, source: nn.Module | None) -> None:
    if source is not None:
        target.weight = source.weight


def to_compressed(model: nn.Module) -> CompressedForCausalLM:
    """Convert an HF causal LM (any supported architecture) into the compressed format, in place.

    The weights are moved, not copied (fused projections are split into copies), and the logits are
    unchanged: the blocks start as dense :class:`CompressedDecoderLayer` s with the original norms.
    """
    if isinstance(model, CompressedForCausalLM):
        return model
    mv = view(model)
    base, shape = mv.config, mv.shape
    config = CompressedConfig(base_config=base.to_dict(), layer_specs=[], block=block_math(base, mv.arch))
    config._attn_implementation = base._attn_implementation
    with torch.device("meta"):
        shell = CompressedForCausalLM(config)
    shell.model, shell.lm_head = mv.decoder, mv.lm_head
    layers = []
    for block in mv.blocks:
        with torch.device("meta"):
            layer = CompressedDecoderLayer(base, dense_spec(base, block.index), block.index, shell.math)
        target = BlockView(block.index, layer, ARCHITECTURES["compressed_decoder"])
        for part, linear in block.projections(shape).items():
            target.set(part, linear)                       # adopt the Linear modules themselves
        for part in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm"):
            _adopt_norm(target.get(part), block.get(part))
        layers.append(layer)
    shell.model.layers = nn.ModuleList(layers)
    shell.sync_config()
    shell.generation_config = model.generation_config
    return shell.eval()

