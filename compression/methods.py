"""The method registry: one :class:`Method` per compression method, keyed by name and config type.

The CLI, the app, the architecture checks, the streaming path and the benchmarks learn everything
method-specific from here: no code outside a method's own module asks for a method by name. A new
method is one module with a config dataclass (fields declared with :func:`compression.knobs.knob`),
``plan(config, base_config, influence) -> Plan``, ``run(model, config, calibration, progress,
held_out) -> (model, Report)`` and ``from_form(FormInput) -> config``, plus one line in ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from . import layerdrop, modegpt, olica, slicegpt
from .arch import ARCHITECTURES
from .knobs import Knob, build, knobs
from .plan import layerwise_from_form
from .report import Report
from .rewrite import rotary_pairs_refusal


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    summary: str            # one paragraph for the UI and --help (markdown allowed)
    config: type
    plan: Callable          # (config, base_config, influence | None) -> Plan: the one place widths are set
    run: Callable           # (model, config, calibration, progress, held_out[, influence]) -> (model, Report)
    from_form: Callable     # (plan.FormInput) -> config: the app's form values as this method's config
    allocations: tuple[str, ...] = ("uniform", "manual")  # how sizes may spread over layers (UI)
    needs_calibration: bool = True
    # Default calibration source, chosen from bench/calibration_sources.json (BENCHMARKS.md): half wiki,
    # half the model's own chat keeps most of self-chat's chat agreement at a fraction of its wiki cost;
    # layer dropping picks its blocks best on self-chat alone (better wiki, code and chat at 0.25).
    calibration: str = "wiki"
    fits_mlp: bool = False  # fits the MLP from its (width × width) correlation: wants more tokens than the width
    # What manual allocation edits: "fractions" (one value per layer, a slider each) or "blocks" (the
    # indices of the blocks to drop, a checkbox each).
    per_layer: str = "fractions"
    keeps_class: bool = False  # the run returns the model's own class (blocks removed), not the compressed one
    takes_influence: bool = False  # run accepts influence= (dense Block Influence measured once, reused)
    # (arch row, config or None, model_type) -> why this method cannot be exact there, or None
    refusal: Callable | None = None
    # The variant the benchmarks' headline rows run (knob values besides the ratio).
    headline: dict = field(default_factory=dict)
    # Shown with the forecast when the per-layer values are not parameter fractions (markdown).
    per_layer_note: str = ""
    # Report config entries that record what the plan resolved rather than what was asked, each with
    # the knobs that asked instead (the run's command line leaves the entry out when one is set).
    resolved: dict = field(default_factory=dict)
    # Row position in the benchmark tables (after dense): the papers' order of publication.
    table_rank: int = 9

    def knobs(self) -> list[Knob]:
        return knobs(self.config)

    def has_knob(self, name: str) -> bool:
        return any(k.name == name for k in self.knobs())

    def make_config(self, values: dict[str, Any]):
        """``Config(**values)`` after dropping unknown keys and Nones (config defaults apply)."""
        return build(self.config, values)

    @property
    def headline_label(self) -> str:
        """The sweep's label of the headline variant (``modegpt-auto`` for automatic allocation)."""
        return self.name + ("-auto" if self.headline.get("allocation") == "auto" else "")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("modegpt", "MoDeGPT", "Rebuilds each block's MLP (Nyström, ridge leverage scores), "
           "query-key (CR decomposition, whole rotary pairs) and value-output (SVD per kv group) at "
           "smaller inner widths, from calibration correlations (arXiv 2408.09632).",
           modegpt.MoDeGPTConfig, modegpt.plan, modegpt.run, partial(layerwise_from_form, modegpt.MoDeGPTConfig),
           ("uniform", "auto", "manual"), calibration="wiki+self-chat", fits_mlp=True, takes_influence=True,
           refusal=rotary_pairs_refusal, headline={"allocation": "auto"}, table_rank=3),
    Method("olica", "Olica", "Orthogonal decomposition of value-output per head, rotary-pair query-key "
           "pruning, MLP neuron pruning, and a low-rank linear calibration branch fitted by ridge "
           "regression on the layers whose pruning error is most predictable.",
           olica.OlicaConfig, olica.plan, olica.run, partial(layerwise_from_form, olica.OlicaConfig),
           ("uniform", "auto", "manual"), calibration="wiki+self-chat", fits_mlp=True, takes_influence=True,
           refusal=rotary_pairs_refusal, table_rank=4),
    Method("slicegpt", "SliceGPT", "Folds the norms, rotates the residual stream into its principal "
           "components (PCA of calibration activations) and deletes the weakest directions; skip "
           "matrices carry the stream between bases (arXiv 2401.15024).",
           slicegpt.SliceGPTConfig, slicegpt.plan, slicegpt.run, slicegpt.from_form, calibration="wiki+self-chat",
           refusal=slicegpt.refusal, resolved={"widths": ("ratio", "slicing")}, table_rank=2,
           per_layer_note="SliceGPT's per-layer values (and the slicing-fraction target) are fractions of "
                          "the hidden size deleted, the paper's knob, not of the parameters: the skip "
                          "matrices it adds between layers give some back, so a fraction removes fewer block "
                          "parameters than it says; the forecast above counts them."),
    Method("layerdrop", "Layer dropping (ShortGPT / LayerChop)", "Deletes whole decoder blocks, those "
           "with the lowest Block Influence (1 − cos between a block's input and output) first; "
           "optional recovery training heals the model (arXiv 2305.14864).",
           layerdrop.LayerDropConfig, layerdrop.plan, layerdrop.run, layerdrop.from_form, ("auto", "manual"),
           needs_calibration=False, calibration="self-chat", per_layer="blocks", keeps_class=True,
           resolved={"layers": ("ratio",)}, table_rank=1),
)}


class UnknownMethod(ValueError):
    pass


def get(name: str) -> Method:
    if name not in METHODS:
        raise UnknownMethod(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_for(config) -> Method:
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"unknown compression config {type(config).__name__}; expected one of "
                    f"{', '.join(m.config.__name__ for m in METHODS.values())}")


def refusal(config_or_model_type, name: str) -> str | None:
    """Why method ``name`` cannot be exact on this architecture, as one line; None when it can. Takes
    a config (preferred: some reasons depend on its values) or a model_type string; a compressed model
    answers for its original architecture."""
    config = config_or_model_type
    if getattr(config, "model_type", None) == "compressed_decoder":
        config = config.build_base()
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    check = get(name).refusal
    if check is None or model_type not in ARCHITECTURES:
        return None  # arch_for reports unsupported architectures
    return check(ARCHITECTURES[model_type], None if isinstance(config, str) else config, model_type)


def validated_report(d) -> Report:
    """A report dict validated against the schema and the registry's method names (an uploaded
    report.json, a saved run's); :class:`compression.report.ReportError` naming the field otherwise."""
    return Report.from_dict(d, METHODS)
