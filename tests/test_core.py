"""Core: architecture view, compressed format, calibration capture, Block Influence, layer drop, metrics."""
import math

import pytest
import torch
from conftest import VOCAB, logits, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from compression import LayerDropConfig, compress
from compression.arch import UnsupportedArchitecture, block_params, count_params, view
from compression.calibration import (Gram, block_influence, capture_block_inputs,
                                     cosine_influence, run_block)
from compression.data import CalibrationError, chunk
from compression.evaluate import perplexity, speed
from compression.layerdrop import layers_to_drop
from compression.modeling import CompressedForCausalLM, to_compressed


def test_view_exposes_every_part(model):
    mv = view(model)
    cfg = model.config
    assert len(mv.blocks) == cfg.num_hidden_layers
    b = mv.blocks[1]
    assert b.q.in_features == cfg.hidden_size
    assert b.k.out_features == mv.num_kv_heads * mv.head_dim
    assert b.down.in_features == cfg.intermediate_size
    assert b.attn_norm.weight.shape == (cfg.hidden_size,)
    assert mv.tied == cfg.tie_word_embeddings
    assert mv.num_kv_heads == 2 and mv.head_dim == 16


def test_unknown_architecture_lists_supported():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitecture, match="llama, mistral, olmo2, phi3, qwen2, qwen3"):
        view(model)


def test_count_params_counts_tied_weights_once():
    tied, untied = tiny_model("llama", tied=True), tiny_model("llama", tied=False)
    emb = tied.config.vocab_size * tied.config.hidden_size
    assert count_params(untied) - count_params(tied) == emb
    assert block_params(tied) == block_params(untied)


def test_compressed_format_roundtrip_is_exact(model, tokens, tmp_path):
    ref = logits(model, tokens)
    compressed = to_compressed(model)
    assert torch.equal(logits(compressed, tokens), ref)
    compressed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CompressedForCausalLM)
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == count_params(compressed)


def test_compressed_generate_matches_dense(model, tokens):
    dense = model.generate(tokens[:2, :8], max_new_tokens=6, do_sample=False)
    compressed = to_compressed(model).generate(tokens[:2, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(dense, compressed)


def test_capture_then_run_blocks_reproduces_hidden_states(model, tokens):
    mv = view(model)
    inputs = capture_block_inputs(mv, tokens, batch_size=3)
    assert [h.shape[0] for h in inputs.hidden] == [3, 3, 2]
    hidden = inputs.hidden
    for i, block in enumerate(mv.layers):
        hidden = run_block(block, hidden, inputs.kwargs_for(i))
    final = mv.final_norm(torch.cat(hidden))
    with torch.no_grad():
        expected = mv.decoder(tokens).last_hidden_state
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-5)
    assert len(mv.layers) == model.config.num_hidden_layers  # the block list was restored


def test_cosine_influence_known_values():
    x = torch.randn(2, 5, 8)
    assert cosine_influence(x, x)[0] == pytest.approx(0.0, abs=1e-9)
    assert cosine_influence(x, -x)[0] == pytest.approx(20.0)
    a = torch.tensor([[1.0, 0.0]]); b = torch.tensor([[0.0, 3.0]])
    assert cosine_influence(a, b) == (pytest.approx(1.0), 1)


def test_block_influence_is_zero_for_an_identity_block(tokens):
    model = tiny_model("llama", layers=4)
    mv = view(model)
    with torch.no_grad():  # block 2 writes nothing into the residual stream: output == input
        mv.blocks[2].o.weight.zero_()
        mv.blocks[2].down.weight.zero_()
    scores = block_influence(mv, capture_block_inputs(mv, tokens))
    assert scores[2] == pytest.approx(0.0, abs=1e-12)
    assert min(scores[i] for i in (0, 1, 3)) > 1e-4
    assert layers_to_drop(scores, [1] * 4, 0.25) == [2]


def test_layers_to_drop_reaches_target_with_fewest_blocks():
    influence = [0.5, 0.1, 0.3, 0.2, 0.9]
    assert layers_to_drop(influence, [10] * 5, 0.0) == []
    assert layers_to_drop(influence, [10] * 5, 0.2) == [1]
    assert layers_to_drop(influence, [10] * 5, 0.25) == [1, 3]
    assert layers_to_drop(influence, [10] * 5, 0.9) == [0, 1, 2, 3]


def test_dropping_zero_layers_keeps_logits(model, tokens):
    ref = logits(model, tokens)
    out, report = compress(model, LayerDropConfig(ratio=0.0), tokens)
    assert report.block_params_compressed == report.block_params_dense
    assert torch.equal(logits(out, tokens), ref)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_drop_save_reload_identical(kind, tokens, tmp_path):
    model = tiny_model(kind, layers=4)
    dense_logits = logits(model, tokens)
    out, report = compress(model, LayerDropConfig(layers=(1, 2)), tokens)
    assert out.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    assert torch.equal(logits(model, tokens), dense_logits), "the argument must stay the dense model"
    assert [l.removed for l in report.layers] == [False, True, True, False]
    ref = logits(out, tokens)
    gen = out.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False)
    out.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded, tokens), ref)
    assert count_params(reloaded) == report.params_compressed
    assert torch.equal(reloaded.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False), gen)


def test_layerdrop_by_ratio_on_compressed_format(tokens, tmp_path):
    model = to_compressed(tiny_model("qwen2", layers=4))
    out, report = compress(model, LayerDropConfig(ratio=0.5), tokens)
    assert report.ratio_achieved == pytest.approx(0.5)
    ref = logits(out, tokens)
    out.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens), ref)


