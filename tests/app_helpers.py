"""Plain helpers of the app tests (test_app, test_app_chat, test_security, test_browser): the tabs on
one context, driving a streaming handler to its end, refusals both ways, one compression, a free port.
The fixtures built from them (``tiny_folder``, ``tabs``, ``compressed``) are in conftest.py.

Import it after ``pytest.importorskip("gradio")``: it imports the app."""
import inspect
import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

import app  # noqa: E402
from ui.store import ModelStore  # noqa: E402

CALIB = dict(calib_samples=4, calib_len=64, ppl_windows=1)  # tiny calibration: seconds per run
FAST_OPTIONS = {"olica_calibrate_layers": 1, "olica_calibrate_rank": 4}


def _tabs():
    """Every tab of the app on one fresh context (its own model store, slot and sessions)."""
    from types import SimpleNamespace

    ctx = app.Context(ModelStore("cpu"))
    return SimpleNamespace(ctx=ctx, compress=app.CompressTab(ctx), inspect=app.InspectTab(ctx),
                           evaluate=app.EvaluateTab(ctx), chat=app.ChatTab(ctx), runs=app.RunsTab(ctx))


def last(generator):
    """The final yield of a streaming handler."""
    out = None
    for out in generator:
        pass
    return out


def refusal(fn, *args, outputs: int, status: int, **kwargs) -> str:
    """Bad input, both ways: the handler itself raises gr.Error (what the named endpoints give
    scripts), and the page's version of it shows the same message as ⚠ status text; returns it."""
    from ui.common import WARN, on_page

    def call(f):
        return last(f(*args, **kwargs)) if inspect.isgeneratorfunction(f) else f(*args, **kwargs)

    with pytest.raises(gr.Error) as err:
        call(fn)
    shown = call(on_page(fn, outputs, status))
    assert shown[status] == f"{WARN} {err.value.message}"
    return shown[status]


def _checksum(model):
    return sum(float(p.detach().double().sum()) for p in model.parameters()), len(list(model.parameters()))


def _compress(t, session, folder, method="layerdrop", ratio=0.3, allocation=None, per_layer="", **kw):
    """One run of the Compress tab's handler to its end (tiny calibration, fast Olica options)."""
    from compression.methods import METHODS

    allocation = allocation or (METHODS[method].allocations[0] if method in METHODS else "uniform")
    kw = {**CALIB, **kw}
    options = {**FAST_OPTIONS, **kw.pop("options", {})}
    return last(t.compress.compress(session, folder, method, ratio, allocation, per_layer, options=options, **kw))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
