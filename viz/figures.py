"""Plotly figures drawn from a Report dict (``Report.to_dict()``, see ``compression/report.py``).

Plain python + plotly only: no torch, no ``compression`` import, so figures can be drawn from a saved
``report.json`` anywhere. Missing data yields a figure with a "no data" annotation; only truly invalid
arguments (e.g. a layer index out of range) raise ``ValueError``.
"""
from __future__ import annotations

import math
import re
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
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
SPECTRUM_TITLES = {"mlp_corr": "MLP activation correlation (Nyström)", "attn_input": "attention input",
                   "mlp_input": "MLP input (PCA basis)", "block_output": "block output (PCA basis)"}
_GROUPED = re.compile(r"vo_(group|head)(\d+)")
X_AXES = ("index", "fraction")  # component number, or component number / spectrum length


def spectrum_title(key: str) -> str:
    """Plain words for a spectrum name of the report (``vo_group1`` -> "value–output, kv group 1")."""
    grouped = _GROUPED.fullmatch(key)
    if grouped:
        return f"value–output, {'kv group' if grouped[1] == 'group' else 'head'} {grouped[2]}"
    return SPECTRUM_TITLES.get(key, key.replace("_", " "))


def _components(n: int, x_axis: str) -> list[float]:
    """x of the sorted components 1..n: the number itself, or the fraction of the spectrum up to it."""
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {X_AXES}, got {x_axis!r}")
    return [k / n for k in range(1, n + 1)] if x_axis == "fraction" else list(range(1, n + 1))


def _x_title(x_axis: str) -> str:
    return "fraction of components" if x_axis == "fraction" else "component (sorted, 1-based)"


def spectrum_figure(report: dict, layer: int, key: str | None = None, x_axis: str = "index") -> go.Figure:
    """One panel per spectrum of a layer (or only ``key``), each titled in plain words.

    A panel shows the eigenvalues (log y, left) and their cumulative energy (right axis, 0–1)
    against the component; its own dotted marker sits on the last kept component, labelled with the
    rank kept and the energy it holds. ``x_axis="fraction"`` puts spectra of different lengths on
    one 0–1 scale.
    """
    report = _as_dict(report)
    title = f"Layer {layer}: eigenvalue spectra and the rank kept"
    lay = _get_layer(report, layer)
    spectra = {k: v for k, v in ((lay or {}).get("spectra") or {}).items() if v}
    if key is not None:
        spectra = {key: spectra[key]} if key in spectra else {}
    if not spectra:
        return _no_data(title, f"layer {layer} has no spectrum" + (f" {key!r}" if key else ""))

    cols = 1 if len(spectra) == 1 else 2
    rows = math.ceil(len(spectra) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[spectrum_title(k) for k in spectra],
                        specs=[[{"secondary_y": True}] * cols] * rows, vertical_spacing=0.3 / rows,
                        horizontal_spacing=0.14)
    kept = lay.get("kept") or {}
    for i, (name, values) in enumerate(spectra.items()):
        row, col = i // cols + 1, i % cols + 1
        x = _components(len(values), x_axis)
        fig.add_trace(go.Scatter(x=x, y=_log_safe(values), name=name, showlegend=False, line_color=KEPT_COLOR,
                                 customdata=values,
                                 hovertemplate="#%{x}: λ=%{customdata:.4g}<extra>" + name + "</extra>"),
                      row=row, col=col)
        energy = _cumulative_energy(values)
        if energy is not None:
            fig.add_trace(go.Scatter(x=x, y=energy, name=f"{name} energy", showlegend=False,
                                     line=dict(color="#999999", dash="dash"),
                                     hovertemplate="up to %{x}: %{y:.1%} energy<extra></extra>"),
                          row=row, col=col, secondary_y=True)
        rank = kept.get(name)
        if _finite(rank) and 0 < rank <= len(values):
            held = f" · {energy[int(rank) - 1]:.0%} energy" if energy is not None else ""
            fig.add_vline(x=x[int(rank) - 1], row=row, col=col, line_dash="dot", line_color=DROPPED_COLOR,
                          annotation_text=f"kept {int(rank)}/{len(values)}{held}",
                          annotation_position="top left", annotation_font_color=DROPPED_COLOR)
        fig.update_yaxes(type="log", exponentformat="power", row=row, col=col, secondary_y=False)
        fig.update_yaxes(range=[0, 1.02], showgrid=False, tickformat=".0%", row=row, col=col,
                         secondary_y=True)
        fig.update_xaxes(title_text=_x_title(x_axis) if row == rows else None, row=row, col=col)
    fig.update_layout(template=TEMPLATE, title=dict(text=title, subtitle=dict(
        text="eigenvalue (log, blue) · cumulative energy (dashed, right axis)")),
        height=max(360, 270 * rows + 110), hovermode="closest", margin=dict(t=110))
    return fig


