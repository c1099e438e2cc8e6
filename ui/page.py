"""What every tab's layout and wiring share: event settings, the named-endpoint plumbing, knob controls.

Each tab module lays out its own components (``build``) and wires its own events (``wire``); app.py only
assembles the tabs and the few events that cross them. Import this inside a ``gr.Blocks`` context only
for :class:`Page` (it places a hidden button).
"""
from __future__ import annotations

import inspect

import gradio as gr

from compression.knobs import Knob

from . import forms, jobs
from .common import ACCEL, on_page

HOVER = ["hover-info"]                           # controls whose help shows under the label, marked "?"
HIDDEN = dict(api_visibility="private")         # page-only events: no API endpoint of their own
LAST = dict(trigger_mode="always_last")         # a change while the previous update runs is not lost
JOB = dict(concurrency_id=ACCEL, concurrency_limit=1)  # runs a model: one at a time, whoever asks

CSS = jobs.CSS + """
@media (max-width: 640px) {
  .run-buttons {position: fixed; left: 0; right: 0; bottom: 0; z-index: 50; margin: 0 !important;
    padding: 8px 12px; background: var(--background-fill-primary); box-shadow: 0 -2px 8px rgba(0,0,0,0.15);}
  .gradio-container {padding-bottom: 72px !important;}
}
.hover-info {overflow: visible !important;}
.hover-info label {position: relative;}
.hover-info [data-testid="block-info"]::after {content: "?"; display: inline-block; width: 1.2em;
  height: 1.2em; margin-left: 0.4em; border: 1px solid currentColor; border-radius: 50%; font-size: 0.75em;
  line-height: 1.1em; text-align: center; opacity: 0.55;}
.chat-panes .bubble-wrap {margin-top: 2.25rem; height: calc(100% - 2.25rem); padding-top: 0.25rem;}
.compare-table .cell-wrap {font-family: var(--font); font-size: var(--text-sm);}
.job-text {font-size: max(14px, var(--text-md)); color: var(--body-text-color);}
.slider_input_container input[type=range] {min-width: 0 !important; flex: 1 1 auto;}
.slider_input_container .min_value, .slider_input_container .max_value {flex-shrink: 0;}
.prose table, .prose th, .prose td, .header-cell, .header-cell * {word-break: normal !important;
  overflow-wrap: normal !important; hyphens: none;}
.prose td[align="right"], .prose td[style*="right"] {white-space: nowrap;}
@font-face {font-family: "Source Sans Pro Whole"; font-style: normal; font-weight: 400;
  src: url("static/fonts/SourceSansPro/SourceSansPro-Regular.woff2") format("woff2");}
@font-face {font-family: "Source Sans Pro Whole"; font-style: normal; font-weight: 600 700;
  src: url("static/fonts/SourceSansPro/SourceSansPro-Bold.woff2") format("woff2");}
.gradio-container {--font: "Source Sans Pro Whole", "Source Sans Pro", ui-sans-serif, system-ui, sans-serif;}
"""  # knobs show their help under the label; the "?" marks that they have some. Chat panes: gradio's
# Chatbot floats its label and buttons (absolute, top 0) over the scrolling message list, whose top
# padding scrolls away with the messages, so a scrolled user message slid under the pane's header;
# the list now starts below the header, which clips it there. Progress text: the theme's subdued grey
# (#bbbbc2 on white, 1.9:1) at 0.9em (12.6 px) was hard to read; body text colour, 14 px at least.
# Sliders: gradio gives the track a 112 px minimum, which in a narrow per-layer slider pushed the
# track out of its box over the max label; it may shrink now. Tables (markdown and data frames):
# gradio breaks words anywhere to fit a narrow column ("compresse/d", "473.2 M/B"); they wrap at
# spaces only, and right-aligned (number) cells not at all, so a column is as wide as its longest word.
# Bold text: the theme's font (Source Sans Pro) takes its bold from gradio's SemiBold file, which holds
# 55 glyphs ("A" and "B" among them, no digits), so bold words fell back glyph by glyph to a wider
# system font ("473.2 M" in one font, "B" in another): bold now comes from the complete Bold file it
# ships. A family of its own, first in the font list: gradio's theme stylesheet loads after this CSS, so
# a face redefined under its family name would lose to the broken one.

