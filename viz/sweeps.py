"""Figures of many runs against their size: perplexity (log y) or zero-shot accuracy vs parameters,
with each run's 95 % interval as an error bar and the Pareto front once it joins two runs or more.

Plain numbers in, Plotly out: no torch, no ``compression`` import (as :mod:`viz.figures`). A run is a
dict: ``method``, ``params`` (or ``params_compressed``), the score (``ppl`` or ``ppl_compressed``; an
accuracy under its key, ``zero_shot_avg`` by default), the score's interval when measured (``ppl_ci``
as ``[lo, hi]``; ``<key>_ci``, or ``<key>_stderr`` for ±1.96 standard errors), and optionally
``label`` and ``ratio``.

Axis ranges are set here rather than left to Plotly: its autorange around a single point spans a
millionth of the value (ticks "123.872255M … 123.872257M") and runs an accuracy axis below 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import plotly.graph_objects as go

from .figures import _figure, _finite, _no_data

Z95 = 1.96  # normal quantile of a two-sided 95 % interval
FRONT = "Pareto front"
Interval = tuple[float, float]


@dataclass(frozen=True)
class Score:
    """What a sweep figure plots on y: how to read it and its interval off a run, and its scale."""
    title: str
    label: str
    value: Callable[[dict], Any]
    interval: Callable[[dict], Any]
    higher_is_better: bool
    log_y: bool
    bounds: Interval | None  # the values a score can take (accuracies: 0–1); intervals are clipped to it
    empty: str


def _pick(run: dict, *keys: str) -> Any:
    """First present, non-None value among ``keys``."""
    return next((run[k] for k in keys if run.get(k) is not None), None)


def _pair(ci: Any) -> Interval | None:
    """``[lo, hi]`` as a sorted pair of finite floats, or None."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(v) for v in ci):
        return (float(min(ci)), float(max(ci)))
    return None


def _accuracy_interval(key: str) -> Callable[[dict], Interval | None]:
    """A run's interval of ``run[key]``: ``<key>_ci`` as given, else ±1.96 × ``<key>_stderr``."""
    def interval(run: dict) -> Interval | None:
        given = _pair(run.get(f"{key}_ci"))
        se, y = run.get(f"{key}_stderr"), run.get(key)
        if given is None and _finite(se) and se >= 0 and _finite(y):
            given = (y - Z95 * se, y + Z95 * se)
        return given
    return interval


def _front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Non-dominated points: best y among all runs of that size or smaller, sorted by x."""
    sign = -1 if higher_is_better else 1
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def padded_range(values: list[float], *, least: float, bounds: Interval | None = None) -> list[float]:
    """An axis range around ``values`` with a tenth of their span free on each side, and at least
    ``least`` when they (nearly) coincide, so a lone point sits mid-axis; clipped to ``bounds``."""
    lo, hi = min(values), max(values)
    pad = max(0.1 * (hi - lo), least)
    lo, hi = lo - pad, hi + pad
    if bounds is not None and max(lo, bounds[0]) < min(hi, bounds[1]):  # out-of-bounds data: unclipped
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return [lo, hi]


def _clip(interval: Interval | None, y: float, bounds: Interval | None) -> Interval | None:
    """The interval widened to hold its own point and cut to the score's bounds."""
    if interval is None:
        return None
    lo, hi = min(interval[0], y), max(interval[1], y)
    return (max(lo, bounds[0]), min(hi, bounds[1])) if bounds else (lo, hi)


def _error_bars(ys: list[float], intervals: list[Interval | None]) -> dict | None:
    """Asymmetric error bars for the points that have an interval (None where none has one)."""
    if all(ci is None for ci in intervals):
        return None
    return dict(type="data", symmetric=False, thickness=1.2, width=4,
                array=[None if ci is None else ci[1] - y for y, ci in zip(ys, intervals)],
                arrayminus=[None if ci is None else y - ci[0] for y, ci in zip(ys, intervals)])


def range_text(lo: float, hi: float) -> str:
    """``lo – hi`` with one precision for both: four significant digits of the larger end, at most three
    decimals (``57.5 – 161.1``, not ``57.538 – 161.1``)."""
    top = max(abs(lo), abs(hi))
    decimals = 3 if top == 0 else min(3, max(0, 3 - math.floor(math.log10(top))))
    return f"{lo:.{decimals}f} – {hi:.{decimals}f}"


