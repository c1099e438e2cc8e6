"""Training-free compression of causal language models: SliceGPT, MoDeGPT, Olica, layer dropping.

``compress(model, config, calibration) -> Compressed(model, report)`` is the one verb; the config's
type picks the method (:data:`compression.methods.METHODS`). Importing this package registers the
compressed-model format with transformers' Auto classes.
"""
import os

# SciPy's OpenBLAS (the Gram matrices' syrk, LAPACK for spectra) and torch's own threads share the
# cores. By default an OpenBLAS thread busy-waits for about 0.1 s after each call, and torch's next
# operation runs beside it: alternating a 1536-wide syrk with a linear layer took 40-60% longer than
# the two apart on 2 cores; with the threads going to sleep at once, 0-3% (read when SciPy first loads
# OpenBLAS, so it is set before anything here imports it; a value the user set wins).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import modeling  # noqa: E402,F401  (registers CompressedForCausalLM)
from .api import Compressed, compress  # noqa: E402
from .data import TextSpec  # noqa: E402
from .forecast import forecast  # noqa: E402
from .layerdrop import LayerDropConfig  # noqa: E402
from .methods import METHODS  # noqa: E402
from .modegpt import MoDeGPTConfig  # noqa: E402
from .models import DEFAULT_MODEL, load_model  # noqa: E402
from .olica import OlicaConfig  # noqa: E402
from .report import LayerReport, Report  # noqa: E402
from .slicegpt import SliceGPTConfig  # noqa: E402

__all__ = ["compress", "Compressed", "forecast", "METHODS", "LayerDropConfig", "SliceGPTConfig",
           "MoDeGPTConfig", "OlicaConfig", "TextSpec", "Report", "LayerReport", "load_model",
           "DEFAULT_MODEL"]
