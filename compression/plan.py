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
from dataclasses import dataclass


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
            if not all(0.0 <= x <= 0.95 for x in self.per_layer):
                raise ValueError("per-layer sparsities must be in [0, 0.95]")
        if self.epsilon <= 0:
            raise ValueError("epsilon must be positive")
        if not 0 < self.max_layer < 1:
            raise ValueError("max_layer must be in (0, 1)")

    @property
    def needs_influence(self) -> bool:
        return self.kind == "auto"

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
