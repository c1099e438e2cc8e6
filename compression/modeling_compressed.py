"""The compressed-model format: one generic decoder block with per-layer shapes.

Self-contained on purpose (torch and transformers only): a saved folder carries this file, so it loads
with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` where this project is not
installed. Everything that needs the architecture table lives in :mod:`compression.modeling`.

A block (shapes per layer, ``D`` = original hidden size; norms marked [pre]/[post] exist only where the
architecture has them: Llama-likes pre only, Gemma 2/3 both, OLMo 2 post only)::

    x            (B, T, d_in)                       residual stream in this layer's input basis
    h = [pre] norm(x)                               RMSNorm over the *original* width D
    a = attn(h)  q/k: d_in -> H*qk_dim, v: d_in -> Hkv*v_dim, o: H*v_dim -> d_mid
                 (q/k normalised per head or over the projection where the architecture does it)
    a = [post] norm(a)
    x = x @ S_attn + a                              S_attn: (d_in, d_mid) skip matrix, or identity
    h = [pre] norm(x)
    m = mlp(h)   gate/up: d_mid -> mlp_dim, down: mlp_dim -> d_out
    m = [post] norm(m) + (h @ A) @ B                optional low-rank branch (Olica's calibration)
    x = x @ S_mlp + m                               S_mlp: (d_mid, d_out) skip matrix, or identity

With RoPE, ``qk_dim < head_dim`` keeps whole rotary pairs: ``rope_index[g]`` lists the kept frequency
indices of kv group ``g``; the kept q/k columns are ordered [pairs' first halves, second halves] so the
usual rotate-half formula applies. Embeddings (Gemma's scaled ones too), rotary tables, masks (sliding
windows included), the KV cache and the final norm come from the original architecture's own base model
(``AutoModel.from_config``), so no HF forward code is copied here; this file only adds the block.

Saved as safetensors plus a config (``model_type = "compressed_decoder"``) holding the original config,
one shape dict per layer and the model-wide block maths (``block``: activation, norm flavour, attention
scale and soft-caps); ``import compression`` registers it with the Auto classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin,
                          PretrainedConfig, PreTrainedModel)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# transformers renamed `past_key_values` to `cache` (5.24); speak whichever the installed one uses.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class Shape:
    """Head and width sizes of a decoder config (the one place they are derived)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> "Shape":
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size)

    @property
    def groups(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class BlockMath:
    """Model-wide maths of a block (no shapes): resolved from the architecture table at conversion.

    norm_offset: RMSNorm scales by (offset + w) (Gemma: 1). norm_upcast: the scale is applied in float32
    before casting back (Gemma, OLMo 2) rather than after (Llama). attn_scale: softmax temperature
    (Gemma: query_pre_attn_scalar^-1/2). attn_softcap / logit_softcap: Gemma 2's tanh soft-capping.
    """

    act: str
    norm_eps: float
    attn_scale: float
    norm_offset: float = 0.0
    norm_upcast: bool = False
    attn_softcap: float | None = None
    logit_softcap: float | None = None

    @classmethod
    def of(cls, base, block: dict | None = None) -> "BlockMath":
        """From a saved ``block`` dict; without one, the Llama-like block of ``base``."""
        defaults = {"act": getattr(base, "hidden_act", None), "norm_eps": getattr(base, "rms_norm_eps", 1e-6),
                    "attn_scale": Shape.of(base).head_dim ** -0.5}
        return cls(**{**defaults, **(block or {})})


class CompressedConfig(PretrainedConfig):
    """The original model's config (``base_config``), one shape dict per layer (``layer_specs``) and
    the block maths (``block``, see :class:`BlockMath`)."""

    model_type = "compressed_decoder"
    COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, base_config: dict | None = None, layer_specs: list[dict] | None = None,
                 block: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.layer_specs = layer_specs or []
        self.block = block or {}
        for key in self.COPIED:  # generation and lm-eval read these off the outer config
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        kwargs.setdefault("tie_word_embeddings", self.base_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    def build_base(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim that divides by the RMS of the *original* width ``mean_dim``.

    After SliceGPT deletes directions the stream is narrower, but its norm is (nearly) unchanged, so the
    mean of squares is still taken over ``mean_dim``; the same holds for q/k norms after rotary pairs are
    cut. ``shape`` may be 2-D ((heads, qk_dim): one scale per head). ``scale=False`` gives the scale-free
    norm left once the scale is folded into the next linear layers. ``offset``/``upcast``: see
    :class:`BlockMath`.
    """

    def __init__(self, shape, mean_dim: int, eps: float, scale: bool = True, offset: float = 0.0,
                 upcast: bool = False):
        super().__init__()
        self.mean_dim, self.eps, self.offset, self.upcast = mean_dim, eps, offset, upcast
        self.weight = nn.Parameter(torch.ones(shape)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight is None:
            return x.to(dtype)
        if self.upcast:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return (self.offset + self.weight) * x.to(dtype) if self.offset else self.weight * x.to(dtype)

    def scale(self) -> torch.Tensor:
        """The per-feature factor this norm applies after normalising."""
        return self.offset + self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of x (all of them unless partial, as in Phi-3)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with per-layer q/k and v head widths, optional kept rotary pairs and
    optional q/k norms (``spec["qk_norm"]``: "head" = per head over head_dim as Qwen3/Gemma 3,
    "proj" = over the whole projection as OLMo 2)."""

    def __init__(self, base, spec: dict, layer_idx: int, math: BlockMath | None = None):
        super().__init__()
        shape, math = Shape.of(base), math or BlockMath.of(base)
        self.config, self.layer_idx = base, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.num_key_value_groups = shape.groups
        self.qk_dim, self.v_dim = spec["qk_dim"], spec["v_dim"]
        self.scaling = math.attn_scale  # the original temperature, whatever qk_dim is kept
        self.softcap = math.attn_softcap
        self.sliding_window = spec.get("sliding_window", getattr(base, "sliding_window", None))
        self.is_causal = True
        qkv_bias = spec.get("qkv_bias", False)
        self.q_proj = nn.Linear(spec["d_in"], self.num_heads * self.qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(spec["d_in"], self.num_kv_heads * self.qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(spec["d_in"], self.num_kv_heads * self.v_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, spec["d_mid"], bias=spec.get("o_bias", False))
        self.qk_norm = spec.get("qk_norm")
        self.q_norm, self.k_norm = (self._qk_norm(n, spec, math) for n in (self.num_heads, self.num_kv_heads))
        # (kv groups, kept pairs): the frequency index of each kept rotary pair; None keeps all.
        partial = self.qk_dim < self.head_dim
        self.register_buffer("rope_index", torch.zeros(self.num_kv_heads, self.qk_dim // 2,
                                                       dtype=torch.long) if partial else None)
        self._rope_tables_index = None  # (rope_index identity, q index, kv index), see rotary()

    def _qk_norm(self, heads: int, spec: dict, math: BlockMath) -> RMSNorm | None:
        """The q or k norm: "proj" over heads·qk_dim (mean over heads·head_dim); "head" over qk_dim
        (mean over head_dim), one scale shared by all heads, or one per head once pairs were cut."""
        norm = lambda shape, mean: RMSNorm(shape, mean, math.norm_eps, True, math.norm_offset,  # noqa: E731
                                           math.norm_upcast)
        if self.qk_norm == "proj":
            return norm(heads * self.qk_dim, heads * self.head_dim)
        if self.qk_norm == "head":
            return norm((heads, self.qk_dim) if spec.get("qk_norm_per_head") else self.qk_dim, self.head_dim)
        return None

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor):
        """cos/sin (B, T, rot) -> (cos_q, sin_q) (B, H, T, qk_dim), (cos_k, sin_k) (B, Hkv, T, qk_dim)
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

    def _heads(self, proj: nn.Linear, norm: RMSNorm | None, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, d_in) -> (B, heads, T, qk_dim), through the q/k norm where there is one."""
        y = proj(x)
        if self.qk_norm == "proj":
            y = norm(y)
        y = y.view(*x.shape[:2], heads, self.qk_dim)
        if self.qk_norm == "head":
            y = norm(y)
        return y.transpose(1, 2)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        q = self._heads(self.q_proj, self.q_norm, hidden_states, self.num_heads)
        k = self._heads(self.k_proj, self.k_norm, hidden_states, self.num_kv_heads)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.v_dim).transpose(1, 2)
        (cos_q, sin_q), (cos_k, sin_k) = self.rotary(*position_embeddings)
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        implementation = self.config._attn_implementation
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None) if implementation != "eager" else None
        if attend is None:
            attend = eager_attention
        elif self.qk_dim != self.v_dim:
            q, k, v = _equal_head_dims(q, k, v)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                        sliding_window=self.sliding_window, softcap=self.softcap, **kwargs)
        return self.o_proj(out[..., :self.v_dim].reshape(B, T, -1)), None


def _equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Zero-pad q/k or v to one head width. Fused attention kernels (SDPA's flash kernel on the CPU)
    need equal q/k and v head dims; with MoDeGPT's or Olica's cut widths (q/k by rotary pairs, v by
    single dims, so an automatic allocation often leaves them one apart) SDPA fell back to its math
    path, 5-6× slower per layer at 512 tokens (10.8 vs 1.8 ms). Exact: zero q/k dims add nothing to
    the scores (the temperature is passed explicitly), zero v dims give zero outputs, cut off after.
    The cache keeps the padded tensor (the smaller of the two grows to the larger)."""
    width = max(q.shape[-1], v.shape[-1])
    pad = lambda t: t if t.shape[-1] == width else nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    return pad(q), pad(k), pad(v)


def eager_attention(module, q, k, v, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Reference attention (B, H, T, d) with GQA by repetition and optional tanh soft-capping of the
    scores (Gemma 2); returns (B, T, H, d_v)."""
    g = module.num_key_value_groups
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


class MLP(nn.Module):
    """Gated MLP; holds Olica's optional low-rank correction, which the block adds (after any post
    norm, since the correction is fitted to what the MLP adds to the stream)."""

    def __init__(self, spec: dict, act: str):
        super().__init__()
        bias = spec.get("mlp_bias", False)
        self.gate_proj = nn.Linear(spec["d_mid"], spec["mlp_dim"], bias=bias)
        self.up_proj = nn.Linear(spec["d_mid"], spec["mlp_dim"], bias=bias)
        self.down_proj = nn.Linear(spec["mlp_dim"], spec["d_out"], bias=bias)
        self.act_fn = ACT2FN[act]
        rank = spec.get("branch_rank", 0)
        self.branch_in = nn.Linear(spec["d_mid"], rank, bias=False) if rank else None
        self.branch_out = nn.Linear(rank, spec["d_out"], bias=False) if rank else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.inner(h))

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        """The intermediate activations act(h W_gate) ⊙ h W_up (what down_proj reads), (..., mlp_dim)."""
        return self.act_fn(self.gate_proj(h)) * self.up_proj(h)


class CompressedDecoderLayer(nn.Module):
    """A decoder block whose widths and norm placement come from ``spec`` (see the module docstring)."""

    def __init__(self, base, spec: dict, layer_idx: int, math: BlockMath | None = None):
        super().__init__()
        math = math or BlockMath.of(base)
        D = base.hidden_size

        def norm(width, scale=True):
            return RMSNorm(width, D, math.norm_eps, scale, math.norm_offset, math.norm_upcast)

        pre, scale, post = spec.get("pre_norm", True), spec.get("norm_scale", True), spec.get("post_norm", False)
        self.input_layernorm = norm(spec["d_in"], scale) if pre else nn.Identity()
        self.self_attn = Attention(base, spec, layer_idx, math)
        self.post_attention_layernorm = norm(spec["d_mid"], scale) if pre else nn.Identity()  # pre-MLP
        self.mlp = MLP(spec, math.act)
        self.attn_output_norm = norm(spec["d_mid"]) if post else None
        self.mlp_output_norm = norm(spec["d_out"]) if post else None
        self.attn_skip = nn.Linear(spec["d_in"], spec["d_mid"], bias=False) if spec.get("attn_skip") else None
        self.mlp_skip = nn.Linear(spec["d_mid"], spec["d_out"], bias=False) if spec.get("mlp_skip") else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
        x = hidden_states                                            # (B, T, d_in)
        a = self._attention(x, position_embeddings, attention_mask,
                            cache if cache is not None else past_key_values, **kwargs)
        x = (x if self.attn_skip is None else self.attn_skip(x)) + a  # (B, T, d_mid)
        return (x if self.mlp_skip is None else self.mlp_skip(x)) + self.mlp_out(x)  # (B, T, d_out)

    def _attention(self, x, position_embeddings, attention_mask, cache=None, **kwargs) -> torch.Tensor:
        a, _ = self.self_attn(self.input_layernorm(x), position_embeddings=position_embeddings,
                              attention_mask=attention_mask, cache=cache, **kwargs)
        return a if self.attn_output_norm is None else self.attn_output_norm(a)

    def attention_out(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What attention adds to the stream for input ``x`` (calibration helper, no cache)."""
        return self._attention(x, kwargs["position_embeddings"], kwargs.get("attention_mask"))

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the stream for its block-internal input ``x``."""
        h = self.post_attention_layernorm(x)
        return self.mlp_finish(h, self.mlp.inner(h))

    def mlp_finish(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The MLP's output from its normalised input ``h`` and intermediate activations ``z``
        (calibration reuses ``z``: a cut MLP's output is the kept channels of the dense one's ``z``)."""
        m = self.mlp.down_proj(z)
        if self.mlp_output_norm is not None:
            m = self.mlp_output_norm(m)
        if self.mlp.branch_in is not None:
            m = m + self.mlp.branch_out(self.mlp.branch_in(h))
        return m

    def spec(self) -> dict:
        """The shape dict that rebuilds this layer (read off the modules, so never stale)."""
        attn, mlp = self.self_attn, self.mlp
        pre = isinstance(self.input_layernorm, RMSNorm)
        return {
            "d_in": attn.q_proj.in_features, "d_mid": attn.o_proj.out_features,
            "d_out": mlp.down_proj.out_features, "qk_dim": attn.qk_dim, "v_dim": attn.v_dim,
            "mlp_dim": mlp.gate_proj.out_features,
            "branch_rank": 0 if mlp.branch_in is None else mlp.branch_in.out_features,
            "attn_skip": self.attn_skip is not None, "mlp_skip": self.mlp_skip is not None,
            "pre_norm": pre, "norm_scale": pre and self.input_layernorm.weight is not None,
            "post_norm": self.attn_output_norm is not None,
            "qk_norm": attn.qk_norm,
            "qk_norm_per_head": attn.qk_norm == "head" and attn.q_norm.weight.dim() == 2,
            "qkv_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
            "mlp_bias": mlp.gate_proj.bias is not None, "sliding_window": attn.sliding_window,
        }


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
        self.math = BlockMath.of(base, config.block)
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        # SDPA has no score soft-capping: Gemma 2 runs eager there, as in transformers.
        base._attn_implementation = "eager" if self.math.attn_softcap is not None and impl == "sdpa" else impl
        self.model = AutoModel.from_config(base)
        self.model.layers = nn.ModuleList(
            CompressedDecoderLayer(base, spec, i, self.math) for i, spec in enumerate(config.layer_specs))
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        cache = cache if cache is not None else past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE: cache}, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if self.math.logit_softcap is not None:
            logits = torch.tanh(logits / self.math.logit_softcap) * self.math.logit_softcap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: getattr(out, CACHE)})

    def sync_config(self) -> None:
        """Write the current per-layer shapes, base config and block maths into ``self.config``."""
        base = self.model.config
        self.config.base_config = base.to_dict()
        self.config.layer_specs = [layer.spec() for layer in self.model.layers]
        self.config.block = asdict(self.math)
        self.config.num_hidden_layers = base.num_hidden_layers

    def save_pretrained(self, *args, **kwargs):
        self.sync_config()
        return super().save_pretrained(*args, **kwargs)


# Saved folders carry this file and an auto_map naming these classes (trust_remote_code loading).
CompressedConfig.register_for_auto_class("AutoConfig")
CompressedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(CompressedConfig.model_type, CompressedConfig, exist_ok=True)
AutoModelForCausalLM.register(CompressedConfig, CompressedForCausalLM, exist_ok=True)
