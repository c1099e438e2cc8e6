"""Gradio app: compress a causal LM without training, inspect what was kept, evaluate, chat, compare runs.

``build_app(default_model=...)`` returns the ``gr.Blocks``; ``python app.py`` launches it (honours
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT). This file only assembles the tabs of :mod:`ui`, each of which
lays out and wires itself (no algorithm, no file handling). Named API endpoints: /compress,
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
from ui.chat_tab import ChatTab
from ui.common import ACCEL, Context, queue_settings  # noqa: F401  (ACCEL: the tests check the queue)
from ui.compress_tab import CompressTab
from ui.evaluate_tab import EvaluateTab
from ui.inspect_tab import InspectTab
from ui.page import CSS, TABS, Page, launch_options  # noqa: F401  (CSS: the browser test serves it)
from ui.runs import Session, clean_leftovers, max_upload_bytes
from ui.runs_tab import RunsTab
from ui.space import prepare_space
from ui.store import ModelStore


def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
              store: ModelStore | None = None) -> gr.Blocks:
    ctx = Context(store or ModelStore(device, dtype))
    tabs = SimpleNamespace(compress=CompressTab(ctx), inspect=InspectTab(ctx), evaluate=EvaluateTab(ctx),
                           chat=ChatTab(ctx), runs=RunsTab(ctx))
    with gr.Blocks(title="Training-free LM compression", delete_cache=(1800, 3600)) as demo:
        page = Page()
        state = gr.State(Session, delete_callback=Session.close)
        gr.Markdown(f"# Training-free compression of causal LMs\nMoDeGPT, Olica, SliceGPT and layer dropping "
                    f"on `{default_model}` or any supported decoder. Running on **{ctx.store.device}** "
                    f"({torch.get_num_threads()} threads).")
        run_dd = gr.Dropdown(label="Run (used by Inspect, Evaluate, Chat and download)", choices=[],
                             interactive=True)
        with gr.Tabs(**TABS):
            with gr.Tab("Compress", id="compress"):
                compress = tabs.compress.build(default_model)
            with gr.Tab("Inspect", id="inspect"):
                inspect = tabs.inspect.build(int(compress.n_layers.value or 0))
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate = tabs.evaluate.build()
            with gr.Tab("Chat", id="chat"):
                chat = tabs.chat.build()
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs = tabs.runs.build()
        # Each tab wires its own events; the Runs table follows those of the others that change runs.
        changed = list(tabs.compress.wire(page, compress, demo, state, run_dd))
        tabs.inspect.wire(page, inspect, state, run_dd)
        changed.append(tabs.evaluate.wire(page, evaluate, state, run_dd))
        tabs.chat.wire(page, chat, state, run_dd, compress.model)
        tabs.runs.wire(page, runs, runs_tab, state, run_dd, changed)

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
    return build_app(model).queue(**queue_settings()).launch(**{**launch_options(), **launch_kwargs})


if __name__ == "__main__":
    main()
