"""The Compress tab: model, method, target and allocation (with a per-layer editor), calibration,
method options (generated from the configs' knobs), a live forecast, the job with its progress (the
finished run is kept and, locally, saved: :mod:`ui.run_saving`), the summary of the selected run, and
recovery training (heal, :mod:`ui.heal_view`) of the selected run. :meth:`CompressTab.build` lays it
out, :meth:`CompressTab.wire` connects it; the handlers are the tab's other methods."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from compression.command import command_for
from compression.methods import METHODS
from compression.models import PACKAGED_MODELS
from compression.pipeline import Stages, compress_and_measure

from . import calibration_form, forms
from .calibration_form import MAX_CHAT_EVAL, calibration_line, calibration_spec
from .common import OK, STOP, WARN, Context, millions, user_errors
from .heal_view import HealView
from .jobs import progress_html, watch
from .page import HIDDEN, HOVER, JOB, LAST, knob_info, knob_slider, option_control, with_option_params
from .preview_view import PreviewView
from .run_saving import keep_compressed
from .runs import Run, RunError, Stopped
from .space import cpu_notice

DEFAULT_METHOD = "modegpt"  # leads BENCHMARKS.md at ratio 0.25 (with automatic allocation)
DEFAULT_ALLOCATION = "auto"
# The chat demo's starting point (bench/calibration_sources.json, default model, self-chat calibration):
# MoDeGPT at 0.1 scores chat KL 0.26 / top-1 0.79 against the dense replies, at 0.25 KL 0.87 / 0.61
# (32 × 512 tokens); at an earlier CPU default (wiki+self-chat, 16 × 256) 0.1 measured KL 0.63 / top-1 0.65.
DEFAULT_RATIO = 0.1
def _same(value, shown) -> bool:
    """Whether a slider that shows ``shown`` already shows ``value`` (to its 0.01 step)."""
    try:
        return shown is not None and abs(float(value) - float(shown)) < 5e-3
    except (TypeError, ValueError):
        return False


def _edits_blocks(method: str) -> bool:
    """Whether the method's manual editor picks blocks to drop (checkboxes) rather than per-layer values."""
    return method in METHODS and METHODS[method].per_layer == "blocks"


class CompressTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.preview = PreviewView(ctx, self)
        self.healing = HealView(ctx)
        self.option_names = [forms.option_param(m, k) for m, k in forms.option_knobs()]  # the controls' order

    # --- the form ------------------------------------------------------------------------------
    def model_info(self, name: str):
        """(info markdown, layer count); a bad name shows its reason and clears the old info."""
        try:
            with user_errors():
                info = self.ctx.store.info(name)
        except gr.Error as err:
            return f"{WARN} {err.message}", 0
        return (f"**{info.model_type}** · {info.num_layers} layers · hidden {info.hidden_size} · "
                f"{info.params / 1e6:,.1f}M parameters"), info.num_layers

    def layout(self, method: str, allocation: str):
        """(allocation, note, slicing checkbox, per-layer text, presets, ε, one group per method)."""
        m = METHODS.get(method) or METHODS[DEFAULT_METHOD]
        allocation = forms.allocation_value(allocation)
        value = allocation if allocation in m.allocations else m.allocations[0]
        return (gr.update(value=value) if value != allocation else gr.update(), m.summary,
                gr.update(visible=m.has_knob("slicing")), gr.update(visible=value == "manual"),
                gr.update(visible=value == "manual"),
                gr.update(visible=value == "auto" and m.has_knob("epsilon")),
                *(gr.update(visible=method == name) for name in METHODS))

    def default_per_layer(self, method, allocation, ratio, num_layers, per_layer):
        """Valid per-layer values for the method when manual allocation is (re)picked."""
        num_layers = int(num_layers or 0)
        if forms.allocation_value(allocation) != "manual" or not num_layers:
            return gr.update()
        blocks = _edits_blocks(method)
        try:
            values = forms.parse_list(per_layer or "", int if blocks else float, "values")
        except ValueError:
            values = ()
        if blocks:
            ok = values and all(0 <= v < num_layers for v in values) and all(float(v).is_integer() for v in values)
            return gr.update() if ok and "." not in (per_layer or "") else ""
        ok = len(values) == num_layers and all(0 <= v <= forms.MAX_LAYER_VALUE for v in values)
        return gr.update() if ok else ",".join([f"{float(ratio):.2f}"] * num_layers)

    @staticmethod
    def editor_layout(num_layers, method, allocation):
        """(slider row, checkboxes, one update per slider): what manual allocation shows for the
        model's layers (checkboxes for layer dropping; no sliders past forms.MAX_SLIDERS layers)."""
        num = int(num_layers or 0)
        manual = forms.allocation_value(allocation) == "manual" and num > 0
        drops = manual and _edits_blocks(method)
        show = manual and not drops and num <= forms.MAX_SLIDERS
        return (gr.update(visible=show), gr.update(visible=drops, choices=list(range(num))),
                *(gr.update(visible=show and i < num) for i in range(forms.MAX_SLIDERS)))

    @staticmethod
    def editor_values(text, method, num_layers, *current):
        """(checkboxes, sliders) following the text when it is usable; half-typed text moves nothing.

        ``current`` (the sliders' values when the event fired) leaves a slider that already shows its
        value untouched: on a busy server a repeated or late echo of the text would otherwise set back
        a value the user has typed into a slider since."""
        num = int(num_layers or 0)
        keep = [gr.update()] * forms.MAX_SLIDERS
        if _edits_blocks(method):
            return forms.drop_indices(text, num), *keep
        values = forms.slider_values(text, num)
        if values is None or num > forms.MAX_SLIDERS:
            return gr.update(), *keep
        current = [*current, *[None] * num][:num]
        moved = [gr.update() if _same(v, c) else v for v, c in zip(values, current)]
        return gr.update(), *moved, *keep[num:]

    @staticmethod
    def slider_text(num_layers, *values):
        """The text field's value for the first ``num_layers`` sliders."""
        return forms.values_text(values[:int(num_layers or 0)])

    def preset(self, name, method, preset, k=2, mean=0.25, epsilon=0.1):
        """(per-layer text, note) for a preset of the manual editor; Block Influence is the dense
        model's, computed once per model (it holds the model slot while it runs)."""
        try:
            with user_errors():
                info = self.ctx.store.info((name or "").strip())
                k, mean, epsilon = int(k or 0), float(mean), float(epsilon or 0.1)
                if not forms.RATIO.low <= mean <= forms.RATIO.high or not 0 < epsilon <= 10:
                    raise ValueError(f"the preset's mean must be in [{forms.RATIO.low:g}, {forms.RATIO.high:g}] "
                                     "and ε in (0, 10]")
                influence = None
                blocks = _edits_blocks(method)
                if preset != "uniform" and (blocks or preset.startswith("automatic")):
                    with self.ctx.slot:
                        influence = self.ctx.store.block_influence(info.name)
                if blocks:
                    drops = forms.preset_drops(preset, mean, k, influence, self.ctx.store.block_sizes(info.name))
                    return forms.indices_text(drops), f"{OK} {preset}: dropping blocks {forms.indices_text(drops)}"
                values = forms.preset_values(preset, info.num_layers, mean, k, influence, epsilon)
        except gr.Error as err:
            return gr.update(), f"{WARN} {err.message}"
        return forms.values_text(values), f"{OK} {preset}: mean {sum(values) / len(values):.2f}"

    def _config(self, name, method, ratio, allocation, per_layer, slicing, batch_size=8, epsilon=0.1,
                options=None):
        info = self.ctx.store.info(name)
        return forms.make_config(method, float(ratio), allocation, per_layer, num_layers=info.num_layers,
                                 hidden_size=info.hidden_size, slicing=bool(slicing),
                                 epsilon=float(epsilon), batch_size=int(batch_size), options=options)

    def forecast(self, name, method, ratio, allocation, per_layer, slicing):
        """Live forecast from shapes alone (no weights are read); problems are shown, not raised."""
        try:
            config = self._config(name, method, ratio, allocation, per_layer, slicing)
            fc = forms.forecast_numbers(self.ctx.store, name, config)
        except Exception as err:  # noqa: BLE001  any message is better than a stale forecast
            return f"### Forecast\n{WARN} {err}"
        mb = 2 ** 20
        dtype = str(self.ctx.store.dtype).split(".")[-1]
        m = METHODS.get(method)
        fractions = forms.allocation_value(allocation) == "manual" or bool(slicing)
        note = f"\n\n{m.per_layer_note}" if m is not None and m.per_layer_note and fractions else ""
        return (f"### Forecast\n| | dense | compressed |\n|---|---:|---:|\n"
                f"| parameters | {millions(fc['params_dense'])} | **{millions(fc['params'])}** |\n"
                f"| weights ({dtype}) | {fc['bytes_dense'] / mb:,.1f} MB | **{fc['bytes'] / mb:,.1f} MB** |"
                f"\n\nBlocks lose **{fc['ratio']:.1%}** of their parameters; the whole model "
                f"{1 - fc['params'] / fc['params_dense']:.1%}.{note}")

    def achieved_target(self, method, allocation, per_layer, ratio):
        """In manual mode the target slider shows the mean of the per-layer values, read-only."""
        if forms.allocation_value(allocation) != "manual" or _edits_blocks(method):
            return gr.update(interactive=True)
        try:
            values = forms.parse_list(per_layer or "", float, "values")
        except ValueError:
            return gr.update(interactive=False)
        mean = round(min(max(sum(values) / len(values), forms.RATIO.low), forms.RATIO.high), 2) if values else ratio
        update = dict(interactive=False, label="Target ratio (manual: mean of the per-layer values)")
        return gr.update(**update) if _same(mean, ratio) else gr.update(value=mean, **update)

    # --- the job -------------------------------------------------------------------------------
    @staticmethod
    def default_source(method):
        """The calibration picker's value when the method changes: the method's default source."""
        return METHODS[method].calibration if method in METHODS else gr.update()

    def compress(self, session, model_name, method, ratio, allocation="auto", per_layer="", slicing=False,
                 calib_samples=16, calib_len=256, seed=0, batch_size=8, epsilon=0.1, calib_text="",
                 ppl_windows=4, options: dict | None = None, *, calib_source="", calib_file=None,
                 chat_eval=0, request: gr.Request = None):
        """Compress a copy of the dense model, streaming progress.

        calib_source: one of :data:`CALIBRATION_SOURCES`; empty (API callers from before the picker):
        ``calib_text`` when given, else wiki (what they always got; the page starts from the method's
        default source). calib_file: an uploaded .txt (custom text). chat_eval:
        held-out instructions scored for chat agreement with the dense model (0 skips it).
        Yields (progress panel, status, summary, run dropdown, session)."""
        self.ctx.register(request, session)
        with user_errors():
            model_name = (model_name or "").strip()
            config = self._config(model_name, method, ratio, allocation, per_layer, slicing, batch_size,
                                  epsilon, options)
            forms.forecast_numbers(self.ctx.store, model_name, config)  # unreachable targets fail now
            windows, chat_eval = int(ppl_windows), int(chat_eval or 0)
            if not 0 <= windows <= 64:
                raise ValueError("perplexity windows must be in [0, 64]")
            if not 0 <= chat_eval <= MAX_CHAT_EVAL:
                raise ValueError(f"chat agreement conversations must be in [0, {MAX_CHAT_EVAL}]")
            spec = calibration_spec(calib_samples, calib_len, calib_source, calib_text, calib_file)
            self.ctx.store.check_calibration_length(model_name, spec.seq_len)
        store = self.ctx.store

        def job(progress):
            text_weight = 0.4 if "self-chat" in spec.label else 0.02  # generating replies takes minutes
            stages = Stages(progress, {"loading the model": 0.05, "calibration text": text_weight,
                                       "compressing": 1.0, "saving": 0.05})
            step = stages.stage("loading the model")
            dense, tokenizer = store.get(model_name)
            step(1.0, "ready")
            step = stages.stage("calibration text")
            calibration = store.calibration(model_name, spec, step)  # CalibrationError on too little text
            step(1.0, f"{spec.num_samples} × {spec.seq_len} tokens")
            model, report = compress_and_measure(
                model_name, dense, tokenizer, config, spec, eval_windows=windows, chat_eval=chat_eval,
                seed=int(seed), cache=store.dense, progress=stages.stage("compressing"),
                calibration=calibration,
                windows=store.eval_windows(model_name, windows) if windows else None)
            run = Run(session.new_id(), model_name, report.to_dict(), model, tokenizer)
            return run, keep_compressed(session, run, stages.stage("saving"))  # in the session, then on disk

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():  # the status of an earlier run is cleared while this one runs
                        yield progress_html(state, "Compress"), "", gr.update(), gr.update(), session
        except Stopped:
            yield "", f"{STOP} Stopped. The dense model is untouched.", {"stopped": True}, \
                self.runs_dropdown(session), session
            return
        run, saved = state.result
        yield progress_html(state, "Compress"), self.status(run, saved), self.summary(run), \
            self.runs_dropdown(session, run.id), session

    @staticmethod
    def status(run: Run, saved: str = "") -> str:
        """The status line of a finished run; ``saved``: where it was saved (or why not)."""
        r = run.report
        ppl = r.get("evaluation", {}).get("ppl")
        ppl_text = (f" · wiki ppl {ppl['dense']:.2f} → **{ppl['compressed']:.2f}** "
                    f"({ppl['windows']} windows)" if ppl else "")
        agree = r.get("agreement") or {}
        if agree:
            ppl_text += f" · agreement with dense: top-1 {agree['top1']:.1%}, KL {agree['kl']:.3f}"
        chat = r.get("agreement_chat") or {}
        if chat.get("kl") is not None:
            ppl_text += (f" · on chat replies ({chat.get('conversations')} conversations): "
                         f"top-1 {chat['top1']:.1%}, KL {chat['kl']:.3f}")
        warn = "".join(f"\n\n{WARN} **{w}**" for w in r.get("warnings") or [])
        saved = f" · {saved}" if saved else ""
        return (f"{OK} **{run.id}**: {millions(r['params_dense'])} → **{millions(r['params_compressed'])}** "
                f"parameters (blocks −{r['ratio_achieved']:.1%}){ppl_text} in "
                f"{r['compress_seconds']:.1f} s · calibration: {calibration_line(r)}{saved}{warn}")

    @staticmethod
    def summary(run: Run) -> dict:
        summary = {k: v for k, v in run.report.items() if not isinstance(v, (list, dict))}
        summary["run"], summary["origin"] = run.id, run.origin
        if run.saved:
            summary["saved_as"] = run.saved
        summary["calibration"] = calibration_line(run.report)
        summary["command"] = command_for(run.report, out=f"runs/{run.id}")  # "copy as command"
        return summary

    def stop(self, session):
        """(progress panel, status) at once: the job's stream is cancelled with this click, so the page
        cannot wait for its last word; the worker ends at its next progress step (within a second or
        two) and frees the model slot."""
        session.request_stop()
        return "", f"{STOP} Stopped. The dense model is untouched."

    @staticmethod
    def selected_summary(session, run_id):
        """The summary of the run the picker shows (None without one), so the two never disagree: the
        picker also changes when a run is loaded, picked or healed, not only when one is compressed."""
        try:
            return CompressTab.summary(session.get(run_id))
        except RunError:
            return None

    heal = property(lambda self: self.healing.heal)  # the heal handler (ui.heal_view), by its old name

    @staticmethod
    def runs_dropdown(session, value=None):
        choices = [(run.label, run.id) for run in session.runs.values()]
        value = value or (choices[-1][1] if choices else None)
        return gr.update(choices=choices, value=value)

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self, default_model: str) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        gpu = self.ctx.on_gpu
        info_md, n0 = self.model_info(default_model)
        c = SimpleNamespace()
        notice = cpu_notice(gpu)
        if notice:
            gr.Markdown(notice)
        with gr.Row():
            with gr.Column(scale=3):
                c.model = gr.Dropdown(list(dict.fromkeys([default_model, *PACKAGED_MODELS])), value=default_model,
                                      allow_custom_value=True, label="Model",
                                      info="packaged name, Hugging Face id or local folder")
                c.model_md = gr.Markdown(info_md)
                c.n_layers = gr.Number(n0, visible=False, precision=0)
                c.method = gr.Radio([(m.label, m.name) for m in METHODS.values()], value=DEFAULT_METHOD,
                                    label="Method")
                c.method_md = gr.Markdown(METHODS[DEFAULT_METHOD].summary)
                c.ratio = knob_slider(forms.RATIO, DEFAULT_RATIO, label=forms.RATIO.label, info=forms.RATIO.help,
                                      elem_classes=HOVER)
                c.allocation = gr.Radio([(forms.ALLOCATION_LABELS[a], a) for a in forms.ALLOCATION_LABELS],
                                        value=DEFAULT_ALLOCATION, label="Allocation over layers", elem_classes=HOVER,
                                        info="uniform: same everywhere; automatic: by Block Influence (layer "
                                             "dropping: the blocks it drops); manual: per layer")
                c.slicing = gr.Checkbox(False, label="Target is the slicing fraction (paper's knob)",
                                        info="fraction of hidden dimensions deleted instead of parameters removed",
                                        elem_classes=HOVER, visible=False)
                c.per_layer = gr.Textbox("", label="Per-layer values", elem_classes=HOVER, visible=False,
                                         info="manual allocation: block indices to drop (layer dropping) or one "
                                              "value per layer, comma-separated; press Enter to update the sliders")
                self._build_editor(c)
            with gr.Column(scale=2):
                c.forecast_md = gr.Markdown("### Forecast")
                c.preview = self.preview.build()
                c.calib = calibration_form.build(gpu, METHODS[DEFAULT_METHOD].calibration)
                with gr.Accordion("Method options", open=False):
                    c.epsilon = gr.Number(forms.EPSILON.default, label=forms.EPSILON.label, elem_classes=HOVER,
                                          info=knob_info(forms.EPSILON))
                    c.groups, c.options = {}, {}
                    for name in METHODS:
                        with gr.Group(visible=name == DEFAULT_METHOD) as c.groups[name]:
                            mine = [k for m, k in forms.option_knobs() if m == name]
                            if not mine:
                                gr.Markdown(f"{METHODS[name].label} has no further options.")
                            for k in mine:
                                c.options[forms.option_param(name, k)] = option_control(k)
                with gr.Row(elem_classes=["run-buttons"]):  # pinned to the bottom of a phone's screen
                    c.go_btn = gr.Button("Compress", variant="primary")
                    c.stop_btn = gr.Button("Stop", variant="stop")
                c.progress = gr.HTML("")
                c.status = gr.Markdown("")
                with gr.Accordion("Run summary", open=False):
                    c.summary = gr.JSON(label="report")
        self.healing.build(c, gpu)
        return c

    @staticmethod
    def _build_editor(c: SimpleNamespace) -> None:
        """Presets and the per-layer editor: fixed components shown as needed (components made by
        gr.render orphan their listeners when it redraws while an update is on its way)."""
        with gr.Row(visible=False, equal_height=True) as c.preset_row:
            c.preset = gr.Dropdown(list(forms.PRESETS), value=forms.PRESETS[1], label="Preset", elem_classes=HOVER,
                                   info="Block Influence: the dense model's, computed once")
            c.preset_k = gr.Number(2, precision=0, minimum=0, maximum=64, label="k", elem_classes=HOVER,
                                   info="layers spared at each end")
            c.preset_mean = knob_slider(forms.RATIO, 0.25, label="Mean ratio")
            c.preset_btn = gr.Button("Apply preset", scale=0, min_width=120)
        c.preset_md = gr.Markdown("")
        with gr.Row(equal_height=True, visible=False) as c.slider_row:
            c.sliders = [gr.Slider(forms.PER_LAYER.low, forms.MAX_LAYER_VALUE, value=0.25, step=0.01,
                                   label=f"layer {i}", min_width=110, interactive=True, visible=False)
                         for i in range(forms.MAX_SLIDERS)]
        c.drop_box = gr.CheckboxGroup([], label="Blocks to drop", interactive=True, visible=False)

    def wire(self, page, c: SimpleNamespace, demo, state, run_dd) -> tuple:
        """Connect the tab's events; returns the (compress, heal) events for the runs view to follow."""
        cal = c.calib
        c.model.change(self.model_info, c.model, [c.model_md, c.n_layers], **HIDDEN)
        gr.on([demo.load, c.method.change, c.allocation.change], self.layout, [c.method, c.allocation],
              [c.allocation, c.method_md, c.slicing, c.per_layer, c.preset_row, c.epsilon, *c.groups.values()],
              **HIDDEN, **LAST)

        # The per-layer text drives the sliders, the read-only target and the forecast: they are chained
        # after the user's typing (`input`) and after each handler that writes the text. Not the textbox's
        # `change`: on a busy server it kept firing for one edit and set back a value typed in a slider.
        def follow_text(event, sliders_too=True):
            if sliders_too:
                event = event.then(self.editor_values, [c.per_layer, c.method, c.n_layers, *c.sliders],
                                   [c.drop_box, *c.sliders], **HIDDEN)
            event = event.then(self.achieved_target, [c.method, c.allocation, c.per_layer, c.ratio], c.ratio, **HIDDEN)
            return event.then(self.forecast, [c.model, c.method, c.ratio, c.allocation, c.per_layer, c.slicing],
                              c.forecast_md, **HIDDEN)

        follow_text(c.preset_btn.click(self.preset, [c.model, c.method, c.preset, c.preset_k, c.preset_mean,
                                                     c.epsilon], [c.per_layer, c.preset_md], **HIDDEN, **JOB))
        follow_text(gr.on([c.allocation.change, c.method.change, c.n_layers.change], self.default_per_layer,
                          [c.method, c.allocation, c.ratio, c.n_layers, c.per_layer], c.per_layer, **HIDDEN, **LAST))
        gr.on([demo.load, c.n_layers.change, c.method.change, c.allocation.change], self.editor_layout,
              [c.n_layers, c.method, c.allocation], [c.slider_row, c.drop_box, *c.sliders], **HIDDEN, **LAST)
        follow_text(c.per_layer.input(self.editor_values, [c.per_layer, c.method, c.n_layers, *c.sliders],
                                      [c.drop_box, *c.sliders], **HIDDEN, **LAST), sliders_too=False)
        follow_text(gr.on([s.release for s in c.sliders], self.slider_text, [c.n_layers, *c.sliders], c.per_layer,
                          **HIDDEN, **LAST), sliders_too=False)
        follow_text(c.drop_box.input(forms.indices_text, c.drop_box, c.per_layer, **HIDDEN, **LAST),
                    sliders_too=False)
        # method, allocation and layer-count changes reach the target and forecast through the chain above
        gr.on([demo.load, c.model.change, c.ratio.change, c.slicing.change], self.forecast,
              [c.model, c.method, c.ratio, c.allocation, c.per_layer, c.slicing], c.forecast_md, **HIDDEN, **LAST)
        c.method.change(self.default_source, c.method, cal.calib_source, **HIDDEN)
        cal.calib_source.change(calibration_form.calibration_layout, cal.calib_source,
                                [cal.calib_note, cal.calib_text, cal.calib_file], **HIDDEN)
        inputs = [state, c.model, c.method, c.ratio, c.allocation, c.per_layer, c.slicing, cal.calib_samples,
                  cal.calib_len, cal.seed, cal.batch_size, c.epsilon, cal.calib_text, cal.ppl_windows,
                  *c.options.values(), cal.calib_source, cal.calib_file, cal.chat_eval]
        compress_evt = page.endpoint([c.go_btn.click], with_option_params(self.compress), inputs,
                                     [c.progress, c.status, c.summary, run_dd, state], c.status, clear=[c.progress],
                                     api_name="compress", trigger_mode="once", show_progress="hidden",
                                     hold=c.go_btn, **JOB)
        c.stop_btn.click(self.stop, state, [c.progress, c.status], cancels=[compress_evt], queue=False, **HIDDEN)
        heal_evt = self.healing.wire(page, c, state, run_dd)
        # the summary shows the picker's run, whatever changed it (compress, load, pick) or it (heal)
        run_dd.change(self.selected_summary, [state, run_dd], c.summary, **HIDDEN, **LAST)
        heal_evt.then(self.selected_summary, [state, run_dd], c.summary, **HIDDEN)
        self._wire_preview(page, c, state, run_dd, compress_evt)
        return compress_evt, heal_evt

    def _wire_preview(self, page, c: SimpleNamespace, state, run_dd, compress_evt) -> None:
        """Measure fills the statistics; the forecast redraws with every settings change (it follows the
        parameter forecast, which every such change rewrites), a run, or another selected run."""
        cal, v = c.calib, c.preview
        calib = [cal.calib_samples, cal.calib_len, cal.calib_source, cal.calib_text, cal.calib_file]
        draw = dict(fn=self.preview.draw, inputs=[state, c.model, c.method, c.ratio, c.allocation, c.per_layer,
                                                  c.slicing, c.epsilon, *calib, run_dd, *c.options.values()],
                    outputs=[v.note, v.errors, v.tradeoff], **HIDDEN, **LAST)
        measured = page.endpoint([v.measure_btn.click], self.preview.measure, [state, c.model, *calib, cal.batch_size],
                                 [v.progress, v.note], v.note, clear=[v.progress], show_progress="hidden", **JOB)
        measured.then(**draw)
        best = page.endpoint([v.best_btn.click], self.preview.best, [c.model, c.method, c.ratio, *calib,
                                                                    *c.options.values()],
                             [c.allocation, c.per_layer, v.note], v.note)
        best.then(self.editor_layout, [c.n_layers, c.method, c.allocation], [c.slider_row, c.drop_box, *c.sliders],
                  **HIDDEN).then(self.editor_values, [c.per_layer, c.method, c.n_layers, *c.sliders],
                                 [c.drop_box, *c.sliders], **HIDDEN).then(**draw)
        compress_evt.then(**draw)
        gr.on([c.forecast_md.change, run_dd.change, cal.calib_samples.change, cal.calib_len.change,
               cal.calib_source.change], **draw)
