"""The compressed-model format, project side: conversion from any table architecture and block shapes.

The model classes live in :mod:`compression.modeling_compressed`, which imports nothing from this
project (a saved folder carries it); this module adds what needs the architecture table:
:func:`to_compressed`, :func:`dense_spec` (a block's shape dict before compression) and
:func:`spec_params` (its parameter count, the forecast before any work).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import ARCHITECTURES, Arch, BlockView, arch_for, view
from .modeling_compressed import (MLP, Attention, BlockMath, CompressedConfig,  # noqa: F401  (re-exported)
                                  CompressedDecoderLayer, CompressedForCausalLM, RMSNorm, Shape,
                                  eager_attention, rotate_half)

# the parts of a block, by their names in the architecture table
LINEAR_PARTS = ("q", "k", "v", "o", "gate", "up", "down")
NORM_PARTS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm")


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
            "pre_norm": arch.attn_norm is not None, "norm_scale": arch.attn_norm is not None,
            "post_norm": arch.attn_post_norm is not None,
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
        for part in NORM_PARTS:
            _adopt_norm(target.get(part), block.get(part))
        layers.append(layer)
    shell.model.layers = nn.ModuleList(layers)
    shell.sync_config()
    shell.generation_config = model.generation_config
    return shell.eval()



# --- export: a standard architecture where the result is one, else this format with its own code ---

def _nonstandard(model: CompressedForCausalLM) -> str | None:
    """Why ``model`` is not its original architecture with a smaller ``intermediate_size``, or None."""
    base = model.model.config
    widths = {layer.spec()["mlp_dim"] for layer in model.model.layers}
    for i, layer in enumerate(model.model.layers):
        spec, dense = layer.spec(), dense_spec(base, i)
        changed = sorted(k for k in dense.keys() | spec.keys()
                         if k != "mlp_dim" and spec.get(k, False) != dense.get(k, False))
        if spec.get("branch_rank"):
            return f"layer {i} has a low-rank calibration branch (rank {spec['branch_rank']})"
        if changed:
            return f"layer {i} differs from a dense {base.model_type} block in " + ", ".join(
                f"{k} ({spec.get(k)} vs {dense.get(k)})" for k in changed)
    if len(widths) > 1:
        return f"MLP widths differ across layers ({min(widths)}..{max(widths)})"
    return None


def export_format(model) -> tuple[str, str]:
    """("native", reason) when ``model`` is exactly a standard transformers architecture (layer dropping
    keeps the original class; MLP-only pruning with one width in every layer is the original class with
    a smaller ``intermediate_size``), else ("remote_code", reason): the compressed format, saved with
    its own modeling file so ``trust_remote_code=True`` loads it without this project."""
    if not isinstance(model, CompressedForCausalLM):
        return "native", f"the model is still a {type(model).__name__} (whole blocks dropped at most)"
    why = _nonstandard(model)
    if why is not None:
        return "remote_code", why
    width = model.model.layers[0].mlp.gate_proj.out_features if len(model.model.layers) else None
    return "native", (f"MLP-only pruning with uniform widths: a {model.model.config.model_type} model "
                      f"with intermediate_size {width}")


def native_config(model: CompressedForCausalLM):
    """The original architecture's config of a model :func:`export_format` calls native: the base
    config with the blocks' MLP width (read from the first block as it is: a streamed model's
    placeholder is not loaded)."""
    base = copy.deepcopy(model.model.config)
    first = next(model.model.layers.children(), None)
    if first is not None:
        base.intermediate_size = first.mlp.gate_proj.out_features
    return base


def native_block(layer: CompressedDecoderLayer, arch: Arch) -> dict[str, torch.Tensor]:
    """The tensors of a compressed-format block under ``arch``'s names, relative to the block (fused
    projections concatenated again): the state dict of that architecture's block."""
    src = BlockView(0, layer, ARCHITECTURES["compressed_decoder"])
    out = {}
    for part in LINEAR_PARTS + NORM_PARTS:
        path = getattr(arch, part)
        if path is not None and src.get(part) is not None:
            out.update({f"{path}.{n}": t for n, t in src.get(part).state_dict().items()})
    if arch.qkv is not None:
        for name in ("weight", "bias"):
            parts = [getattr(src.get(p), name) for p in ("q", "k", "v")]
            if parts[0] is not None:
                out[f"{arch.qkv}.{name}"] = torch.cat(parts)
    if arch.gate_up is not None:
        out[f"{arch.gate_up}.weight"] = torch.cat([src.gate.weight, src.up.weight])
    return out


def to_native(model: CompressedForCausalLM) -> nn.Module:
    """The original architecture's class holding the weights of a model :func:`export_format` calls
    native (fused projections fused again); logits are unchanged."""
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_config(native_config(model), dtype=model.lm_head.weight.dtype).eval()
    nv = view(native)
    with torch.no_grad():
        for block, layer in zip(nv.blocks, model.model.layers):
            block.module.load_state_dict(native_block(layer, nv.arch))
        outside = {k: v for k, v in model.model.state_dict().items() if not k.startswith("layers.")}
        nv.decoder.load_state_dict(outside, strict=False)
        if not nv.tied:
            nv.lm_head.weight.copy_(model.lm_head.weight)
    native.generation_config = model.generation_config
    return native


def save_model(model, tokenizer, folder) -> tuple[str, str]:
    """Save ``model`` (and ``tokenizer``) in the most portable format that is exact; returns
    :func:`export_format`'s (format, reason) so callers can record which case applied."""
    fmt, reason = export_format(model)
    (to_native(model) if fmt == "native" and isinstance(model, CompressedForCausalLM) else model) \
        .save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return fmt, reason
