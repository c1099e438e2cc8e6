"""Calibration sources: where the tokens that the statistics are estimated on come from.

An instruct model is used through its chat template, on instructions; Wikipedia prose is not what it
sees then. Sources (``--calibration``):

- ``wiki``: the offline Wikipedia calibration split (:func:`compression.data.wiki_split`);
- ``self-chat``: the model's own replies, under its chat template, to the instructions of
  ``assets/chat_prompts.json`` (sampled with a fixed seed, batched, cached per model): calibration
  data without a dataset, as the self-generated-data remedy suggests;
- ``code``: the calibration part of the pinned source-code package (:func:`compression.data.code_split`);
- ``text:FILE``: a user's text file;
- ``hf:NAME[:CONFIG][:SPLIT]``: a dataset's ``text`` column through ``datasets`` (needs the network);
- ``A+B``: a mixture, the sequences split evenly between the parts (``wiki+self-chat``).

:func:`calibration_tokens` returns the fitted sequences, held-out sequences for the per-layer errors
(the ones after the fitted ones in the same text) and the facts the report records.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import CalibrationError, chunk, code_split, leading_tokens, wiki_split

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "assets" / "chat_prompts.json"
NAMED = ("wiki", "self-chat", "code")
MAX_FILE_BYTES = 64 << 20
# Samples × length, checked before any work: past it a run takes days on a CPU (self-chat is generated
# token by token) or the named text runs out after minutes of tokenizing.
MAX_CALIBRATION_TOKENS = 1 << 24


@dataclass(frozen=True)
class SelfChat:
    """How self-chat replies are sampled (part of the cache key)."""

    max_new_tokens: int = 192
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 16


SELF_CHAT = SelfChat()                        # calibration replies: sampled
CHAT_REFERENCE = SelfChat(max_new_tokens=128)  # the dense replies chat agreement is scored on: greedy


def chat_prompts(part: str) -> list[str]:
    """The shipped instructions: ``"calibration"`` (220) or the disjoint ``"evaluation"`` set (32)."""
    data = json.loads(PROMPTS_FILE.read_text())
    return list(data[part])


def parse(source: str) -> list[str]:
    """The parts of a source string, each checked; ValueError with the accepted forms otherwise."""
    parts = [p.strip() for p in (source or "").split("+") if p.strip()]
    if not parts:
        raise ValueError("empty calibration source")
    for part in parts:
        if part in NAMED or (part.startswith("text:") and len(part) > 5) or \
                (part.startswith("hf:") and len(part) > 3):
            continue
        raise ValueError(f"unknown calibration source {part[:60]!r}; use wiki, self-chat, code, text:FILE, "
                         "hf:NAME[:CONFIG][:SPLIT], or a mixture like wiki+self-chat")
    return parts


# --- self-chat -----------------------------------------------------------------------------------

SHIPPED_REPLIES = Path(__file__).resolve().parents[1] / "assets" / "self_chat"


def _cache_file(model_id: str, kind: str, prompts: list[str], settings) -> Path:
    """The user-cache file of these replies. ``assets/self_chat`` ships files of the same names for
    the packaged default model (written by :func:`cached_replies`: ``python -m bench.self_chat_assets``),
    read when the user cache has none, so a first run generates nothing."""
    from .models import cache_root

    key = json.dumps([model_id, kind, prompts, repr(settings)], sort_keys=True)
    return cache_root() / "self_chat" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


class _EveryStep:
    """A stopping criterion that never stops: it calls ``tick(tokens generated)`` after every token, so
    a caller's progress (which raises to cancel) is heard between tokens, not only between batches."""

    def __init__(self, tick, prompt_len: int):
        self.tick, self.prompt_len = tick, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.tick(input_ids.shape[1] - self.prompt_len)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, *, sample: bool,
                     temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                     batch_size: int = 16, tick=None) -> list[str]:
    """The model's replies to ``prompts`` under its chat template, generated in left-padded batches;
    ``tick(tokens of the current batch)`` after every token."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            every = [_EveryStep(tick, batch["input_ids"].shape[1])] if tick else []
            torch.manual_seed(seed + start)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList(every))
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def render(tokenizer, prompt: str, reply: str | None = None) -> str:
    """``prompt`` (and ``reply``) under the tokenizer's chat template (a plain format without one)."""
    turns = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        if reply is None:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": reply}], tokenize=False)
    return f"User: {prompt}\nAssistant:" + ("" if reply is None else f" {reply}\n")


def cached_replies(model_id: str, model, tokenizer, prompts: list[str], kind: str, settings: SelfChat,
                   sample: bool, progress=None) -> list[str]:
    """Replies to ``prompts``, generated once per model and settings and kept in the user cache."""
    from .files import read_json, write_json_atomic

    path = _cache_file(model_id, kind, prompts, settings)
    for known in (path, SHIPPED_REPLIES / path.name):
        data = read_json(known) if known.exists() else None
        if isinstance(data, list) and len(data) == len(prompts) and all(isinstance(r, str) for r in data):
            return data
    replies = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = min(settings.batch_size, len(prompts) - start)

        def tick(tokens, done=start, batch=batch):  # the fraction moves with the batch's tokens
            if progress:
                progress((done + batch * tokens / settings.max_new_tokens) / len(prompts),
                         f"replies {done}/{len(prompts)}, token {tokens}/{settings.max_new_tokens}")

        replies += generate_replies(model, tokenizer, prompts[start:start + settings.batch_size],
                                    settings.max_new_tokens, sample=sample, temperature=settings.temperature,
                                    top_p=settings.top_p, seed=settings.seed + start,
                                    batch_size=settings.batch_size, tick=tick)
        if progress:
            progress(min(1.0, len(replies) / len(prompts)), f"replies {len(replies)}/{len(prompts)}")
    write_json_atomic(path, replies)
    return replies


