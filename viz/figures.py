"""Plotly figures drawn from a Report dict (``Report.to_dict()``, see ``compression/report.py``).

Plain python + plotly only: no torch, no ``compression`` import, so figures can be drawn from a saved
``report.json`` anywhere. Missing data yields a figure with a "no data" annotation; only truly invalid
arguments (e.g. a layer index out of range) raise ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
NO_DATA = "no data"
PALETTE = qualitative.Plotly
KEPT_COLOR, DROPPED_COLOR = "#1f77b4", "#d62728"
_TINY = 1e-30  # log-axis floor when a spectrum has no positive value at all


# ----------------------------------------------------------------------------------------- helpers
def _as_dict(report: Any) -> dict:
    """Accept a Report object (anything with ``to_dict``) as well as its dict."""
    return report.to_dict() if hasattr(report, "to_dict") else (report or {})


def _layers(report: dict) -> list[dict]:
    return list(report.get("layers") or [])


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _figure(title: str, xtitle: str = "", ytitle: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=xtitle, yaxis_title=ytitle)
    return fig


def _no_data(title: str, reason: str = "") -> go.Figure:
    """Empty figure with a centred "no data" annotation (the reason goes in the subtitle)."""
    fig = _figure(title)
    fig.update_layout(title=dict(text=title, subtitle=dict(text=reason)),
                      xaxis_visible=False, yaxis_visible=False)
    fig.add_annotation(text=NO_DATA, x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font_size=20)
    return fig


def _get_layer(report: dict, layer: int) -> dict | None:
    """The layer dict; None when the report has no layers; ValueError for a bad index."""
    layers = _layers(report)
    if not layers:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: report has {len(layers)} layers (0..{len(layers) - 1})")
    return layers[layer]


def _log_safe(values: list[float]) -> list[float]:
    """Clip zeros, negatives and non-finite values to a tiny positive so they fit a log axis."""
    pos = [v for v in values if _finite(v) and v > 0]
    floor = min(pos) * 1e-3 if pos else _TINY
    return [v if _finite(v) and v > 0 else floor for v in values]


def _cumulative_energy(values: list[float]) -> list[float] | None:
    """cumsum / total over the non-negative part of a spectrum (None when the total is 0)."""
    clean = [v if _finite(v) and v > 0 else 0.0 for v in values]
    total = sum(clean)
    if total <= 0:
        return None
    out, acc = [], 0.0
    for v in clean:
        acc += v
        out.append(acc / total)
    return out


# ----------------------------------------------------------------------------------------- spectra
def spectrum_figure(report: dict, layer: int, key: str | None = None) -> go.Figure:
    """Eigenvalue spectrum of one layer (all its spectra if ``key`` is None).

    Top row: eigenvalues (log y) against the 1-based component number, so the dotted marker at
    x = kept rank sits on the last kept component. Bottom row: cumulative energy (cumsum / total).
    """
    report = _as_dict(report)
    title = f"Layer {layer} eigenvalue spectrum" + (f" ({key})" if key else "")
    lay = _get_layer(report, layer)
    spectra = {k: v for k, v in ((lay or {}).get("spectra") or {}).items() if v}
    if key is not None:
        spectra = {key: spectra[key]} if key in spectra else {}
    if not spectra:
        return _no_data(title, f"layer {layer} has no spectrum" + (f" {key!r}" if key else ""))

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35],
                        vertical_spacing=0.06)
    kept = (lay.get("kept") or {})
    for i, (name, values) in enumerate(spectra.items()):
        color = PALETTE[i % len(PALETTE)]
        x = list(range(1, len(values) + 1))
        fig.add_trace(go.Scatter(x=x, y=_log_safe(values), name=name, legendgroup=name,
                                 line_color=color, customdata=values,
                                 hovertemplate=f"{name}<br>#%{{x}}: λ=%{{customdata:.4g}}<extra></extra>"),
                      row=1, col=1)
        energy = _cumulative_energy(values)
        if energy is not None:
            fig.add_trace(go.Scatter(x=x, y=energy, name=f"{name} energy", legendgroup=name,
                                     showlegend=False, line_color=color,
                                     hovertemplate=f"{name}<br>first %{{x}}: %{{y:.1%}} energy<extra></extra>"),
                          row=2, col=1)
    for i, name in enumerate(spectra):  # after the traces so the marker spans both rows
        if _finite(kept.get(name)):
            fig.add_vline(x=kept[name], row="all", col=1, line_dash="dot",
                          line_color=PALETTE[i % len(PALETTE)])
            fig.add_annotation(x=kept[name], y=1, yref="y domain", xref="x", text=f"kept {kept[name]}",
                               showarrow=False, xanchor="left", font_color=PALETTE[i % len(PALETTE)])
    fig.update_layout(template=TEMPLATE, title=title, hovermode="closest")
    fig.update_yaxes(type="log", title_text="eigenvalue", row=1, col=1)
    fig.update_yaxes(title_text="cumulative energy", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="component (sorted, 1-based)", row=2, col=1)
    return fig


def spectra_overview_figure(report: dict, key: str) -> go.Figure:
    """All layers' spectra of one key, normalised by their largest eigenvalue, coloured by depth."""
    report = _as_dict(report)
    title = f"Normalised spectra of {key!r} across layers"
    curves = []
    for i, lay in enumerate(_layers(report)):
        values = (lay.get("spectra") or {}).get(key) or []
        top = max((v for v in values if _finite(v)), default=0)
        if top > 0:
            curves.append((lay.get("index", i), [v / top if _finite(v) else v for v in values]))
    if not curves:
        return _no_data(title, f"no layer has a spectrum {key!r}")

    fig = _figure(title, "component (sorted, 1-based)", "λ / λ_max")
    n_layers = max(len(_layers(report)) - 1, 1)
    for idx, values in curves:
        fig.add_trace(go.Scatter(x=list(range(1, len(values) + 1)), y=_log_safe(values),
                                 name=f"layer {idx}", mode="lines",
                                 line_color=sample_colorscale("Viridis", [idx / n_layers])[0],
                                 hovertemplate=f"layer {idx}<br>#%{{x}}: %{{y:.3g}}<extra></extra>"))
    fig.update_yaxes(type="log")
    return fig