def _hover_interval(ci: Interval | None) -> str:
    return "" if ci is None else f"<br>95% interval {range_text(*ci)}"


def _runs_figure(runs: list[dict], score: Score) -> go.Figure:
    """One trace per method (the dense model a black star), error bars where a run has an interval,
    the dashed front when it joins two runs or more, and axes padded around what is drawn."""
    pts = []
    for run in runs or []:
        x, y = _pick(run, "params", "params_compressed"), score.value(run)
        if _finite(x) and _finite(y) and (y > 0 or not score.log_y):
            ci = _clip(_pair(score.interval(run)), y, score.bounds)
            pts.append((x, y, ci, str(run.get("method", "?")), run))
    if not pts:
        return _no_data(score.title, score.empty)

    fig = _figure(score.title, "parameters", score.label)
    for method in dict.fromkeys(p[3] for p in pts):
        sel = [p for p in pts if p[3] == method]
        text = [str(_pick(p[4], "label") or (f"ratio {p[4]['ratio']:.0%}" if _finite(p[4].get("ratio"))
                                              else method)) + _hover_interval(p[2]) for p in sel]
        dense = method == "dense"
        fig.add_trace(go.Scatter(
            x=[p[0] for p in sel], y=[p[1] for p in sel], text=text, name=method, mode="markers",
            error_y=_error_bars([p[1] for p in sel], [p[2] for p in sel]),
            marker=dict(size=14 if dense else 9, symbol="star" if dense else "circle",
                        color="black" if dense else None),
            hovertemplate=f"{method}<br>%{{text}}<br>%{{x:,}} params<br>{score.label} %{{y:.4g}}<extra></extra>"))
    front = _front([(p[0], p[1]) for p in pts], score.higher_is_better)
    if len(front) >= 2:  # a front of one run is no line: no legend entry for it either
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], name=FRONT,
                                 mode="lines", line=dict(dash="dash", color="gray"), line_shape="hv",
                                 hoverinfo="skip"))
    _set_ranges(fig, pts, score)
    return fig


def _set_ranges(fig: go.Figure, pts: list, score: Score) -> None:
    """x: the sizes with 5 % of the largest free around them (sizes are never negative); y: the scores
    and their intervals, with room around one point (half a decade's tenth on a log axis, 5 points of
    accuracy), never outside the score's bounds."""
    xs = [p[0] for p in pts]
    fig.update_xaxes(range=padded_range(xs, least=0.05 * max(abs(x) for x in xs) or 1.0, bounds=(0, math.inf)))
    ys = [v for p in pts for v in (p[1], *(p[2] or ()))]
    if score.log_y:
        logs = [math.log10(v) for v in ys if v > 0]
        fig.update_yaxes(type="log", range=padded_range(logs, least=0.05))
    else:
        fig.update_yaxes(range=padded_range(ys, least=0.05, bounds=score.bounds))


PERPLEXITY = Score("Perplexity vs size", "perplexity", lambda r: _pick(r, "ppl", "ppl_compressed"),
                   lambda r: _pick(r, "ppl_ci", "ppl_compressed_ci"), higher_is_better=False, log_y=True,
                   bounds=None,
                   empty="no run has a perplexity yet:<br>compress with perplexity windows, or run Evaluate")


def pareto_figure(runs: list[dict]) -> go.Figure:
    """Perplexity (log y) vs parameters of many runs, with the Pareto front (lowest ppl per size)."""
    return _runs_figure(runs, PERPLEXITY)


def accuracy_figure(runs: list[dict], key: str = "zero_shot_avg") -> go.Figure:
    """Zero-shot accuracy (``run[key]``) vs parameters, with the front (highest accuracy per size)."""
    return _runs_figure(runs, Score("Zero-shot accuracy vs size", key.replace("_", " "), lambda r: r.get(key),
                                    _accuracy_interval(key), higher_is_better=True, log_y=False, bounds=(0.0, 1.0),
                                    empty="no run has a zero-shot score yet:<br>tick tasks in Evaluate and run it"))
