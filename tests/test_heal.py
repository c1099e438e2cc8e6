"""Recovery training: loss goes down, LoRA merges back to the plain format, no evaluation text leaks."""
import json

import numpy as np
import pytest
import torch
from conftest import VOCAB, logits, tiny_model
from transformers import AutoModelForCausalLM

import compression  # noqa: F401  (registers the compressed format for the reload)
from compression import heal as heal_module
from compression.data import CalibrationError, wiki_split
from compression.heal import HealConfig, heal, training_sequences
from compression.modeling import CompressedForCausalLM, to_compressed

REPEATED = "the quick brown fox jumps over the lazy dog; " * 80


def ascii_ids(text: str) -> np.ndarray:
    """One id per character, non-ASCII clipped to 127 (fits the tiny models' 128-token vocab)."""
    return np.minimum(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), VOCAB - 1).astype(np.int64)


def as_text(ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("latin-1")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ascii_ids(text).tolist()}


TOK = CharTokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**kw) -> HealConfig:
    return HealConfig(**{"tokens": 32 * 4 * 25, "seq_len": 32, "batch_size": 4, "lr": 3e-3,
                         "warmup_frac": 0.1, **kw})


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- config and data ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"tokens": 0}, {"seq_len": 1}, {"batch_size": 0}, {"grad_accum": 0},
                                 {"lr": -1.0}, {"lr": float("nan")}, {"warmup_frac": 1.0},
                                 {"lora_rank": -1}, {"offset": -5}, {"tokens": 2.5e4},
                                 {"tokens": 100, "seq_len": 64, "batch_size": 2},  # below one step
                                 {"lora_rank": 4, "lora_targets": ()}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        HealConfig(**{"tokens": 10_000, **bad})


def test_config_defaults_and_schedule():
    full, lora = HealConfig(tokens=10_000), HealConfig(tokens=10_000, lora_rank=8)
    assert full.lr == 1e-4 and lora.lr == 1e-3 and lora.lora_alpha == 16
    cfg = HealConfig(tokens=256 * 4 * 2 * 50 + 100, grad_accum=2, lr=1e-3, warmup_frac=0.1,
                     min_lr_frac=0.1)
    assert cfg.steps == 50 and cfg.tokens_per_step == 2048
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    peak = lrs.index(max(lrs))
    assert 0 < peak <= 5 and lrs[0] < lrs[peak] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # cosine decays monotonically
    assert lrs[-1] == pytest.approx(1e-4)


def test_training_sequences_are_consecutive_chunks_after_offset_and_wrap():
    text = as_text(np.random.default_rng(0).integers(33, 127, 1000))  # no repeated chunks
    ids = torch.as_tensor(ascii_ids(text), dtype=torch.long)
    cfg = HealConfig(tokens=10 * 100 * 2, seq_len=100, batch_size=2, offset=250)
    seqs = training_sequences(TOK, cfg, text)
    assert seqs.shape == (20, 100)
    assert torch.equal(seqs[0], ids[250:350]) and torch.equal(seqs[6], ids[850:950])
    assert torch.equal(seqs[7], seqs[0])  # 7 full chunks after the offset, then round again
    assert not any(torch.equal(s, ids[200:300]) for s in seqs)  # the skipped prefix never returns
    with pytest.raises(CalibrationError):
        training_sequences(TOK, HealConfig(tokens=2000, seq_len=100, batch_size=2, offset=950), text)


