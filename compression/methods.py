"""The method registry: one :class:`Method` per compression method, keyed by name and config type.

The CLI, the app and the benchmark list methods, build configs and forecast sizes from here only. A
new method is one module with a config dataclass (fields declared with :func:`compression.knobs.knob`),
``plan(config, base_config, influence) -> Plan`` and ``run(model, config, calibration, progress,
held_out) -> (model, Report)``, plus one line in ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import layerdrop, modegpt, olica, slicegpt
from .knobs import Knob, knobs


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    summary: str            # one paragraph for the UI and --help (markdown allowed)
    config: type
    plan: Callable          # (config, base_config, influence | None) -> Plan: the one place widths are set
    run: Callable           # (model, config, calibration, progress, held_out) -> (model, Report)
    allocations: tuple[str, ...] = ("uniform", "manual")  # how sizes may spread over layers (UI)
    needs_calibration: bool = True
    # Default calibration source, chosen from bench/calibration_sources.json (BENCHMARKS.md): half wiki,
    # half the model's own chat keeps most of self-chat's chat agreement at a fraction of its wiki cost;
    # layer dropping picks its blocks best on self-chat alone (better wiki, code and chat at 0.25).
    calibration: str = "wiki"
    fits_mlp: bool = False  # fits the MLP from its (width × width) correlation: wants more tokens than the width

    def knobs(self) -> list[Knob]:
        return knobs(self.config)

    def make_config(self, values: dict[str, Any]):
        """``Config(**values)`` after dropping unknown keys and Nones (config defaults apply)."""
        names = {k.name for k in self.knobs()}
        return self.config(**{k: v for k, v in values.items() if k in names and v is not None})


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("modegpt", "MoDeGPT", "Rebuilds each block's MLP (Nyström, **ridge leverage scores**), "
           "query-key (CR decomposition, whole rotary pairs) and value-output (SVD per kv group) at "
           "smaller inner widths, from calibration correlations (arXiv 2408.09632).",
           modegpt.MoDeGPTConfig, modegpt.plan, modegpt.run, ("uniform", "auto", "manual"),
           calibration="wiki+self-chat", fits_mlp=True),
    Method("olica", "Olica", "Orthogonal decomposition of value-output per head, rotary-pair query-key "
           "pruning, MLP neuron pruning, and a **low-rank linear calibration branch** fitted by ridge "
           "regression on the layers whose pruning error is most predictable.",
           olica.OlicaConfig, olica.plan, olica.run, ("uniform", "auto", "manual"), calibration="wiki+self-chat",
           fits_mlp=True),
    Method("slicegpt", "SliceGPT", "Folds the norms, rotates the residual stream into its principal "
           "components (PCA of calibration activations) and **deletes the weakest directions**; skip "
           "matrices carry the stream between bases (arXiv 2401.15024).",
           slicegpt.SliceGPTConfig, slicegpt.plan, slicegpt.run, calibration="wiki+self-chat"),
    Method("layerdrop", "Layer dropping (ShortGPT / LayerChop)", "Deletes whole decoder blocks, those "
           "with the lowest **Block Influence** (1 − cos between a block's input and output) first; "
           "optional recovery training heals the model (arXiv 2305.14864).",
           layerdrop.LayerDropConfig, layerdrop.plan, layerdrop.run, ("auto", "manual"),
           needs_calibration=False, calibration="self-chat"),
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


def config_from(name: str, values: dict[str, Any]):
    """The config of method ``name`` from plain values (form fields, CLI flags, a report's config)."""
    return get(name).make_config(values)