def test_layerdrop_rejects_bad_config():
    with pytest.raises(ValueError, match=r"\[0, 0.9\]"):
        LayerDropConfig(ratio=0.95)
    with pytest.raises(ValueError, match="out of range"):
        compress(tiny_model(), LayerDropConfig(layers=(7,)), None)


def test_perplexity_of_uniform_model_is_vocab_size():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: embeddings become zero too; logits are all zero
    windows = torch.randint(0, VOCAB, (3, 16))
    assert perplexity(model, windows) == pytest.approx(VOCAB, rel=1e-5)


def test_perplexity_matches_direct_computation(tokens):
    model = tiny_model()
    with torch.no_grad():
        lp = torch.log_softmax(model(tokens).logits[:, :-1], -1)
        nll = -lp.gather(-1, tokens[:, 1:, None]).mean().item()
    assert perplexity(model, tokens, batch_size=3) == pytest.approx(math.exp(nll), rel=1e-5)


def test_gram_accumulates_xtx():
    x = torch.randn(3, 7, 5)
    g = Gram(5)
    g.add(x[:2]); g.add(x[2:])
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(g.mean, flat.T @ flat / 21)


def test_chunk_errors_when_text_is_short():
    ids = torch.arange(100)
    assert chunk(ids, 3, 30, "x").shape == (3, 30)
    with pytest.raises(CalibrationError, match="only 3"):
        chunk(ids, 4, 30, "x")


def test_speed_reports_positive_rates():
    result = speed(tiny_model(), prompt_len=16, new_tokens=4, repeats=1)
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0


def test_speed_side_by_side_measures_every_model_and_its_memory():
    from compression.evaluate import speed_side_by_side

    small, large = tiny_model(layers=1), tiny_model(layers=4)
    result = speed_side_by_side({"small": small, "large": large}, prompt_len=16, new_tokens=4, rounds=2)
    assert set(result) == {"small", "large"}
    weights_mb = {name: sum(p.numel() * 4 for p in m.parameters()) / 2**20
                  for name, m in (("small", small), ("large", large))}
    for name, r in result.items():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        # memory = the model's own weights (+ what its run allocates), not the process's total
        assert weights_mb[name] <= r["peak_mem_mb"] < weights_mb[name] + 200
    assert result["large"]["peak_mem_mb"] > result["small"]["peak_mem_mb"]


def test_spec_params_forecast_matches_modules(model):
    from compression.modeling import spec_params
    compressed = to_compressed(model)
    base = compressed.model.config
    for layer in compressed.model.layers:
        assert spec_params(layer.spec(), base) == count_params(layer)


@pytest.mark.parametrize("make_config", [
    lambda: LayerDropConfig(ratio=0.4),
    lambda: __import__("compression.slicegpt", fromlist=["x"]).SliceGPTConfig(slicing=0.25),
    lambda: __import__("compression.modegpt", fromlist=["x"]).MoDeGPTConfig(ratio=0.3),
    lambda: __import__("compression.olica", fromlist=["x"]).OlicaConfig(ratio=0.3, calibrate_layers=0),
], ids=["layerdrop", "slicegpt", "modegpt", "olica"])
def test_forecast_matches_result(make_config, tokens):
    from compression.forecast import forecast
    model = tiny_model("llama", layers=4)
    predicted = forecast(model, make_config())
    out, report = compress(model, make_config(), tokens)
    assert predicted["params"] == report.params_compressed
    assert predicted["block_params"] == report.block_params_compressed


@pytest.mark.parametrize("args, message", [
    (["--model", "./missing-folder"], "does not exist"),
    (["--ratio", "1.5"], "[0, 0.9]"),
    (["--method", "slicegpt", "--slicing", "0.2"], "exactly one"),
    (["--method", "olica", "--ratio", "0.2", "--calibrate-rank", "-1"], "calibrate_rank must be in"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, capsys, tmp_path):
    from compression.__main__ import main
    base = ["compress", "--method", "layerdrop", "--ratio", "0.25", "--out", str(tmp_path / "x")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "x").exists()


def test_cli_rejects_unsupported_architecture(tmp_path, capsys):
    from compression.__main__ import main
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(tmp_path / "gpt2")
    assert main(["eval", "--model", str(tmp_path / "gpt2")]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err


def test_rotary_tables_index_follows_rope_index_edits():
    from compression.modeling import Attention, dense_spec

    base = tiny_config("llama")
    head_dim = base.hidden_size // base.num_attention_heads
    attn = Attention(base, {**dense_spec(base), "qk_dim": head_dim - 2}, layer_idx=0)
    groups, pairs = attn.rope_index.shape
    cos = torch.arange(head_dim, dtype=torch.float32).expand(1, 3, head_dim)  # (B, T, head_dim)

    def expected_kv():
        return torch.cat([attn.rope_index, attn.rope_index], dim=-1)  # (Hkv, qk_dim)

    for fill in (torch.arange(pairs), torch.arange(pairs) + 1):  # the second edit is in place
        attn.rope_index.copy_(fill.expand(groups, pairs))
        (cos_q, _), (cos_k, _) = attn.rotary(cos, cos)
        assert torch.equal(cos_k[0, :, 0], expected_kv().float())
        assert torch.equal(cos_q[0, :, 0], expected_kv().repeat_interleave(
            base.num_attention_heads // groups, dim=0).float())


def test_peak_memory_sees_a_large_allocation_and_reports_land_in_compress():
    from compression.evaluate import PeakMemory, _high_water_bytes

    with PeakMemory("cpu") as before:
        pass
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB of fp32, touched
        del block
    assert peak.mb >= before.mb + 200
    _, report = compress(tiny_model(), LayerDropConfig(layers=(1,)), None)
    assert report.peak_memory_mb is not None and report.peak_memory_mb > 0
    assert _high_water_bytes() > 0
