"""Metrics: perplexity with its interval, agreement with the dense model, parameter counts,
prefill/decode speed, peak memory.

Perplexity protocol (fixed, so numbers compare with published reference runs): the evaluation split
tokenized without special tokens, cut into non-overlapping 1024-token windows, the first 32 by
default; ppl = exp(mean next-token NLL over all predicted tokens of all windows). Its 95 % interval is
a percentile bootstrap over windows (:func:`bootstrap_interval`): windows are the independent units,
tokens inside one window are not.

Agreement with the dense model (:func:`evaluate_against`) runs on the same windows: the mean
token-level KL(dense || compressed) over the full vocabulary, the top-1 next-token agreement and the
ppl ratio, each with a bootstrap interval over windows. The dense side is computed once
(:class:`DenseReference`) and reused for every compressed model.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .arch import block_params, count_params
from .memory import proc_kib
from .models import cached_step

Progress = Callable[[float, str], None]

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
POSITION_CHUNK = 256  # positions per full-vocabulary comparison: 256 x 49152 fp32 = 50 MB a tensor


def _noop(fraction: float, message: str) -> None:
    pass


# --------------------------------------------------------------------------- pure statistics


def bootstrap_interval(numerators: Sequence[float], denominators: Sequence[float],
                       resamples: int = BOOTSTRAP_RESAMPLES, level: float = LEVEL,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``.

    Each resample draws len(numerators) units (windows) with replacement, keeping each unit's
    numerator and denominator together; the interval is the (1 - level)/2 and (1 + level)/2
    quantiles of the resampled ratios. Deterministic for a given seed."""
    num = np.asarray(numerators, dtype=np.float64)  # (N,)
    den = np.asarray(denominators, dtype=np.float64)  # (N,)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"need two equally long, non-empty sequences, got {num.shape} and {den.shape}")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(resamples, num.size))  # (R, N)
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)  # (R,)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ppl_summary(nll_per_window: Sequence[float], tokens_per_window: Sequence[int]) -> dict:
    """Perplexity of summed per-window NLLs and its bootstrap interval (exp is monotone, so the
    interval of the mean NLL maps to the interval of the ppl)."""
    tokens = int(sum(tokens_per_window))
    lo, hi = bootstrap_interval(nll_per_window, tokens_per_window)
    return {"ppl": math.exp(sum(nll_per_window) / tokens), "ppl_ci": [math.exp(lo), math.exp(hi)],
            "windows": len(nll_per_window), "tokens": tokens,
            "nll_per_window": [float(x) for x in nll_per_window]}


def token_kl(dense_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(dense || model) per position from full-vocabulary log-probs (P, V) -> (P,)."""
    return (dense_logp.exp() * (dense_logp - logp)).sum(-1)


def compare_chunk(logits: torch.Tensor, dense_logits: torch.Tensor,
                  targets: torch.Tensor) -> tuple[float, float, int]:
    """(NLL sum of the targets, KL(dense || model) sum, top-1 agreements) over P positions.

    logits, dense_logits: (P, V); targets: (P,) next tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (P, V)
    dense_logp = torch.log_softmax(dense_logits.float(), dim=-1)  # (P, V)
    nll = -logp.gather(-1, targets[:, None]).sum()
    kl = token_kl(dense_logp, logp).sum()
    agree = (logits.argmax(-1) == dense_logits.argmax(-1)).sum()
    return nll.item(), kl.item(), int(agree.item())


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity_stats(model, windows: torch.Tensor, batch_size: int = 1, progress: Progress = _noop) -> dict:
    """Perplexity of ``model`` over ``windows`` (N, T) with its 95 % bootstrap interval over windows.

    Returns {"ppl", "ppl_ci": [lo, hi], "windows": N, "tokens": N * (T - 1),
    "nll_per_window": [NLL summed over each window's T - 1 predicted tokens]}."""
    device = next(model.parameters()).device
    nll: list[float] = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)  # (B, T)
        logits = model(ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        # (B*(T-1), V) rows: the class-dim-1 layout of (B, V, T-1) sums less exactly (4e-5 relative
        # on a real window)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                    reduction="none").view(ids.shape[0], -1)  # (B, T-1)
        nll += per_token.sum(-1).tolist()
        done = start + ids.shape[0]
        progress(done / windows.shape[0], f"perplexity {done}/{windows.shape[0]}")
    return ppl_summary(nll, [windows.shape[1] - 1] * windows.shape[0])


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: Progress = _noop) -> float:
    """exp of the mean next-token negative log-likelihood over ``windows`` (N, T)."""
    return perplexity_stats(model, windows, batch_size, progress)["ppl"]


