"""Where a run's seconds go: named stages timed with a wall clock, for the report's ``timing``.

A :class:`Stopwatch` is opened around one job (:func:`stopwatch`); code anywhere below it marks its
work with ``with stage("statistics"):``. Stages nest: an inner stage pauses the outer one, so every
second is counted once, under the innermost stage. Outside an open stopwatch ``stage`` costs nothing.
The open stopwatch is a context variable, so concurrent jobs (threads, tasks) keep their own.

Stage names used by the library: ``capture`` (first-block inputs, Block Influence), ``forwards``
(pushing calibration batches through rewritten blocks), ``statistics`` (second moments of
activations), ``decompositions`` (leverage scores, solves, eigen- and singular value decompositions),
``errors`` (per-layer reconstruction errors on held-out tokens); the pipeline adds ``calibration_text``
and ``evaluation``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar


class Stopwatch:
    """Seconds per stage name; time inside no stage is reported as ``other`` by :meth:`summary`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []
        self.start = time.perf_counter()

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing stage
            outer, since = self._stack[-1]
            self.seconds[outer] = self.seconds.get(outer, 0.0) + now - since
        self._stack.append((name, now))

    def leave(self) -> None:
        now = time.perf_counter()
        name, since = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        if self._stack:  # resume the enclosing stage
            self._stack[-1] = (self._stack[-1][0], now)

    def summary(self) -> dict[str, float]:
        """Seconds per stage (rounded to ms), with ``other`` = total − the stages."""
        total = time.perf_counter() - self.start
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        return out


_CURRENT: ContextVar[Stopwatch | None] = ContextVar("stopwatch", default=None)


@contextmanager
def stopwatch():
    """Open a :class:`Stopwatch` for the code inside (nested stopwatches each see only their own)."""
    watch = Stopwatch()
    token = _CURRENT.set(watch)
    try:
        yield watch
    finally:
        _CURRENT.reset(token)


@contextmanager
def stage(name: str):
    """Count the seconds inside under ``name`` in the open stopwatch (none open: no-op)."""
    watch = _CURRENT.get()
    if watch is None:
        yield
        return
    watch.enter(name)
    try:
        yield
    finally:
        watch.leave()


def breakdown(timing: dict) -> str:
    """A report's ``timing`` in one line, largest stage first: ``compress 61.6 s = 1.49 × a plain
    forward (41.5 s): forwards 27.5 · statistics 16.5 · … | calibration text 0.1 s · evaluation 80.2 s``."""
    if not timing:
        return "timing: not recorded"
    unit, total = timing.get("calibration_forward_s"), timing.get("compress_s", 0.0)
    head = f"compress {total:.1f} s"
    if unit:
        share = timing.get("calibration_forward_timed") or 1.0
        how = "" if share >= 1 else f", {share:.0%} of it timed and scaled"
        head += f" = {total / unit:.2f} × a plain forward over the calibration tokens ({unit:.1f} s{how})"
    stages = sorted((timing.get("stages") or {}).items(), key=lambda kv: -kv[1])
    parts = " · ".join(f"{name} {sec:.1f}" for name, sec in stages if sec >= 0.05)
    tail = " · ".join(f"{label} {timing[key]:.1f} s" for key, label in
                      (("calibration_text_s", "calibration text"), ("evaluation_s", "evaluation"))
                      if timing.get(key) is not None)
    return f"timing: {head}" + (f": {parts}" if parts else "") + (f" | {tail}" if tail else "")