# --- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "compressed"])
@pytest.mark.parametrize("rank", [0, 4])
def test_loss_goes_down_on_repeated_text(fmt, rank):
    model = tiny_model("llama", layers=2)
    if fmt == "compressed":
        model = to_compressed(model)
    probe = torch.as_tensor(ascii_ids(REPEATED[:64]))[None]
    before = logits(model, probe)
    seen, messages = [], []
    rec = heal(model, TOK, small(lora_rank=rank, lr=3e-3 if rank == 0 else 1e-2), text=REPEATED,
               progress=lambda f, m: messages.append((f, m)),
               on_step=lambda s, t, loss: seen.append((s, t, loss)))
    assert rec["steps"] == 25 and rec["tokens"] == 25 * 128 and rec["lora_rank"] == rank
    assert json.loads(json.dumps(rec)) == rec  # goes into report.json under "heal" as is
    assert len(rec["loss"]) == len(rec["lr"]) == 25 and rec["seconds"] > 0
    assert sum(rec["loss"][-3:]) / 3 < 0.6 * rec["loss"][0]
    assert [s for s, _, _ in seen] == list(range(1, 26)) and seen[-1][1] == rec["tokens"]
    assert [loss for _, _, loss in seen] == rec["loss"] and [t for _, t, _ in seen] == rec["tokens_seen"]
    assert any("heal step 25/25 loss" in m for _, m in messages) and messages[-1][0] == 1.0
    # the model comes back ready for inference, changed
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not torch.allclose(logits(model, probe), before)
    trainable = rec["trainable_params"]
    total = sum(p.numel() for p in model.parameters())
    assert (trainable == total) if rank == 0 else (0 < trainable < total / 4)


def test_lora_merges_back_into_a_plain_loadable_model(tmp_path):
    model = to_compressed(tiny_model("qwen2", layers=2))
    names = [n for n, _ in model.named_modules()]
    before_shapes = shapes(model)
    embed = model.model.embed_tokens.weight.clone()
    q = model.model.layers[0].self_attn.q_proj.weight.clone()
    heal(model, TOK, small(lora_rank=4, lr=1e-2), text=REPEATED)
    assert isinstance(model, CompressedForCausalLM)
    assert shapes(model) == before_shapes and [n for n, _ in model.named_modules()] == names
    assert not any("lora" in n for n in model.state_dict())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embed)  # not a LoRA target: untouched
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)  # merged delta
    probe = torch.as_tensor(ascii_ids(REPEATED[:48]))[None]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CompressedForCausalLM) and shapes(reloaded) == before_shapes
    assert "peft" not in (tmp_path / "config.json").read_text()
    torch.testing.assert_close(logits(reloaded, probe), logits(model, probe))


def test_dtype_and_device_are_kept_for_half_precision_models():
    model = tiny_model("llama", layers=1).to(torch.bfloat16)
    rec = heal(model, TOK, small(tokens=32 * 4 * 3), text=REPEATED)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert rec["device"] == "cpu" and len(rec["loss"]) == 3


def test_eval_fn_fills_perplexity_before_and_after():
    model = tiny_model("mistral", tied=False, layers=2)
    windows = torch.as_tensor(ascii_ids(REPEATED[:4 * 64]), dtype=torch.long).view(4, 64)
    from compression.evaluate import perplexity
    rec = heal(model, TOK, small(), text=REPEATED, eval_fn=lambda m: perplexity(m, windows))
    assert rec["ppl_after"] < 0.5 * rec["ppl_before"]


def test_lora_targets_must_match_a_linear_layer():
    model = tiny_model("llama", layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="match no linear layer"):
        heal(model, TOK, small(lora_rank=2, lora_targets=("c_attn",)), text=REPEATED)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- the evaluation split never reaches training --------------------------------------------------

def test_training_reads_only_the_calibration_split(monkeypatch):
    parts = []
    real = heal_module.wiki_split
    monkeypatch.setattr(heal_module, "wiki_split", lambda part: parts.append(part) or real(part))
    model = tiny_model("llama", layers=1)
    fed = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: fed.append(kw["input_ids"].clone()) or forward(*a, **kw))
    cfg = HealConfig(tokens=128 * 2 * 3, seq_len=128, batch_size=2, offset=1000)
    heal(model, TOK, cfg)
    assert parts == ["calibration"]
    rows = [as_text(row) for batch in fed for row in batch]
    assert len(rows) == 6
    calibration, evaluation = as_text(ascii_ids(wiki_split("calibration"))), as_text(ascii_ids(wiki_split("evaluation")))
    for row in rows:
        assert row in calibration and row not in evaluation
    assert rows[0] == calibration[1000:1128]  # consecutive from the offset


def test_custom_text_containing_evaluation_articles_is_refused():
    model = tiny_model("llama", layers=1)
    leaked = wiki_split("calibration")[:20_000] + "\n\n" + wiki_split("evaluation")[:20_000]
    with pytest.raises(CalibrationError, match="evaluation split"):
        heal(model, TOK, small(), text=leaked)
