"""Gradio app: compress a causal LM without training, inspect what was kept, evaluate, chat, compare runs.

``build_app(default_model=...)`` returns the ``gr.Blocks``; ``python app.py`` launches it (honours
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT). No algorithm lives here: configs, jobs and chat come from
``compression.session`` and figures from ``viz``. Event functions are methods of :class:`Handlers` and
take plain values, so tests call them without a browser. Named API endpoints: /compress, /inspect,
/evaluate, /chat (scriptable with gradio_client).
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref

import gradio as gr
import torch

import viz
from compression import session as S
from compression.data import TextSpec
from compression.models import DEFAULT_MODEL, PACKAGED_MODELS

try:  # Hugging Face ZeroGPU: borrow a GPU per call; a no-op decorator elsewhere
    import spaces

    GPU = spaces.GPU
except ImportError:
    def GPU(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

try:
    import compression.heal  # noqa: F401  (recovery training is optional)
    HEAL = True
except ImportError:
    HEAL = False

ACCEL = "accelerator"  # concurrency_id shared by every job that runs a model (one at a time)
METHOD_CHOICES = [("Layer dropping (ShortGPT / LayerChop)", "layerdrop"), ("SliceGPT", "slicegpt"),
                  ("MoDeGPT", "modegpt"), ("Olica", "olica")]
METHOD_NOTES = {
    "layerdrop": "Deletes whole decoder blocks, those with the lowest **Block Influence** "
                 "(1 − cos between a block's input and output) first. Fast, coarse.",
    "slicegpt": "Rotates the residual stream into its principal components (PCA of calibration "
                "activations) and **deletes the weakest directions** of every block's width.",
    "modegpt": "Rebuilds each block's MLP (Nyström, **ridge leverage scores**), query-key (CR "
               "decomposition, rotary pairs) and value-output (SVD) at smaller inner widths.",
    "olica": "Orthogonal decomposition of value-output, rotary-pair query-key pruning, MLP neuron "
             "pruning, and a **low-rank linear calibration branch** that predicts the pruning error.",
}
CHAT_EXAMPLES = ["Explain photosynthesis to a ten-year-old.", "Write a haiku about autumn.",
                 "What is the capital of France, and why is it famous?",
                 "Give me three tips for writing clean Python code."]
CSS = """
.hover-info {overflow: visible !important;}
.hover-info label {position: relative;}
.hover-info [data-testid="block-info"]::after {content: "?"; display: inline-block; width: 1.2em;
  height: 1.2em; margin-left: 0.4em; border: 1px solid currentColor; border-radius: 50%; font-size: 0.75em;
  line-height: 1.1em; text-align: center; opacity: 0.55;}
.hover-info .info-text {visibility: hidden; position: absolute; z-index: 50; top: 1.6em; left: 0;
  max-width: 28em; padding: 4px 8px; border-radius: 6px; background: var(--background-fill-primary);
  border: 1px solid var(--border-color-primary); box-shadow: var(--shadow-drop-lg); pointer-events: none;
  color: var(--body-text-color);}