# ---------------------------------------------------------------------------------------- per layer
def leverage_figure(report: dict, layer: int) -> go.Figure:
    """Ridge leverage scores of a layer's MLP channels, sorted descending, kept vs dropped."""
    report = _as_dict(report)
    title = f"Layer {layer} MLP channel ridge leverage"
    lev = (_get_layer(report, layer) or {}).get("leverage") or {}
    scores = lev.get("scores") or []
    if not scores:
        return _no_data(title, f"layer {layer} has no leverage scores")

    kept = set(lev.get("kept") or [])
    order = sorted(range(len(scores)), key=lambda c: -scores[c] if _finite(scores[c]) else math.inf)
    fig = _figure(title, "channel rank (by score, descending)", "ridge leverage score")
    for label, color, is_kept in (("kept", KEPT_COLOR, True), ("dropped", DROPPED_COLOR, False)):
        ranks = [r for r, c in enumerate(order) if (c in kept) == is_kept]
        fig.add_trace(go.Scatter(
            x=ranks, y=[scores[order[r]] for r in ranks], customdata=[order[r] for r in ranks],
            mode="markers", marker_color=color, name=f"{label} ({len(ranks)})",
            hovertemplate="channel %{customdata}<br>rank %{x}<br>score %{y:.4g}<extra>" + label + "</extra>"))
    return fig


def error_figure(report: dict) -> go.Figure:
    """Relative reconstruction error per layer, one trace per error key (removed layers skipped)."""
    report = _as_dict(report)
    title = "Reconstruction error per layer"
    live = [(lay.get("index", i), lay.get("errors") or {})
            for i, lay in enumerate(_layers(report)) if not lay.get("removed")]
    keys = list(dict.fromkeys(k for _, errs in live for k in errs))  # union, first-seen order
    if not keys:
        return _no_data(title, "no layer reports reconstruction errors")

    fig = _figure(title, "layer", "relative Frobenius error")
    for key in keys:
        pts = [(idx, errs[key]) for idx, errs in live if _finite(errs.get(key))]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=key,
                                 mode="lines+markers",
                                 hovertemplate=f"{key}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(dtick=1)
    return fig


def influence_figure(report: dict) -> go.Figure:
    """Block Influence per layer (``block_influence`` or per-layer ``influence``), removed in red."""
    report = _as_dict(report)
    title = "Block Influence per layer"
    layers = _layers(report)
    values = report.get("block_influence")
    if values is None:
        values = [lay.get("influence") for lay in layers]
    removed = [bool(layers[i].get("removed")) if i < len(layers) else False for i in range(len(values))]
    pts = [(i, v, r) for i, (v, r) in enumerate(zip(values, removed)) if _finite(v)]
    if not pts:
        return _no_data(title, "the method did not compute Block Influence")

    fig = _figure(title, "layer", "Block Influence (1 − cos(in, out))")
    for label, color, is_removed in (("kept", KEPT_COLOR, False), ("removed", DROPPED_COLOR, True)):
        sel = [p for p in pts if p[2] == is_removed]
        fig.add_trace(go.Bar(x=[p[0] for p in sel], y=[p[1] for p in sel], marker_color=color,
                             name=f"{label} ({len(sel)})",
                             hovertemplate="layer %{x}<br>BI %{y:.4g}<extra>" + label + "</extra>"))
    fig.update_xaxes(dtick=1)
    return fig


