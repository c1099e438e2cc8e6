"""Dense models shared by all sessions: loaded lazily, cached by name, never changed in place.

Every cache here is bounded and evicts the least recently used entry (:class:`LRU`): the dense
references of agreement (one per perplexity-window setting, ~100-200 MB each for a 135M model, shared
by all sessions) by count and bytes, tokenized texts and model facts by count.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from compression.arch import arch_for, count_params, view
from compression.calibration import block_influence, capture_block_inputs
from compression.data import TextSpec, chunk, tokenize, wiki_split
from compression.models import (PACKAGED_MODELS, ModelError, default_device, load_config, load_model,
                                resolve_dtype)
from compression.pipeline import DenseCache, calibration_tokens

from .runs import Served, on_space

INFLUENCE_SPEC = TextSpec(16, 256)  # a small wiki calibration: Block Influence in ~10 s on 2 cores
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
MAX_REFERENCES = 4  # dense references kept (agreement on perplexity windows, chat agreement)
MAX_TOKEN_TEXTS = 16  # tokenized texts kept (wiki splits, calibration sources per model)
MAX_INFOS = 16  # models whose config facts are kept


def reference_budget() -> int:
    """Bytes of dense references kept (``COMPRESSION_REFERENCE_MB``, default 1024 MB)."""
    return int(float(os.environ.get("COMPRESSION_REFERENCE_MB", "1024")) * 2**20)


def nbytes(value, _depth: int = 0) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, a container of them or an object's fields)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if _depth > 3:
        return 0
    if isinstance(value, dict):
        return sum(nbytes(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v, _depth + 1) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v, _depth + 1) for v in vars(value).values())
    return 0


class LRU(MutableMapping):
    """A dict that keeps at most ``max_items`` entries and ``max_bytes`` (by ``size(value)``; the
    newest entry is always kept), evicting the least recently used; reads count as use. Thread-safe."""

    def __init__(self, max_items: int, max_bytes: int | None = None, size: Callable[[Any], int] = nbytes):
        self.max_items, self.max_bytes, self.size = max_items, max_bytes, size
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.RLock()

    def __getitem__(self, key):
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def __setitem__(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._sizes[key] = self.size(value) if self.max_bytes is not None else 0
            while len(self._data) > 1 and (len(self._data) > self.max_items or (
                    self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes)):
                old, _ = self._data.popitem(last=False)
                self._sizes.pop(old, None)

    def __delitem__(self, key) -> None:
        with self._lock:
            del self._data[key]
            self._sizes.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._data

    def __iter__(self):
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())


def check_model_name(name: str) -> str:
    """A packaged name, a hub id or (not on a Space) a local folder; ModelError otherwise."""
    name = (name or "").strip()
    if not name:
        raise ModelError("enter a model: a packaged name, a Hugging Face id or a local folder")
    if len(name) > 256:
        raise ModelError("that model name is too long")
    if name in PACKAGED_MODELS:
        return name
    if on_space() and not (HUB_ID.fullmatch(name) and ".." not in name):
        raise ModelError("on a Space, give a packaged name or a Hugging Face id (owner/name)")
    return name


@dataclass
class ModelInfo:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    params: int
    skeleton: Any  # the model built on the meta device: shapes without weights, for forecasts
    context: int | None = None  # max_position_embeddings: the longest sequence the model takes

    def served(self) -> Served:
        return Served(self.name, self.params, self.num_layers, self.context)


class ModelStore:
    """Dense models by name, loaded on first use; at most ``max_models`` kept in memory."""

    def __init__(self, device: str | None = None, dtype: str | None = None, max_models: int = 1):
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_models = max_models
        self.dense = DenseCache()  # dense metrics, computed once per model and settings
        self.dense.references = LRU(MAX_REFERENCES, reference_budget())  # each 100+ MB: bounded
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._infos: LRU = LRU(MAX_INFOS)
        self._tokens: LRU = LRU(MAX_TOKEN_TEXTS)  # (name, split) -> the wiki split tokenized once, ...
        self._influence: LRU = LRU(MAX_INFOS)  # name -> the dense model's Block Influence
        self._lock = threading.RLock()

    def info(self, name: str) -> ModelInfo:
        """Config-only facts about a model (ModelError / UnsupportedArchitecture on bad input)."""
        name = check_model_name(name)
        with self._lock:
            if name not in self._infos:
                from transformers import AutoModelForCausalLM

                config = load_config(name)
                arch_for(config)  # unsupported architectures fail here, before any weights are read
                with torch.device("meta"):
                    skeleton = AutoModelForCausalLM.from_config(config)
                context = getattr(config, "max_position_embeddings", None)
                self._infos[name] = ModelInfo(name, config.model_type, config.num_hidden_layers,
                                              config.hidden_size, count_params(skeleton), skeleton,
                                              context if isinstance(context, int) and context > 0 else None)
            return self._infos[name]

    def served(self, name: str) -> Served:
        """What an uploaded run of ``name`` is checked against (:func:`ui.weights_check.check_weights`);
        ModelError when the app cannot serve that model."""
        return self.info(name).served()

    def check_calibration_length(self, name: str, seq_len: int) -> None:
        """ValueError when calibration sequences of ``seq_len`` tokens are longer than the model's
        context (call before the job starts: the total is capped elsewhere, the length here)."""
        context = self.info(name).context
        if context is not None and int(seq_len) > context:
            raise ValueError(f"calibration sequences of {int(seq_len):,} tokens are longer than the model's "
                             f"context of {context:,} tokens; use at most {context:,}")

    def get(self, name: str):
        """``(model, tokenizer)`` of the dense model, shared: never change it in place."""
        name = check_model_name(name)
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            self.info(name)
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
            pair = load_model(name, self.device, self.dtype)
            self._models[name] = pair
            return pair

    def wiki_tokens(self, name: str, part: str) -> torch.Tensor:
        """The wiki ``part`` split tokenized with the model's tokenizer (once: ~1M tokens)."""
        key = (name.strip(), part)
        if key not in self._tokens:
            self._tokens[key] = tokenize(self.get(name)[1], wiki_split(part))
        return self._tokens[key]

    def calibration(self, name: str, spec: TextSpec, progress=None):
        """(fit tokens, held-out tokens or None, facts) for ``spec``; tokenized texts are cached."""
        model, tokenizer = self.get(name)
        return calibration_tokens(name, model, tokenizer, spec, cache=self._tokens,
                                  progress=progress or (lambda f, m: None))

    def eval_windows(self, name: str, num_windows: int, seq_len: int = 1024) -> torch.Tensor:
        """``num_windows`` held-out wiki windows, from the cached tokens."""
        return chunk(self.wiki_tokens(name, "evaluation"), num_windows, seq_len, "evaluation")

    def block_influence(self, name: str) -> list[float]:
        """The dense model's Block Influence on :data:`INFLUENCE_SPEC` wiki tokens, computed once per
        model. It swaps the model's block list while it runs: call it holding the model slot."""
        name = check_model_name(name)
        if name not in self._influence:
            mv = view(self.get(name)[0])
            fit = self.calibration(name, INFLUENCE_SPEC)[0]
            self._influence[name] = block_influence(mv, capture_block_inputs(mv, fit))
        return list(self._influence[name])

    def block_sizes(self, name: str) -> list[int]:
        """Parameters of every decoder block, from the weightless skeleton."""
        return [count_params(block) for block in view(self.info(name).skeleton).layers]

    def bytes_per_param(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()
