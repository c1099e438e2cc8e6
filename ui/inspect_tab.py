"""The Inspect tab: per-layer spectra, leverage scores, reconstruction errors, Block Influence and
kept sizes of one run, drawn from its report alone (so a loaded report.json is enough)."""
from __future__ import annotations

import gradio as gr

import viz

from .common import Context, user_errors


class InspectTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def inspect(self, session, run_id, layer=0, key="all"):
        """(layer slider, spectrum picker, summary, spectrum, overview, leverage, errors, influence, sizes)."""
        if not session.runs:
            empty = [viz.spectrum_figure({}, 0)] + [viz.error_figure({})] * 5
            return gr.update(), gr.update(), "No run yet: compress a model first.", *empty
        with user_errors():
            run = session.get(run_id)
        rep = run.report
        layers = rep.get("layers") or []
        try:
            asked = int(float(layer or 0))
        except (TypeError, ValueError):
            asked = 0
        layer = min(max(asked, 0), max(len(layers) - 1, 0))
        keys = list((layers[layer].get("spectra") or {}) if layers else {})
        all_keys = list(dict.fromkeys(k for lay in layers for k in (lay.get("spectra") or {})))
        asked_key, key = key, key if key in keys else "all"
        overview_key = key if key != "all" else (keys or all_keys or ["attn_input"])[0]
        measured_on = (rep.get("extra") or {}).get("errors_measured_on", "calibration (in-sample)")
        summary = (f"**{run.id}** · {rep.get('method')} on `{run.model_name}` · "
                   f"{rep.get('params_dense', 0) / 1e6:,.1f}M → {rep.get('params_compressed', 0) / 1e6:,.1f}M "
                   f"parameters · target {rep.get('ratio_target') or 0:.0%}, achieved "
                   f"{rep.get('ratio_achieved') or 0:.1%} · errors measured on {measured_on} tokens")
        # values are sent back only when they change, so a late reply never undoes the user's pick
        return (gr.update(maximum=max(len(layers) - 1, 1), **({"value": layer} if layer != asked else {})),
                gr.update(choices=["all", *keys], **({"value": key} if key != asked_key else {})), summary,
                viz.spectrum_figure(rep, layer, None if key == "all" else key),
                viz.spectra_overview_figure(rep, overview_key), viz.leverage_figure(rep, layer),
                viz.error_figure(rep), viz.influence_figure(rep), viz.sizes_figure(rep))
