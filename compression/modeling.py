"""The compressed-model format: one generic pre-norm decoder block with per-layer shapes.

Every method except plain layer dropping writes its result into this format, so SliceGPT, MoDeGPT and
Olica share one save/load path. A block (shapes per layer, ``D`` = original hidden size)::

    x            (B, T, d_in)                       residual stream in this layer's input basis
    h = norm(x)                                     RMSNorm over the *original* width D
    a = attn(h)  q/k: d_in -> H*qk_dim, v: d_in -> Hkv*v_dim, o: H*v_dim -> d_mid
    x = x @ S_attn + a                              S_attn: (d_in, d_mid) skip matrix, or identity
    h = norm(x)
    m = mlp(h)   gate/up: d_mid -> mlp_dim, down: mlp_dim -> d_out
    m = m + (h @ A) @ B                             optional low-rank branch (Olica's calibration)
    x = x @ S_mlp + m                               S_mlp: (d_mid, d_out) skip matrix, or identity

With RoPE, ``qk_dim < head_dim`` keeps whole rotary pairs: ``rope_index[g]`` lists the kept frequency
indices of kv group ``g``; the kept q/k columns are ordered [pairs' first halves, second halves] so the
usual rotate-half formula applies. Embeddings, rotary tables, masks, the KV cache and the final norm
come from the original architecture's own base model (``AutoModel.from_config``), so no HF forward
code is copied here; this file only adds the block.

Saved as safetensors plus a config (``model_type = "compressed_decoder"``) holding the original config
and one shape dict per layer; ``import compression`` registers it with the Auto classes.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin,
                          PretrainedConfig, PreTrainedModel)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .arch import LLAMA_LIKE, BlockView, view


class CompressedConfig(PretrainedConfig):
    """The original model's config (``base_config``) plus one shape dict per layer (``layer_specs``)."""

    model_type = "compressed_decoder"
    COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, base_config: dict | None = None, layer_specs: list[dict] | None = None,
                 **kwargs):
        self.base_config = base_config or {}
        self.layer_specs = layer_specs or []
        for key in self.COPIED:  # generation and lm-eval read these off the outer config
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        kwargs.setdefault("tie_word_embeddings", self.base_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    def build_base(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class RMSNorm(nn.Module):
    """RMSNorm over ``width`` features that divides by the RMS of the *original* width.

    After SliceGPT deletes directions the stream is narrower, but its norm is (nearly) unchanged, so the
    mean of squares must still be taken over ``mean_dim`` = the original hidden size. ``scale=False``
    gives the scale-free norm left behind once the scale is folded into the next linear layers.
    """

    def __init__(self, width: int, mean_dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps
        self.weight = nn.Parameter(torch.ones(width)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        x = (x * torch.rsqrt(variance + self.eps)).to(dtype)
        return x if self.weight is None else self.weight * x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with per-layer q/k and v head widths and optional kept rotary pairs."""

    def __init__(self, base, spec: dict, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = base, layer_idx
        self.num_heads = base.num_attention_heads
        self.num_kv_heads = getattr(base, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(base, "head_dim", None) or base.hidden_size // self.num_heads
        self.qk_dim, self.v_dim = spec["qk_dim"], spec["v_dim"]
        self.scaling = self.head_dim**-0.5  # the original temperature, whatever qk_dim is kept
        self.is_causal = True
        qkv_bias = spec.get("qkv_bias", False)
        self.q_proj = nn.Linear(spec["d_in"], self.num_heads * self.qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(spec["d_in"], self.num_kv_heads * self.qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(spec["d_in"], self.num_kv_heads * self.v_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, spec["d_mid"], bias=spec.get("o_bias", False))
        # (kv groups, kept pairs): the frequency index of each kept rotary pair; None keeps all.
        partial = self.qk_dim < self.head_dim
        self.register_buffer("rope_index", torch.zeros(self.num_kv_heads, self.qk_dim // 2,
                                                       dtype=torch.long) if partial else None)
        self._rope_tables_index = None  # (rope_index identity, q index, kv index), see rotary()

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor):
        """cos/sin (B, T, head_dim) -> (cos_q, sin_q) (B, H, T, qk_dim), (cos_k, sin_k) (B, Hkv, T, qk_dim)
        (with every pair kept: the full tables, broadcast over heads)."""
        if self.rope_index is None:
            full = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
            return full, full
        idx_q, idx_kv = self._rotary_indices()
        table = lambda t, idx: t[:, :, idx].transpose(1, 2)  # noqa: E731  (B, T, h, qk) -> (B, h, T, qk)
        return (table(cos, idx_q), table(sin, idx_q)), (table(cos, idx_kv), table(sin, idx_kv))

    def _rotary_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the rotary tables, both halves of every kept pair: (H, qk_dim) for the query
        heads and (Hkv, qk_dim) for the kv groups. Built once, not per step (decode is dominated by
        per-op overhead at this size); rebuilt when ``rope_index`` is replaced, edited or moved."""
        ident = (self.rope_index.data_ptr(), self.rope_index._version, self.rope_index.device)
        if self._rope_tables_index is None or self._rope_tables_index[0] != ident:
            kv = torch.cat([self.rope_index, self.rope_index], dim=-1)
            self._rope_tables_index = (ident, kv.repeat_interleave(self.num_key_value_groups, dim=0), kv)
        return self._rope_tables_index[1:]

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                **kwargs):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.v_dim).transpose(1, 2)
        (cos_q, sin_q), (cos_k, sin_k) = self.rotary(*position_embeddings)
        q = q * cos_q + rotate_half(q) * sin_q
        k = k * cos_k + rotate_half(k) * sin_k
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None) \
            if self.config._attn_implementation != "eager" else None
        if attend is None:
            attend = eager_attention
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                        sliding_window=getattr(self.config, "sliding_window", None), **kwargs)
        return self.o_proj(out.reshape(B, T, -1)), None


