"""Plotly figures for compression Reports (plain dicts; no torch, no ``compression`` import)."""
from .figures import (
    X_AXES,
    error_figure,
    has_influence,
    influence_figure,
    leverage_figure,
    loss_figure,
    sizes_figure,
    spectra_overview_figure,
    spectrum_figure,
    spectrum_title,
)
from .preview import preview_errors_figure, tradeoff_figure
from .sweeps import accuracy_figure, pareto_figure, range_text

__all__ = [
    "X_AXES",
    "spectrum_figure",
    "spectra_overview_figure",
    "leverage_figure",
    "error_figure",
    "influence_figure",
    "sizes_figure",
    "pareto_figure",
    "loss_figure",
    "accuracy_figure",
    "spectrum_title",
    "has_influence",
    "preview_errors_figure",
    "tradeoff_figure",
    "range_text",
]
