"""The trade-off explorer: what a setting will cost, forecast from one pass over the dense model.

:func:`collect` runs the calibration tokens through the dense model once (block inputs captured once,
each dense block run once on the dense stream) and keeps per layer the statistics every method's
choices are made from: the Gram of the attention input (the input norm's output, D × D), the Gram of
the MLP's intermediate activations z = act(h W_gateᵀ) ⊙ h W_upᵀ (m × m), Block Influence, the energy of
each module's output and of the stream, and 1-D error curves derived from them (one value per kept
width). :func:`predict` then answers any config of any method from those curves alone: the method's
own :meth:`~compression.methods.Method.plan` (automatic allocation from the statistics' Block
Influence, the same scores the method measures on the same tokens) sets the widths, and each layer's
errors are looked up at them — milliseconds per setting, no model.

Exact on the dense stream and the calibration tokens: MoDeGPT's MLP least-squares refit error (a lower
bound for the default shrunk refit), Olica's neuron-pruning
error and which layers its calibration branches go to, the value-output rewrite's error and a dropped
block's loss. Measured on a few calibration sequences: the query-key pair cut. Approximate: what an
Olica branch removes (ridge shrinkage left out) and the attention error when both its parts are cut.
A proxy: SliceGPT (the discarded PCA mass of the dense stream). Each curve, module by module:
:mod:`compression.preview_curves`.

The real runs are sequential: each block is calibrated, and its error measured, on the outputs of the
already-compressed blocks before it, while the forecast sees the dense stream everywhere; the real
errors are also measured on held-out sequences, the curves on the calibration tokens (so MoDeGPT's
refit, fitted in-sample, is forecast too well, more so with few tokens per MLP channel). Per layer,
``predicted_error`` is relative to what the layer's measured errors are relative to (the block's update,
attention + MLP outputs, for the per-block methods; the stream for SliceGPT and layer dropping), and
``stream`` is the error energy the layer injects relative to the stream leaving it, comparable across
methods; a setting's ``total`` is √Σ stream², the forecast the trade-off curve plots.

This module is the public surface: :func:`collect`, :class:`StatisticsCache` and :func:`predict` live in
:mod:`compression.preview_statistics`, the curves in :mod:`compression.preview_curves`; here, what the app
and the CLI do with forecasts (a run's measured errors in the forecast's layout, the best allocation by
forecast, the trade-off curve and its measured points, the CLI's rows).
"""
from __future__ import annotations

import math

from .methods import Method, get, method_for
from .plan import MAX_LAYER_SPARSITY
from .preview_statistics import LayerStatistics, Statistics, StatisticsCache, collect, predict

__all__ = ["LayerStatistics", "Statistics", "StatisticsCache", "collect", "predict", "measured_errors",
           "allocation_candidates", "best_allocation", "tradeoff_curve", "run_point", "rows", "TRADEOFF_RATIOS"]


def measured_errors(report, statistics: Statistics | None = None) -> dict:
    """A report's (or its dict's) measured per-layer errors in :func:`predict`'s layout, to draw over a
    forecast: ``attn``, ``mlp``, ``predicted_error``'s counterpart ``per_layer`` (the block update's
    error from attn and mlp weighted by the dense output energies of ``statistics``, equal weights
    without them; SliceGPT's "block" error as it is) and, with ``statistics``, ``stream`` and ``total``
    as :func:`predict` defines them (a dropped block counts what dropping it loses on the dense stream).
    None where the report has no value (dropped blocks, methods that measure none)."""
    report = report.to_dict() if hasattr(report, "to_dict") else report
    layers = report.get("layers") or []
    attn, mlp, per_layer, stream = [], [], [], []
    for i, lay in enumerate(layers):
        errors = lay.get("errors") or {}
        a, m = errors.get("attn"), errors.get("mlp")
        e = statistics.layers[i].energy if statistics is not None else None
        attn.append(a), mlp.append(m)
        s = None
        if lay.get("removed"):
            per_layer.append(None)
            s = statistics.layers[i].drop if statistics is not None else None
        elif "block" in errors:
            per_layer.append(errors["block"])
            s = errors["block"] ** 2
        elif a is not None and m is not None:
            w_attn, w_mlp = (e["attn"], e["mlp"]) if e is not None else (1.0, 1.0)
            lost = a * a * w_attn + m * m * w_mlp
            per_layer.append(math.sqrt(lost / max(w_attn + w_mlp, 1e-30)))
            s = lost / max(e["stream_out"], 1e-30) if e is not None else None
        else:
            per_layer.append(None)
            s = 0.0 if statistics is not None and not errors else None
        stream.append(s)
    out = {"attn": attn, "mlp": mlp, "per_layer": per_layer}
    if statistics is not None:
        known = [s for s in stream if s is not None]
        out["stream"] = [None if s is None else math.sqrt(s) for s in stream]
        out["total"] = math.sqrt(sum(known)) if known else None
    return out


# --- ranking allocations by forecast ----------------------------------------------------------------

def _method(method) -> Method:
    return method if isinstance(method, Method) else get(method)


