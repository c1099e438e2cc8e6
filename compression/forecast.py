"""What a config will leave of a model, before any work: the parameter count of the method's plan.

Counts come from block shapes alone (:func:`compression.modeling.spec_params` of each planned block),
so they work on a weightless ("meta") model. They are exact for uniform and manual plans; automatic
allocation keeps the mean sparsity, hence the same count up to rounding, and layer dropping by ratio
counts equal-sized blocks (true for every supported architecture).
"""
from __future__ import annotations

from .arch import count_params, view
from .methods import method_for
from .modeling import spec_params


def forecast(model, config) -> dict[str, int | float]:
    """``{"params", "block_params", "ratio"}`` that ``compress(model, config, ...)`` will leave."""
    mv = view(model)
    base = mv.config
    plan = method_for(config).plan(config, base, None)
    total, blocks = count_params(model), count_params(mv.layers)
    new_blocks = sum(spec_params(s, base) for s in plan.specs if s is not None) + plan.extra_params
    return {"params": total - blocks + new_blocks, "block_params": new_blocks,
            "ratio": 1 - new_blocks / blocks if blocks else 0.0}