.hover-info [data-testid="block-info"]:hover + .info-text {visibility: visible;}
"""  # knobs explain themselves in a tooltip when the pointer is on their label (gradio's `info` text)


@contextlib.contextmanager
def user_errors():
    """Library errors on bad input become a gr.Error toast; the app stays usable."""
    try:
        yield
    except (gr.Error, S.Stopped):
        raise
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, ArithmeticError) as err:
        raise gr.Error(f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err),
                       print_exception=False) from err


def _bridge(progress):
    """A library progress(fraction, message) callback that drives a gr.Progress."""
    return lambda fraction, message: progress(min(max(float(fraction), 0.0), 1.0), desc=message)


class Handlers:
    """Event functions; ``store`` (dense models) is shared, ``session`` (gr.State) is per user."""

    def __init__(self, store: S.ModelStore):
        self.store = store
        self.gpu = threading.Lock()  # held while a model runs, even if gradio cancelled the request
        self.sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def on_gpu(self) -> bool:
        return self.store.device.startswith("cuda")

    def _register(self, request, session):
        if request is not None and getattr(request, "session_hash", None):
            self.sessions[request.session_hash] = session

    def unload(self, request: gr.Request = None):
        """Page closed: free that session's models now rather than when its state expires."""
        session = self.sessions.pop(getattr(request, "session_hash", None), None) if request else None
        if session is not None:
            session.close()

    # ------------------------------------------------------------------------------------ compress
    def model_info(self, name: str):
        with user_errors():
            info = self.store.info(name)
        md = (f"**{info.model_type}** · {info.num_layers} layers · hidden {info.hidden_size} · "
              f"{info.params / 1e6:,.1f}M parameters")
        return md, info.num_layers

    def layout(self, method: str, allocation: str):
        """Show the allocations and knobs of the chosen method:
        (allocation, note, slicing, per-layer text, ε, layerdrop/slicegpt/modegpt/olica options)."""
        # The choices stay fixed (events already in flight validate against them); only the value moves
        # to one the method supports.
        choices = S.ALLOCATIONS.get(method, ("uniform",))
        value = allocation if allocation in choices else choices[0]
        return (gr.update(value=value) if value != allocation else gr.update(), METHOD_NOTES.get(method, ""),
                gr.update(visible=method == "slicegpt"), gr.update(visible=value == "manual"),
                gr.update(visible=value == "automatic" and method in ("modegpt", "olica")),
                *(gr.update(visible=method == m) for m in ("layerdrop", "slicegpt", "modegpt", "olica")))

    def default_per_layer(self, method, allocation, ratio, num_layers, per_layer):
        """Fill the per-layer text with valid defaults when manual allocation is picked."""
        if allocation != "manual" or not num_layers:
            return gr.update()  # unchanged: never overwrite what the user is typing
        try:
            values = S.parse_list(per_layer, int if method == "layerdrop" else float)
        except ValueError:
            values = None
        if method == "layerdrop":
            ok = values and all(0 <= v < num_layers for v in values)
            return gr.update() if ok else ""
        ok = values and len(values) == num_layers
        return gr.update() if ok else ",".join([f"{ratio:.2f}"] * int(num_layers))

    def _config(self, name, method, ratio, allocation, per_layer, slicing, batch_size=8, epsilon=0.1,
                modegpt_ridge=1.0, olica_ridge=1e-3, attn_share=1.0, calibrate_layers=8,
                calibrate_rank=64):
        info = self.store.info(name)
        ridge = modegpt_ridge if method == "modegpt" else olica_ridge if method == "olica" else None
        return S.make_config(method, ratio, allocation, per_layer, num_layers=info.num_layers,
                             hidden_size=info.hidden_size, slicing=bool(slicing), epsilon=epsilon,
                             ridge=ridge, attn_share=attn_share, calibrate_layers=int(calibrate_layers),
                             calibrate_rank=int(calibrate_rank), batch_size=int(batch_size))

    def forecast(self, name, method, ratio, allocation, per_layer, slicing):
        """Live forecast from shapes alone (no weights are read); problems are shown, not raised."""
        try:
            fc = S.plan_forecast(self.store, name, self._config(name, method, ratio, allocation,
                                                                 per_layer, slicing))
        except Exception as err:  # noqa: BLE001  any message is better than a stale forecast
            return f"### Forecast\n⚠️ {err}"
        mb = 2 ** 20
        return (f"### Forecast\n| | dense | compressed |\n|---|---:|---:|\n"
                f"| parameters | {fc['params_dense'] / 1e6:,.2f}M | **{fc['params'] / 1e6:,.2f}M** |\n"
                f"| weights ({str(self.store.dtype).split('.')[-1]}) | {fc['bytes_dense'] / mb:,.0f} MB | "
                f"**{fc['bytes'] / mb:,.0f} MB** |\n\nBlocks lose **{fc['ratio']:.1%}** of their "
                f"parameters; the whole model {1 - fc['params'] / fc['params_dense']:.1%}.")

    @GPU(duration=600)
    def compress(self, session, model_name, method, ratio, allocation="uniform", per_layer="",
                 slicing=False, calib_samples=16, calib_len=256, seed=0, batch_size=8, epsilon=0.1,
                 modegpt_ridge=1.0, olica_ridge=1e-3, attn_share=1.0, calibrate_layers=8,
                 calibrate_rank=64, calib_text="", ppl_windows=4, progress=gr.Progress(),
                 request: gr.Request = None):
        """Compress a copy of the dense model; returns (status, summary, run dropdown, session)."""
        self._register(request, session)
        session.stop.clear()
        with user_errors():
            model_name = (model_name or "").strip()
            config = self._config(model_name, method, ratio, allocation, per_layer, slicing, batch_size,
                                  epsilon, modegpt_ridge, olica_ridge, attn_share, calibrate_layers,
                                  calibrate_rank)
            spec = TextSpec(int(calib_samples), int(calib_len), (calib_text or "").strip() or None)
            try:
                with self.gpu:
                    run = S.run_compression(self.store, session, model_name, config, spec,
                                            int(seed), int(ppl_windows), _bridge(progress))
            except S.Stopped:
                return ("⏹ Stopped. The dense model is untouched.", {"stopped": True},
                        self._runs_dropdown(session), session)
        r = run.report
        summary = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
        summary["run"] = run.id
        ppl = (f" · ppl {r['ppl_dense']:.2f} → **{r['ppl_compressed']:.2f}**"
               if r.get("ppl_compressed") is not None else "")
        status = (f"✅ **{run.id}**: {r['params_dense'] / 1e6:,.1f}M → **{r['params_compressed'] / 1e6:,.1f}M** "
                  f"parameters (blocks −{r['ratio_achieved']:.1%}){ppl} in {r['compress_seconds']:.1f} s")
        return status, summary, self._runs_dropdown(session, run.id), session

    def stop(self, session):
        session.stop.set()
        return "⏹ Stopped. The dense model is untouched."

    def stop_heal(self, session):
        session.stop.set()
        return "⏹ Stopped. LoRA adapters are discarded (rank 0 keeps the steps already taken)."

    def _runs_dropdown(self, session, value=None):
        choices = [(run.label, run.id) for run in session.runs.values()]
        value = value or (choices[-1][1] if choices else None)
        return gr.update(choices=choices, value=value)

    # ------------------------------------------------------------------------------------ inspect
    def inspect(self, session, run_id, layer=0, key="all"):
        """(layer slider, spectrum picker, summary, spectrum, overview, leverage, errors, influence, sizes)."""
        if not session.runs:
            empty = [viz.spectrum_figure({}, 0)] + [viz.error_figure({})] * 5
            return gr.update(), gr.update(), "No run yet: compress a model first.", *empty
        with user_errors():
            run = session.get(run_id)
        rep = run.report
        layers = rep.get("layers") or []
        asked = int(layer or 0)
        layer = min(max(asked, 0), max(len(layers) - 1, 0))
        keys = list((layers[layer].get("spectra") or {}) if layers else {})
        all_keys = list(dict.fromkeys(k for lay in layers for k in (lay.get("spectra") or {})))
        asked_key, key = key, key if key in keys else "all"
        overview_key = key if key != "all" else (keys or all_keys or ["attn_input"])[0]
        summary = (f"**{run.id}** · {rep.get('method')} on `{run.model_name}` · "
                   f"{rep.get('params_dense', 0) / 1e6:,.1f}M → {rep.get('params_compressed', 0) / 1e6:,.1f}M "
                   f"parameters · target {rep.get('ratio_target') or 0:.0%}, achieved "
                   f"{rep.get('ratio_achieved') or 0:.1%}")
        # values are sent back only when they change, so a late reply never undoes the user's pick
        return (gr.update(maximum=max(len(layers) - 1, 1), **({"value": layer} if layer != asked else {})),
                gr.update(choices=["all", *keys], **({"value": key} if key != asked_key else {})), summary,
                viz.spectrum_figure(rep, layer, None if key == "all" else key),
                viz.spectra_overview_figure(rep, overview_key), viz.leverage_figure(rep, layer),
                viz.error_figure(rep), viz.influence_figure(rep), viz.sizes_figure(rep))

    # ------------------------------------------------------------------------------------ evaluate
    @GPU(duration=600)
    def evaluate(self, session, run_id, ppl_windows=4, tasks=(), limit=50, measure_speed=True,
                 progress=gr.Progress()):
        """Dense vs compressed table: [metric, dense, compressed, delta, delta %]."""
        with user_errors():
            run = session.get(run_id)
            if run.model is None:
                raise ValueError(f"run {run.id} has only its report in memory; compress or load it again")
            limit = int(limit) if limit else None
            speed_args = {} if self.on_gpu else {"prompt_len": 128, "new_tokens": 32, "repeats": 2}
            args = dict(tasks=tuple(tasks or ()), limit=limit, measure_speed=bool(measure_speed),
                        speed_args=speed_args)
            key = (run.model_name, "eval", *map(str, args.values()))
            dense_progress = lambda f, m: progress(0.5 * f, desc=f"dense: {m}")  # noqa: E731
            with self.gpu:
                if key not in self.store.dense_metrics:  # dense numbers are computed once per setting
                    dense, tok = self.store.get(run.model_name)
                    self.store.dense_metrics[key] = S.evaluate_model(dense, tok, progress=dense_progress,
                                                                     **args)
                dense_metrics = dict(self.store.dense_metrics[key])
                windows = None
                if ppl_windows:
                    windows = self.store.eval_windows(run.model_name, int(ppl_windows))
                    dense_metrics["ppl"] = S.dense_perplexity(self.store, run.model_name, int(ppl_windows),
                                                              dense_progress)
                comp = S.evaluate_model(run.model, run.tokenizer, windows,
                                        progress=lambda f, m: progress(0.5 + 0.5 * f, desc=f"compressed: {m}"),
                                        **args)
        run.metrics = {"dense": dense_metrics, "compressed": comp}
        if "ppl" in comp:
            run.report["ppl_dense"], run.report["ppl_compressed"] = dense_metrics["ppl"], comp["ppl"]
        return S.compare_rows(run.metrics["dense"], comp)

    # ------------------------------------------------------------------------------------ chat
    @GPU(duration=120)
    def chat(self, session, message, dense_history, compressed_history, run_id=None, model_name="",
             temperature=0.7, top_p=0.9, max_new_tokens=128, repetition_penalty=1.1, seed=0,
             chat_template=True):
        """Stream both replies in lockstep; yields (dense history, compressed history, cleared input)."""
        if not (message or "").strip():
            raise gr.Error("type a message first", print_exception=False)
        with user_errors():
            run = session.get(run_id) if session.runs else None
            dense = self.store.get(run.model_name if run else model_name)
        if run is None or run.model is None:
            gr.Warning("No compressed model in memory: only the dense model answers.")
        s = S.Sampling(float(temperature), float(top_p), int(max_new_tokens), float(repetition_penalty),
                       int(seed), bool(chat_template))
        pairs = [dense, (run.model, run.tokenizer) if run and run.model is not None else None]
        histories = [dense_history or [], compressed_history or []]
        for histories in S.chat_stream(pairs, histories, message.strip(), s):
            yield histories[0], histories[1], ""

    # ------------------------------------------------------------------------------------ runs
    def runs_view(self, session):
        points = S.pareto_runs(session)
        return (S.runs_table(session), viz.pareto_figure(points), viz.accuracy_figure(points))

    def load_saved(self, session, upload=None, folder="", request: gr.Request = None):
        self._register(request, session)
        path = upload or (folder or "").strip()
        if not path:
            raise gr.Error("upload a run (.zip or report.json) or enter a saved run's folder",
                           print_exception=False)
        with user_errors():
            run = S.load_run(session, path)
        what = "model and report" if run.model is not None else "report only (no model weights)"
        return f"Loaded **{run.id}** ({what}).", self._runs_dropdown(session, run.id), session

    def download(self, session, run_id):
        with user_errors():
            return str(S.zip_run(session.get(run_id), session.workdir))

    @GPU(duration=600)
    def heal(self, session, run_id, tokens=16384, lora_rank=8, seq_len=256, ppl_windows=4,
             progress=gr.Progress()):
        """Recovery-train the run's compressed model in place; returns (status, loss figure)."""
        session.stop.clear()
        with user_errors():
            run = session.get(run_id)
            try:
                with self.gpu:
                    rec = S.heal_run(self.store, session, run, int(tokens), int(lora_rank), int(seq_len),
                                     int(ppl_windows), _bridge(progress))
            except S.Stopped:
                return "⏹ Stopped.", viz.loss_figure([])
        ppl = (f" · ppl {rec['ppl_before']:.2f} → **{rec['ppl_after']:.2f}**"
               if rec.get("ppl_after") is not None else "")
        status = (f"✅ healed **{run.id}** on {rec['tokens']:,} tokens in {rec['seconds']:.0f} s · loss "
                  f"{rec['loss'][0]:.3f} → {rec['loss'][-1]:.3f}{ppl}")
        return status, viz.loss_figure(rec["loss"], rec.get("tokens_seen"))


