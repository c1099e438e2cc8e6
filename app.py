"""Gradio app: compress a causal LM without training, inspect what was kept, evaluate, chat, compare runs.

``build_app(default_model=...)`` returns the ``gr.Blocks``; ``python app.py`` launches it (honours
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT). This file only lays out components and wires them to the
tab objects in :mod:`ui` (no algorithm, no file handling). Named API endpoints: /compress,
/inspect, /evaluate, /chat, /heal, /load_run, /download (scriptable with gradio_client). Each is an
event of its own on a hidden button: it raises on bad input, so scripts get an exception, while the
page's event shows the same message as "⚠ ..." status text (:func:`ui.common.on_page`).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr
import torch

from compression.methods import METHODS
from compression.models import DEFAULT_MODEL, PACKAGED_MODELS
from ui import forms, jobs
from ui.chat_tab import CHAT_EXAMPLES, COMPARE_MAX_TOKENS, MAX_RUNS, ChatTab
from ui.common import ACCEL, Context, on_page
from ui.compress_tab import (CALIBRATION_CPU, CALIBRATION_GPU, CALIBRATION_SOURCES, DEFAULT_ALLOCATION,
                             DEFAULT_METHOD, DEFAULT_RATIO, MAX_CALIB_CHARS, MAX_CHAT_EVAL, SOURCE_NOTES,
                             CompressTab, with_option_params)
from ui.evaluate_tab import EvaluateTab
from ui.inspect_tab import NO_OVERLAY, X_AXIS_CHOICES, InspectTab
from ui.runs import Session, max_upload_bytes, runs_root
from ui.runs_tab import RUN_COLUMNS, RunsTab
from ui.space import cpu_notice, prepare_space
from ui.store import ModelStore

CHAT_HEIGHT = 480  # px: room for a prompt and a 128-token reply with two panes across
CSS = jobs.CSS + """
.hover-info {overflow: visible !important;}
.hover-info label {position: relative;}
.hover-info [data-testid="block-info"]::after {content: "?"; display: inline-block; width: 1.2em;
  height: 1.2em; margin-left: 0.4em; border: 1px solid currentColor; border-radius: 50%; font-size: 0.75em;
  line-height: 1.1em; text-align: center; opacity: 0.55;}
