"""Dense models shared by all sessions: loaded lazily, cached by name, never changed in place."""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from compression.arch import arch_for, count_params, view
from compression.calibration import block_influence, capture_block_inputs
from compression.data import TextSpec, chunk, tokenize, wiki_split
from compression.models import (PACKAGED_MODELS, ModelError, default_device, load_config, load_model,
                                resolve_dtype)
from compression.pipeline import DenseCache, calibration_tokens

from .runs import on_space

INFLUENCE_SPEC = TextSpec(16, 256)  # the CPU default calibration: Block Influence in ~10 s on 2 cores
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


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


class ModelStore:
    """Dense models by name, loaded on first use; at most ``max_models`` kept in memory."""

    def __init__(self, device: str | None = None, dtype: str | None = None, max_models: int = 1):
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_models = max_models
        self.dense = DenseCache()  # dense metrics, computed once per model and settings
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._infos: dict[str, ModelInfo] = {}
        self._tokens: dict[tuple, torch.Tensor] = {}  # (name, split) -> the wiki split tokenized once
        self._influence: dict[str, list[float]] = {}  # name -> the dense model's Block Influence
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
                self._infos[name] = ModelInfo(name, config.model_type, config.num_hidden_layers,
                                              config.hidden_size, count_params(skeleton), skeleton)
            return self._infos[name]

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