def _overview_legend(outlined: int | None, has_marks: bool, has_gaps: bool) -> str:
    """The heat map's key, under its title: what the ticks, the colours, blank rows and the box mean."""
    first = (["white tick: the layer's kept rank (components up to it are kept)"] if has_marks else []) + \
        ([f"red box: layer {outlined}"] if outlined is not None else [])
    second = ["colour: eigenvalue / the layer's largest; darkest: 10<sup>-12</sup> or less (numerically zero)"] + \
        (["blank row: no such spectrum (layer dropped)"] if has_gaps else [])
    return "<br>".join(" · ".join(part) for part in (first, second) if part)


def spectra_overview_figure(report: dict, key: str, layer: int | None = None,
                            x_axis: str = "index") -> go.Figure:
    """Heat map, layers × components, of one spectrum normalised by each layer's largest eigenvalue
    (log10), with every layer's kept rank marked, ``layer`` outlined, and a key under the title (a
    layer without the spectrum is a blank row, so the others keep one row each)."""
    report = _as_dict(report)
    if not key:
        return _no_data("Normalised spectra by layer", "the report has no spectra")
    title = f"{spectrum_title(key)}: normalised spectra by layer"
    rows = {}
    for i, lay in enumerate(_layers(report)):
        values = (lay.get("spectra") or {}).get(key) or []
        top = max((v for v in values if _finite(v)), default=0)
        if top > 0:
            rows[lay.get("index", i)] = (values, top, (lay.get("kept") or {}).get(key))
    if not rows:
        return _no_data(title, f"no layer has a spectrum {key!r}")

    width = max(len(values) for values, _, _ in rows.values())
    floor = -12.0  # log10 of the smallest ratio shown; smaller (and zero, negative) values sit on it
    layer_ids = sorted(set(rows) | {lay.get("index", i) for i, lay in enumerate(_layers(report))})
    z = [[None] * width if idx not in rows else
         [max(math.log10(v / rows[idx][1]), floor) if _finite(v) and v > 0 else floor for v in rows[idx][0]]
         + [None] * (width - len(rows[idx][0])) for idx in layer_ids]
    x = _components(width, x_axis)
    fig = _figure(title, _x_title(x_axis), "layer")
    decades = [0, -3, -6, -9, -12]
    ticks = ["1"] + [f"10<sup>{d}</sup>" for d in decades[1:-1]] + ["≤ 10<sup>-12</sup>"]
    fig.add_trace(go.Heatmap(z=z, x=x, y=layer_ids, colorscale="Viridis", zmin=floor, zmax=0,
                             colorbar=dict(title="λ / λ_max", tickvals=decades, ticktext=ticks),
                             hoverongaps=False, hovertemplate="layer %{y}<br>#%{x}: 10^%{z:.2f}<extra></extra>"))
    marks = [(idx, x[int(k) - 1]) for idx, (values, _, k) in rows.items() if _finite(k) and 0 < k <= len(values)]
    if marks:
        fig.add_trace(go.Scatter(x=[m[1] for m in marks], y=[m[0] for m in marks], mode="markers",
                                 name="kept rank", marker=dict(symbol="line-ns-open", size=10, color="white",
                                                               line_width=2),
                                 hovertemplate="layer %{y}: kept up to %{x}<extra></extra>"))
    outlined = layer if layer is not None and layer in rows else None
    if outlined is not None:
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color=DROPPED_COLOR, width=2))
    _layer_ticks(fig, len(_layers(report)), axis="y")
    fig.update_layout(title=dict(text=title, subtitle=dict(text=_overview_legend(
        outlined, bool(marks), len(rows) < len(layer_ids)))), margin=dict(t=110),
        legend=dict(orientation="h", y=-0.2))
    return fig


