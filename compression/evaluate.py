"""Metrics: perplexity, parameter counts, prefill/decode speed, peak memory.

Perplexity protocol (fixed, so numbers compare with published reference runs): the evaluation split
tokenized without special tokens, cut into non-overlapping 1024-token windows, the first 32 by
default; ppl = exp(mean next-token NLL over all predicted tokens of all windows).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from .arch import block_params, count_params
from .data import evaluation_windows

Progress = Callable[[float, str], None]


def _noop(fraction: float, message: str) -> None:
    pass


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: Progress = _noop) -> float:
    """exp of the mean next-token negative log-likelihood over ``windows`` (N, T)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
        progress((start + ids.shape[0]) / windows.shape[0], f"perplexity {start + ids.shape[0]}/{windows.shape[0]}")
    return math.exp(nll / count)


def wiki_perplexity(model, tokenizer, num_windows: int | None = 32, seq_len: int = 1024,
                    progress: Progress = _noop) -> float:
    return perplexity(model, evaluation_windows(tokenizer, num_windows, seq_len), progress=progress)


def sizes(model) -> dict[str, int]:
    """Parameter counts (tied weights once) and bytes of the weights."""
    nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": count_params(model), "block_params": block_params(model), "bytes": nbytes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(model, prompt_len: int = 512, new_tokens: int = 128, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Median prefill tokens/s on a ``prompt_len`` prompt and decode tokens/s over ``new_tokens``
    greedy steps with the KV cache (EOS ignored so every run decodes the same number of tokens)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []
    model(ids[:, :16], use_cache=False)  # warm-up
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(device)
        prefill.append(prompt_len / (time.perf_counter() - t0))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode.append(new_tokens / (time.perf_counter() - t0))
    result = {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
              "threads": torch.get_num_threads()}
    result["peak_mem_mb"] = peak_memory_mb(device)
    return result


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
