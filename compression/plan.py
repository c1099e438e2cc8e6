"""Per-layer sparsity: uniform, from the user (the app's sliders), or automatic from Block Influence.

Automatic allocation follows MoDeGPT (arXiv 2408.09632, §3.3): with s_i the Block Influence of layer i,
    φ_i = L · φ_avg · softmax(−s_i / ε)
so layers that change the stream least lose most. ε trades uniform (ε → ∞) for greedy (ε → 0).
Values are then clipped to [0, max_layer] and the surplus re-spread over the unclipped layers
(water-filling), so the mean sparsity — hence the parameter count of equal-sized blocks — hits the
target exactly before the methods round sizes to whole channels, heads and rotary pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .knobs import build, check, knob


MAX_LAYER_SPARSITY = 0.95  # no layer or module loses more than this (the per-layer knob's ceiling)


@dataclass
class Allocation:
    """How a global target is spread over layers.

    kind: "uniform", "auto" (Block Influence + entropic softmax) or "manual" (``per_layer``).
    epsilon: softmax temperature for "auto". The default 0.1 is the best of those measured with
        MoDeGPT at ratio 0.25 on SmolLM2-135M (`bench/epsilon.py`; wiki ppl, uniform 29.97):
        ε 0.03 → 30.07, 0.1 → 28.73, 0.3 → 29.09. Block Influence there is 0.03–0.08 for most
        layers and 0.17–1.0 for layers 0, 1, 24 and 29, so ε = 0.1 spares those few and
        spreads the rest nearly evenly, while 0.03 concentrates the cut on the lowest-influence layers.
    per_layer: sparsity per layer for "manual" (their mean need not equal the target).
    max_layer: no layer loses more than this fraction.
    """

    kind: str = "uniform"
    epsilon: float = 0.1
    per_layer: tuple[float, ...] | None = None
    max_layer: float = 0.8

    def __post_init__(self):
        if self.kind not in ("uniform", "auto", "manual"):
            raise ValueError(f"allocation must be uniform, auto or manual, not {self.kind!r}")
        if self.kind == "manual":
            if not self.per_layer:
                raise ValueError("manual allocation needs per_layer sparsities")
            self.per_layer = tuple(float(x) for x in self.per_layer)
            if not all(0.0 <= x <= MAX_LAYER_SPARSITY for x in self.per_layer):
                raise ValueError(f"per-layer sparsities must be in [0, {MAX_LAYER_SPARSITY}]")
        if self.epsilon <= 0:
            raise ValueError("epsilon must be positive")
        if not 0 < self.max_layer < 1:
            raise ValueError("max_layer must be in (0, 1)")

    def sparsities(self, target: float, num_layers: int,
                   influence: list[float] | None = None) -> list[float]:
        if self.kind == "manual":
            if len(self.per_layer) != num_layers:
                raise ValueError(f"manual allocation has {len(self.per_layer)} values for "
                                 f"{num_layers} layers")
            return list(self.per_layer)
        if self.kind == "uniform" or target == 0:
            return [target] * num_layers
        if influence is None:
            raise ValueError("automatic allocation needs Block Influence scores")
        return entropic_allocation(influence, target, self.epsilon, self.max_layer)


def entropic_allocation(influence: list[float], target: float, epsilon: float,
                        max_layer: float = 0.8) -> list[float]:
    """φ_i = L·target·softmax(−s_i/ε), clipped to [0, max_layer] with the mean kept at ``target``."""
    L = len(influence)
    if target > max_layer:
        raise ValueError(f"target {target} exceeds the per-layer maximum {max_layer}")
    low = min(influence)
    weights = [math.exp(-(s - low) / epsilon) for s in influence]
    phi = [0.0] * L
    free = list(range(L))
    budget = target * L
    while True:  # water-filling: clip, then re-spread what the clipped layers could not take
        total = sum(weights[i] for i in free)
        for i in free:
            phi[i] = budget * weights[i] / total
        over = [i for i in free if phi[i] > max_layer]
        if not over:
            return phi
        for i in over:
            phi[i] = max_layer
            free.remove(i)
        budget = target * L - max_layer * (L - len(free))


ALLOCATIONS = ("uniform", "auto", "manual")


@dataclass
class LayerwiseConfig:
    """Knobs shared by the per-block methods (MoDeGPT, Olica): a target and its spread over layers.

    ``allocation`` may also be given as an :class:`Allocation` (unpacked into the three fields).
    """

    ratio: float = knob(0.25, kind="float", label="Target ratio", low=0.0, high=0.9,
                        help="fraction of decoder-block parameters to remove")
    allocation: str = knob("uniform", kind="str", label="Allocation over layers", choices=ALLOCATIONS,
                           help="uniform: the same sparsity everywhere; auto: from Block Influence "
                                "(entropic softmax, MoDeGPT §3.3); manual: --layer-sparsity")
    epsilon: float = knob(0.1, kind="float", label="Allocation temperature ε", low=0.0, low_open=True,
                          help="auto allocation: φ_i ∝ softmax(−BI_i/ε); small ε prunes "
                               "low-influence layers harder", advanced=True)
    layer_sparsity: tuple[float, ...] | None = knob(
        None, kind="floats", label="Per-layer sparsity", low=0.0, high=MAX_LAYER_SPARSITY, optional=True,
        help="manual allocation: one sparsity per layer, comma-separated")
    batch_size: int = knob(8, kind="int", label="Calibration batch", low=1, high=4096, flag="--calib-batch",
                           help="calibration sequences per forward pass", advanced=True)

    def __post_init__(self):
        if isinstance(self.allocation, Allocation):
            alloc = self.allocation
            self.allocation, self.epsilon, self.layer_sparsity = alloc.kind, alloc.epsilon, alloc.per_layer
        check(self)
        self.spread  # noqa: B018  (validates the combination: manual needs its values)

    @property
    def spread(self) -> Allocation:
        return Allocation(kind=self.allocation, epsilon=self.epsilon, per_layer=self.layer_sparsity)

    def sparsities(self, num_layers: int, influence: list[float] | None = None) -> list[float]:
        """Per-layer sparsity; without influence an automatic plan is forecast as uniform (same mean)."""
        if self.allocation == "auto" and influence is None:
            return [self.ratio] * num_layers
        return self.spread.sparsities(self.ratio, num_layers, influence)


@dataclass(frozen=True)
class FormInput:
    """What a form (the app's Compress tab) gives a method, for its ``from_form`` to make a config.

    options: the method's other knob values by name. allocation: one of the method's allocations.
    per_layer: under manual allocation, what the method's per-layer editor holds (``Method.per_layer``:
    one fraction per layer, or the indices of the blocks to drop); None otherwise. slicing: the target
    is SliceGPT's slicing fraction rather than a parameter ratio. hidden_size, num_layers: the model's.
    """

    options: dict
    ratio: float
    allocation: str
    per_layer: tuple | None = None
    slicing: bool = False
    epsilon: float = 0.1
    hidden_size: int = 0
    num_layers: int = 0


def layerwise_from_form(config_cls, form: FormInput):
    """A :class:`LayerwiseConfig` subclass from form values: the target, its allocation and, under
    manual allocation, one sparsity per layer."""
    return build(config_cls, {**form.options, "ratio": form.ratio, "allocation": form.allocation,
                              "epsilon": form.epsilon, "layer_sparsity": form.per_layer})


@dataclass(frozen=True)
class Plan:
    """Per-layer block shapes a method will produce (None: the block is removed), plus parameters
    whose placement is only known after fitting (Olica's calibration branches)."""

    specs: list = field(default_factory=list)
    extra_params: int = 0


def inner_widths(base, sparsity: float, attn_share: float | None = None, extra_mlp_cut: int = 0) -> dict:
    """Block spec with attention and MLP inner widths cut at ``sparsity`` (MoDeGPT, Olica).

    ``attn_share`` None: every module loses the same fraction (MoDeGPT). Otherwise attention loses
    ``attn_share`` × sparsity and the MLP takes the rest of the block's budget (Olica); the MLP then
    gives up ``extra_mlp_cut`` more channels. Widths are whole rotary pairs, value dims and channels.
    """
    from .modeling import Shape, dense_spec

    spec, shape = dense_spec(base), Shape.of(base)
    hd, m, D, H, Hkv = shape.head_dim, shape.intermediate, shape.hidden, shape.heads, shape.kv_heads
    if attn_share is None:
        s_attn = s_mlp = sparsity
    else:
        p_attn = D * (H + Hkv) * hd + D * Hkv * hd + H * hd * D
        p_mlp = 3 * D * m
        s_attn = min(MAX_LAYER_SPARSITY, attn_share * sparsity)
        s_mlp = min(max((sparsity * (p_attn + p_mlp) - s_attn * p_attn) / p_mlp, 0.0), MAX_LAYER_SPARSITY)
    keep = 1.0 - s_attn
    spec.update(qk_dim=2 * max(1, round(keep * hd / 2)), v_dim=max(1, round(keep * hd)),
                mlp_dim=max(1, round((1 - s_mlp) * m) - extra_mlp_cut))
    # Cut values move their bias to o_proj (rewrite.fold_value_bias).
    spec["o_bias"] = spec["o_bias"] or (spec["qkv_bias"] and spec["v_dim"] < hd)
    # Heads keep different rotary pairs, so a per-head q/k norm becomes one scale row per head.
    spec["qk_norm_per_head"] = spec.get("qk_norm") == "head" and spec["qk_dim"] < hd
    return spec