.chat-panes .bubble-wrap {margin-top: 2.25rem; height: calc(100% - 2.25rem); padding-top: 0.25rem;}
.compare-table .cell-wrap {font-family: var(--font); font-size: var(--text-sm);}
"""  # knobs show their help under the label; the "?" marks that they have some. Chat panes: gradio's
# Chatbot floats its label and buttons (absolute, top 0) over the scrolling message list, whose top
# padding scrolls away with the messages, so a scrolled user message slid under the pane's header;
# the list now starts below the header, which clips it there.


def option_control(k, hover):
    """A gradio control for one method knob (from its metadata)."""
    info = k.help + (f" · range {k.range_text()}" if k.range_text() else "")
    if k.kind == "bool":
        return gr.Checkbox(k.default, label=k.label, info=info, elem_classes=hover)
    if k.kind in ("float", "int"):
        return gr.Number(k.default, label=k.label, info=info, elem_classes=hover,
                         precision=0 if k.kind == "int" else None)
    if k.choices:
        return gr.Dropdown(list(k.choices), value=k.default, label=k.label, info=info, elem_classes=hover)
    return gr.Textbox("" if k.default is None else str(k.default), label=k.label, info=info,
                      elem_classes=hover)


def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
              store: ModelStore | None = None) -> gr.Blocks:
    ctx = Context(store or ModelStore(device, dtype))
    tabs = SimpleNamespace(compress=CompressTab(ctx), inspect=InspectTab(ctx), evaluate=EvaluateTab(ctx),
                           chat=ChatTab(ctx), runs=RunsTab(ctx))
    gpu = ctx.on_gpu
    info_md, n0 = tabs.compress.model_info(default_model)
    hover = ["hover-info"]
    models = list(dict.fromkeys([default_model, *PACKAGED_MODELS]))
    root = runs_root()
    hidden = dict(api_visibility="private")
    last = dict(trigger_mode="always_last")  # a change while the previous update runs is not lost
    with gr.Blocks(title="Training-free LM compression") as demo:
        state = gr.State(Session, delete_callback=Session.close)
        gr.Markdown(f"# Training-free compression of causal LMs\nMoDeGPT, Olica, SliceGPT and layer dropping "
                    f"on `{default_model}` or any supported decoder. Running on **{ctx.store.device}** "
                    f"({torch.get_num_threads()} threads).")
        run_dd = gr.Dropdown(label="Run (used by Inspect, Evaluate, Chat and download)", choices=[],
                             interactive=True)
        with gr.Tabs():
            # ---------------------------------------------------------------- Compress
            with gr.Tab("Compress", id="compress"):
                notice = cpu_notice(gpu)
                if notice:
                    gr.Markdown(notice)
                with gr.Row():
                    with gr.Column(scale=3):
                        model = gr.Dropdown(models, value=default_model, allow_custom_value=True, label="Model",
                                            info="packaged name, Hugging Face id or local folder")
                        model_md = gr.Markdown(info_md)
                        n_layers = gr.Number(n0, visible=False, precision=0)
                        method = gr.Radio([(m.label, m.name) for m in METHODS.values()], value=DEFAULT_METHOD,
                                          label="Method")
                        method_md = gr.Markdown(METHODS[DEFAULT_METHOD].summary)
                        ratio = gr.Slider(0.0, 0.9, value=DEFAULT_RATIO, step=0.01, label="Target ratio",
                                          info="fraction of decoder-block parameters to remove",
                                          elem_classes=hover)
                        allocation = gr.Radio([(forms.ALLOCATION_LABELS[a], a) for a in ("uniform", "auto", "manual")],
                                              value=DEFAULT_ALLOCATION, label="Allocation over layers",
                                              elem_classes=hover,
                                              info="uniform: same everywhere; automatic: by Block Influence "
                                                   "(layer dropping: the blocks it drops); manual: per layer")
                        slicing = gr.Checkbox(False, label="Target is the slicing fraction (paper's knob)",
                                              info="fraction of hidden dimensions deleted instead of "
                                                   "parameters removed", elem_classes=hover, visible=False)
                        per_layer = gr.Textbox("", label="Per-layer values", elem_classes=hover, visible=False,
                                               info="manual allocation: block indices to drop (layer "
                                                    "dropping) or one value per layer, comma-separated; "
                                                    "press Enter to update the sliders")

                        with gr.Row(visible=False, equal_height=True) as preset_row:
                            preset = gr.Dropdown(list(forms.PRESETS), value=forms.PRESETS[1], label="Preset",
                                                 elem_classes=hover,
                                                 info="Block Influence: the dense model's, computed once")
                            preset_k = gr.Number(2, precision=0, minimum=0, maximum=64, label="k",
                                                 info="layers spared at each end", elem_classes=hover)
                            preset_mean = gr.Slider(0.0, 0.9, value=0.25, step=0.01, label="Mean ratio")
                            preset_btn = gr.Button("Apply preset", scale=0, min_width=120)
                        preset_md = gr.Markdown("")
                        # the per-layer editor: fixed components shown as needed (components made by
                        # gr.render orphan their listeners when it redraws while an update is on its way)
                        with gr.Row(equal_height=True, visible=False) as slider_row:
                            sliders = [gr.Slider(0.0, forms.MAX_LAYER_VALUE, value=0.25, step=0.01,
                                                 label=f"layer {i}", min_width=110, interactive=True, visible=False)
                                       for i in range(forms.MAX_SLIDERS)]
                        drop_box = gr.CheckboxGroup([], label="Blocks to drop", interactive=True, visible=False)

                    with gr.Column(scale=2):
                        forecast_md = gr.Markdown("### Forecast")
                        with gr.Accordion("Calibration", open=True):
                            with gr.Row():
                                calib = CALIBRATION_GPU if gpu else CALIBRATION_CPU
                                calib_samples = gr.Number(calib[0], precision=0, label="Samples",
                                                          info="paper: 64 × 512 tokens; smaller is faster on CPU",
                                                          elem_classes=hover)
                                calib_len = gr.Number(calib[1], precision=0, label="Tokens each",
                                                      elem_classes=hover, info="sequence length")
                            with gr.Row():
                                seed = gr.Number(0, precision=0, label="Seed")
                                batch_size = gr.Number(8, precision=0, label="Batch", elem_classes=hover,
                                                       info="calibration sequences per forward pass")
                            source0 = METHODS[DEFAULT_METHOD].calibration
                            calib_source = gr.Dropdown(CALIBRATION_SOURCES, value=source0, label="Calibration source",
                                                       info="what the statistics are estimated on (each "
                                                            "method starts from its measured default)",
                                                       elem_classes=hover)
                            calib_note = gr.Markdown(SOURCE_NOTES[source0])
                            calib_text = gr.Textbox("", lines=2, label="Custom calibration text", visible=False,
                                                    max_length=MAX_CALIB_CHARS)
                            calib_file = gr.File(label="…or upload a .txt file (UTF-8)", file_types=[".txt"],
                                                 type="filepath", visible=False, height=120)
                            ppl_windows = gr.Slider(0, 32, value=32 if gpu else 4, step=1,
                                                    label="Perplexity windows after compressing",
                                                    info="1024-token held-out wiki windows (paper: 32; 0 = skip)",
                                                    elem_classes=hover)
                            chat_eval = gr.Slider(0, MAX_CHAT_EVAL, value=16 if gpu else 8, step=1,
                                                  label="Chat agreement conversations",
                                                  info="held-out instructions: KL and top-1 against the dense "
                                                       "model's greedy replies (0 = skip)", elem_classes=hover)
                        with gr.Accordion("Method options", open=False):
                            epsilon = gr.Number(0.1, label="Allocation temperature ε", elem_classes=hover,
                                                info="automatic allocation: φ_i ∝ softmax(−BI_i/ε); "
                                                     "small ε prunes low-influence layers harder")
                            groups, options = {}, {}
                            for name in METHODS:
                                with gr.Group(visible=name == DEFAULT_METHOD) as groups[name]:
                                    mine = [k for m, k in forms.option_knobs() if m == name]
                                    if not mine:
                                        gr.Markdown(f"{METHODS[name].label} has no further options.")
                                    for k in mine:
                                        options[forms.option_param(name, k)] = option_control(k, hover)
                        with gr.Row():
                            go_btn = gr.Button("Compress", variant="primary")
                            stop_btn = gr.Button("Stop", variant="stop")
                        compress_progress = gr.HTML("")
                        status = gr.Markdown("")
                        with gr.Accordion("Run summary", open=False):
                            summary = gr.JSON(label="report")
                with gr.Accordion("Recovery training (heal) of the selected run", open=False):
                    gr.Markdown("A short causal-LM fine-tune of the compressed model on calibration text "
                                "(after the tokens it was calibrated on), LoRA merged back, or every "
                                "parameter with rank 0. It changes the run's model in place.")
                    with gr.Row():
                        heal_tokens = gr.Number(1_000_000 if gpu else 16_384, precision=0, label="Tokens",
                                                elem_classes=hover, info="training budget; LayerChop uses far more")
                        heal_rank = gr.Number(8, precision=0, label="LoRA rank", elem_classes=hover,
                                              info="0 trains every parameter")
                        heal_len = gr.Number(256, precision=0, label="Sequence length")
                        heal_windows = gr.Number(32 if gpu else 4, precision=0, label="Perplexity windows",
                                                 elem_classes=hover,
                                                 info="held-out windows measured before and after (0: skip)")
                    with gr.Row():
                        heal_btn = gr.Button("Heal")
                        heal_stop = gr.Button("Stop healing", variant="stop")
                    heal_progress = gr.HTML("")
                    heal_md = gr.Markdown("")
                    heal_plot = gr.Plot(label="loss")
            # ---------------------------------------------------------------- Inspect
            with gr.Tab("Inspect", id="inspect"):
                inspect_md = gr.Markdown("No run yet: compress a model first.")
                with gr.Row(equal_height=True):
                    layer = gr.Slider(0, max(n0 - 1, 1), value=0, step=1, label="Layer", scale=2)
                    x_axis = gr.Radio(X_AXIS_CHOICES, value="index", label="Spectra x-axis")
                    other_run = gr.Dropdown([NO_OVERLAY], value=NO_OVERLAY, label="Overlay a second run",
                                            info="on the error and size plots")
                fig_spectrum = gr.Plot(label="spectra of the layer")
                with gr.Row():
                    with gr.Column():
                        key = gr.Dropdown([], value="", allow_custom_value=True, label="Spectrum for the heat map")
                        fig_overview = gr.Plot(label="spectra by layer")
                    with gr.Column():
                        log_leverage = gr.Checkbox(False, label="Log scale for leverage")
                        fig_leverage = gr.Plot(label="leverage")
                with gr.Row():
                    fig_errors, fig_sizes = gr.Plot(label="errors"), gr.Plot(label="sizes")
                fig_influence = gr.Plot(label="influence")
            # ---------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate"):
                try:
                    from compression.zeroshot import available_tasks
                    tasks_ok, zs_note = available_tasks(), ""
                except Exception as err:  # noqa: BLE001  lm-eval or the task files missing
                    tasks_ok, zs_note = (), f"_Zero-shot disabled: {err}_"
                with gr.Row():
                    ev_windows = gr.Slider(0, 64, value=32 if gpu else 4, step=1, label="Perplexity windows",
                                           info="1024-token held-out wiki windows (reference: 32)",
                                           elem_classes=hover)
                    ev_limit = gr.Number(50, precision=0, label="Zero-shot items per task",
                                         info="the interval shrinks as 1/√n: 50 items ≈ ±14 points",
                                         elem_classes=hover)
                    ev_speed = gr.Checkbox(True, label="Measure speed and memory",
                                           info="prefill / decode tokens per second", elem_classes=hover)
                ev_tasks = gr.CheckboxGroup(list(tasks_ok), value=[], label="Zero-shot tasks (lm-eval, offline)",
                                            interactive=bool(tasks_ok))
                gr.Markdown(zs_note or "Peak memory on CPU is the process's peak resident size.")
                ev_btn = gr.Button("Evaluate dense vs compressed", variant="primary")
                ev_progress = gr.HTML("")
                ev_status = gr.Markdown("")
                ev_table = gr.Dataframe(headers=["metric", "dense", "compressed", "Δ %"],
                                        label="dense vs compressed", interactive=False, max_height=1000)
            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat"):
                chat_runs = gr.Dropdown([], value=None, multiselect=True, max_choices=MAX_RUNS,
                                        allow_custom_value=True, label=f"Runs to chat with (up to {MAX_RUNS})",
                                        info="each answers next to the dense model; follows the run picked "
                                             "above; a new selection starts a new conversation")
                with gr.Row(elem_classes=["chat-panes"]):
                    panes = [gr.Chatbot(label="Dense", height=CHAT_HEIGHT, buttons=["copy"])] + \
                            [gr.Chatbot(label=f"Run {i + 1}", height=CHAT_HEIGHT, buttons=["copy"], visible=False)
                             for i in range(MAX_RUNS)]
                msg = gr.Textbox(placeholder="Message every model…", show_label=False, submit_btn=True)
                chat_status = gr.Markdown("")
                with gr.Row():
                    chat_stop = gr.Button("Stop", variant="stop")
                    chat_clear = gr.Button("Clear chat")
                gr.Examples(CHAT_EXAMPLES, inputs=[msg])
                compare_btn = gr.Button("Compare on these prompts")
                compare_progress = gr.HTML("")
                compare_table = gr.Dataframe(headers=["prompt", "dense"], label="The example prompts, every model "
                                             f"(fresh conversations, replies capped at {COMPARE_MAX_TOKENS} tokens)",
                                             interactive=False, wrap=True, max_height=800,
                                             elem_classes=["compare-table"])
                with gr.Accordion("Sampling (same settings and seed for every model)", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature",
                                                info="0 = greedy", elem_classes=hover)
                        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                        max_new = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
                        rep_penalty = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
                        chat_seed = gr.Number(0, precision=0, label="Seed")
                        template = gr.Checkbox(True, label="Chat template")
            # ---------------------------------------------------------------- Runs
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs_df = gr.Dataframe(headers=RUN_COLUMNS, label="This session's runs", interactive=False)
                with gr.Row():
                    fig_pareto, fig_acc = gr.Plot(label="pareto"), gr.Plot(label="accuracy")
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="Load a saved run (.zip or report.json)", file_types=[".zip", ".json"])
                        folder = gr.Textbox(label=f"…or a saved run's folder name under {root}" if root else
                                            "Loading folders from the server is off on a Space",
                                            interactive=root is not None)
                        load_btn = gr.Button("Load run")
                        load_md = gr.Markdown("")
                    with gr.Column():
                        dl_btn = gr.Button("Zip the selected run (safetensors + config + report)")
                        dl_file = gr.File(label="download", interactive=False)
                        dl_status = gr.Markdown("")

        # ------------------------------------------------------------------------ wiring
        t = tabs
        api_only = gr.Button(visible=False)  # never clicked: it carries the named endpoints for scripts

        def endpoint(triggers, fn, inputs, outputs, status, clear=(), api_name=None, **kwargs):
            """The page's event, where user errors show as text in ``status`` (added to the outputs when
            it is not one of them), and with ``api_name`` the named endpoint for scripts, where they
            still raise (gradio_client gets an exception)."""
            if api_name:  # registered first, so it gets the name itself
                api_only.click(fn, inputs, outputs, api_name=api_name, **kwargs)
            shown = outputs if status in outputs else [*outputs, status]
            page = on_page(fn, len(outputs), shown.index(status), tuple(outputs.index(c) for c in clear))
            return gr.on(triggers, page, inputs, shown, **hidden, **kwargs)

        inspect_out = [layer, key, inspect_md, fig_spectrum, fig_overview, fig_leverage, fig_errors, fig_sizes,
                       other_run]
        runs_out = [runs_df, fig_pareto, fig_acc]
        job = dict(concurrency_id=ACCEL, concurrency_limit=1)
        model.change(t.compress.model_info, model, [model_md, n_layers], **hidden)
        gr.on([demo.load, method.change, allocation.change], t.compress.layout, [method, allocation],
              [allocation, method_md, slicing, per_layer, preset_row, epsilon, *groups.values()], **hidden, **last)
        # The per-layer text drives the sliders, the read-only target and the forecast: they are chained
        # after the user's typing (`input`) and after each handler that writes the text. Not the textbox's
        # `change`: on a busy server it kept firing for one edit and set back a value typed in a slider.
        def follow_text(event, sliders_too=True):
            if sliders_too:
                event = event.then(t.compress.editor_values, [per_layer, method, n_layers, *sliders],
                                   [drop_box, *sliders], **hidden)
            event = event.then(t.compress.achieved_target, [method, allocation, per_layer, ratio], ratio, **hidden)
            return event.then(t.compress.forecast, [model, method, ratio, allocation, per_layer, slicing],
                              forecast_md, **hidden)

        follow_text(preset_btn.click(t.compress.preset, [model, method, preset, preset_k, preset_mean, epsilon],
                                     [per_layer, preset_md], **hidden, **job))
        follow_text(gr.on([allocation.change, method.change, n_layers.change], t.compress.default_per_layer,
                          [method, allocation, ratio, n_layers, per_layer], per_layer, **hidden, **last))
        gr.on([demo.load, n_layers.change, method.change, allocation.change], t.compress.editor_layout,
              [n_layers, method, allocation], [slider_row, drop_box, *sliders], **hidden, **last)
        follow_text(per_layer.input(t.compress.editor_values, [per_layer, method, n_layers, *sliders],
                                    [drop_box, *sliders], **hidden, **last), sliders_too=False)
        follow_text(gr.on([s.release for s in sliders], t.compress.slider_text, [n_layers, *sliders], per_layer,
                          **hidden, **last), sliders_too=False)
        follow_text(drop_box.input(forms.indices_text, drop_box, per_layer, **hidden, **last), sliders_too=False)
        # method, allocation and layer-count changes reach the target and forecast through the chain above
        gr.on([demo.load, model.change, ratio.change, slicing.change], t.compress.forecast,
              [model, method, ratio, allocation, per_layer, slicing], forecast_md, **hidden, **last)
        compress_inputs = [state, model, method, ratio, allocation, per_layer, slicing, calib_samples, calib_len,
                           seed, batch_size, epsilon, calib_text, ppl_windows, *options.values(), calib_source,
                           calib_file, chat_eval]
        method.change(t.compress.default_source, method, calib_source, **hidden)
        calib_source.change(t.compress.calibration_layout, calib_source, [calib_note, calib_text, calib_file],
                            **hidden)
        compress_evt = endpoint([go_btn.click], with_option_params(t.compress.compress), compress_inputs,
                                [compress_progress, status, summary, run_dd, state], status, clear=[compress_progress],
                                api_name="compress", trigger_mode="once", show_progress="hidden", **job)
        compress_evt.then(t.runs.view, state, runs_out, **hidden)
        stop_btn.click(t.compress.stop, state, status, cancels=[compress_evt], queue=False, **hidden)
        endpoint([run_dd.change, layer.change, key.input, x_axis.input, log_leverage.input, other_run.input],
                 t.inspect.inspect, [state, run_dd, layer, key, x_axis, log_leverage, other_run], inspect_out,
                 inspect_md, api_name="inspect", **last)
        run_dd.change(t.inspect.influence, [state, run_dd], fig_influence, **hidden, **job)
        ev_evt = endpoint([ev_btn.click], t.evaluate.evaluate, [state, run_dd, ev_windows, ev_tasks, ev_limit, ev_speed],
                          [ev_progress, ev_table], ev_status, clear=[ev_progress], api_name="evaluate",
                          show_progress="hidden", **job)
        ev_evt.then(t.runs.view, state, runs_out, **hidden)
        # Chat: the run picker follows the global run; a new selection relabels and empties the panes
        run_dd.change(t.chat.choices, [state, run_dd, chat_runs], chat_runs, **hidden)
        chat_runs.change(t.chat.panes, [state, chat_runs], panes, **hidden, **last)
        sampling = [temperature, top_p, max_new, rep_penalty, chat_seed, template]
        chat_inputs = [state, msg, panes[0], panes[1], run_dd, model, *sampling, chat_runs, *panes[2:]]
        chat_evt = endpoint([msg.submit], t.chat.chat, chat_inputs, [*panes, msg], chat_status, api_name="chat",
                            **job)
        compare_evt = endpoint([compare_btn.click], t.chat.compare, [state, chat_runs, model, *sampling],
                               [compare_progress, compare_table], chat_status, clear=[compare_progress],
                               show_progress="hidden", **job)
        chat_stop.click(t.chat.stopped, None, [chat_status, compare_progress], cancels=[chat_evt, compare_evt],
                        queue=False, **hidden)
        chat_clear.click(t.chat.clear, None, [*panes, msg], queue=False, **hidden)
        load_evt = endpoint([load_btn.click], t.runs.load_saved, [state, upload, folder], [load_md, run_dd, state],
                            load_md, api_name="load_run", **job)
        load_evt.then(t.runs.view, state, runs_out, **hidden)
        # Plots drawn while their tab was hidden come back with a clipped legend: redraw on select
        runs_tab.select(t.runs.view, state, runs_out, **hidden)
        endpoint([dl_btn.click], t.runs.download, [state, run_dd], [dl_file], dl_status, api_name="download", **job)
        heal_evt = endpoint([heal_btn.click], t.compress.heal, [state, run_dd, heal_tokens, heal_rank, heal_len,
                                                                 heal_windows],
                            [heal_progress, heal_md, heal_plot], heal_md, clear=[heal_progress], api_name="heal",
                            show_progress="hidden", **job)
        heal_evt.then(t.runs.view, state, runs_out, **hidden)
        heal_stop.click(t.compress.stop, state, heal_md, cancels=[heal_evt], queue=False, **hidden)

        def on_unload(request: gr.Request):
            unload(ctx, request)
        demo.unload(on_unload)
    demo.tabs, demo.ctx = tabs, ctx  # for tests and scripts
    return demo


def unload(ctx: Context, request: gr.Request = None):
    """Page closed: free that session's models and files now rather than when its state expires."""
    session = ctx.sessions.pop(getattr(request, "session_hash", None), None) if request else None
    if session is not None:
        session.close()


def main(**launch_kwargs):
    """Serve the app (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by gradio's launch)."""
    prepare_space()  # on a Space: the --no-deps offline assets, before the default model is needed
    model = os.environ.get("COMPRESSION_APP_MODEL", DEFAULT_MODEL)
    launch_kwargs.setdefault("max_file_size", max_upload_bytes())
    return build_app(model).queue(default_concurrency_limit=4).launch(css=CSS, **launch_kwargs)


if __name__ == "__main__":
    main()
