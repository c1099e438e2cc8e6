"""The architecture table: ``config.model_type`` -> where each part of a decoder lives and how it computes.

Every method reads and writes models through :func:`view`, a uniform picture of embeddings, blocks
(attention q/k/v/o, MLP gate/up/down, norms) and the head. Architectures are data, not code: a new
decoder is one more :class:`Arch` row. What a row records (checked against transformers' modeling files):

- module paths, with fused projections (Phi-3's ``qkv_proj`` rows [q; k; v], ``gate_up_proj`` rows
  [gate; up]) split on conversion to the compressed format;
- norm placement: pre-norms before each sub-block (Llama), norms on each sub-block's output before the
  residual add (Gemma 2/3 have both, OLMo 2 only these), and the RMSNorm flavour (Gemma: scale
  (1 + w), applied in float32 like OLMo 2);
- q/k norms: per head over head_dim (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
- config attributes holding the activation, the attention temperature and Gemma 2's soft-caps;
- biases the config does not announce (Qwen2's q/k/v).

Gemma's embedding scale (× sqrt(hidden)), rotary tables and sliding-window masks are computed by the
original base model, which the compressed format keeps, so no row needs them. Which method cannot be
exact on which architecture, and why, each method says itself (``Method.refusal``, asked through
:func:`compression.methods.refusal`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .modeling_compressed import Shape


@dataclass(frozen=True)
class Arch:
    """Attribute paths (dotted, relative to the causal-LM module or to one block) and block facts."""

    decoder: str = "model"  # the base model that owns embeddings, blocks and final norm
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None          # fused [q; k; v] projection (replaces q/k/v)
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None      # fused [gate; up] projection (replaces gate/up)
    down: str = "mlp.down_proj"
    attn_norm: str | None = "input_layernorm"            # before attention
    mlp_norm: str | None = "post_attention_layernorm"    # before the MLP
    attn_post_norm: str | None = None                    # on the attention output, before the add
    mlp_post_norm: str | None = None                     # on the MLP output, before the add
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm: str | None = None      # "head": over head_dim per head; "proj": over the whole projection
    norm_offset: float = 0.0        # RMSNorm scale is (offset + w)
    norm_upcast: bool = False       # the scale multiplies in float32, before casting back
    qkv_bias: bool = False          # q/k/v have biases whatever config.attention_bias says
    act: str = "hidden_act"         # config attribute naming the MLP activation
    query_scalar: str | None = None  # config attribute s: attention temperature s^-1/2 (else head_dim)
    attn_softcap: str | None = None  # config attribute: tanh cap of attention scores
    logit_softcap: str | None = None  # config attribute: tanh cap of the final logits


LLAMA_LIKE = Arch()
GEMMA = Arch(mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
             mlp_post_norm="post_feedforward_layernorm", norm_offset=1.0, norm_upcast=True,
             act="hidden_activation", query_scalar="query_pre_attn_scalar",
             logit_softcap="final_logit_softcapping")
ARCHITECTURES: dict[str, Arch] = {
    "llama": LLAMA_LIKE,
    "qwen2": Arch(qkv_bias=True),
    "mistral": LLAMA_LIKE,
    "qwen3": Arch(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="head"),
    "gemma2": replace(GEMMA, attn_softcap="attn_logit_softcapping"),
    # Gemma 3 keeps attn_logit_softcapping in its config but its attention never applies it.
    "gemma3_text": replace(GEMMA, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="head"),
    "phi3": Arch(q=None, k=None, v=None, qkv="self_attn.qkv_proj", gate=None, up=None,
                 gate_up="mlp.gate_up_proj"),
    "olmo2": Arch(attn_norm=None, mlp_norm=None, attn_post_norm="post_attention_layernorm",
                  mlp_post_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm",
                  k_norm="self_attn.k_norm", qk_norm="proj", norm_upcast=True),
    # our own format (compression.modeling_compressed) keeps the Llama names
    "compressed_decoder": Arch(attn_post_norm="attn_output_norm", mlp_post_norm="mlp_output_norm",
                               q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
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


def partial_rotary(config) -> bool:
    """Whether a config rotates only part of each head (Phi-3's partial_rotary_factor < 1)."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return factor is not None and factor < 1.0


def get_path(root: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for name in parents:
        root = getattr(root, name)
    setattr(root, last, module)


def split_rows(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """A fused Linear cut into Linears of ``sizes`` output rows each (bias cut alike)."""
    parts, start = [], 0
    for n in sizes:
        part = nn.Linear(linear.in_features, n, bias=linear.bias is not None, device="meta")
        part.weight = nn.Parameter(linear.weight[start:start + n].detach().clone(), requires_grad=False)
        if linear.bias is not None:
            part.bias = nn.Parameter(linear.bias[start:start + n].detach().clone(), requires_grad=False)
        parts.append(part)
        start += n
    return parts


@dataclass
class BlockView:
    """One decoder block seen through the table."""

    index: int
    module: nn.Module
    arch: Arch

    def get(self, part: str) -> nn.Module | None:
        return get_path(self.module, getattr(self.arch, part))

    def set(self, part: str, module: nn.Module) -> None:
        set_path(self.module, getattr(self.arch, part), module)

    def projections(self, shape: Shape) -> dict[str, nn.Linear]:
        """q, k, v, o, gate, up, down as separate Linears (fused ones split, the others as they are)."""
        out = {part: self.get(part) for part in ("q", "k", "v", "o", "gate", "up", "down")}
        if self.arch.qkv is not None:
            hd = shape.head_dim
            out["q"], out["k"], out["v"] = split_rows(
                self.get("qkv"), [shape.heads * hd, shape.kv_heads * hd, shape.kv_heads * hd])
        if self.arch.gate_up is not None:
            out["gate"], out["up"] = split_rows(self.get("gate_up"), [shape.intermediate] * 2)
        return out

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
    def shape(self) -> Shape:
        return Shape.of(self.config)

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
        return self.shape.hidden

    @property
    def num_heads(self) -> int:
        return self.shape.heads

    @property
    def num_kv_heads(self) -> int:
        return self.shape.kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

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