# ---------------------------------------------------------------------------------------- per layer
def _layer_ticks(fig: go.Figure, n_layers: int, axis: str = "x") -> None:
    """Integer layer ticks 0..n-1 only (no −1 or n from autorange padding), at most ~16 labels."""
    step = max(1, math.ceil(n_layers / 16))
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(tickmode="linear", tick0=0, dtick=step, range=[-0.5, max(n_layers, 1) - 0.5])


def leverage_figure(report: dict, layer: int, log_y: bool = False) -> go.Figure:
    """Ridge leverage scores of a layer's MLP channels, sorted descending, kept vs dropped."""
    report = _as_dict(report)
    title = f"Layer {layer}: MLP channel ridge leverage, kept vs dropped"
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
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    return fig


def _run_name(names, i: int) -> str:
    return str(names[i]) if names and i < len(names) and names[i] else ("this run", "other run")[i]


def _layer_list(indices: list[int], most: int = 12) -> str:
    """``3, 5, 7`` (the first ``most``, then how many more)."""
    shown = ", ".join(str(i) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


def _dropped_note(name: str, removed: list[int], drew: bool, overlaid: bool) -> str:
    """Why a run's errors are missing from the plot, or '' when nothing is: dropped layers are gone
    whole, so they have no per-module errors (an overlaid layer-dropping run would vanish silently)."""
    prefix = f"{name}: " if overlaid else ""
    if removed:
        what = "layer" if len(removed) == 1 else "layers"
        return (f"{prefix}{what} {_layer_list(removed)} dropped, no per-module errors there"
                + ("" if drew else " and none measured on the others"))
    return "" if drew or not overlaid else f"{name}: no per-module errors in its report"


def error_figure(report: dict, other: dict | None = None, names: tuple = ()) -> go.Figure:
    """Relative reconstruction error per layer, one trace per error key; ``other`` (a second run's
    report) is overlaid in dashed lines, ``names`` label the two runs. Removed layers have no errors:
    the subtitle names them, and says when a run has no errors to draw at all."""
    title = "Reconstruction error per layer"
    reports = [_as_dict(report)] + ([_as_dict(other)] if other else [])
    fig, notes = _figure(title, "layer", "relative Frobenius error"), []
    for r, rep in enumerate(reports):
        layers = [(lay.get("index", i), lay) for i, lay in enumerate(_layers(rep))]
        live = [(idx, lay.get("errors") or {}) for idx, lay in layers if not lay.get("removed")]
        drew = False
        for j, key in enumerate(dict.fromkeys(k for _, errs in live for k in errs)):  # first-seen order
            pts = [(idx, errs[key]) for idx, errs in live if _finite(errs.get(key))]
            if not pts:
                continue
            drew = True
            name = key if len(reports) == 1 else f"{key} · {_run_name(names, r)}"
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=name,
                                     mode="lines+markers", line=dict(color=PALETTE[j % len(PALETTE)],
                                                                     dash="dash" if r else "solid"),
                                     hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>"))
        removed = [idx for idx, lay in layers if lay.get("removed")]
        notes.append(_dropped_note(_run_name(names, r), removed, drew, len(reports) > 1))
    note = " · ".join(n for n in notes if n)
    if not fig.data:
        return _no_data(title, note or "no layer reports reconstruction errors")
    if note:
        fig.update_layout(title=dict(text=title, subtitle=dict(text=note)))
    _layer_ticks(fig, max(len(_layers(rep)) for rep in reports))
    return fig


def has_influence(report: dict) -> bool:
    """Whether the report holds Block Influence scores of its own."""
    report = _as_dict(report)
    values = report.get("block_influence") or [lay.get("influence") for lay in _layers(report)]
    return any(_finite(v) for v in values)


def influence_figure(report: dict, influence: list[float] | None = None, source: str = "") -> go.Figure:
    """Block Influence per layer (``block_influence`` or per-layer ``influence``), removed in red.

    ``influence``: scores measured elsewhere (the dense model's, computed on demand) for a report
    without any; ``source`` says where they come from (shown under the title)."""
    report = _as_dict(report)
    title = "Block Influence per layer (1 − cos(block input, output))"
    layers = _layers(report)
    values = report.get("block_influence")
    if values is None:
        values = [lay.get("influence") for lay in layers]
    if has_influence(report):
        source = "measured by the method on its calibration tokens"
    elif influence is not None:
        values = influence
    removed = [bool(layers[i].get("removed")) if i < len(layers) else False for i in range(len(values))]
    pts = [(i, v, r) for i, (v, r) in enumerate(zip(values, removed)) if _finite(v)]
    if not pts:
        return _no_data(title, source or "the method did not compute Block Influence")

    fig = _figure(title, "layer", "Block Influence")
    fig.update_layout(title=dict(text=title, subtitle=dict(text=source)))
    for label, color, is_removed in (("kept", KEPT_COLOR, False), ("removed", DROPPED_COLOR, True)):
        sel = [p for p in pts if p[2] == is_removed]
        fig.add_trace(go.Bar(x=[p[0] for p in sel], y=[p[1] for p in sel], marker_color=color,
                             name=f"{label} ({len(sel)})",
                             hovertemplate="layer %{x}<br>BI %{y:.4g}<extra>" + label + "</extra>"))
    _layer_ticks(fig, len(values))
    return fig


def sizes_figure(report: dict, other: dict | None = None, names: tuple = ()) -> go.Figure:
    """Dense vs compressed parameters per layer (grouped bars); kept sizes shown on hover;
    ``other`` adds a second run's compressed bars."""
    title = "Parameters per layer"
    reports = [_as_dict(report)] + ([_as_dict(other)] if other else [])
    layers = _layers(reports[0])
    if not layers:
        return _no_data(title, "report has no layers")

    fig = _figure(title, "layer", "parameters")
    fig.add_trace(go.Bar(x=[lay.get("index", i) for i, lay in enumerate(layers)],
                         y=[lay.get("params_dense") or 0 for lay in layers], name="dense", marker_color="#aaaaaa",
                         hovertemplate="layer %{x}<br>%{y:,} params<extra>dense</extra>"))
    for r, rep in enumerate(reports):
        lays = _layers(rep)
        hover = ["removed" if lay.get("removed") else
                 "<br>".join(f"{k} = {v}" for k, v in (lay.get("sizes") or {}).items()) or "—" for lay in lays]
        name = "compressed" if len(reports) == 1 else _run_name(names, r)
        fig.add_trace(go.Bar(x=[lay.get("index", i) for i, lay in enumerate(lays)],
                             y=[lay.get("params_compressed") or 0 for lay in lays], name=name,
                             marker_color=(KEPT_COLOR, "#ff7f0e")[r], customdata=hover,
                             hovertemplate="layer %{x}<br>%{y:,} params<br>%{customdata}<extra>"
                                           + name + "</extra>"))
    fig.update_layout(barmode="group")
    _layer_ticks(fig, max(len(_layers(rep)) for rep in reports))
    return fig


# ------------------------------------------------------------------------------------------ training
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
