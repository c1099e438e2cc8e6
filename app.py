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

from compression.models import DEFAULT_MODEL
from ui.chat_tab import CHAT_EXAMPLES, COMPARE_MAX_TOKENS, MAX_RUNS, ChatTab
from ui.common import ACCEL, Context, queue_settings  # noqa: F401  (ACCEL: the tests check the queue)
from ui.compress_tab import CompressTab
from ui.evaluate_tab import EvaluateTab
from ui.inspect_tab import NO_OVERLAY, X_AXIS_CHOICES, InspectTab
from ui.page import CSS, HIDDEN, JOB, LAST, Page
from ui.runs import Session, clean_leftovers, max_upload_bytes, runs_root
from ui.runs_tab import RUN_COLUMNS, RunsTab
from ui.space import prepare_space
from ui.store import ModelStore

CHAT_HEIGHT = 480  # px: room for a prompt and a 128-token reply with two panes across


def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
              store: ModelStore | None = None) -> gr.Blocks:
    ctx = Context(store or ModelStore(device, dtype))
    tabs = SimpleNamespace(compress=CompressTab(ctx), inspect=InspectTab(ctx), evaluate=EvaluateTab(ctx),
                           chat=ChatTab(ctx), runs=RunsTab(ctx))
    gpu = ctx.on_gpu
    hover = ["hover-info"]
    root = runs_root()
    hidden, last, job = HIDDEN, LAST, JOB
    with gr.Blocks(title="Training-free LM compression", delete_cache=(1800, 3600)) as demo:
        page = Page()
        state = gr.State(Session, delete_callback=Session.close)
        gr.Markdown(f"# Training-free compression of causal LMs\nMoDeGPT, Olica, SliceGPT and layer dropping "
                    f"on `{default_model}` or any supported decoder. Running on **{ctx.store.device}** "
                    f"({torch.get_num_threads()} threads).")
        run_dd = gr.Dropdown(label="Run (used by Inspect, Evaluate, Chat and download)", choices=[],
                             interactive=True)
        with gr.Tabs():
            with gr.Tab("Compress", id="compress"):
                compress = tabs.compress.build(default_model)
                n0 = int(compress.n_layers.value or 0)
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
        endpoint = page.endpoint
        inspect_out = [layer, key, inspect_md, fig_spectrum, fig_overview, fig_leverage, fig_errors, fig_sizes,
                       other_run]
        runs_out = [runs_df, fig_pareto, fig_acc]
        for event in t.compress.wire(page, compress, demo, state, run_dd):
            event.then(t.runs.view, state, runs_out, **hidden)
        model = compress.model
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
    clean_leftovers()  # what killed jobs of earlier processes left
    model = os.environ.get("COMPRESSION_APP_MODEL", DEFAULT_MODEL)
    launch_kwargs.setdefault("max_file_size", max_upload_bytes())
    return build_app(model).queue(**queue_settings()).launch(css=CSS, **launch_kwargs)


if __name__ == "__main__":
    main()
