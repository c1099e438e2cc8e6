"""Training-free compression of causal language models: SliceGPT, MoDeGPT, Olica, layer dropping.

``compress(model, config, calibration) -> Report`` is the one verb; configs pick the method.
Importing this package registers the compressed-model format with transformers' Auto classes.
"""
from . import modeling  # noqa: F401  (registers CompressedForCausalLM)
from .api import compress
from .data import TextSpec
from .layerdrop import LayerDropConfig
from .models import DEFAULT_MODEL, load_model
from .report import LayerReport, Report

__all__ = ["compress", "LayerDropConfig", "TextSpec", "Report", "LayerReport", "load_model",
           "DEFAULT_MODEL"]
