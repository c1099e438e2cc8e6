"""Figures of the trade-off explorer (``compression.preview``): the forecast per layer with a run's
measured errors over it, and the forecast total against the ratio with the session's runs.

Plain numbers in, Plotly out: no torch, no ``compression`` import (as :mod:`viz.figures`)."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .figures import (DROPPED_COLOR, KEPT_COLOR, PALETTE, _as_dict, _figure, _finite, _layer_ticks, _layers,
                      _no_data)

PREVIEW_LABELS = {"attn": "attention", "mlp": "MLP", "predicted_error": "block update"}


def _values(seq: Any, n: int | None = None) -> list:
    """A list of finite floats or None (anything else becomes None), padded/cut to ``n`` when given."""
    out = [float(v) if _finite(v) else None for v in (seq or [])]
    return out if n is None else (out + [None] * n)[:n]


def _measured_layers(measured: dict) -> dict:
    """{"attn", "mlp", "per_layer"} lists from a measured-errors dict or a report (its layers' errors)."""
    measured = _as_dict(measured)
    if "layers" not in measured:
        return measured
    errors = [(lay.get("errors") or {}) if not lay.get("removed") else {} for lay in _layers(measured)]
    return {"attn": [e.get("attn") for e in errors], "mlp": [e.get("mlp") for e in errors],
            "per_layer": [e.get("block") for e in errors]}


def preview_errors_figure(predicted: dict, measured: dict | None = None) -> go.Figure:
    """Forecast relative error per layer, before compressing: bars per module (``predicted["attn"]``,
    ``["mlp"]``), a line for the layer's total (``["predicted_error"]``); dropped blocks
    (``["dropped"]``) shaded. ``measured`` (a run's errors in the same layout, ``attn``/``mlp``/
    ``per_layer``, or its report) is drawn over as markers. ``predicted["labels"]`` names the series
    (SliceGPT's two are slices of the stream, not modules)."""
    title = "Forecast: relative error per layer"
    predicted = predicted or {}
    names = {**PREVIEW_LABELS, **(predicted.get("labels") or {})}
    series = {k: _values(predicted.get(k)) for k in ("attn", "mlp", "predicted_error")}
    n = max((len(v) for v in series.values()), default=0)
    if not any(v is not None for vals in series.values() for v in vals):
        return _no_data(title, "no forecast yet")
    fig = _figure(title, "layer", "relative Frobenius error")
    layers = list(range(n))
    colors = {"attn": PALETTE[0], "mlp": PALETTE[1], "predicted_error": "#444444"}
    for key in ("attn", "mlp"):
        fig.add_trace(go.Bar(x=layers, y=_values(series[key], n), name=f"{names[key]} (forecast)",
                             marker_color=colors[key], opacity=0.55,
                             hovertemplate=f"layer %{{x}}<br>forecast %{{y:.4g}}<extra>{names[key]}</extra>"))
    fig.add_trace(go.Scatter(x=layers, y=_values(series["predicted_error"], n), mode="lines",
                             name=f"{names['predicted_error']} (forecast)",
                             line=dict(color=colors["predicted_error"], width=1.5),
                             hovertemplate="layer %{x}<br>forecast %{y:.4g}<extra>total</extra>"))
    if measured:
        got = _measured_layers(measured)
        for key, source in (("attn", "attn"), ("mlp", "mlp"), ("predicted_error", "per_layer")):
            ys = _values(got.get(source), n)
            if any(v is not None for v in ys):
                fig.add_trace(go.Scatter(
                    x=layers, y=ys, mode="markers+lines", name=f"{names[key]} (measured)",
                    line=dict(color=colors[key], dash="dot", width=1),
                    marker=dict(color=colors[key], symbol="diamond", size=8, line=dict(color="white", width=1)),
                    hovertemplate=f"layer %{{x}}<br>measured %{{y:.4g}}<extra>{names[key]}</extra>"))
    for i in predicted.get("dropped") or []:
        if isinstance(i, int) and 0 <= i < n:
            fig.add_vrect(x0=i - 0.5, x1=i + 0.5, fillcolor=DROPPED_COLOR, opacity=0.12, line_width=0)
    if predicted.get("dropped"):
        fig.update_layout(title=dict(text=title, subtitle=dict(text="shaded: blocks dropped")))
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    _layer_ticks(fig, n)
    return fig


def _curve_points(curve: Any) -> list[tuple[float, float]]:
    """(ratio, total) pairs from a list of rows ({"ratio", "total"}) or a dict of two lists."""
    if isinstance(curve, dict):
        pairs = zip(curve.get("ratio") or [], curve.get("total") or [])
    else:
        pairs = ((row.get("ratio"), row.get("total")) for row in curve or [] if isinstance(row, dict))
    return sorted((float(r), float(t)) for r, t in pairs if _finite(r) and _finite(t))


def tradeoff_figure(curve: Any, runs: list[dict] | None = None, current: float | None = None,
                    method: str = "") -> go.Figure:
    """Forecast total error against the target ratio (``curve``: rows with ``ratio`` and ``total``, as
    ``python -m compression preview`` prints), with the session's runs as measured points (``runs``:
    dicts with ``ratio``, ``total`` and optionally ``label``, ``ppl``) and the slider's ``current``
    ratio marked."""
    title = f"Trade-off forecast{': ' + method if method else ''}"
    pts = _curve_points(curve)
    done = [r for r in runs or [] if isinstance(r, dict) and _finite(r.get("ratio")) and _finite(r.get("total"))]
    if not pts and not done:
        return _no_data(title, "no forecast yet")
    fig = _figure(title, "target ratio (fraction of block parameters removed)", "total error (forecast)")
    if pts:
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name="forecast", line_color=KEPT_COLOR, marker_size=5,
                                 hovertemplate="ratio %{x:.3g}<br>forecast %{y:.4g}<extra></extra>"))
    if done:
        text = [str(r.get("label") or f"ratio {r['ratio']:.3g}") + (f"<br>ppl {r['ppl']:.2f}" if _finite(r.get("ppl"))
                                                                  else "") for r in done]
        fig.add_trace(go.Scatter(x=[r["ratio"] for r in done], y=[r["total"] for r in done], mode="markers",
                                 name="runs (measured)", text=text,
                                 marker=dict(color=DROPPED_COLOR, symbol="diamond", size=10),
                                 hovertemplate="%{text}<br>measured %{y:.4g}<extra></extra>"))
    if _finite(current):
        fig.add_vline(x=current, line_dash="dot", line_color="gray", annotation_text="this setting",
                      annotation_position="top left")
    fig.update_xaxes(tickformat=".0%")
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return fig
