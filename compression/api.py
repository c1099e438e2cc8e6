"""The one public verb: ``compress(model, config, calibration) -> Report``.

It dispatches on the config's type to the method's orchestration and fills what every report shares
(parameter counts before and after, timings). The model is changed in place; methods that need the
compressed format return the converted model as ``report.compressed`` (the same object for layer
dropping).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .arch import block_params, count_params, view
from .layerdrop import LayerDropConfig, compress_layerdrop
from .report import Report

Progress = Callable[[float, str], None]


def _methods() -> dict[type, Callable]:
    table = {LayerDropConfig: compress_layerdrop}
    try:
        from .slicegpt import SliceGPTConfig, compress_slicegpt
        table[SliceGPTConfig] = compress_slicegpt
    except ImportError:
        pass
    try:
        from .modegpt import MoDeGPTConfig, compress_modegpt
        table[MoDeGPTConfig] = compress_modegpt
    except ImportError:
        pass
    try:
        from .olica import OlicaConfig, compress_olica
        table[OlicaConfig] = compress_olica
    except ImportError:
        pass
    return table


def compress(model, config, calibration: torch.Tensor | None,
             progress: Progress | None = None) -> Report:
    """Compress ``model`` with the method that ``config``'s type names.

    calibration: token ids (N, T) from :meth:`compression.data.TextSpec.batches` (methods that need
    no statistics accept None). progress: ``progress(fraction, message)`` callback.
    """
    methods = _methods()
    if type(config) not in methods:
        names = ", ".join(t.__name__ for t in methods)
        raise TypeError(f"unknown compression config {type(config).__name__}; expected one of {names}")
    view(model)  # unsupported architectures fail here, before any work
    params_dense, block_dense = count_params(model), block_params(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        report = methods[type(config)](model, config, calibration, progress or (lambda f, m: None))
    report.compress_seconds = time.perf_counter() - t0
    out = report.compressed if report.compressed is not None else model
    report.compressed = out
    report.params_dense, report.block_params_dense = params_dense, block_dense
    report.params_compressed, report.block_params_compressed = count_params(out), block_params(out)
    return report
