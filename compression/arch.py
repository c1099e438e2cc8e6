"""The architecture table: ``config.model_type`` -> where each part of a decoder lives.

Every method reads and writes models through :func:`view`, a uniform picture of embeddings, blocks
(attention q/k/v/o, MLP gate/up/down, two norms) and the head. Architectures are data, not code: a new
decoder with the usual pre-norm layout is one more :class:`Arch` row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    """Attribute paths (dotted, relative to the causal-LM module or to one block)."""

    decoder: str = "model"  # the base model that owns embeddings, blocks and final norm
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    norm_kind: str = "rms"
    rope: bool = True


LLAMA_LIKE = Arch()
ARCHITECTURES: dict[str, Arch] = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "compressed_decoder": LLAMA_LIKE,  # our own format (compression.modeling) keeps these names
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(k for k in ARCHITECTURES if k != "compressed_decoder"))
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported model types: {supported}"
        )
    return ARCHITECTURES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for name in parents:
        root = getattr(root, name)
    setattr(root, last, module)


@dataclass
class BlockView:
    """One decoder block seen through the table."""

    index: int
    module: nn.Module
    arch: Arch

    def get(self, part: str) -> nn.Module:
        return get_path(self.module, getattr(self.arch, part))

    def set(self, part: str, module: nn.Module) -> None:
        set_path(self.module, getattr(self.arch, part), module)

    q = property(lambda self: self.get("q"))
    k = property(lambda self: self.get("k"))
    v = property(lambda self: self.get("v"))
    o = property(lambda self: self.get("o"))
    gate = property(lambda self: self.get("gate"))
    up = property(lambda self: self.get("up"))
    down = property(lambda self: self.get("down"))
    attn_norm = property(lambda self: self.get("attn_norm"))
    mlp_norm = property(lambda self: self.get("mlp_norm"))


@dataclass
class ModelView:
    """Uniform read-and-write access to a causal LM of any supported architecture."""

    model: nn.Module
    arch: Arch

    @property
    def config(self):
        """The original architecture's config (a compressed model's inner base model holds it)."""
        return self.decoder.config

    @property
    def decoder(self) -> nn.Module:
        return get_path(self.model, self.arch.decoder)

    @property
    def layers(self) -> nn.ModuleList:
        return get_path(self.model, self.arch.blocks)

    @property
    def blocks(self) -> list[BlockView]:
        return [BlockView(i, m, self.arch) for i, m in enumerate(self.layers)]

    @property
    def embed(self) -> nn.Embedding:
        return get_path(self.model, self.arch.embed)

    @property
    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.arch.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return get_path(self.model, self.arch.lm_head)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


def view(model: nn.Module) -> ModelView:
    """The uniform view of ``model``; unknown architectures fail with the list of supported ones."""
    return ModelView(model, arch_for(model.config))


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, shared (tied) tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():  # nn.Module.parameters() already de-duplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def block_params(model: nn.Module) -> int:
    """Parameters of the decoder blocks only (embeddings, final norm and head excluded)."""
    return count_params(view(model).layers)
