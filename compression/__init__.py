"""Training-free compression of causal language models: SliceGPT, MoDeGPT, Olica, layer dropping.

``compress(model, config, calibration) -> Compressed(model, report)`` is the one verb; the config's
type picks the method (:data:`compression.methods.METHODS`). Importing this package registers the
compressed-model format with transformers' Auto classes.
"""
from . import modeling  # noqa: F401  (registers CompressedForCausalLM)
from .api import Compressed, compress
from .data import TextSpec
from .forecast import forecast
from .layerdrop import LayerDropConfig
from .methods import METHODS
from .modegpt import MoDeGPTConfig
from .models import DEFAULT_MODEL, load_model
from .olica import OlicaConfig
from .report import LayerReport, Report
from .slicegpt import SliceGPTConfig

__all__ = ["compress", "Compressed", "forecast", "METHODS", "LayerDropConfig", "SliceGPTConfig",
           "MoDeGPTConfig", "OlicaConfig", "TextSpec", "Report", "LayerReport", "load_model",
           "DEFAULT_MODEL"]