# --------------------------------------------------------------------------- agreement


def _capture_head(model):
    """Forward hook on the output head keeping its input and output of the last call."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"the output head is a {type(head).__name__}, not a Linear layer")
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["input"], seen["output"] = args[0], output

    return head, seen, head.register_forward_hook(hook)


@dataclass
class DenseReference:
    """The dense model's side of agreement on fixed windows, held on the CPU.

    Full-vocabulary log-probs are too big to cache (1024 x 49152 fp32 = 200 MB a window). The logits
    are a linear function of the output head's input, so we keep that input, (T - 1, d) a window
    (1024 x 576 fp32 = 2.4 MB), and one copy of the head, and recompute the dense logits exactly when
    comparing: one (T, d) x (d, V) matmul a window, about a tenth of a forward of the 135M model.
    :meth:`build` checks that the model's logits are the head's output unchanged (no soft-capping).
    """

    windows: torch.Tensor  # (N, T) token ids
    hidden: torch.Tensor  # (N, T-1, d) head inputs at the positions that predict a next token
    head_weight: torch.Tensor  # (V, d)
    head_bias: torch.Tensor | None  # (V,)
    nll_per_window: list[float]  # the dense model's NLL sum per window, for the ppl ratio

    @classmethod
    @torch.no_grad()
    def build(cls, model, windows: torch.Tensor, progress: Progress = _noop) -> "DenseReference":
        """One forward of ``model`` (the dense model, on any device) per window of ``windows`` (N, T)."""
        device = next(model.parameters()).device
        head, seen, handle = _capture_head(model)
        hidden, nll = [], []
        try:
            for i in range(windows.shape[0]):
                ids = windows[i:i + 1].to(device)  # (1, T)
                logits = model(ids, use_cache=False).logits  # (1, T, V)
                if not torch.equal(seen["output"].to(logits.dtype), logits):
                    raise ValueError("the model's logits are not its output head's output (soft-capping "
                                     "or scaling?); DenseReference cannot recompute them")
                hidden.append(seen["input"][0, :-1].to("cpu", copy=True))  # (T-1, d)
                nll.append(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item())
                progress((i + 1) / windows.shape[0], f"dense reference {i + 1}/{windows.shape[0]}")
        finally:
            handle.remove()
        bias = None if head.bias is None else head.bias.detach().to("cpu", copy=True)
        return cls(windows.cpu(), torch.stack(hidden), head.weight.detach().to("cpu", copy=True), bias, nll)

    def head(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense output head's weight (V, d) and bias (V,) as fp32 on ``device``."""
        bias = None if self.head_bias is None else self.head_bias.to(device, torch.float32)
        return self.head_weight.to(device, torch.float32), bias

    def dense_logits(self, index: int, start: int, stop: int, head: tuple) -> torch.Tensor:
        """fp32 dense logits (stop - start, V) of window ``index`` at positions [start, stop), with
        ``head`` from :meth:`head` (so it is moved to the device once per evaluation)."""
        weight, bias = head
        return F.linear(self.hidden[index, start:stop].to(weight.device, torch.float32), weight, bias)

    def ppl_stats(self) -> dict:
        """The dense model's :func:`perplexity_stats` on the reference windows (no forward needed)."""
        return ppl_summary(self.nll_per_window, [self.windows.shape[1] - 1] * self.windows.shape[0])


@torch.no_grad()
def evaluate_against(model, reference: DenseReference, progress: Progress = _noop) -> dict:
    """Perplexity of ``model`` and its agreement with the dense model, one forward per window.

    ``model`` may live on another device than the one the reference was built on. Returns the keys
    of :func:`perplexity_stats` plus "agreement": {"kl": mean KL(dense || model) per token (nats),
    "kl_ci", "top1": fraction of positions whose argmax equals the dense argmax, "top1_ci",
    "ppl_ratio": ppl / dense ppl, "ppl_ratio_ci", "dense_ppl", "windows", "tokens"}; every interval
    is a 95 % percentile bootstrap over windows (the ppl ratio's resamples windows in pairs)."""
    device = next(model.parameters()).device
    head = reference.head(device)
    n, length = reference.windows.shape
    nll, kl, agree = [0.0] * n, [0.0] * n, [0] * n
    for i in range(n):
        ids = reference.windows[i:i + 1].to(device)  # (1, T)
        logits = model(ids, use_cache=False).logits[0, :-1]  # (T-1, V)
        for start in range(0, length - 1, POSITION_CHUNK):
            stop = min(start + POSITION_CHUNK, length - 1)
            dense = reference.dense_logits(i, start, stop, head)  # (P, V)
            a, b, c = compare_chunk(logits[start:stop], dense, ids[0, 1 + start:1 + stop])
            nll[i] += a
            kl[i] += b
            agree[i] += c
        progress((i + 1) / n, f"perplexity and agreement {i + 1}/{n}")
    tokens = [length - 1] * n
    out = ppl_summary(nll, tokens)
    dense_nll = reference.nll_per_window
    log_ratio_ci = bootstrap_interval([c - d for c, d in zip(nll, dense_nll)], tokens)
    out["agreement"] = {
        "kl": sum(kl) / sum(tokens), "kl_ci": list(bootstrap_interval(kl, tokens)),
        "top1": sum(agree) / sum(tokens), "top1_ci": list(bootstrap_interval(agree, tokens)),
        "ppl_ratio": math.exp((sum(nll) - sum(dense_nll)) / sum(tokens)),
        "ppl_ratio_ci": [math.exp(x) for x in log_ratio_ci],
        "dense_ppl": math.exp(sum(dense_nll) / sum(tokens)),
        "windows": n, "tokens": sum(tokens),
    }
    return out


