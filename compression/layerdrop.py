"""Layer dropping: the pruning step of LayerChop (Jha et al., arXiv 2305.14864).

Which layers go is decided by Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 − E[cos(x_i, x_i+1)]
over calibration tokens, the lowest-influence blocks being the most redundant. The model keeps its own
class: dropped blocks are deleted and the rest renumbered, so ``save_pretrained`` output reloads with
plain ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

from dataclasses import dataclass

import time

from torch import nn

from .arch import ModelView, count_params, view
from .calibration import block_influence, capture_block_inputs
from .knobs import build, check, knob, values
from .modeling import spec_params
from .plan import FormInput, Plan
from .report import LayerReport, Report


@dataclass
class LayerDropConfig:
    """Drop whole decoder blocks: the fewest lowest-influence blocks whose removal reaches ``ratio``,
    or exactly ``layers`` when given (then ``ratio`` is ignored)."""

    ratio: float | None = knob(0.25, kind="float", label="Target ratio", low=0.0, high=0.9, optional=True,
                               help="fraction of decoder-block parameters to remove")
    layers: tuple[int, ...] | None = knob(None, kind="ints", label="Blocks to drop", low=0, optional=True,
                                          help="indices of the blocks to drop, comma-separated "
                                               "(instead of --ratio)")
    batch_size: int = knob(8, kind="int", label="Calibration batch", low=1, high=4096, flag="--calib-batch",
                           help="calibration sequences per forward pass", advanced=True)

    def __post_init__(self):
        check(self)
        if self.layers is not None:
            self.layers, self.ratio = tuple(sorted(set(self.layers))), None
        elif self.ratio is None:
            raise ValueError("layer dropping needs a ratio or the layers to drop")

    def validate_for(self, num_layers: int) -> None:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"layer indices {bad} out of range for a model with {num_layers} layers")
            if len(self.layers) >= num_layers:
                raise ValueError("cannot drop every layer")


def layers_to_drop(influence: list[float], block_sizes: list[int], ratio: float) -> list[int]:
    """The fewest lowest-influence blocks whose parameters reach ``ratio`` of all block parameters."""
    target = ratio * sum(block_sizes)
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    chosen, removed = [], 0
    for i in order:
        if removed >= target - 1e-9 or len(chosen) == len(order) - 1:
            break
        chosen.append(i)
        removed += block_sizes[i]
    return sorted(chosen)


def drop_layers(mv: ModelView, drop: list[int]) -> None:
    """Delete blocks ``drop`` in place and renumber what indexes layers (cache slots, layer types)."""
    keep = [i for i in range(len(mv.layers)) if i not in set(drop)]
    decoder, config = mv.decoder, mv.config
    decoder.layers = nn.ModuleList(mv.layers[i] for i in keep)
    for new_index, block in enumerate(decoder.layers):
        attn = block.self_attn
        attn.layer_idx = new_index
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    outer = mv.model.config
    if outer is not config:  # compressed format: the outer config mirrors the base
        outer.num_hidden_layers = len(keep)
        if hasattr(mv.model, "sync_config"):
            mv.model.sync_config()


def block_sizes(mv: ModelView) -> list[int]:
    return [count_params(block) for block in mv.layers]


def from_form(form: FormInput) -> LayerDropConfig:
    """Manual allocation: exactly the blocks in ``form.per_layer``; otherwise the target ratio."""
    if form.allocation == "manual":
        if not form.per_layer:
            raise ValueError("manual layer dropping: pick at least one block to drop")
        config = build(LayerDropConfig, {**form.options, "layers": tuple(form.per_layer)})
        config.validate_for(form.num_layers)
        return config
    return build(LayerDropConfig, {**form.options, "ratio": form.ratio})


def plan(config: LayerDropConfig, base, influence: list[float] | None = None) -> Plan:
    """The dense block spec for kept blocks, None for dropped ones. Without influence a ratio is
    forecast by dropping the first blocks: blocks are equal-sized, so the count is the same."""
    from .modeling import dense_spec

    L = base.num_hidden_layers
    config.validate_for(L)
    spec = dense_spec(base)
    size = spec_params(spec, base)
    drop = set(config.layers if config.layers is not None
               else layers_to_drop(influence or list(range(L)), [size] * L, config.ratio))
    return Plan([None if i in drop else dict(spec) for i in range(L)])


def run(model, config: LayerDropConfig, calibration, progress, held_out=None):
    """Block Influence on the calibration tokens, then drop the chosen blocks of ``model`` (a private
    copy); returns (model, Report). The model keeps its own class."""
    mv = view(model)
    config.validate_for(len(mv.layers))
    sizes = block_sizes(mv)
    t0 = time.perf_counter()
    influence = None
    if calibration is not None:
        progress(0.0, "calibration: capturing block inputs")
        inputs = capture_block_inputs(mv, calibration, config.batch_size)
        influence = block_influence(mv, inputs, progress)
        del inputs
    calibration_seconds = time.perf_counter() - t0
    if config.layers is not None:
        drop = list(config.layers)
    else:
        if influence is None:
            raise ValueError("layer dropping by ratio needs calibration tokens for Block Influence")
        drop = layers_to_drop(influence, sizes, config.ratio)
    drop_layers(mv, drop)
    layers = [LayerReport(index=i, removed=i in drop, params_dense=n,
                          params_compressed=0 if i in drop else n,
                          influence=None if influence is None else influence[i])
              for i, n in enumerate(sizes)]
    return model, Report(method="layerdrop", config={**values(config), "layers": drop},
                         ratio_target=config.ratio if config.layers is None else None,
                         calibration_seconds=calibration_seconds, block_influence=influence,
                         layers=layers)
