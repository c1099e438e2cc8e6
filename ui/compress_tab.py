"""The Compress tab: model, method, target and allocation (with a per-layer editor), calibration,
method options (generated from the configs' knobs), a live forecast, and the job with its progress."""
from __future__ import annotations

import inspect

import gradio as gr

import viz
from compression.data import TextSpec
from compression.heal import HealConfig
from compression.methods import METHODS
from compression.pipeline import Stages, compress_and_measure, heal_and_measure

from . import forms
from .common import OK, STOP, WARN, Context, millions, user_errors
from .jobs import progress_html, watch
from .runs import Run, Stopped, read_text_upload

DEFAULT_METHOD = "modegpt"  # leads BENCHMARKS.md at ratio 0.25 (with automatic allocation)
DEFAULT_ALLOCATION = "auto"
# The chat demo's starting point (bench/calibration_sources.json, default model, self-chat calibration):
# MoDeGPT at 0.1 scores chat KL 0.26 / top-1 0.79 against the dense replies, at 0.25 KL 0.87 / 0.61
# (32 × 512 tokens); at the app's defaults (wiki+self-chat, 16 × 256) 0.1 measured KL 0.63 / top-1 0.65.
DEFAULT_RATIO = 0.1
# Calibration (samples, tokens each) the page starts from: the papers' 64 × 512 on a GPU; 32 × 512 on a
# CPU, which the one-pass path compresses in about 1.5 plain forwards (bench/latency.json). 16 × 256,
# the earlier CPU default, cost MoDeGPT 0.25 1.68× the perplexity of 64 × 512 (50.29 vs 29.97).
CALIBRATION_GPU, CALIBRATION_CPU = (64, 512), (32, 512)
MAX_CALIB_TOKENS = 1 << 20  # samples × length cap, so one request cannot hold the slot for hours
MAX_CALIB_CHARS = 2_000_000  # custom text kept (a million tokens is about 4 MB of prose)
MAX_CALIB_FILE_BYTES = 8 << 20
MAX_CHAT_EVAL = 32  # the shipped held-out instructions
CUSTOM = "custom"
# only these: the library's text:FILE and hf:NAME sources would read server files or the network
CALIBRATION_SOURCES = [("Wikipedia (offline split)", "wiki"),
                       ("self-chat: the model's own replies, chat template applied", "self-chat"),
                       ("source code (pinned package)", "code"),
                       ("wiki + self-chat, half each", "wiki+self-chat"),
                       ("custom text (typed or a .txt upload)", CUSTOM)]
SOURCE_NOTES = {
    "wiki": "Offline Wikipedia summaries (the calibration split; evaluation never reads it).",
    "self-chat": "The model's own sampled replies to 220 shipped instructions under its chat template. "
                 "**The first use on a model generates them (minutes on CPU)**; they are cached after.",
    "code": "Source files of a pinned package: for code models.",
    "wiki+self-chat": "Half the sequences from each. **The first use on a model generates its self-chat "
                      "replies (minutes on CPU)**; they are cached after.",
    CUSTOM: "Your text: type it below or upload a UTF-8 .txt file "
            f"(up to {MAX_CALIB_FILE_BYTES >> 20} MB; an upload takes precedence).",
}


def _same(value, shown) -> bool:
    """Whether a slider that shows ``shown`` already shows ``value`` (to its 0.01 step)."""
    try:
        return shown is not None and abs(float(value) - float(shown)) < 5e-3
    except (TypeError, ValueError):
        return False


def _edits_blocks(method: str) -> bool:
    """Whether the method's manual editor picks blocks to drop (checkboxes) rather than per-layer values."""
    return method in METHODS and METHODS[method].per_layer == "blocks"