def allocation_candidates(method, ratio: float, num_layers: int, options: dict | None = None,
                          epsilons=(0.02, 0.05, 0.1, 0.2, 0.5), spare=(1, 2, 3, 4, 6, 8)) -> list[tuple[str, object]]:
    """(label, config) of the allocations :func:`best_allocation` compares at ``ratio``: uniform,
    automatic at each ε, and manual plans that spare the first or last k layers (sparsity 0 there, the
    rest raised to keep the mean). ``options``: the method's other knob values."""
    m = _method(method)
    if "auto" not in m.allocations or not m.has_knob("layer_sparsity"):
        raise ValueError(f"{m.label} has no per-layer allocation to rank")
    base = {**(options or {}), "ratio": ratio}
    out = [("uniform", m.make_config({**base, "allocation": "uniform"}))]
    out += [(f"auto ε={e:g}", m.make_config({**base, "allocation": "auto", "epsilon": e})) for e in epsilons]
    for k in spare:
        rest = ratio * num_layers / (num_layers - k) if k < num_layers else math.inf
        if rest > MAX_LAYER_SPARSITY:
            continue
        for side, spared in (("first", range(k)), ("last", range(num_layers - k, num_layers))):
            values = tuple(0.0 if i in spared else rest for i in range(num_layers))
            out.append((f"spare {side} {k}", m.make_config({**base, "allocation": "manual",
                                                            "layer_sparsity": values})))
    return out


def best_allocation(statistics: Statistics, method, ratio: float, base_config, options: dict | None = None,
                    **candidates) -> tuple[object, list[dict]]:
    """The allocation with the lowest forecast ``total`` among :func:`allocation_candidates` at
    ``ratio``: (its config, every candidate as {"label", "total", "params", "config"} sorted best
    first). Candidates whose parameters exceed uniform's by more than 0.5 % of the blocks are skipped,
    so a cheaper forecast error is never bought with parameters."""
    rows = []
    for label, config in allocation_candidates(method, ratio, statistics.num_layers, options, **candidates):
        p = predict(statistics, config, base_config)
        rows.append({"label": label, "total": p["total"], "params": p["params"], "config": config})
    budget = rows[0]["params"] + 0.005 * statistics.params_blocks
    fair = sorted((r for r in rows if r["params"] <= budget), key=lambda r: r["total"])
    return fair[0]["config"], fair + [r for r in rows if r["params"] > budget]


# --- the trade-off curve ------------------------------------------------------------------------------

TRADEOFF_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 13))  # 0.05 .. 0.6


def tradeoff_curve(statistics: Statistics, method, base_config, options: dict | None = None,
                   ratios=TRADEOFF_RATIOS) -> list[dict]:
    """The forecast at each target ratio for ``method`` with its other knob values ``options``: rows
    {"ratio", "total", "params"} for :func:`viz.tradeoff_figure`. Ratios the method cannot reach are
    left out; manual per-layer values in ``options`` are dropped (the curve varies the target)."""
    m = _method(method)
    values = {k: v for k, v in (options or {}).items() if k not in ("layer_sparsity", "layers", "widths", "slicing")}
    if values.get("allocation") == "manual":
        values["allocation"] = "uniform"
    rows = []
    for r in ratios:
        try:
            p = predict(statistics, m.make_config({**values, "ratio": r}), base_config)
        except ValueError:
            continue
        rows.append({"ratio": r, "total": p["total"], "params": p["params"]})
    return rows


def run_point(report, statistics: Statistics, label: str | None = None) -> dict:
    """A finished run as a measured point of the trade-off figure: the ratio it achieved, its measured
    ``total`` (:func:`measured_errors`), its label and wiki perplexity (None if not measured)."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    return {"ratio": data.get("ratio_achieved"), "total": measured_errors(data, statistics).get("total"),
            "label": label or f"{data.get('method', '?')} {data.get('ratio_target')}",
            "ppl": data.get("ppl_compressed")}


def rows(statistics: Statistics, configs: list, base_config, best: bool = False) -> list[dict]:
    """The CLI's JSON rows, one per config: ``ratio``, ``params``, ``block_params``, ``ratio_achieved``,
    per layer ``predicted_error``, ``attn``, ``mlp`` and ``stream``, ``total`` and ``labels``, plus
    ``sparsity`` and ``dropped`` where the plan has them. ``best``: each config's target with the
    allocation of lowest forecast (:func:`best_allocation`, its other knobs kept), named in
    ``allocation``."""
    from .knobs import values

    out = []
    for config in configs:
        label = None
        if best:
            options = {k: v for k, v in values(config).items() if k not in ("allocation", "epsilon", "layer_sparsity")}
            config, ranked = best_allocation(statistics, method_for(config), config.ratio, base_config, options)
            label = ranked[0]["label"]
        p = predict(statistics, config, base_config)
        row = {"ratio": getattr(config, "ratio", None), "params": p["params"], "block_params": p["block_params"],
               "ratio_achieved": p["ratio"], **{k: p[k] for k in ("predicted_error", "attn", "mlp", "stream",
                                                                   "total", "labels")}}
        row.update({k: v for k, v in (("allocation", label), ("sparsity", p["sparsity"]),
                                      ("dropped", p["dropped"])) if v})
        out.append(row)
    return out
