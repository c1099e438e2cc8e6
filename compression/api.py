"""The one public verb: ``compress(model, config, calibration) -> Compressed(model, report)``.

It dispatches on the config's type to the method (:mod:`compression.methods`), works on a private
copy so the caller's model is never changed, and fills what every report shares (parameter counts,
timings, calibration facts and warnings). The :class:`Report` is plain data; the compressed model
travels beside it.

Memory, in memory (``offload=False``): the copy is made before any work, so the peak is the dense
model twice plus one block's calibration activations; the compressed copy then shrinks as blocks are
rewritten. Streamed (``offload=True``, :mod:`compression.streaming`): no copy; one block at a time is
read from where the dense weights are (the checkpoint of a streamed model, or the model in memory),
rewritten on the execution device and sent to CPU memory or ``offload_folder``, so the execution device
holds the embeddings, head and one block besides the activations. ``offload=None`` streams when the
model is already streamed or when a copy does not fit (:func:`compression.streaming.needs_offload`
with one copy: 1.1 × the weights' bytes against the free memory of the model's device). The report's
``peak_memory_mb`` measures either (CUDA allocator peak on the execution device, or the process's
resident high-water mark on CPU); ``extra["offload"]`` says which path ran and why, and
``extra["stats_precision"]`` the statistics precision used.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, NamedTuple

import torch

from . import streaming
from .arch import block_params, count_params, view
from .calibration import resolve_precision, statistics_precision
from .evaluate import PeakMemory
from .methods import method_for, refusal
from .modeling_compressed import Shape
from .ops import fingerprint
from .report import Report
from .timing import stage, stopwatch

Progress = Callable[[float, str], None]


class Compressed(NamedTuple):
    model: torch.nn.Module
    report: Report


def calibration_facts(tokens: torch.Tensor | None, hidden_size: int,
                      mlp_width: int | None = None) -> tuple[dict, list[str]]:
    """Size and fingerprint of the calibration tokens, and warnings when they are too few or too
    repetitive to estimate (hidden × hidden) statistics: fewer tokens, or fewer distinct tokens, than
    the hidden size leave the correlations rank-deficient, and per-layer errors measured on such text
    say nothing about other text. ``mlp_width``: for methods that fit the MLP from its (width × width)
    correlation, fewer tokens than the width make that fit interpolate the calibration (measured on
    Qwen2.5-0.5B, MLP 4,864 wide: held-out error 0.84 from 4,096 tokens, 0.26 from 16,384)."""
    if tokens is None:
        return {"tokens": 0}, []
    n, distinct = tokens.numel(), int(torch.unique(tokens).numel())
    facts = {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "tokens": n,
             "distinct_tokens": distinct, "fingerprint": fingerprint(tokens)}
    warnings = []
    if n < hidden_size:
        warnings.append(f"calibration has {n} tokens, fewer than the hidden size {hidden_size}: the "
                        "statistics are rank-deficient and the result is unreliable")
    if mlp_width and hidden_size <= n < mlp_width:
        warnings.append(f"calibration has {n} tokens, fewer than the MLP width {mlp_width}: the MLP fit "
                        "interpolates the calibration text and errs on other text; use several times more")
    if distinct < hidden_size:
        warnings.append(f"calibration has only {distinct} distinct tokens (hidden size {hidden_size}): "
                        "the block-input correlations are rank-deficient beyond what damping covers")
    return facts, warnings


def check_tokens(tokens: torch.Tensor | None, vocab_size: int, what: str) -> None:
    if tokens is None:
        return
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"{what} must be token ids of shape (sequences, length ≥ 2), got "
                         f"{tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64) or int(tokens.min()) < 0 \
            or int(tokens.max()) >= vocab_size:
        raise ValueError(f"{what} must be integer token ids in [0, {vocab_size})")


def compress(model, config, calibration: torch.Tensor | None, progress: Progress | None = None,
             held_out: torch.Tensor | None = None, *, offload: bool | None = None,
             offload_folder: str | None = None, device: str | torch.device | None = None,
             precision: str | None = None, influence: list[float] | None = None) -> Compressed:
    """Compress a copy of ``model`` with the method that ``config``'s type names.

    calibration: token ids (N, T) (methods that need no statistics accept None). held_out: token ids
    on which per-layer errors are measured, disjoint from the calibration (None: measured in-sample
    and flagged). progress: ``progress(fraction, message)``; an exception raised there stops the work.
    offload: stream blocks (True), work on an in-memory copy (False), or decide (None, see the module
    docstring); a streamed result keeps streaming (``forward`` works, block by block; save it with
    :func:`compression.pipeline.save`). offload_folder: where a streamed run spills rewritten blocks
    (None: CPU memory); it must outlive the result. device: execution device of a streamed run (default:
    a streamed model's own, else the model's). precision: statistics precision, "auto" (None), "float64"
    or "mixed" (:mod:`compression.calibration`). influence: the dense model's Block Influence on these
    calibration tokens (the report of an earlier run with automatic allocation has it), so a method
    that allocates by it skips that dense pass; methods that measure their own ignore it.
    """
    method = method_for(config)
    mv = view(model)  # unsupported architectures fail here, before any work
    reason = refusal(model.config, method.name)
    if reason:
        raise ValueError(reason)
    if method.needs_calibration and calibration is None:
        raise ValueError(f"{method.label} needs calibration tokens")
    vocab = model.config.vocab_size
    check_tokens(calibration, vocab, "calibration")
    check_tokens(held_out, vocab, "held-out tokens")
    method.plan(config, mv.config, None)  # an unreachable plan fails before the copy
    mlp_width = Shape.of(mv.config).intermediate if method.fits_mlp else None
    facts, warnings = calibration_facts(calibration, mv.hidden_size, mlp_width)
    progress = progress or (lambda f, m: None)
    params_dense, block_dense = count_params(model), block_params(model)
    offload, why = _decide_offload(model, offload)
    store = streaming.store_of(model)
    device = torch.device(device or (store.device if store is not None else mv.device))
    stats = resolve_precision(precision, device)
    progress(0.0, "preparing the streamed copy" if offload else "copying the dense model")
    t0 = time.perf_counter()
    with torch.no_grad(), statistics_precision(precision), PeakMemory(device) as peak, stopwatch() as watch:
        with stage("copy"):
            if offload:
                working = streaming.working_copy(model, device=device, folder=offload_folder,
                                                 compressed=not method.keeps_class)
                work_store = streaming.store_of(working)
            else:
                working = copy.deepcopy(model)
        reuse = {"influence": influence} if influence is not None and method.takes_influence else {}
        out, report = method.run(working, config, calibration, progress, held_out, **reuse)
        if offload:
            streaming.finish(out, work_store)
    report.compress_seconds = time.perf_counter() - t0
    report.timing = {"compress_s": round(report.compress_seconds, 3), "stages": watch.summary(),
                     **report.timing}
    report.peak_memory_mb = peak.mb
    report.extra.update(offload={"streamed": offload, "device": str(device), "why": why,
                                 "spilled_to_disk": bool(offload and offload_folder)},
                        stats_precision=stats)
    report.params_dense, report.block_params_dense = params_dense, block_dense
    report.params_compressed, report.block_params_compressed = count_params(out), block_params(out)
    report.calibration = {**facts, **report.calibration}
    report.warnings = warnings + report.warnings
    return Compressed(out, report)


def _decide_offload(model, offload: bool | None) -> tuple[bool, str]:
    """(stream?, why): as asked, else streamed models stream and others stream when a copy does not
    fit next to them (:func:`compression.streaming.needs_offload`, one copy)."""
    if streaming.is_streamed(model):
        if offload is False:
            raise ValueError("the model is streamed (its blocks are read on demand); compress it with "
                             "offload=True or None")
        return True, "asked" if offload else "the model is streamed"
    if offload is not None:
        return bool(offload), "asked"
    return streaming.needs_offload(streaming.weight_bytes(model), view(model).device, copies=1)
