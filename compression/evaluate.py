"""Metrics: perplexity, parameter counts, prefill/decode speed, peak memory.

Perplexity protocol (fixed, so numbers compare with published reference runs): the evaluation split
tokenized without special tokens, cut into non-overlapping 1024-token windows, the first 32 by
default; ppl = exp(mean next-token NLL over all predicted tokens of all windows).
"""
from __future__ import annotations

import math
import os
import statistics
import threading
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


def _prompt(model, prompt_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    return ids.to(next(model.parameters()).device)


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill of ``ids`` and for ``new_tokens`` cached greedy steps after it."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def speed(model, prompt_len: int = 512, new_tokens: int = 128, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Median prefill tokens/s on a ``prompt_len`` prompt and decode tokens/s over ``new_tokens``
    greedy steps with the KV cache (EOS ignored so every run decodes the same number of tokens),
    plus the memory of one such run (:func:`inference_memory_mb`)."""
    return speed_side_by_side({"model": model}, prompt_len, new_tokens, repeats, seed)["model"]


@torch.no_grad()
def speed_side_by_side(models: dict, prompt_len: int = 512, new_tokens: int = 128, rounds: int = 3,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`speed` for several models in one process, rounds alternating between them (A B A B …)
    so that drift on a shared machine hits every model alike; medians over rounds, same prompt and
    thread count for all."""
    prompts = {name: _prompt(m, prompt_len, seed) for name, m in models.items()}
    for name, m in models.items():
        m(prompts[name][:, :16], use_cache=False)  # warm-up
    samples = {name: ([], []) for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            prefill_s, decode_s = _greedy(m, prompts[name], new_tokens)
            samples[name][0].append(prompt_len / prefill_s)
            samples[name][1].append(new_tokens / decode_s)
    return {name: {"prefill_tok_s": statistics.median(samples[name][0]),
                   "decode_tok_s": statistics.median(samples[name][1]),
                   "threads": torch.get_num_threads(),
                   "peak_mem_mb": inference_memory_mb(m, prompts[name])}
            for name, m in models.items()}


@torch.no_grad()
def inference_memory_mb(model, ids: torch.Tensor, new_tokens: int = 16) -> float:
    """Memory to hold the model and run a prefill of ``ids`` plus ``new_tokens`` cached steps.

    CUDA: the allocator's peak during the run (weights included). CPU: the weights' bytes plus the
    highest resident-set growth of the process during the run (sampled every millisecond), so other
    models or data the process holds are not counted."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _greedy(model, ids, new_tokens)
        return torch.cuda.max_memory_allocated(device) / 2**20
    weights = sum(t.numel() * t.element_size()
                  for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    _release_free_memory()  # else freed blocks the allocator kept would hide the run's growth
    with _PeakResident() as rss:
        _greedy(model, ids, new_tokens)
    return (weights + rss.growth) / 2**20


def _release_free_memory() -> None:
    """Return the C allocator's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakResident:
    """Highest growth of this process's resident set size while the block runs (Linux /proc;
    elsewhere the growth of the lifetime peak, which can only underestimate)."""

    def __enter__(self):
        self.base = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())
        self.growth = max(0, self.peak - self.base)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