def eager_attention(module, q, k, v, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention (B, H, T, d) with GQA by repetition; returns (B, T, H, d_v)."""
    g = module.num_key_value_groups
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


class MLP(nn.Module):
    """Gated MLP, plus Olica's optional parallel low-rank correction ``(h @ A) @ B``."""

    def __init__(self, base, spec: dict):
        super().__init__()
        bias = spec.get("mlp_bias", False)
        self.gate_proj = nn.Linear(spec["d_mid"], spec["mlp_dim"], bias=bias)
        self.up_proj = nn.Linear(spec["d_mid"], spec["mlp_dim"], bias=bias)
        self.down_proj = nn.Linear(spec["mlp_dim"], spec["d_out"], bias=bias)
        self.act_fn = ACT2FN[base.hidden_act]
        rank = spec.get("branch_rank", 0)
        self.branch_in = nn.Linear(spec["d_mid"], rank, bias=False) if rank else None
        self.branch_out = nn.Linear(rank, spec["d_out"], bias=False) if rank else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))
        if self.branch_in is not None:
            out = out + self.branch_out(self.branch_in(h))
        return out


class CompressedDecoderLayer(nn.Module):
    """A pre-norm decoder block whose widths come from ``spec`` (see the module docstring)."""

    def __init__(self, base, spec: dict, layer_idx: int):
        super().__init__()
        D, eps = base.hidden_size, getattr(base, "rms_norm_eps", 1e-6)
        scale = spec.get("norm_scale", True)
        self.input_layernorm = RMSNorm(spec["d_in"], D, eps, scale)
        self.self_attn = Attention(base, spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec["d_mid"], D, eps, scale)
        self.mlp = MLP(base, spec)
        self.attn_skip = nn.Linear(spec["d_in"], spec["d_mid"], bias=False) if spec.get("attn_skip") else None
        self.mlp_skip = nn.Linear(spec["d_mid"], spec["d_out"], bias=False) if spec.get("mlp_skip") else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        x = hidden_states                                            # (B, T, d_in)
        a, _ = self.self_attn(self.input_layernorm(x), position_embeddings=position_embeddings,
                              attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        x = (x if self.attn_skip is None else self.attn_skip(x)) + a  # (B, T, d_mid)
        m = self.mlp(self.post_attention_layernorm(x))
        return (x if self.mlp_skip is None else self.mlp_skip(x)) + m  # (B, T, d_out)

    def attention_out(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What attention adds to the stream for input ``x`` (calibration helper, no cache)."""
        return self.self_attn(self.input_layernorm(x), position_embeddings=kwargs["position_embeddings"],
                              attention_mask=kwargs.get("attention_mask"))[0]

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the stream for its block-internal input ``x``."""
        return self.mlp(self.post_attention_layernorm(x))

    def spec(self) -> dict:
        """The shape dict that rebuilds this layer (read off the modules, so never stale)."""
        attn, mlp = self.self_attn, self.mlp
        return {
            "d_in": attn.q_proj.in_features, "d_mid": attn.o_proj.out_features,
            "d_out": mlp.down_proj.out_features, "qk_dim": attn.qk_dim, "v_dim": attn.v_dim,
            "mlp_dim": mlp.gate_proj.out_features,
            "branch_rank": 0 if mlp.branch_in is None else mlp.branch_in.out_features,
            "attn_skip": self.attn_skip is not None, "mlp_skip": self.mlp_skip is not None,
            "norm_scale": self.input_layernorm.weight is not None,
            "qkv_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
            "mlp_bias": mlp.gate_proj.bias is not None,
        }


def dense_spec(base) -> dict:
    """The spec of an unmodified block of ``base``."""
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    return {"d_in": base.hidden_size, "d_mid": base.hidden_size, "d_out": base.hidden_size,
            "qk_dim": head_dim, "v_dim": head_dim, "mlp_dim": base.intermediate_size,
            "qkv_bias": bool(getattr(base, "attention_bias", False) or base.model_type == "qwen2"),
            "o_bias": bool(getattr(base, "attention_bias", False)),
            "mlp_bias": bool(getattr(base, "mlp_bias", False))}


def spec_params(spec: dict, base) -> int:
    """Parameters of a block with shape ``spec``: a forecast before any compression work."""
    heads = base.num_attention_heads
    kv = getattr(base, "num_key_value_heads", None) or heads
    d_in, d_mid, d_out, m = spec["d_in"], spec["d_mid"], spec["d_out"], spec["mlp_dim"]
    qk, v = spec["qk_dim"], spec["v_dim"]
    n = d_in * (heads + kv) * qk + d_in * kv * v + heads * v * d_mid      # q, k, v, o
    n += 2 * d_mid * m + m * d_out                                         # gate, up, down
    n += spec.get("branch_rank", 0) * (d_mid + d_out)                      # low-rank branch
    n += d_in * d_mid * bool(spec.get("attn_skip")) + d_mid * d_out * bool(spec.get("mlp_skip"))
    n += (d_in + d_mid) * spec.get("norm_scale", True)
    if spec.get("qkv_bias"):
        n += (heads + kv) * qk + kv * v
    n += d_mid * spec.get("o_bias", False) + (2 * m + d_out) * spec.get("mlp_bias", False)
    return n


class CompressedForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose blocks are :class:`CompressedDecoderLayer`; everything else is the base
    architecture's own model (embeddings, rotary tables, masks, cache, final norm)."""

    config_class = CompressedConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CompressedDecoderLayer"]

    def __init__(self, config: CompressedConfig):
        super().__init__(config)
        base = config.build_base()
        base._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.model = AutoModel.from_config(base)
        self.model.layers = nn.ModuleList(
            CompressedDecoderLayer(base, spec, i) for i, spec in enumerate(config.layer_specs))
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def sync_config(self) -> None:
        """Write the current per-layer shapes and base config into ``self.config``."""
        base = self.model.config
        self.config.base_config = base.to_dict()
        self.config.layer_specs = [layer.spec() for layer in self.model.layers]
        self.config.num_hidden_layers = base.num_hidden_layers

    def save_pretrained(self, *args, **kwargs):
        self.sync_config()
        return super().save_pretrained(*args, **kwargs)


def to_compressed(model: nn.Module) -> CompressedForCausalLM:
    """Convert an HF causal LM (any supported architecture) into the compressed format, in place.

    The weights are moved, not copied, and the logits are unchanged: the blocks start as dense
    :class:`CompressedDecoderLayer` s with the original norms.
    """
    if isinstance(model, CompressedForCausalLM):
        return model
    mv = view(model)
    base = mv.config
    spec = dense_spec(base)
    config = CompressedConfig(base_config=base.to_dict(), layer_specs=[])
    config._attn_implementation = base._attn_implementation
    with torch.device("meta"):
        shell = CompressedForCausalLM(config)
    shell.model, shell.lm_head = mv.decoder, mv.lm_head
    layers = []
    for block in mv.blocks:
        with torch.device("meta"):
            layer = CompressedDecoderLayer(base, spec, block.index)
        target = BlockView(block.index, layer, LLAMA_LIKE)  # our block keeps the Llama names
        for part in ("q", "k", "v", "o", "gate", "up", "down"):
            target.set(part, block.get(part))             # adopt the Linear modules themselves
        layer.input_layernorm.weight = block.attn_norm.weight
        layer.post_attention_layernorm.weight = block.mlp_norm.weight
        layers.append(layer)
    shell.model.layers = nn.ModuleList(layers)
    shell.sync_config()
    shell.generation_config = model.generation_config
    return shell.eval()


AutoConfig.register(CompressedConfig.model_type, CompressedConfig, exist_ok=True)
AutoModelForCausalLM.register(CompressedConfig, CompressedForCausalLM, exist_ok=True)