def with_option_params(fn):
    """A generator function calling ``fn(..., options={...}, request=...)`` whose signature lists one
    parameter per method option (``<method>_<knob>``): gradio reads it for the inputs' order and the
    API's parameter names, so a new knob needs no change here or in app.py."""
    names = [forms.option_param(m, k) for m, k in forms.option_knobs()]
    defaults = {forms.option_param(m, k): k.default for m, k in forms.option_knobs()}
    P = inspect.Parameter
    own = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("options", "request")]
    base = [p for p in own if p.kind != P.KEYWORD_ONLY]
    # fn's keyword-only parameters were added later: they follow the options, so positional API
    # calls written before them keep working
    later = [p.replace(kind=P.POSITIONAL_OR_KEYWORD) for p in own if p.kind == P.KEYWORD_ONLY]
    params = base + [P(n, P.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in names] + later + \
        [P("request", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)]
    signature = inspect.Signature(params)

    def wrapper(*args, **kwargs):
        values = signature.bind(*args, **kwargs)
        values.apply_defaults()
        values = dict(values.arguments)
        options = {n: values.pop(n) for n in names}
        yield from fn(**values, options=options)

    wrapper.__signature__ = signature
    wrapper.__annotations__ = {"request": gr.Request}
    wrapper.__name__ = fn.__name__
    return wrapper


class CompressTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

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
        ok = len(values) == num_layers and all(0 <= v <= 0.95 for v in values)
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
                if not 0.0 <= mean <= 0.9 or not 0 < epsilon <= 10:
                    raise ValueError("the preset's mean must be in [0, 0.9] and ε in (0, 10]")
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
        return (f"### Forecast\n| | dense | compressed |\n|---|---:|---:|\n"
                f"| parameters | {millions(fc['params_dense'])} | **{millions(fc['params'])}** |\n"
                f"| weights ({dtype}) | {fc['bytes_dense'] / mb:,.1f} MB | **{fc['bytes'] / mb:,.1f} MB** |"
                f"\n\nBlocks lose **{fc['ratio']:.1%}** of their parameters; the whole model "
                f"{1 - fc['params'] / fc['params_dense']:.1%}.")

    def achieved_target(self, method, allocation, per_layer, ratio):
        """In manual mode the target slider shows the mean of the per-layer values, read-only."""
        if forms.allocation_value(allocation) != "manual" or _edits_blocks(method):
            return gr.update(interactive=True)
        try:
            values = forms.parse_list(per_layer or "", float, "values")
        except ValueError:
            return gr.update(interactive=False)
        mean = round(min(max(sum(values) / len(values), 0.0), 0.9), 2) if values else ratio
        update = dict(interactive=False, label="Target ratio (manual: mean of the per-layer values)")
        return gr.update(**update) if _same(mean, ratio) else gr.update(value=mean, **update)

    # --- the job -------------------------------------------------------------------------------
    @staticmethod
    def default_source(method):
        """The calibration picker's value when the method changes: the method's default source."""
        return METHODS[method].calibration if method in METHODS else gr.update()

    @staticmethod
    def calibration_layout(source):
        """(note on the source, custom-text box, upload): the box and upload only for custom text."""
        custom = source == CUSTOM
        return SOURCE_NOTES.get(source, ""), gr.update(visible=custom), gr.update(visible=custom)

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
        store = self.ctx.store

        def job(progress):
            text_weight = 0.4 if "self-chat" in spec.label else 0.02  # generating replies takes minutes
            stages = Stages(progress, {"loading the model": 0.05, "calibration text": text_weight,
                                       "compressing": 1.0})
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
            return Run(session.new_id(), model_name, report.to_dict(), model, tokenizer)

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():
                        yield progress_html(state, "Compress"), gr.update(), gr.update(), gr.update(), session
        except Stopped:
            yield "", f"{STOP} Stopped. The dense model is untouched.", {"stopped": True}, \
                self.runs_dropdown(session), session
            return
        run = session.add(state.result)
        yield progress_html(state, "Compress"), self.status(run), self.summary(run), \
            self.runs_dropdown(session, run.id), session

    @staticmethod
    def status(run: Run) -> str:
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
        return (f"{OK} **{run.id}**: {millions(r['params_dense'])} → **{millions(r['params_compressed'])}** "
                f"parameters (blocks −{r['ratio_achieved']:.1%}){ppl_text} in "
                f"{r['compress_seconds']:.1f} s · calibration: {calibration_line(r)}{warn}")

    @staticmethod
    def summary(run: Run) -> dict:
        summary = {k: v for k, v in run.report.items() if not isinstance(v, (list, dict))}
        summary["run"] = run.id
        summary["calibration"] = calibration_line(run.report)
        return summary

    def stop(self, session):
        session.request_stop()
        return f"{STOP} Stopping… the dense model is untouched."

    @staticmethod
    def runs_dropdown(session, value=None):
        choices = [(run.label, run.id) for run in session.runs.values()]
        value = value or (choices[-1][1] if choices else None)
        return gr.update(choices=choices, value=value)

    # --- healing -------------------------------------------------------------------------------
    def heal(self, session, run_id, tokens=16384, lora_rank=8, seq_len=256, ppl_windows=4):
        """Recovery-train the run's compressed model in place; yields (progress, status, loss figure)."""
        store = self.ctx.store
        with user_errors():
            run = session.get(run_id)
            if run.model is None:
                raise ValueError(f"run {run.id}'s model is no longer in memory; compress or load it again")
            calib = run.report.get("calibration") or {}
            config = HealConfig(tokens=int(tokens), lora_rank=int(lora_rank), seq_len=int(seq_len),
                                offset=int(calib.get("tokens", 0)))
            windows = int(ppl_windows)
            if not 0 <= windows <= 64:
                raise ValueError("perplexity windows must be in [0, 64]")

        def job(progress):
            eval_windows = store.eval_windows(run.model_name, windows) if windows else None
            return heal_and_measure(run.model, run.tokenizer, config, eval_windows, progress)

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():
                        yield progress_html(state, "Heal"), gr.update(), gr.update()
        except Stopped:
            yield "", f"{STOP} Stopped. LoRA adapters are discarded.", viz.loss_figure([])
            return
        rec = state.result
        run.report["heal"] = rec
        if rec.get("ppl_after") is not None:
            run.report["ppl_compressed"] = rec["ppl_after"]
        run.metrics = {}  # evaluation numbers describe the model before healing
        ppl = (f" · ppl {rec['ppl_before']:.2f} → **{rec['ppl_after']:.2f}** ({windows} windows)"
               if rec.get("ppl_after") is not None else "")
        status = (f"{OK} healed **{run.id}** on {rec['tokens']:,} tokens in {rec['seconds']:.0f} s · loss "
                  f"{rec['loss'][0]:.3f} → {rec['loss'][-1]:.3f}{ppl}")
        yield progress_html(state, "Heal"), status, viz.loss_figure(rec["loss"], rec.get("tokens_seen"))


# --- calibration -----------------------------------------------------------------------------------

def calibration_spec(samples, length, source, text, upload) -> TextSpec:
    """The TextSpec of the form's calibration fields (ValueError / RunError on bad input). Custom text
    stays in memory: an upload is read from gradio's upload folder and never written anywhere."""
    samples, length = int(samples), int(length)
    if samples < 1 or length < 2 or samples * length > MAX_CALIB_TOKENS:
        raise ValueError(f"calibration must be 1 to {MAX_CALIB_TOKENS:,} tokens (samples ≥ 1, length ≥ 2)")
    source, text = (source or "").strip(), (text or "").strip()
    if not source:  # API callers from before the source picker
        source = CUSTOM if text or upload else "wiki"
    if source not in {v for _, v in CALIBRATION_SOURCES}:
        raise ValueError(f"calibration source must be one of {', '.join(v for _, v in CALIBRATION_SOURCES)}")
    if source != CUSTOM:
        return TextSpec(samples, length, source=source)
    if isinstance(upload, dict):  # the API may send gradio's FileData dict
        upload = upload.get("path")
    if upload:
        text = read_text_upload(upload, MAX_CALIB_FILE_BYTES).strip()
    if not text:
        raise ValueError("custom calibration: type the text or upload a .txt file")
    return TextSpec(samples, length, text[:MAX_CALIB_CHARS])


def calibration_line(report: dict) -> str:
    """The report's calibration record in one line: ``wiki · 16 × 256 = 4,096 tokens · fingerprint …``."""
    cal = report.get("calibration") or {}
    source = {"text": "custom text"}.get(cal.get("source"), cal.get("source") or "?")
    shape = (f" · {cal['samples']} × {cal['seq_len']}" if cal.get("samples") and cal.get("seq_len") else "")
    tokens = f" = {cal['tokens']:,} tokens" if isinstance(cal.get("tokens"), int) else ""
    digest = f" · fingerprint {str(cal['fingerprint'])[:8]}" if cal.get("fingerprint") else ""
    return f"{source}{shape}{tokens}{digest}"
