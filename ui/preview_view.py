"""The error forecast next to the parameter forecast (the trade-off explorer): one dense pass measures
the statistics for the model and calibration picked (:func:`compression.preview.collect`, cached per
model, source and size), then every change of the settings redraws each layer's predicted error and
the trade-off curve in milliseconds, without compressing; the selected run's measured errors and the
session's runs are drawn over them."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

import viz
from compression.arch import view
from compression.methods import METHODS
from compression.preview import (StatisticsCache, best_allocation, measured_errors, predict, run_point,
                                 tradeoff_curve)

from .calibration_form import calibration_spec
from .common import OK, WARN, user_errors
from .jobs import progress_html, watch
from .forms import values_text
from .runs import Stopped

NOT_YET = ("Press **Measure** for a forecast of each layer's error at these settings: one pass of the "
           "dense model over the calibration tokens (about one plain forward), then every slider move "
           "redraws it at once.")
NO_CALIBRATION = "The forecast waits for usable calibration settings: it is measured on those tokens."


class PreviewView:
    """The forecast's statistics live here, one cache per app (a couple of model × calibration entries)."""

    def __init__(self, ctx, compress_tab):
        self.ctx, self.tab, self.cache = ctx, compress_tab, StatisticsCache()

    def build(self) -> SimpleNamespace:
        v = SimpleNamespace()
        with gr.Accordion("Error forecast (before compressing)", open=True):
            with gr.Row():
                v.measure_btn = gr.Button("Measure", scale=0, min_width=120)
                v.best_btn = gr.Button("Best allocation by forecast", scale=0, min_width=120)
            v.note = gr.Markdown(NOT_YET)
            v.progress = gr.HTML("")
            v.errors = gr.Plot(label="forecast per layer")
            v.tradeoff = gr.Plot(label="trade-off forecast")
        return v

    def _spec(self, samples, length, source, text, upload):
        return calibration_spec(samples, length, source, text, upload)

    def measure(self, session, model_name, samples, length, source, text, upload, batch_size=8, request=None):
        """Collect the statistics (holding the model slot); yields (progress panel, note)."""
        self.ctx.register(request, session)
        with user_errors():
            name = (model_name or "").strip()
            spec = self._spec(samples, length, source, text, upload)
            batch = int(batch_size)
            if not 1 <= batch <= 4096:
                raise ValueError("calibration batch must be in [1, 4096]")
        store = self.ctx.store

        def job(progress):
            dense, _ = store.get(name)
            fit = store.calibration(name, spec, lambda f, m: progress(0.1 * f, m))[0]
            return self.cache.get_or_collect(name, dense, spec, fit, batch,
                                             lambda f, m: progress(0.1 + 0.9 * f, m))

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():
                        yield progress_html(state, "Forecast statistics"), gr.update()
        except Stopped:
            yield "", f"{WARN} Stopped before the statistics were complete."
            return
        stats = state.result
        yield "", (f"{OK} Statistics of {spec.num_samples} × {spec.seq_len} {spec.label} tokens measured in "
                   f"{stats.seconds:.0f} s; the forecast follows the settings.")

    def draw(self, session, model_name, method, ratio, allocation, per_layer, slicing, epsilon, samples, length,
             source, text, upload, run_id, *option_values):
        """(note, per-layer forecast figure, trade-off figure) for the current settings; never raises."""
        try:
            name = (model_name or "").strip()
            try:
                spec = self._spec(samples, length, source, text, upload)
            except ValueError:  # the Compress status names the problem; one message, not two
                return NO_CALIBRATION, viz.preview_errors_figure({}), viz.tradeoff_figure([])
            stats = self.cache.get(name, spec)
            if stats is None:
                return NOT_YET, viz.preview_errors_figure({}), viz.tradeoff_figure([])
            options = dict(zip(self.tab.option_names, option_values))
            config = self.tab._config(name, method, ratio, allocation, per_layer, slicing, epsilon=epsilon,
                                      options=options)
            base = view(self.ctx.store.info(name).skeleton).config
            forecast = predict(stats, config, base)
            runs = [r for r in session.runs.values() if r.model_name == name and r.report.get("method") == method]
            chosen = session.runs.get(run_id)
            measured = measured_errors(chosen.report, stats) if chosen in runs else None
            points = [run_point(r.report, stats, label=r.id) for r in runs]
            curve = tradeoff_curve(stats, method, base, {k: getattr(config, k, None) for k in ("allocation", "epsilon")})
        except Exception as err:  # noqa: BLE001  a forecast that cannot be drawn says why, the page stays up
            return f"{WARN} {err}", viz.preview_errors_figure({}), viz.tradeoff_figure([])
        label = METHODS[method].label
        over = f" · measured errors of {chosen.id} drawn over" if measured else ""
        note = (f"{OK} Forecast total error **{forecast['total']:.3f}** ({label}, on the dense stream; the real "
                f"run is sequential, so later layers err more than drawn){over}.")
        return (note, viz.preview_errors_figure(forecast, measured),
                viz.tradeoff_figure(curve, points, current=forecast.get("ratio"), method=label))

    def best(self, session, model_name, method, ratio, samples, length, source, text, upload, *option_values):
        """(allocation, per-layer text, note): the allocation with the lowest forecast error at this ratio
        among uniform, automatic at several ε and sparing the first or last layers, as manual values."""
        with user_errors():
            name = (model_name or "").strip()
            stats = self.cache.get(name, self._spec(samples, length, source, text, upload))
            if stats is None:
                raise ValueError("press Measure first: the forecast needs the statistics")
            prefix = f"{method}_"
            options = {k[len(prefix):]: v for k, v in zip(self.tab.option_names, option_values) if k.startswith(prefix)}
            base = view(self.ctx.store.info(name).skeleton).config
            config, ranked = best_allocation(stats, method, float(ratio), base, options)
            per_layer = predict(stats, config, base)["sparsity"]
        top = ranked[0]
        auto = next((r for r in ranked if r["label"] == "auto ε=0.1"), None)
        versus = f" (automatic, ε 0.1: {auto['total']:.3f})" if auto and auto is not top else ""
        return ("manual", values_text(per_layer),
                f"{OK} Best by forecast: **{top['label']}**, total error {top['total']:.3f}{versus}, of "
                f"{len(ranked)} allocations; set as manual per-layer values.")
