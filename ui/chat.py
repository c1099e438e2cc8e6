"""Side-by-side chat: the same prompt, sampling settings and seed for every model, streamed in lockstep.

Input and output are capped (a public Space must stay responsive): a message longer than
:data:`MAX_MESSAGE_TOKENS` tokens is refused with a clear message, replies stop at
:data:`MAX_NEW_TOKENS`, a history sent with the message is checked by :func:`check_history` (at most
:data:`MAX_HISTORY_MESSAGES` messages of at most :data:`MAX_HISTORY_MESSAGE_CHARS` characters), and
the conversation is cut to the served dense model's context from the left (never to what an uploaded
run's config claims).
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from compression.models import cached_step

MAX_MESSAGE_CHARS = 8000
MAX_MESSAGE_TOKENS = 1024
MAX_NEW_TOKENS = 512
MAX_HISTORY_MESSAGES = 200  # user and assistant messages a conversation may send back
MAX_HISTORY_MESSAGE_CHARS = 2 * MAX_MESSAGE_CHARS  # a message, or a reply of MAX_NEW_TOKENS tokens
CHARS_PER_TOKEN = 16  # history kept before tokenizing: context × this many characters, newest first
MAX_GENERATION_SECONDS = 600.0  # one reply's wall time at most, whoever is (or is no longer) listening
OWN = "own"  # build_prompt's template: the tokenizer's own chat template


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


def check_history(history, pane: str = "the") -> list[dict]:
    """The messages of a history sent with a chat request (``pane``: whose, for the message), or
    ChatError when it is not a list of messages or is over the caps (:data:`MAX_HISTORY_MESSAGES`,
    :data:`MAX_HISTORY_MESSAGE_CHARS`); checked before anything is tokenized."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise ChatError(f"{pane} conversation must be a list of messages")
    if len(history) > MAX_HISTORY_MESSAGES:
        raise ChatError(f"{pane} conversation holds {len(history):,} messages; the limit is "
                        f"{MAX_HISTORY_MESSAGES}: clear the chat")
    for m in history:
        if not isinstance(m, dict):
            raise ChatError(f"{pane} conversation must be a list of messages")
        content = m.get("content")
        n = len(content) if isinstance(content, str) else len(_text(content)) \
            if isinstance(content, (list, tuple, dict)) and len(content) <= 64 else None
        if n is None or n > MAX_HISTORY_MESSAGE_CHARS:
            raise ChatError(f"a message in {pane} conversation is over the limit of "
                            f"{MAX_HISTORY_MESSAGE_CHARS:,} characters: clear the chat")
    return list(history)


def context_of(model, fallback: int = 2048) -> int:
    """The model's context in tokens (``max_position_embeddings``), ``fallback`` when it has none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else fallback


def recent_turns(turns: list[dict], budget_chars: int) -> list[dict]:
    """The newest ``turns`` whose characters fit ``budget_chars`` (the older ones would be cut by
    the context anyway), starting at a user turn when any is left."""
    kept, total = [], 0
    for turn in reversed(turns):
        total += len(turn["content"])
        if total > budget_chars and kept:
            break
        kept.append(turn)
    kept.reverse()
    while len(kept) > 1 and kept[0]["role"] != "user":
        kept.pop(0)
    return kept


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


def build_prompt(tokenizer, history: list[dict], message: str, use_template: bool,
                 template: str | None = OWN, context: int | None = None) -> torch.Tensor:
    """Token ids for the conversation so far plus ``message`` (stats lines stripped).

    template: the chat template to render (:data:`OWN`: the tokenizer's own; None: none, plain
    "User: / Assistant:" lines); an uploaded run's own template is never rendered (the chat tab passes
    the dense model's). context: the conversation is first cut to its newest turns of at most
    ``context`` × :data:`CHARS_PER_TOKEN` characters, so an overlong history is never tokenized."""
    turns = [{"role": m["role"], "content": STATS.sub("", _text(m["content"])).replace(NO_REPLY, "")}
             for m in history or [] if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    turns.append({"role": "user", "content": message})
    if context:
        turns = recent_turns(turns, context * CHARS_PER_TOKEN)
    if template == OWN:
        template = getattr(tokenizer, "chat_template", None)
    if use_template and template:
        text = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
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


@dataclass
class Halt:
    """When a generation ends early, checked before every token: its job's stop flag was set (Stop,
    a cancelled or vanished client), or it has run for ``seconds`` since it was made. A thread whose
    request was cancelled thus ends within a token instead of burning a core to the token cap.
    ``reason`` says which ("" while it runs on)."""

    stop: threading.Event | None = None
    seconds: float = field(default_factory=lambda: MAX_GENERATION_SECONDS)
    started: float = field(default_factory=time.monotonic)
    reason: str = ""

    def __call__(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            self.reason = "stopped"
        elif time.monotonic() - self.started > self.seconds:
            self.reason = "time limit"
        return bool(self.reason)

    def note(self) -> str:
        """What the reply's stats line says about an early end ("" when there was none)."""
        return f"cut at the {self.seconds:.0f} s time limit · " if self.reason == "time limit" else ""


@torch.no_grad()
def generate(model, tokenizer, prompt: torch.Tensor, s: Sampling, context: int | None = None,
             halt: Halt | None = None) -> Iterator[tuple[str, int, float]]:
    """Yield (text so far, tokens, seconds spent in the model) after every new token (KV cache).

    context: the prompt is cut from the left to ``context - max_new_tokens`` tokens; pass the served
    dense model's context (:func:`context_of`), since an uploaded run's config may claim any.
    halt: ends the reply early (:class:`Halt`; default: the time limit alone)."""
    halt = halt if halt is not None else Halt()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(s.seed))
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    limit = (context or context_of(model)) - int(s.max_new_tokens)
    ids, cache, out, seconds = prompt[:, -max(limit, 1):].to(device), None, [], 0.0
    context = prompt[0].tolist()
    for _ in range(int(s.max_new_tokens)):
        if halt():
            break
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
                stop: threading.Event | None = None, templates: list | None = None,
                context: int | None = None) -> Iterator[list[list[dict]]]:
    """Answer ``message`` with every (model, tokenizer) in ``pairs`` in lockstep, same settings and seed.

    Yields the updated histories (gradio "messages" format) after each step; a ``<sub>... tok/s</sub>``
    line closes every reply: tokens, time to the first token, and decode tokens/s after it (and "cut at
    the … time limit" when :class:`Halt` ended it). A pair may be None (that side is left alone).
    templates: one chat template per pair (see :func:`build_prompt`; default: each tokenizer's own);
    context: the served dense model's context, for every pair (default: each model's own).
    """
    histories = [list(h or []) for h in histories]
    templates = list(templates) if templates is not None else [OWN] * len(pairs)
    streams, halts = [], []
    for (pair, hist, template) in zip(pairs, histories, templates):
        halts.append(Halt(stop))
        if pair is None:
            streams.append(None)
            continue
        if stop is not None and stop.is_set():
            return
        model, tok = pair
        prompt = build_prompt(tok, hist, message, s.chat_template, template, context or context_of(model))
        streams.append(generate(model, tok, prompt, s, context, halts[-1]))
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
            stats = f"{halts[i].note()}{n} tokens · {ttft}{rate:.1f} tok/s"
            histories[i][-1] = {"role": "assistant", "content": f"{text or NO_REPLY}\n\n<sub>{stats}</sub>"}
        yield histories