def sizes_figure(report: dict) -> go.Figure:
    """Dense vs compressed parameters per layer (grouped bars); kept sizes shown on hover."""
    report = _as_dict(report)
    title = "Parameters per layer"
    layers = _layers(report)
    if not layers:
        return _no_data(title, "report has no layers")

    x = [lay.get("index", i) for i, lay in enumerate(layers)]
    hover = ["removed" if lay.get("removed") else
             "<br>".join(f"{k} = {v}" for k, v in (lay.get("sizes") or {}).items()) or "—"
             for lay in layers]
    fig = _figure(title, "layer", "parameters")
    for label, field, color in (("dense", "params_dense", "#aaaaaa"),
                                ("compressed", "params_compressed", KEPT_COLOR)):
        fig.add_trace(go.Bar(x=x, y=[lay.get(field) or 0 for lay in layers], name=label,
                             marker_color=color, customdata=hover,
                             hovertemplate="layer %{x}<br>%{y:,} params<br>%{customdata}<extra>"
                                           + label + "</extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(dtick=1)
    return fig


# --------------------------------------------------------------------------------------- run sweeps
def _pick(run: dict, *keys: str) -> Any:
    """First present, non-None value among ``keys``."""
    return next((run[k] for k in keys if run.get(k) is not None), None)


def _front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Non-dominated points: best y among all runs of that size or smaller, sorted by x."""
    sign = -1 if higher_is_better else 1
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def _runs_figure(runs: list[dict], title: str, ytitle: str, y_of: Callable[[dict], Any],
                 higher_is_better: bool, log_y: bool) -> go.Figure:
    """Shared body of pareto/accuracy figures: one trace per method, dense star, dashed front."""
    pts = []
    for run in runs or []:
        x, y = _pick(run, "params", "params_compressed"), y_of(run)
        if _finite(x) and _finite(y) and (y > 0 or not log_y):
            pts.append((x, y, str(run.get("method", "?")), run))
    if not pts:
        return _no_data(title, "no run has both a size and a score")

    fig = _figure(title, "parameters", ytitle)
    for method in dict.fromkeys(p[2] for p in pts):
        sel = [p for p in pts if p[2] == method]
        text = [str(_pick(p[3], "label") or (f"ratio {p[3]['ratio']:.0%}" if _finite(p[3].get("ratio"))
                                              else method)) for p in sel]
        dense = method == "dense"
        fig.add_trace(go.Scatter(
            x=[p[0] for p in sel], y=[p[1] for p in sel], text=text, name=method, mode="markers",
            marker=dict(size=14 if dense else 9, symbol="star" if dense else "circle",
                        color="black" if dense else None),
            hovertemplate=f"{method}<br>%{{text}}<br>%{{x:,}} params<br>{ytitle} %{{y:.4g}}<extra></extra>"))
    front = _front([(p[0], p[1]) for p in pts], higher_is_better)
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], name="Pareto front",
                             mode="lines", line=dict(dash="dash", color="gray"), line_shape="hv",
                             hoverinfo="skip"))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def pareto_figure(runs: list[dict]) -> go.Figure:
    """Perplexity (log y) vs parameters of many runs, with the Pareto front (lowest ppl per size)."""
    return _runs_figure(runs, "Perplexity vs size", "perplexity",
                        lambda r: _pick(r, "ppl", "ppl_compressed"), higher_is_better=False, log_y=True)


def accuracy_figure(runs: list[dict], key: str = "zero_shot_avg") -> go.Figure:
    """Zero-shot accuracy (``run[key]``) vs parameters, with the front (highest accuracy per size)."""
    return _runs_figure(runs, "Zero-shot accuracy vs size", key.replace("_", " "),
                        lambda r: r.get(key), higher_is_better=True, log_y=False)


def loss_figure(losses: list[float], tokens: list[int] | None = None) -> go.Figure:
    """Recovery-training loss against step (or tokens seen), with an exponential moving average."""
    title = "Recovery training loss"
    if not losses:
        return _no_data(title, "no losses recorded")
    if tokens is not None and len(tokens) != len(losses):
        raise ValueError(f"tokens has {len(tokens)} entries but losses has {len(losses)}")

    x = list(tokens) if tokens is not None else list(range(1, len(losses) + 1))
    y = [v if _finite(v) else None for v in losses]  # gaps for nan/inf
    fig = _figure(title, "tokens seen" if tokens is not None else "step", "loss")
    fig.add_trace(go.Scatter(x=x, y=y, name="loss", mode="lines", line_color="#9ecae1",
                             hovertemplate="%{x:,}: %{y:.4f}<extra>loss</extra>"))
    if len(losses) >= 10:  # smoothed curve only when there is something to smooth
        ema, acc = [], None
        for v in y:
            acc = v if acc is None else (acc if v is None else 0.9 * acc + 0.1 * v)
            ema.append(acc)
        fig.add_trace(go.Scatter(x=x, y=ema, name="EMA (0.9)", mode="lines", line_color=KEPT_COLOR,
                                 hovertemplate="%{x:,}: %{y:.4f}<extra>EMA</extra>"))
    return fig