def self_chat_text(model_id: str, model, tokenizer, tokens_needed: int, settings: SelfChat | None = None,
                   progress=None) -> str:
    """Conversations (instruction + the model's own sampled reply, chat template applied) until the
    text holds ``tokens_needed`` tokens; the prompt list is cycled with new seeds if it runs out."""
    settings = settings or SELF_CHAT
    prompts, texts, used, rounds = chat_prompts("calibration"), [], 0, 0
    while used < tokens_needed:
        if rounds == 8:
            raise CalibrationError(f"self-chat: 8 rounds of {len(prompts)} prompts gave only {used} tokens")
        round_settings = SelfChat(**{**settings.__dict__, "seed": settings.seed + 1000 * rounds})
        per_batch = round_settings.batch_size
        for start in range(0, len(prompts), per_batch):
            batch = prompts[start:start + per_batch]
            replies = cached_replies(model_id, model, tokenizer, batch, "calibration", round_settings, True,
                                     progress and (lambda f, m: progress(min(1.0, used / tokens_needed),
                                                                         f"self-chat text {used}/{tokens_needed} tokens: {m}")))
            for prompt, reply in zip(batch, replies):
                text = render(tokenizer, prompt, reply)
                texts.append(text)
                used += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if progress:
                progress(min(1.0, used / tokens_needed), f"self-chat text {min(used, tokens_needed)}/{tokens_needed} tokens")
            if used >= tokens_needed:
                break
        rounds += 1
    return "\n".join(texts)


# --- one source ----------------------------------------------------------------------------------

def source_text(part: str, model_id: str, model, tokenizer, tokens_needed: int, progress=None) -> str:
    if part == "wiki":
        return wiki_split("calibration")
    if part == "code":
        return code_split("calibration")
    if part == "self-chat":
        return self_chat_text(model_id, model, tokenizer, tokens_needed, progress=progress)
    if part.startswith("text:"):
        path = Path(part[5:]).expanduser()
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CalibrationError(f"calibration file {path} is over {MAX_FILE_BYTES >> 20} MB")
        return path.read_text(errors="replace")
    return hub_text(part[3:])


def hub_text(spec: str) -> str:
    """The ``text`` column of a dataset ``NAME[:CONFIG][:SPLIT]`` (split default ``train``)."""
    import os

    name, config, split = (spec.split(":") + [None, None])[:3]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CalibrationError(f"hf:{spec}: the hub is off (offline mode); use wiki, self-chat, code or text:FILE")
    try:
        from datasets import load_dataset

        data = load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # noqa: BLE001  network, missing dataset, bad config: one clear line
        raise CalibrationError(f"hf:{spec} cannot be loaded: {str(err).splitlines()[0][:200]}") from None
    if "text" not in data.column_names:
        raise CalibrationError(f"hf:{spec} has no 'text' column (columns: {', '.join(data.column_names)})")
    return "\n\n".join(t for t in data["text"][:200_000] if isinstance(t, str))


def calibration_tokens(source: str, model_id: str, model, tokenizer, samples: int, seq_len: int,
                       held_out: int = 2, progress=None, cache: dict | None = None):
    """(fit (samples, seq_len), held-out (n, seq_len) or None, facts) for ``source``.

    A mixture gives each part an even share of the sequences (interleaved); held-out sequences are
    the ones after the fitted ones in each part's text. ``cache`` (optional dict) keeps tokenized
    texts by (model, part) for callers that calibrate repeatedly (the app)."""
    parts = parse(source)
    shares = [samples // len(parts) + (i < samples % len(parts)) for i in range(len(parts))]
    fits, held = [], []
    for part, share in zip(parts, shares):
        key = (model_id, part)
        ids = None if cache is None else cache.get(key)
        if ids is None or ids.numel() < (share + held_out) * seq_len:
            text = source_text(part, model_id, model, tokenizer, (share + held_out) * seq_len, progress)
            ids = leading_tokens(tokenizer, text, (share + held_out) * seq_len)
            if cache is not None and part != "self-chat":
                cache[key] = ids
        fit = chunk(ids, share, seq_len, f"calibration ({part})") if share else ids[:0].view(0, seq_len)
        rest = ids[fit.numel():]
        n = min(held_out, rest.numel() // seq_len)
        fits.append(fit)
        if n:
            held.append(chunk(rest, n, seq_len, "held-out"))
    fit = torch.stack([row for rows in _interleave(fits) for row in rows]) if len(fits) > 1 else fits[0]
    held_ids = torch.cat(held)[:held_out] if held else None
    return fit, held_ids, {"source": source, "parts": parts}


def _interleave(chunks: list[torch.Tensor]):
    """Rows of several (n_i, T) tensors, alternating, so every batch sees every part."""
    longest = max(c.shape[0] for c in chunks)
    for i in range(longest):
        yield [c[i] for c in chunks if i < c.shape[0]]