def agreement(model, reference: DenseReference, progress: Progress = _noop) -> dict:
    """The "agreement" entry of :func:`evaluate_against`."""
    return evaluate_against(model, reference, progress)["agreement"]


def sizes(model) -> dict[str, int]:
    """Parameter counts (tied weights once) and bytes of the weights."""
    nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": count_params(model), "block_params": block_params(model), "bytes": nbytes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model, prompt_len: int, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    return ids.to(next(model.parameters()).device)


def _greedy(model, ids: torch.Tensor, new_tokens: int, between: Callable[[], None] = lambda: None
            ) -> tuple[float, float]:
    """Seconds for the prefill of ``ids`` and for ``new_tokens`` cached greedy steps after it;
    ``between()`` runs after every forward (a stop check: it may raise to end the run)."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    logits, cache = cached_step(model, ids)
    _sync(device)
    t1 = time.perf_counter()
    between()
    token = logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        logits, cache = cached_step(model, token, cache)
        token = logits[:, -1:].argmax(-1)
        between()
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
                       seed: int = 0, batch: int = 1, memory: bool = True,
                       progress: Progress = _noop) -> dict[str, dict[str, float]]:
    """:func:`speed` for several models in one process, rounds alternating between them (A B A B …)
    so that drift on a shared machine hits every model alike; same prompt and thread count for all.

    ``batch`` sequences of ``prompt_len`` tokens are prefilled together and decoded together; rates
    count the tokens of the whole batch. Per model: ``prefill_tok_s`` and ``decode_tok_s`` are medians
    over rounds; their spread comes with them: ``<metric>_rounds`` (every round's rate, in order),
    ``<metric>_min`` and ``<metric>_max``; ``peak_mem_mb`` unless ``memory`` is False. ``progress``
    hears of every warm-up, round and memory run of every model, and is called again after each
    forward, so a progress that raises (a stop) ends the measurement within one forward."""
    prompts = {name: _prompt(m, prompt_len, seed, batch) for name, m in models.items()}
    steps = len(models) * (1 + rounds + memory)
    done = iter(range(steps))

    def step(what: str) -> Callable[[], None]:
        """Report the next step; returns the check that repeats the report between forwards."""
        report = ((next(done) / steps), what)
        progress(*report)
        return lambda: progress(*report)

    for name, m in models.items():
        step(f"warm-up, {name}")
        m(prompts[name][:, :16], use_cache=False)
    samples = {name: {"prefill_tok_s": [], "decode_tok_s": []} for name in models}
    for r in range(rounds):
        for name, m in models.items():
            prefill_s, decode_s = _greedy(m, prompts[name], new_tokens, step(f"round {r + 1}/{rounds}, {name}"))
            samples[name]["prefill_tok_s"].append(batch * prompt_len / prefill_s)
            samples[name]["decode_tok_s"].append(batch * new_tokens / decode_s)
    out = {name: {**_spread("prefill_tok_s", samples[name]["prefill_tok_s"]),
                  **_spread("decode_tok_s", samples[name]["decode_tok_s"]),
                  "threads": torch.get_num_threads(), "batch": batch}
           for name in models}
    if memory:
        for name, m in models.items():
            out[name]["peak_mem_mb"] = inference_memory_mb(m, prompts[name], between=step(f"memory, {name}"))
    progress(1.0, "done")
    return out


def _spread(metric: str, rates: list[float]) -> dict:
    """The median of ``rates`` under ``metric`` and their spread under ``metric_rounds/_min/_max``."""
    return {metric: statistics.median(rates), f"{metric}_rounds": [float(r) for r in rates],
            f"{metric}_min": min(rates), f"{metric}_max": max(rates)}


@torch.no_grad()
def inference_memory_mb(model, ids: torch.Tensor, new_tokens: int = 16,
                        between: Callable[[], None] = lambda: None) -> float:
    """Memory to hold the model and run a prefill of ``ids`` plus ``new_tokens`` cached steps.

    CUDA: the allocator's peak during the run (weights included). CPU: the weights' bytes plus the
    highest resident-set growth of the process during the run (sampled every millisecond), so other
    models or data the process holds are not counted."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _greedy(model, ids, new_tokens, between)
        return torch.cuda.max_memory_allocated(device) / 2**20
    weights = sum(t.numel() * t.element_size()
                  for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    _release_free_memory()  # else freed blocks the allocator kept would hide the run's growth
    with _PeakResident() as rss:
        _greedy(model, ids, new_tokens, between)
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


# --------------------------------------------------------------------------- chat agreement


@dataclass
class ChatReference:
    """The dense model's side of chat agreement: conversations (an instruction and the dense model's
    own greedy reply, chat template applied) scored on the reply tokens only.

    Like :class:`DenseReference` it keeps the output head's input at the scored positions (not the
    logits) and the head itself, so the dense logits are recomputed exactly when comparing."""

    sequences: list[torch.Tensor]  # (T_i,) token ids per conversation
    starts: list[int]  # index of the first reply token in each sequence
    hidden: list[torch.Tensor]  # (T_i - starts_i, d) head inputs at the positions that predict a reply token
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None

    @classmethod
    @torch.no_grad()
    def build(cls, model, sequences: list[torch.Tensor], starts: list[int],
              progress: Progress = _noop) -> "ChatReference":
        device = next(model.parameters()).device
        head, seen, handle = _capture_head(model)
        hidden = []
        try:
            for i, (ids, start) in enumerate(zip(sequences, starts)):
                if not 0 < start < ids.numel():
                    raise ValueError("every conversation needs a prompt and at least one reply token")
                model(ids[None].to(device), use_cache=False)
                hidden.append(seen["input"][0, start - 1:-1].to("cpu", copy=True))  # predicts ids[start:]
                progress((i + 1) / len(sequences), f"dense chat reference {i + 1}/{len(sequences)}")
        finally:
            handle.remove()
        bias = None if head.bias is None else head.bias.detach().to("cpu", copy=True)
        return cls([s.cpu() for s in sequences], list(starts), hidden,
                   head.weight.detach().to("cpu", copy=True), bias)


@torch.no_grad()
def chat_agreement(model, reference: ChatReference, progress: Progress = _noop) -> dict:
    """KL(dense ‖ model) and top-1 agreement on the dense model's reply tokens, template applied:
    {"kl", "kl_ci", "top1", "top1_ci", "conversations", "tokens"} (intervals: bootstrap over
    conversations)."""
    device = next(model.parameters()).device
    weight, bias = (reference.head_weight.to(device, torch.float32),
                    None if reference.head_bias is None else reference.head_bias.to(device, torch.float32))
    kl, agree, tokens = [], [], []
    n = len(reference.sequences)
    for i, (ids, start) in enumerate(zip(reference.sequences, reference.starts)):
        ids = ids.to(device)
        logits = model(ids[None], use_cache=False).logits[0, start - 1:-1]  # (R, V)
        dense = F.linear(reference.hidden[i].to(device, torch.float32), weight, bias)
        _, k, a = compare_chunk(logits, dense, ids[start:])
        kl.append(k)
        agree.append(a)
        tokens.append(ids.numel() - start)
        progress((i + 1) / n, f"chat agreement {i + 1}/{n}")
    return {"kl": sum(kl) / sum(tokens), "kl_ci": list(bootstrap_interval(kl, tokens)),
            "top1": sum(agree) / sum(tokens), "top1_ci": list(bootstrap_interval(agree, tokens)),
            "conversations": n, "tokens": int(sum(tokens))}


# --------------------------------------------------------------------------- peak memory


class PeakMemory:
    """Peak memory of a block of work, in MB: the CUDA allocator's peak on ``device`` when it is a GPU,
    else the process's resident-set high-water mark (Linux ``VmHWM``, reset on entry through
    ``/proc/self/clear_refs``; elsewhere the lifetime peak, which can only overestimate)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _high_water_bytes() / 2**20


def _high_water_bytes() -> int:
    peak = proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
