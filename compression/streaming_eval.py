"""Evaluation of streamed models: perplexity and agreement with the dense model, block-major.

:func:`measure_against` returns what :func:`compression.pipeline.measure_against` returns for models in
memory, computed so that nothing of either model is whole in memory: each model's head inputs are
computed block-major (:func:`head_inputs`: each block is materialized once and runs every window, whose
states wait on the CPU between blocks), then the logits window by window, :data:`EVAL_POSITIONS`
positions at a time, compared with :func:`compression.evaluate.compare_chunk`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import view
from .blockstore import store_of
from .calibration import capture_block_inputs
from .evaluate import bootstrap_interval, compare_chunk, ppl_summary

Progress = Callable[[float, str], None]

# Positions per logits comparison in the streamed evaluation: a comparison holds ~5 (P, vocab) fp32
# tensors, 190 MB at P = 64 with a 152k vocabulary (the in-memory evaluation's 256 would hold 775 MB,
# more than a streamed run needs for anything else). Only float32 summation order differs.
EVAL_POSITIONS = 64


def _noop(fraction: float, message: str) -> None:
    pass


@torch.no_grad()
def head_inputs(model: nn.Module, windows: torch.Tensor, progress: Progress = _noop) -> torch.Tensor:
    """The output head's input (N, T, d) for every window of ``windows`` (N, T), computed block-major:
    each block is materialized once and runs every window (one at a time, as a forward of batch 1
    would); the windows' states wait on the CPU between blocks."""
    mv = view(model)
    device = mv.device
    inputs = capture_block_inputs(mv, windows, batch_size=1)
    hidden = [h.to("cpu") for h in inputs.hidden]
    blocks = mv.layers
    for i in range(len(blocks)):
        block, kwargs = blocks[i], inputs.kwargs_for(i)
        hidden = [block(h.to(device), use_cache=False, **kw).to("cpu") for h, kw in zip(hidden, kwargs)]
        progress((i + 1) / len(blocks), f"block {i + 1}/{len(blocks)}")
    store = store_of(model)
    if store is not None:
        store.release()
    return torch.cat([mv.final_norm(h.to(device)).to("cpu") for h in hidden])


def _head(model: nn.Module):
    """(weight, bias, soft-cap) of the output head: logits = cap·tanh((h Wᵀ + b)/cap) where capped."""
    mv = view(model)
    head = mv.lm_head
    base = mv.config
    cap = getattr(base, "final_logit_softcapping", None)
    return head.weight, head.bias, cap


def _logits(hidden: torch.Tensor, head, dtype=None) -> torch.Tensor:
    weight, bias, cap = head
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden.to(weight.device, weight.dtype), weight, bias)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def measure_against(dense: nn.Module, model: nn.Module, windows: torch.Tensor,
                    progress: Progress = _noop, what: str = "wiki evaluation split") -> dict:
    """What :func:`compression.pipeline.measure_against` returns (perplexity of both models with 95%
    intervals, and agreement: KL, top-1, ppl ratio), for streamed models: the head inputs of both models
    are computed block-major (:func:`head_inputs`), then the logits window by window and
    :data:`EVAL_POSITIONS` positions at a time with :func:`~compression.evaluate.compare_chunk`, as
    :func:`~compression.evaluate.evaluate_against` compares them. Nothing of the dense side is cached."""
    dense_hidden = head_inputs(dense, windows, lambda f, m: progress(0.4 * f, f"dense: {m}"))
    hidden = head_inputs(model, windows, lambda f, m: progress(0.4 + 0.4 * f, f"compressed: {m}"))
    head, dense_head = _head(model), _head(dense)
    n, length = windows.shape
    nll, kl, agree, dense_nll = [0.0] * n, [0.0] * n, [0] * n, [0.0] * n
    for i in range(n):
        targets = windows[i, 1:].to(head[0].device)
        for start in range(0, length - 1, EVAL_POSITIONS):
            stop = min(start + EVAL_POSITIONS, length - 1)
            logits = _logits(hidden[i, start:stop], head)                       # (P, V) model dtype
            dense = _logits(dense_hidden[i, start:stop], dense_head)            # (P, V) model dtype
            # the dense NLL from the logits a dense forward gives; the comparison in fp32 from the head
            # input, as DenseReference does
            dense_nll[i] += F.cross_entropy(dense.float(), targets[start:stop], reduction="sum").item()
            if dense.dtype != torch.float32:
                dense = _logits(dense_hidden[i, start:stop], dense_head, torch.float32)
            a, b, c = compare_chunk(logits, dense, targets[start:stop])
            nll[i], kl[i], agree[i] = nll[i] + a, kl[i] + b, agree[i] + c
            del logits, dense
        progress(0.8 + 0.2 * (i + 1) / n, f"perplexity and agreement {i + 1}/{n}")
    tokens = [length - 1] * n
    out, dense_stats = ppl_summary(nll, tokens), ppl_summary(dense_nll, tokens)
    log_ratio_ci = bootstrap_interval([c - d for c, d in zip(nll, dense_nll)], tokens)
    agreement = {
        "kl": sum(kl) / sum(tokens), "kl_ci": list(bootstrap_interval(kl, tokens)),
        "top1": sum(agree) / sum(tokens), "top1_ci": list(bootstrap_interval(agree, tokens)),
        "ppl_ratio": math.exp((sum(nll) - sum(dense_nll)) / sum(tokens)),
        "ppl_ratio_ci": [math.exp(x) for x in log_ratio_ci],
        "dense_ppl": dense_stats["ppl"], "windows": n, "tokens": sum(tokens),
    }
    return {"ppl": {"dense": dense_stats["ppl"], "dense_ci": dense_stats["ppl_ci"], "compressed": out["ppl"],
                    "compressed_ci": out["ppl_ci"], "windows": n, "seq_len": int(length),
                    "text": what},
            "agreement": agreement}
