"""Tiny random decoders of every supported architecture, built from configs (seconds on CPU)."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128


def tiny_config(kind: str, tied: bool = True, layers: int = 3):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**common)


def tiny_model(kind: str = "llama", tied: bool = True, layers: int = 3, seed: int = 0):
    """A random model whose norms are not all ones (so norm folding is really exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tied, layers)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.02)
    return model


ARCHS = [("llama", True), ("qwen2", True), ("mistral", False)]


@pytest.fixture(params=ARCHS, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in ARCHS])
def model(request):
    kind, tied = request.param
    return tiny_model(kind, tied)


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real default model end to end")
