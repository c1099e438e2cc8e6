"""Long jobs (compress, evaluate, heal) in a worker thread, watched by a generator the UI streams.

The event handler is a generator that yields the job's progress twice a second. That gives the page a
live progress panel (stage, bar, elapsed, time left), and it ties the job to its client: when the
client cancels or disconnects, gradio stops pulling from the generator, and the worker's next
progress tick raises :class:`Stopped` (at once when the generator is closed, or after
:data:`LOST_AFTER` seconds without a pull), so the model slot is free again within seconds.
"""
from __future__ import annotations

import html
import threading
import time
from typing import Callable, Iterator

from .runs import Stopped

POLL = 0.5       # seconds between progress updates sent to the page
LOST_AFTER = 5.0  # seconds without a pull after which the client is taken to be gone


class Job:
    """One call of ``fn(progress)`` in a thread, with the state the page shows. The job itself is the
    progress callable ``fn`` receives (``job(fraction, message)``), so :class:`compression.pipeline.Stages`
    can tell it where each stage begins and ends (:meth:`enter_stage`)."""

    def __init__(self, fn: Callable, stop: threading.Event, lock: threading.Lock):
        self.fn, self.stop, self.lock = fn, stop, lock
        self.fraction, self.message = 0.0, "waiting for the model slot"
        self.started = self.pulled = time.monotonic()
        self.stage: tuple[str, float, float, float] | None = None  # (name, begin, end, started)
        self.result = self.error = None
        self.done = threading.Event()

    def progress(self, fraction: float, message: str = "") -> None:
        if self.stop.is_set():
            raise Stopped("stopped")
        if time.monotonic() - self.pulled > LOST_AFTER:
            self.stop.set()
            raise Stopped("the client went away")
        self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), message

    __call__ = progress

    def enter_stage(self, name: str, begin: float, end: float) -> None:
        """The job's overall fraction runs from ``begin`` to ``end`` during stage ``name``, from now."""
        self.stage = (name, begin, end, time.monotonic())

    def _run(self) -> None:
        try:
            with self.lock:  # one model job at a time, whatever gradio's queue thinks
                self.started = time.monotonic()
                self.progress(0.0, "starting")
                self.result = self.fn(self)
        except BaseException as err:  # noqa: BLE001  handed to the generator, which re-raises it
            self.error = err
        finally:
            self.done.set()

    def eta(self) -> tuple[float, str | None] | None:
        """(seconds left, stage) from the rate so far; None until enough has run to tell.

        Inside a stage that is not the last one, the estimate is that stage's time left at its own
        rate, and the stage's name comes with it: one stage's rate says nothing about the next one's
        (self-chat generation runs ~100× slower per unit of progress than compression), so
        extrapolating it over the whole job is what made the estimate run away. In the last stage, or
        without stages, it is the whole job's time left (stage None)."""
        now = time.monotonic()
        if self.stage is not None:
            name, begin, end, started = self.stage
            local = (self.fraction - begin) / (end - begin) if end > begin else 1.0
            elapsed = now - started
            if local < 0.03 or elapsed < 2:
                return None
            left = elapsed * (1 - local) / local
            return (left, None) if end >= 1.0 - 1e-9 else (left, name)
        elapsed = now - self.started
        if self.fraction < 0.03 or elapsed < 2:
            return None
        return elapsed * (1 - self.fraction) / self.fraction, None


def watch(fn: Callable, session, lock: threading.Lock) -> Iterator[Job]:
    """Start ``fn(progress)`` and yield its :class:`Job` every :data:`POLL` seconds until it ends;
    the last yield is the finished job (``job.result``), or its exception is raised. The job has
    its own stop flag, registered with ``session`` (its Stop button sets it)."""
    stop = session.start_job()
    job = Job(fn, stop, lock)
    threading.Thread(target=job._run, daemon=True).start()
    try:
        while not job.done.wait(POLL):
            job.pulled = time.monotonic()
            yield job
        if job.error is not None:
            raise job.error
        yield job
    finally:
        if not job.done.is_set():  # the generator was closed early: the client cancelled
            stop.set()
        session.end_job(stop)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def progress_html(job: Job | None, title: str = "") -> str:
    """A progress panel that is always painted (not a transient overlay): bar, stage, clock."""
    if job is None:
        return ""
    elapsed = time.monotonic() - job.started
    eta = job.eta()
    left = ""
    if eta is not None and not job.done.is_set():
        seconds, stage = eta
        left = f" · about {_clock(seconds)} left" + (f" in {stage}" if stage else "")
    pct = 100 * (1.0 if job.done.is_set() and job.error is None else job.fraction)
    return (f'<div class="job-progress" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="job-bar"><div class="job-fill" style="width:{pct:.1f}%">'
            f'</div></div><div class="job-text">{html.escape(title)} {pct:.0f}% · '
            f'{html.escape(job.message)} · {_clock(elapsed)} elapsed{left}</div></div>')


CSS = """
.job-progress {margin: 4px 0 8px 0;}
.job-bar {height: 10px; border-radius: 5px; background: var(--border-color-primary); overflow: hidden;}
.job-fill {height: 100%; background: var(--color-accent); transition: width 0.4s;}
.job-text {font-size: 0.9em; margin-top: 4px; color: var(--body-text-color-subdued);}
"""