# ---------------------------------------------------------------------------------------- layout
def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
              store: S.ModelStore | None = None) -> gr.Blocks:
    h = Handlers(store or S.ModelStore(device, dtype))
    gpu = h.on_gpu
    try:
        info_md, n0 = h.model_info(default_model)
    except gr.Error as err:
        info_md, n0 = f"⚠️ {err}", 0
    hover = ["hover-info"]
    models = list(dict.fromkeys([default_model, *PACKAGED_MODELS]))
    with gr.Blocks(title="Training-free LM compression") as demo:
        state = gr.State(S.Session, delete_callback=S.Session.close)
        gr.Markdown(f"# Training-free compression of causal LMs\nLayer dropping, SliceGPT, MoDeGPT and "
                    f"Olica on `{default_model}` or any Llama / Qwen2 / Mistral model. Running on "
                    f"**{h.store.device}** ({torch.get_num_threads()} threads).")
        run_dd = gr.Dropdown(label="Run (used by Inspect, Evaluate, Chat and download)", choices=[],
                             interactive=True)
        with gr.Tabs():
            # ---------------------------------------------------------------- Compress
            with gr.Tab("Compress", id="compress"):
                with gr.Row():
                    with gr.Column(scale=3):
                        model = gr.Dropdown(models, value=default_model, allow_custom_value=True,
                                            label="Model", info="packaged name, Hugging Face id or local folder")
                        model_md = gr.Markdown(info_md)
                        n_layers = gr.Number(n0, visible=False, precision=0)
                        method = gr.Radio(METHOD_CHOICES, value="slicegpt", label="Method")
                        method_md = gr.Markdown(METHOD_NOTES["slicegpt"])
                        ratio = gr.Slider(0.0, 0.9, value=0.25, step=0.01, label="Target ratio",
                                          info="fraction of decoder-block parameters to remove",
                                          elem_classes=hover)
                        allocation = gr.Radio(["uniform", "automatic", "manual"], value="uniform",
                                              label="Allocation over layers", elem_classes=hover,
                                              info="uniform: same everywhere; automatic: by Block Influence"
                                                   " (layer dropping: its only plan; SliceGPT: none); manual: "
                                                   "one value per layer below")
                        slicing = gr.Checkbox(False, label="Target is the slicing fraction (paper's knob)",
                                              info="fraction of hidden dimensions deleted instead of "
                                                   "parameters removed", elem_classes=hover)
                        per_layer = gr.Textbox("", label="Per-layer values", elem_classes=hover,
                                               info="manual allocation: block indices to drop (layer "
                                                    "dropping) or one sparsity per layer, comma-separated")

                        @gr.render(inputs=[n_layers, method, allocation, per_layer, ratio],
                                   triggers=[n_layers.change, method.change, allocation.change, demo.load])
                        def per_layer_editor(num, meth, alloc, text, target):
                            num = int(num or 0)
                            if alloc != "manual" or not num:
                                return
                            if meth == "layerdrop":
                                try:
                                    chosen = [v for v in S.parse_list(text, int) if 0 <= v < num]
                                except ValueError:
                                    chosen = []
                                box = gr.CheckboxGroup(list(range(num)), value=chosen, label="Blocks to drop")
                                box.input(lambda v: ",".join(map(str, sorted(v))), box, per_layer)
                                return
                            try:
                                values = S.parse_list(text, float)
                            except ValueError:
                                values = []
                            values = values if len(values) == num else [target] * num
                            with gr.Row(equal_height=True):
                                sliders = [gr.Slider(0.0, 0.95, value=v, step=0.01, label=f"layer {i}",
                                                     min_width=110) for i, v in enumerate(values)]
                            gr.on([s.release for s in sliders], lambda *v: ",".join(f"{x:.2f}" for x in v),
                                  sliders, per_layer)
                    with gr.Column(scale=2):
                        forecast_md = gr.Markdown("### Forecast")
                        with gr.Accordion("Calibration", open=True):
                            with gr.Row():
                                calib_samples = gr.Number(64 if gpu else 16, precision=0, label="Samples",
                                                          info="paper: 64 x 512 tokens; smaller is faster on CPU",
                                                          elem_classes=hover)
                                calib_len = gr.Number(512 if gpu else 256, precision=0, label="Tokens each",
                                                      elem_classes=hover, info="sequence length")
                            with gr.Row():
                                seed = gr.Number(0, precision=0, label="Seed")
                                batch_size = gr.Number(8, precision=0, label="Batch", elem_classes=hover,
                                                       info="calibration sequences per forward pass")
                            calib_text = gr.Textbox("", lines=2, label="Custom calibration text (optional)",
                                                    info="default: the offline Wikipedia calibration split",
                                                    elem_classes=hover)
                            ppl_windows = gr.Slider(0, 32, value=32 if gpu else 4, step=1,
                                                    label="Perplexity windows after compressing",
                                                    info="1024-token held-out wiki windows (paper: 32; 0 = skip)",
                                                    elem_classes=hover)
                        with gr.Accordion("Method options", open=False):
                            epsilon = gr.Number(0.1, label="Allocation temperature ε", elem_classes=hover,
                                                info="automatic allocation: φ_i ∝ softmax(−BI_i/ε); "
                                                     "small ε prunes low-influence layers harder",
                                                visible=False)
                            with gr.Group(visible=False) as layerdrop_opts:
                                gr.Markdown("Layer dropping has no options: Block Influence on the "
                                            "calibration text picks the blocks (or pick them manually).")
                            with gr.Group(visible=False) as slicegpt_opts:
                                gr.Markdown("SliceGPT keeps widths that are multiples of 8.")
                            with gr.Group(visible=False) as modegpt_opts:
                                modegpt_ridge = gr.Number(1.0, label="Leverage ridge λ", elem_classes=hover,
                                                          info="relative to the mean eigenvalue; larger → "
                                                               "scores closer to the channels' energy")
                            with gr.Group(visible=False) as olica_opts:
                                attn_share = gr.Number(1.0, label="Attention share", elem_classes=hover,
                                                       info="attention sparsity relative to the layer's; "
                                                            "the MLP takes the rest")
                                calibrate_layers = gr.Number(8, precision=0, label="Calibrated layers",
                                                             elem_classes=hover,
                                                             info="layers given a linear-calibration branch (0: off)")
                                calibrate_rank = gr.Number(64, precision=0, label="Calibration rank",
                                                           elem_classes=hover, info="rank of each branch")
                                olica_ridge = gr.Number(1e-3, label="Calibration ridge", elem_classes=hover,
                                                        info="ridge of the calibration regression (relative)")
                        with gr.Row():
                            go_btn = gr.Button("Compress", variant="primary")
                            stop_btn = gr.Button("Stop", variant="stop")
                        status = gr.Markdown("")
                        with gr.Accordion("Run summary", open=False):
                            summary = gr.JSON(label="report")
                with gr.Accordion("Recovery training (heal) of the selected run", open=False):
                    gr.Markdown("A short causal-LM fine-tune of the compressed model on calibration text "
                                "(after the tokens it was calibrated on), LoRA merged back, or every "
                                "parameter with rank 0. It changes the run's model in place." if HEAL else
                                "_Not available in this build: `compression.heal` is missing._")
                    with gr.Row():
                        heal_tokens = gr.Number(1_000_000 if gpu else 16_384, precision=0, label="Tokens",
                                                interactive=HEAL, elem_classes=hover,
                                                info="training budget; LayerChop uses far more")
                        heal_rank = gr.Number(8, precision=0, label="LoRA rank", interactive=HEAL,
                                              elem_classes=hover, info="0 trains every parameter")
                        heal_len = gr.Number(256, precision=0, label="Sequence length", interactive=HEAL)
                        heal_windows = gr.Number(32 if gpu else 4, precision=0, label="Perplexity windows",
                                                 interactive=HEAL, elem_classes=hover,
                                                 info="held-out windows measured before and after (0: skip)")
                    with gr.Row():
                        heal_btn = gr.Button("Heal", interactive=HEAL)
                        heal_stop = gr.Button("Stop healing", variant="stop", interactive=HEAL)
                    heal_md = gr.Markdown("")
                    heal_plot = gr.Plot(label="loss")
            # ---------------------------------------------------------------- Inspect
            with gr.Tab("Inspect", id="inspect"):
                inspect_md = gr.Markdown("No run yet: compress a model first.")
                with gr.Row():
                    layer = gr.Slider(0, max(n0 - 1, 1), value=0, step=1, label="Layer")
                    key = gr.Dropdown(["all"], value="all", label="Spectrum", allow_custom_value=True)
                with gr.Row():
                    fig_spectrum, fig_overview = gr.Plot(label="spectrum"), gr.Plot(label="spectra by depth")
                with gr.Row():
                    fig_leverage, fig_errors = gr.Plot(label="leverage"), gr.Plot(label="errors")
                with gr.Row():
                    fig_influence, fig_sizes = gr.Plot(label="influence"), gr.Plot(label="sizes")
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
                    ev_limit = gr.Number(50, precision=0, label="Zero-shot documents per task",
                                         info="0 = whole validation set (slow on CPU)", elem_classes=hover)
                    ev_speed = gr.Checkbox(True, label="Measure speed and memory",
                                           info="prefill / decode tokens per second", elem_classes=hover)
                ev_tasks = gr.CheckboxGroup(list(tasks_ok), value=[], label="Zero-shot tasks (lm-eval, offline)",
                                            interactive=bool(tasks_ok))
                gr.Markdown(zs_note or "Peak memory on CPU is the process's peak resident size.")
                ev_btn = gr.Button("Evaluate dense vs compressed", variant="primary")
                ev_table = gr.Dataframe(headers=["metric", "dense", "compressed", "Δ", "Δ %"],
                                        label="dense vs compressed", interactive=False)
            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_dense = gr.Chatbot(label="Dense", height=420, buttons=["copy"])
                    chat_comp = gr.Chatbot(label="Compressed", height=420, buttons=["copy"])
                msg = gr.Textbox(placeholder="Message both models…", show_label=False, submit_btn=True)
                with gr.Row():
                    chat_stop = gr.Button("Stop", variant="stop")
                    chat_clear = gr.Button("Clear")
                gr.Examples(CHAT_EXAMPLES, inputs=[msg])
                with gr.Accordion("Sampling (same settings and seed for both)", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature",
                                                info="0 = greedy", elem_classes=hover)
                        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                        max_new = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
                        rep_penalty = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
                        chat_seed = gr.Number(0, precision=0, label="Seed")
                        template = gr.Checkbox(True, label="Chat template")
            # ---------------------------------------------------------------- Runs
            with gr.Tab("Runs", id="runs"):
                runs_df = gr.Dataframe(headers=S.RUN_COLUMNS, label="This session's runs", interactive=False)
                with gr.Row():
                    fig_pareto, fig_acc = gr.Plot(label="pareto"), gr.Plot(label="accuracy")
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="Load a saved run (.zip or report.json)",
                                         file_types=[".zip", ".json"])
                        folder = gr.Textbox(label="…or a saved run's folder on the server")
                        load_btn = gr.Button("Load run")
                        load_md = gr.Markdown("")
                    with gr.Column():
                        dl_btn = gr.Button("Zip the selected run (safetensors + config + report)")
                        dl_file = gr.File(label="download", interactive=False)

        # ------------------------------------------------------------------------ wiring
        inspect_out = [layer, key, inspect_md, fig_spectrum, fig_overview, fig_leverage, fig_errors,
                       fig_influence, fig_sizes]
        runs_out = [runs_df, fig_pareto, fig_acc]
        hidden = dict(api_visibility="private")
        last = dict(trigger_mode="always_last")  # a change while the previous update runs is not lost
        model.change(h.model_info, model, [model_md, n_layers], **hidden)
        gr.on([demo.load, method.change, allocation.change], h.layout, [method, allocation],
              [allocation, method_md, slicing, per_layer, epsilon, layerdrop_opts, slicegpt_opts,
               modegpt_opts, olica_opts], **hidden, **last)
        gr.on([allocation.change, n_layers.change], h.default_per_layer,
              [method, allocation, ratio, n_layers, per_layer], per_layer, **hidden, **last)
        gr.on([demo.load, model.change, method.change, ratio.change, allocation.change, per_layer.change,
               slicing.change, n_layers.change], h.forecast,
              [model, method, ratio, allocation, per_layer, slicing], forecast_md, **hidden, **last)
        job = dict(concurrency_id=ACCEL, concurrency_limit=1)
        compress_evt = go_btn.click(
            h.compress, [state, model, method, ratio, allocation, per_layer, slicing, calib_samples,
                         calib_len, seed, batch_size, epsilon, modegpt_ridge, olica_ridge, attn_share,
                         calibrate_layers, calibrate_rank, calib_text, ppl_windows],
            [status, summary, run_dd, state], api_name="compress", trigger_mode="once",
            show_progress_on=[status], **job)
        compress_evt.then(h.runs_view, state, runs_out, **hidden)
        stop_btn.click(h.stop, state, status, cancels=[compress_evt], queue=False, **hidden)
        gr.on([run_dd.change, layer.release, key.input], h.inspect, [state, run_dd, layer, key],
              inspect_out, api_name="inspect", **last)
        ev_btn.click(h.evaluate, [state, run_dd, ev_windows, ev_tasks, ev_limit, ev_speed], ev_table,
                     api_name="evaluate", **job).then(h.runs_view, state, runs_out, **hidden)
        chat_inputs = [state, msg, chat_dense, chat_comp, run_dd, model, temperature, top_p, max_new,
                       rep_penalty, chat_seed, template]
        chat_evt = msg.submit(h.chat, chat_inputs, [chat_dense, chat_comp, msg], api_name="chat", **job)
        chat_stop.click(None, cancels=[chat_evt], **hidden)
        chat_clear.click(lambda: ([], [], ""), None, [chat_dense, chat_comp, msg], queue=False, **hidden)
        load_btn.click(h.load_saved, [state, upload, folder], [load_md, run_dd, state], api_name="load_run",
                       **job).then(h.runs_view, state, runs_out, **hidden)
        dl_btn.click(h.download, [state, run_dd], dl_file, api_name="download", **job)
        heal_evt = heal_btn.click(h.heal, [state, run_dd, heal_tokens, heal_rank, heal_len, heal_windows],
                                  [heal_md, heal_plot], api_name="heal", show_progress_on=[heal_md], **job)
        heal_evt.then(h.runs_view, state, runs_out, **hidden)
        heal_stop.click(h.stop_heal, state, heal_md, cancels=[heal_evt], queue=False, **hidden)
        demo.unload(h.unload)
    demo.handlers = h  # for tests and scripts
    return demo


def main(**launch_kwargs):
    """Serve the app (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by gradio's launch)."""
    model = os.environ.get("COMPRESSION_APP_MODEL", DEFAULT_MODEL)
    return build_app(model).queue(default_concurrency_limit=4).launch(css=CSS, **launch_kwargs)


if __name__ == "__main__":
    main()
