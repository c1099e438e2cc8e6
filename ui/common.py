"""What every tab shares: the model store, the one model slot, error display and number formats."""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import gradio as gr

from compression.files import FileError
from compression.report import ReportError

from .runs import RunError, Stopped
from .store import ModelStore

ACCEL = "accelerator"  # concurrency_id shared by every job that runs a model (one at a time)
OK, STOP, WARN = "✔", "■", "⚠"  # plain symbols: they render without an emoji font


@dataclass
class Context:
    """Shared by all sessions: dense models, the model slot, and live sessions by browser hash."""

    store: ModelStore
    slot: threading.Lock = field(default_factory=threading.Lock)
    sessions: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)

    @property
    def on_gpu(self) -> bool:
        return self.store.device.startswith("cuda")

    def register(self, request, session) -> None:
        if request is not None and getattr(request, "session_hash", None):
            self.sessions[request.session_hash] = session


@contextlib.contextmanager
def user_errors():
    """Errors about the user's input become a gr.Error with a readable message (shown as status
    text on the page by :func:`on_page`); the app stays up."""
    try:
        yield
    except (gr.Error, Stopped):
        raise
    except (ValueError, RunError, ReportError, FileError) as err:
        raise gr.Error(str(err), print_exception=False) from err
    except (TypeError, KeyError, OSError, RuntimeError, ArithmeticError) as err:
        raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from err


def on_page(fn, outputs: int, status: int, clear: tuple[int, ...] = ()):
    """``fn`` as the page calls it: a user error (gr.Error) becomes ``⚠ message`` in output
    ``status`` instead of a toast, which cuts long messages off; the ``clear`` outputs (progress
    panels) are blanked and the others left as they are, so the tab stays usable. ``status ==
    outputs`` adds a status output after ``fn``'s own (blank unless there is an error). The named API
    endpoints call ``fn`` itself, so scripts still get a failure they can detect."""
    extra = status == outputs

    def shown(err: gr.Error):
        out = [gr.update()] * (outputs + extra)
        for i in clear:
            out[i] = ""
        out[status] = f"{WARN} {err.message}"
        return tuple(out)

    def ok(result):
        if not extra:
            return result
        return (*(result if outputs > 1 else (result,)), "")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def page(*args, **kwargs):
            try:
                for result in fn(*args, **kwargs):
                    yield ok(result)
            except gr.Error as err:
                yield shown(err)
    else:
        @functools.wraps(fn)
        def page(*args, **kwargs):
            try:
                return ok(fn(*args, **kwargs))
            except gr.Error as err:
                return shown(err)
    return page


MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()!|~:@.])")  # inline markup and autolinks (mid-line text)
MAX_SHOWN_CHARS = 200  # a report string shown on the page is cut to this many characters


def md_text(value, limit: int = MAX_SHOWN_CHARS) -> str:
    """``value`` (a report string: untrusted) as literal Markdown text: one line, at most ``limit``
    characters, HTML escaped and every Markdown character backslash-escaped, so no tag, link or
    image of it reaches the page."""
    text = " ".join(str(value).split())
    text = text[:limit] + ("…" if len(text) > limit else "")
    return MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=False))


def md_code(value, limit: int = MAX_SHOWN_CHARS) -> str:
    """``value`` shown as inline code: one line (a blank line would end the span's paragraph), at
    most ``limit`` characters, its backticks replaced (one would close the span); inside the span,
    Markdown shows ``<``, ``&`` and the rest literally."""
    text = " ".join(str(value).split()).replace("`", "ʹ")
    text = text[:limit] + ("…" if len(text) > limit else "")
    return f"`{text}`" if text else "(none)"


def queue_settings() -> dict:
    """``demo.queue(**queue_settings())``: the queue's bound (``COMPRESSION_QUEUE_SIZE``, default 32
    waiting events; more are refused with gradio's "queue is full") and the concurrency of events
    that do not run a model (those that do share one slot, :data:`ACCEL`)."""
    return {"default_concurrency_limit": 4,
            "max_size": max(1, int(os.environ.get("COMPRESSION_QUEUE_SIZE", "32")))}


def millions(n) -> str:
    return "" if n is None else f"{n / 1e6:,.2f}M"


def megabytes(n_bytes) -> str:
    return "" if n_bytes is None else f"{n_bytes / 2**20:,.1f} MB"


def number(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