# The tab bar wraps onto a second row where it does not fit (a phone): gradio's default hides the
# tabs that do not fit behind a "⋯" menu, two taps away.
TABS = dict(overflow_behavior="wrap")

# Gradio's status announcer (a screen-reader live region) says ``common.complete`` when an event
# ends, a key its own English strings lack, so the raw key was read out; this fills it in.
TRANSLATIONS = {"en": {"common.complete": "Done"}}


def launch_options() -> dict:
    """What ``launch`` needs besides the server settings: the page CSS and the missing strings."""
    return dict(css=CSS, i18n=gr.I18n(**TRANSLATIONS))


class Page:
    """The page's event plumbing: :meth:`endpoint` registers a page event and, with ``api_name``, the
    named endpoint for scripts on a hidden button that is never clicked."""

    def __init__(self):
        self.api_only = gr.Button(visible=False)

    def endpoint(self, triggers, fn, inputs, outputs, status, clear=(), api_name=None, hold=None, **kwargs):
        """The page's event, where user errors show as text in ``status`` (added to the outputs when
        it is not one of them), and with ``api_name`` the named endpoint for scripts, where they
        still raise (gradio_client gets an exception). ``hold``: the button greyed out while the
        event runs (see :func:`hold_while_running`)."""
        if api_name:  # registered first, so it gets the name itself
            self.api_only.click(fn, inputs, outputs, api_name=api_name, **kwargs)
        if hold is not None:  # before the event: the page runs a click's listeners in this order
            hold.click(None, None, hold, js=GREY_OUT, queue=False, **HIDDEN)
        shown = outputs if status in outputs else [*outputs, status]
        page = on_page(fn, len(outputs), shown.index(status), tuple(outputs.index(c) for c in clear))
        event = gr.on(triggers, page, inputs, shown, **HIDDEN, **kwargs)
        if hold is not None:
            hold_while_running(hold, event)
        return event


GREY_OUT = "() => ({__type__: 'update', interactive: false})"  # in the page: no server round trip to lose
RELEASE = "() => ({__type__: 'update', interactive: true})"


def hold_while_running(button, event) -> None:
    """Give ``button`` back once ``event`` has ended: finished, failed or stopped.

    The page counts a stopped event as running until its cancel request has come back (seconds on a
    busy server), and it silently drops a click on a running event: after Stop, a quick click on
    Compress did nothing. Greyed out, the button says "not yet" instead. The page runs ``.then``
    steps after success and after a cancel, but after an error only ``.failure`` steps, hence both."""
    event.then(None, None, button, js=RELEASE, queue=False, **HIDDEN)
    event.failure(None, None, button, js=RELEASE, queue=False, **HIDDEN)


def knob_info(k: Knob) -> str:
    return k.help + (f" · range {k.range_text()}" if k.range_text() else "")


def option_control(k: Knob):
    """A gradio control for one method knob (from its metadata)."""
    info = knob_info(k)
    if k.kind == "bool":
        return gr.Checkbox(k.default, label=k.label, info=info, elem_classes=HOVER)
    if k.kind in ("float", "int") and k.optional and k.default is None:  # a Number shows (and sends) 0
        return gr.Textbox("", label=k.label, info=info, placeholder="automatic", elem_classes=HOVER)
    if k.kind in ("float", "int"):
        return gr.Number(k.default, label=k.label, info=info, elem_classes=HOVER,
                         precision=0 if k.kind == "int" else None)
    if k.choices:
        return gr.Dropdown(list(k.choices), value=k.default, label=k.label, info=info, elem_classes=HOVER)
    return gr.Textbox("" if k.default is None else str(k.default), label=k.label, info=info,
                      elem_classes=HOVER)


def knob_slider(k: Knob, value: float, step: float = 0.01, **kwargs):
    """A slider over a knob's declared range (so the range is written once, in the config)."""
    return gr.Slider(k.low, k.high, value=value, step=step, **kwargs)


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
