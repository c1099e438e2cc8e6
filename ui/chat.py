"""Side-by-side chat: the same prompt, sampling settings and seed for every model, streamed in lockstep.

Input and output are capped (a public Space must stay responsive): a message longer than
:data:`MAX_MESSAGE_TOKENS` tokens is refused with a clear message, replies stop at
:data:`MAX_NEW_TOKENS`, and the conversation is cut to the model's context from the left.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from compression.models import cached_step

MAX_MESSAGE_CHARS = 8000
MAX_MESSAGE_TOKENS = 1024
MAX_NEW_TOKENS = 512


class ChatError(ValueError):
    pass


def check_message(tokenizer, message: str) -> str:
    """The message stripped, or ChatError when it is empty or over the caps."""
    message = (message or "").strip()
    if not message:
        raise ChatError("type a message first")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ChatError(f"the message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
    n = len(tokenizer(message, add_special_tokens=False)["input_ids"])
    if n > MAX_MESSAGE_TOKENS:
        raise ChatError(f"the message is {n:,} tokens; the limit is {MAX_MESSAGE_TOKENS:,}")
    return message

@dataclass
class Sampling:
    """Sampling settings, checked on construction (they may come from an API call)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    repetition_penalty: float = 1.1
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self):
        checks = {"temperature": (0.0, 5.0), "top_p": (0.01, 1.0), "repetition_penalty": (1.0, 3.0)}
        for name, (low, high) in checks.items():
            value = float(getattr(self, name))
            if not low <= value <= high:  # NaN fails too
                raise ChatError(f"{name.replace('_', ' ')} must be in [{low:g}, {high:g}]")
            setattr(self, name, value)
        self.max_new_tokens = int(self.max_new_tokens)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ChatError(f"max new tokens must be in [1, {MAX_NEW_TOKENS}]")
        self.seed = int(self.seed)


STATS = re.compile(r"\n*<sub>[^<]*tok/s</sub>\s*$")  # the tokens/s line appended under a reply
NO_REPLY = "_(no reply: the model ended its turn at once)_"


def build_prompt(tokenizer, history: list[dict], message: str, use_template: bool) -> torch.Tensor:
    """Token ids for the conversation so far plus ``message`` (stats lines stripped)."""
    turns = [{"role": m["role"], "content": STATS.sub("", _text(m["content"])).replace(NO_REPLY, "")}
             for m in history or [] if m.get("role") in ("user", "assistant")]
    turns.append({"role": "user", "content": message})
    if use_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}\n"
                       for t in turns) + "Assistant:"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio may send [{"type": "text", "text": ...}]
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def _sample(logits: torch.Tensor, previous: list[int], s: Sampling, gen: torch.Generator) -> int:
    logits = logits.float().cpu()
    if s.repetition_penalty != 1.0 and previous:
        idx = torch.tensor(sorted(set(previous)))
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model, tokenizer, prompt: torch.Tensor, s: Sampling) -> Iterator[tuple[str, int, float]]:
    """Yield (text so far, tokens, seconds spent in the model) after every new token (KV cache)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(s.seed))
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    limit = getattr(model.config, "max_position_embeddings", 2048) - int(s.max_new_tokens)
    ids, cache, out, seconds = prompt[:, -max(limit, 1):].to(device), None, [], 0.0
    context = prompt[0].tolist()
    for _ in range(int(s.max_new_tokens)):
        t0 = time.perf_counter()
        logits, cache = cached_step(model, ids, cache)
        token = _sample(logits[0, -1], context + out, s, gen)
        seconds += time.perf_counter() - t0
        if token in eos:
            break
        ids = torch.tensor([[token]], device=device)
        out.append(token)
        yield tokenizer.decode(out, skip_special_tokens=True), len(out), seconds
    yield tokenizer.decode(out, skip_special_tokens=True), len(out), seconds


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def chat_stream(pairs: list[tuple], histories: list[list[dict]], message: str, s: Sampling,
                stop: threading.Event | None = None) -> Iterator[list[list[dict]]]:
    """Answer ``message`` with every (model, tokenizer) in ``pairs`` in lockstep, same settings and seed.

    Yields the updated histories (gradio "messages" format) after each step; a ``<sub>... tok/s</sub>``
    line closes every reply: tokens, time to the first token, and decode tokens/s after it. A pair may be None (that side is left alone).
    """
    histories = [list(h or []) for h in histories]
    streams = []
    for (pair, hist) in zip(pairs, histories):
        if pair is None:
            streams.append(None)
            continue
        model, tok = pair
        streams.append(generate(model, tok, build_prompt(tok, hist, message, s.chat_template), s))
        hist += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    alive = [st is not None for st in streams]
    first = [None] * len(streams)  # seconds to the first token: the prompt's prefill and one sample
    while any(alive):
        for i, st in enumerate(streams):
            if not alive[i]:
                continue
            if stop is not None and stop.is_set():
                alive[i] = False
                continue
            try:
                text, n, seconds = next(st)
            except StopIteration:
                alive[i] = False
                continue
            if first[i] is None and n:
                first[i] = seconds
            decode = seconds - (first[i] or 0.0)
            rate = (n - 1) / decode if n > 1 and decode > 0 else 0.0
            ttft = f"first token {first[i]:.2f} s · " if first[i] is not None else ""
            histories[i][-1] = {"role": "assistant",
                                "content": f"{text or NO_REPLY}\n\n<sub>{n} tokens · {ttft}{rate:.1f} tok/s</sub>"}
        yield histories
