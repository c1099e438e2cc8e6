"""The Compress tab's calibration fields: sources, sizes and caps, their layout, and the TextSpec they
make (:func:`calibration_spec`), plus the one-line calibration record shown with every run."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from compression.data import TextSpec

from .page import HOVER
from .runs import read_text_upload

# Calibration (samples, tokens each) the page starts from: the papers' 64 × 512 on a GPU; 24 × 512 on a
# CPU (bench/latency.json has its time). 16 × 256, an earlier CPU default, cost MoDeGPT 0.25 1.68× the
# perplexity of 64 × 512 (50.29 vs 29.97); with MoDeGPT's shrunk refit 24 × 512 beats the least-squares
# refit on 32 × 512, the default before it, for a quarter less work (bench/refit_shrinkage.json).
CALIBRATION_GPU, CALIBRATION_CPU = (64, 512), (24, 512)
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


def build(gpu: bool, source: str) -> SimpleNamespace:
    """The Calibration accordion's fields (inside the Compress tab's right column)."""
    with gr.Accordion("Calibration", open=True):
        with gr.Row():
            samples, length = CALIBRATION_GPU if gpu else CALIBRATION_CPU
            calib_samples = gr.Number(samples, precision=0, label="Samples", elem_classes=HOVER,
                                      info="paper: 64 × 512 tokens; smaller is faster on CPU")
            calib_len = gr.Number(length, precision=0, label="Tokens each", elem_classes=HOVER,
                                  info="sequence length")
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed")
            batch_size = gr.Number(8, precision=0, label="Batch", elem_classes=HOVER,
                                   info="calibration sequences per forward pass")
        calib_source = gr.Dropdown(CALIBRATION_SOURCES, value=source, label="Calibration source",
                                   info="what the statistics are estimated on (each method starts from its "
                                        "measured default)", elem_classes=HOVER)
        calib_note = gr.Markdown(SOURCE_NOTES[source])
        calib_text = gr.Textbox("", lines=2, label="Custom calibration text", visible=False,
                                max_length=MAX_CALIB_CHARS)
        calib_file = gr.File(label="…or upload a .txt file (UTF-8)", file_types=[".txt"], type="filepath",
                             visible=False, height=120)
        ppl_windows = gr.Slider(0, 32, value=32 if gpu else 4, step=1, label="Perplexity windows after compressing",
                                info="1024-token held-out wiki windows (paper: 32; 0 = skip)", elem_classes=HOVER)
        chat_eval = gr.Slider(0, MAX_CHAT_EVAL, value=16 if gpu else 8, step=1, label="Chat agreement conversations",
                              info="held-out instructions: KL and top-1 against the dense model's greedy replies "
                                   "(0 = skip)", elem_classes=HOVER)
    return SimpleNamespace(calib_samples=calib_samples, calib_len=calib_len, seed=seed, batch_size=batch_size,
                           calib_source=calib_source, calib_note=calib_note, calib_text=calib_text,
                           calib_file=calib_file, ppl_windows=ppl_windows, chat_eval=chat_eval)


def calibration_layout(source):
    """(note on the source, custom-text box, upload): the box and upload only for custom text."""
    custom = source == CUSTOM
    return SOURCE_NOTES.get(source, ""), gr.update(visible=custom), gr.update(visible=custom)


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
