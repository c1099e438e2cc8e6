"""Tiny random decoders of every supported architecture, built from configs (seconds on CPU)."""
import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128


# Per-architecture extras of the tiny configs: what makes each one differ from Llama is switched on
# (Gemma: soft-caps, a query scalar unlike head_dim, sliding windows shorter than the test sequences;
# Qwen3: a sliding layer; Phi-3 stays fully rotary, since partial rotary is refused by MoDeGPT/Olica).
EXTRA = {
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=2,
                        final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config,
           "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config, "olmo2": Olmo2Config}
NEW_ARCHS = ["qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]


def tiny_config(kind: str, tied: bool = True, layers: int = 3, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    return CONFIGS[kind](**{**common, **EXTRA.get(kind, {}), **overrides})


def tiny_model(kind: str = "llama", tied: bool = True, layers: int = 3, seed: int = 0, **overrides):
    """A random model whose norms are not all ones (so norm folding is really exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tied, layers, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.02)
    return model


def tiny_chat_llama():
    """A 2-layer random Llama with the default model's tokenizer (it has a chat template): the model
    for tests that need real text, chat templates or the app's model names. (model, tokenizer)."""
    from transformers import AutoTokenizer

    from compression.models import DEFAULT_MODEL, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(DEFAULT_MODEL))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tok


ARCHS = [("llama", True), ("qwen2", True), ("mistral", False)]


@pytest.fixture(params=ARCHS, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in ARCHS])
def model(request):
    kind, tied = request.param
    return tiny_model(kind, tied)


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32))


# --- the app tests' fixtures (helpers in app_helpers.py; requesting tabs or compressed needs gradio) ---

@pytest.fixture(scope="session", autouse=True)
def runs_root_of_the_tests(tmp_path_factory):
    """The app saves every finished run under the runs root (ui.run_saving): in tests, a throwaway
    folder, never the project's runs/ (tests that need another root or none set their own)."""
    os.environ["COMPRESSION_RUNS_ROOT"] = str(tmp_path_factory.mktemp("runs-root"))


def saved_tiny_chat_llama(folder) -> str:
    """:func:`tiny_chat_llama` saved (weights, config, tokenizer) in ``folder``; returns it."""
    model, tok = tiny_chat_llama()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama saved with the default model's tokenizer (and chat template)."""
    return saved_tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tabs():
    """The app's tabs on a context of this test module's own."""
    from app_helpers import _tabs

    return _tabs()


@pytest.fixture(scope="session")
def slicegpt_run(tiny_folder):
    """The tiny Llama compressed by SliceGPT at 0.3 through the Compress tab: done once per test run."""
    from app_helpers import _compress, _tabs
    from ui import runs as R

    session = R.Session()
    _compress(_tabs(), session, tiny_folder, "slicegpt", 0.3)
    yield session.get("r1")
    session.close()


@pytest.fixture(scope="module")
def compressed(slicegpt_run):
    """A session of this test module's own whose run r1 is a copy of :func:`slicegpt_run` (model and
    report), so what one module adds or changes is never seen by another; the next run is r2."""
    import copy

    from ui import runs as R

    session = R.Session()
    assert session.new_id() == slicegpt_run.id == "r1"
    session.add(copy.deepcopy(slicegpt_run))
    return session


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real default model end to end, or the app in a real browser")
