"""What every tab shares: the model store, the one model slot, error display and number formats."""
from __future__ import annotations

import contextlib
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
    """Errors about the user's input become a readable gr.Error; the app stays up."""
    try:
        yield
    except (gr.Error, Stopped):
        raise
    except (ValueError, RunError, ReportError, FileError) as err:
        raise gr.Error(str(err), print_exception=False) from err
    except (TypeError, KeyError, OSError, RuntimeError, ArithmeticError) as err:
        raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from err


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
