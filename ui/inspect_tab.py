"""The Inspect tab: per-layer spectra, leverage scores, reconstruction errors, Block Influence and
kept sizes of one run, drawn from its report alone (so a loaded report.json is enough), with a
second run overlaid on the errors and sizes."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

import viz

from .common import WARN, Context, md_code, md_text, user_errors
from .store import INFLUENCE_SPEC
from .page import HIDDEN, JOB, LAST

X_AXIS_CHOICES = [("component index", "index"), ("fraction of components", "fraction")]
NO_OVERLAY = "none"


def _layer_number(value, num_layers: int) -> int:
    """The layer asked for, clamped to the report's layers (anything unreadable is layer 0)."""
    try:
        asked = int(float(value or 0))
    except (TypeError, ValueError, OverflowError):
        asked = 0
    return min(max(asked, 0), max(num_layers - 1, 0))


class InspectTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def inspect(self, session, run_id, layer=0, key="", x_axis="index", log_leverage=False, other_id=NO_OVERLAY):
        """(layer slider, heat-map spectrum picker, summary, spectra, heat map, leverage, errors, sizes,
        second-run picker)."""
        if not session.runs:
            empty = [viz.spectrum_figure({}, 0)] + [viz.error_figure({})] * 4
            return gr.update(), gr.update(), "No run yet: compress a model first.", *empty, gr.update()
        with user_errors():
            run = session.get(run_id)
            other = session.get(other_id) if other_id not in (None, "", NO_OVERLAY) else None
            x_axis = x_axis if x_axis in viz.X_AXES else "index"
        rep = run.report
        layers = rep.get("layers") or []
        index = _layer_number(layer, len(layers))
        keys = list(dict.fromkeys(k for lay in layers for k in (lay.get("spectra") or {})))
        heat_key = key if key in keys else (keys[0] if keys else "")
        others = [(NO_OVERLAY, NO_OVERLAY)] + [(r.label, r.id) for r in session.runs.values() if r.id != run.id]
        measured_on = md_text((rep.get("extra") or {}).get("errors_measured_on", "calibration (in-sample)"))
        summary = (f"{run.id} · {md_text(rep.get('method'))} on {md_code(run.model_name)} · "
                   f"{rep.get('params_dense', 0) / 1e6:,.1f}M → **{rep.get('params_compressed', 0) / 1e6:,.1f}M** "
                   f"parameters · target {rep.get('ratio_target') or 0:.0%}, achieved "
                   f"{rep.get('ratio_achieved') or 0:.1%} · errors measured on {measured_on} tokens")
        names = (run.id, other.id if other else "")
        other_report = other.report if other else None
        # values are sent back only when they change, so a late reply never undoes the user's pick
        return (gr.update(maximum=max(len(layers) - 1, 1), **({"value": index} if index != layer else {})),
                gr.update(choices=[(viz.spectrum_title(k), k) for k in keys],
                          **({"value": heat_key} if heat_key != key else {})),
                summary, viz.spectrum_figure(rep, index, x_axis=x_axis),
                viz.spectra_overview_figure(rep, heat_key, index, x_axis),
                viz.leverage_figure(rep, index, bool(log_leverage)),
                viz.error_figure(rep, other_report, names), viz.sizes_figure(rep, other_report, names),
                gr.update(choices=others, **({} if other or other_id == NO_OVERLAY else {"value": NO_OVERLAY})))

    def influence(self, session, run_id):
        """Block Influence of the run; when its method did not measure it, the dense model's,
        computed once per model (it holds the model slot while it runs)."""
        if not session.runs:
            return viz.influence_figure({})
        with user_errors():
            run = session.get(run_id)
        if viz.has_influence(run.report):
            return viz.influence_figure(run.report)
        try:
            with user_errors(), self.ctx.slot:
                scores = self.ctx.store.block_influence(run.model_name)
        except gr.Error as err:
            return viz.influence_figure(run.report, source=f"{WARN} cannot measure it here: {err.message}")
        return viz.influence_figure(run.report, scores, source=(
            f"the method did not use it: the dense model's, on {INFLUENCE_SPEC.num_samples} × "
            f"{INFLUENCE_SPEC.seq_len} wiki calibration tokens"))

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self, num_layers: int) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        c = SimpleNamespace()
        c.md = gr.Markdown("No run yet: compress a model first.")
        with gr.Row(equal_height=True):
            c.layer = gr.Slider(0, max(num_layers - 1, 1), value=0, step=1, label="Layer", scale=2)
            c.x_axis = gr.Radio(X_AXIS_CHOICES, value="index", label="Spectra x-axis")
            c.other_run = gr.Dropdown([NO_OVERLAY], value=NO_OVERLAY, label="Overlay a second run",
                                      info="on the error and size plots")
        c.spectrum = gr.Plot(label="spectra of the layer")
        with gr.Row():
            with gr.Column():
                c.key = gr.Dropdown([], value="", allow_custom_value=True, label="Spectrum for the heat map")
                c.overview = gr.Plot(label="spectra by layer")
            with gr.Column():
                c.log_leverage = gr.Checkbox(False, label="Log scale for leverage")
                c.leverage = gr.Plot(label="leverage")
        with gr.Row():
            c.errors, c.sizes = gr.Plot(label="errors"), gr.Plot(label="sizes")
        c.influence = gr.Plot(label="influence")
        return c

    def wire(self, page, c: SimpleNamespace, state, run_dd) -> None:
        outputs = [c.layer, c.key, c.md, c.spectrum, c.overview, c.leverage, c.errors, c.sizes, c.other_run]
        page.endpoint([run_dd.change, c.layer.change, c.key.input, c.x_axis.input, c.log_leverage.input,
                       c.other_run.input], self.inspect,
                      [state, run_dd, c.layer, c.key, c.x_axis, c.log_leverage, c.other_run], outputs, c.md,
                      api_name="inspect", **LAST)
        run_dd.change(self.influence, [state, run_dd], c.influence, **HIDDEN, **JOB)
