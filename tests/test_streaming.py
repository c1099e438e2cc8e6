"""Block streaming (compression/streaming.py) and the statistics precision modes (compression/calibration.py).

Streaming must compute exactly what the in-memory path computes, keep one block resident at a time,
never touch the caller's model, and save a folder that reloads with plain transformers.
"""
import pytest
import torch
from conftest import VOCAB, logits, tiny_model
from transformers import AutoModelForCausalLM

from compression import LayerDropConfig, compress
from compression.arch import count_params, view
from compression.calibration import (Gram, precision_for, precision_for_gpu, resolve_precision,
                                     statistics_precision)
from compression.modegpt import MoDeGPTConfig
from compression.olica import OlicaConfig
from compression.slicegpt import SliceGPTConfig
from compression import blockstore, memory, streaming

CONFIGS = {
    "modegpt": lambda: MoDeGPTConfig(ratio=0.3),
    "olica": lambda: OlicaConfig(ratio=0.3, calibrate_layers=2, calibrate_rank=4),
    "slicegpt": lambda: SliceGPTConfig(slicing=0.25),
    "layerdrop": lambda: LayerDropConfig(ratio=0.3),
}
ZERO = {
    "modegpt": lambda: MoDeGPTConfig(ratio=0.0),
    "olica": lambda: OlicaConfig(ratio=0.0),
    "slicegpt": lambda: SliceGPTConfig(slicing=0.0),
    "layerdrop": lambda: LayerDropConfig(ratio=0.0),
}
TIGHT = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture
def held_out():
    torch.manual_seed(2)
    return torch.randint(0, VOCAB, (2, 32))


def _checkpoint(model, folder):
    """``model`` saved, then opened streamed (blocks read from the safetensors on demand)."""
    model.save_pretrained(folder)
    return streaming.open_checkpoint(folder, "cpu", torch.float32)


def _resident_blocks(model) -> int:
    """Blocks of a streamed model whose tensors are real (not meta placeholders)."""
    blocks = blockstore.placeholders(view(model).layers)
    return sum(any(not t.is_meta for t in blockstore.tensors_of(b).values()) for b in blocks)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_streaming_from_memory_equals_in_memory(method, kind, tokens, held_out):
    model = tiny_model(kind, layers=4)
    dense = logits(model, tokens)
    ref, ref_report = compress(model, CONFIGS[method](), tokens, held_out=held_out, offload=False)
    out, report = compress(model, CONFIGS[method](), tokens, held_out=held_out, offload=True)
    assert streaming.is_streamed(out) and report.extra["offload"]["streamed"]
    assert not ref_report.extra["offload"]["streamed"]
    torch.testing.assert_close(logits(out, tokens), logits(ref, tokens), **TIGHT)
    assert report.params_compressed == ref_report.params_compressed
    for got, expected in zip(report.layers, ref_report.layers):
        assert got.errors == pytest.approx(expected.errors, rel=1e-6)
        assert got.removed == expected.removed
        assert got.influence == (None if expected.influence is None else pytest.approx(expected.influence))
    assert torch.equal(logits(model, tokens), dense), "the caller's model must not change"


@pytest.mark.parametrize("method", list(CONFIGS))
def test_streaming_from_checkpoint_with_spill_equals_in_memory(method, tokens, tmp_path):
    model = tiny_model("qwen2", layers=4)
    ref, ref_report = compress(model, CONFIGS[method](), tokens)
    streamed = _checkpoint(model, tmp_path / "dense")
    assert _resident_blocks(streamed) == 0
    torch.testing.assert_close(logits(streamed, tokens), logits(model, tokens), rtol=0, atol=0)
    out, report = compress(streamed, CONFIGS[method](), tokens, offload_folder=tmp_path / "spill")
    assert report.extra["offload"]["why"] == "the model is streamed"  # streamed callers stream by default
    torch.testing.assert_close(logits(out, tokens), logits(ref, tokens), **TIGHT)
    assert report.params_compressed == ref_report.params_compressed
    spilled = list((tmp_path / "spill").glob("*.safetensors"))
    rewritten = method != "layerdrop"  # layer dropping rewrites nothing: its blocks stay in the checkpoint
    assert len(spilled) == (len(view(out).layers) if rewritten else 0)
    assert _resident_blocks(out) <= 1
    with pytest.raises(ValueError, match="streamed"):
        compress(streamed, CONFIGS[method](), tokens, offload=False)


@pytest.mark.parametrize("method, kind", [(m, k) for m in ZERO for k in ("llama", "phi3", "gemma2")
                                          if (m, k) != ("slicegpt", "gemma2")])  # refused: post-norms
def test_streaming_at_zero_compression_reproduces_dense_logits(method, kind, tokens, tmp_path):
    model = tiny_model(kind, layers=3)
    dense = logits(model, tokens)
    out, report = compress(_checkpoint(model, tmp_path), ZERO[method](), tokens)
    assert report.block_params_compressed >= report.block_params_dense  # nothing removed
    torch.testing.assert_close(logits(out, tokens), dense, rtol=1e-4, atol=1e-4)


def test_one_block_resident_at_a_time(tokens, tmp_path):
    model = tiny_model("llama", layers=5)
    streamed = _checkpoint(model, tmp_path / "dense")
    seen = []
    store_cls = blockstore.BlockStore
    original = store_cls.materialize

    def watched(self, module):
        result = original(self, module)
        seen.append(sum(any(not t.is_meta for t in blockstore.tensors_of(m).values())
                        for m, _ in self.homes.values()))
        return result

    store_cls.materialize = watched
    try:
        compress(streamed, MoDeGPTConfig(ratio=0.3), tokens, offload_folder=tmp_path / "spill")
    finally:
        store_cls.materialize = original
    assert len(seen) >= 5 and max(seen) == 1


def test_saved_streamed_model_reloads_with_its_parameter_count(tokens, tmp_path):
    from compression.pipeline import save

    model = tiny_model("llama", layers=4)
    for method in ("modegpt", "olica", "slicegpt", "layerdrop"):
        out, report = compress(_checkpoint(model, tmp_path / f"dense-{method}"), CONFIGS[method](), tokens,
                               offload_folder=tmp_path / f"spill-{method}")
        expected = logits(out, tokens)
        folder = save(tmp_path / method, out, None, report)
        shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
        assert len(shards) == len(view(out).layers) + 1  # one shard per block, one for the rest
        reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert count_params(reloaded) == report.params_compressed
        assert report.export["format"] == ("native" if method == "layerdrop" else "remote_code")
        torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=0, atol=0)


def test_native_export_of_a_streamed_compressed_model(tokens, tmp_path):
    """MoDeGPT at ratio 0 leaves dense blocks in the compressed format: saved as the original class,
    fused projections fused again."""
    model = tiny_model("phi3", layers=3)
    out, report = compress(_checkpoint(model, tmp_path / "dense"), MoDeGPTConfig(ratio=0.0), tokens)
    streaming.save_streamed(out, None, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, tokens), logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_streamed_evaluation_matches_the_in_memory_one(tokens, tmp_path):
    from compression.pipeline import DenseCache, Stages, measure_against

    model = tiny_model("llama", layers=3)
    streamed = _checkpoint(model, tmp_path / "dense")
    ref, _ = compress(model, MoDeGPTConfig(ratio=0.3), tokens)
    out, _ = compress(streamed, MoDeGPTConfig(ratio=0.3), tokens)
    torch.manual_seed(3)
    windows = torch.randint(0, VOCAB, (3, 40))
    stages = lambda: Stages(lambda f, m: None, {"dense reference": 1, "compressed perplexity and agreement": 1})  # noqa: E731
    expected = measure_against(str(tmp_path / "dense"), model, ref, windows, DenseCache(), stages())
    got = measure_against(str(tmp_path / "dense"), streamed, out, windows, DenseCache(), stages())
    assert got["ppl"].keys() == expected["ppl"].keys()
    assert got["agreement"].keys() == expected["agreement"].keys()
    for part in ("ppl", "agreement"):
        for key, value in expected[part].items():
            assert got[part][key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), \
                (part, key)


def test_auto_offload_streams_when_a_copy_does_not_fit(tokens, monkeypatch):
    model = tiny_model("llama", layers=3)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 * 2**30)
    assert memory.needs_offload(2**30, "cpu", copies=2) == (
        False, "fits: 2 × 1.00 GiB of weights × 1.1 = 2.20 GiB vs 3.00 GiB available on cpu")
    assert memory.needs_offload(2**30, "cpu", copies=3)[0]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    assert memory.needs_offload(1000, "cpu", copies=1)[0]          # 1.1 × 1000 > 1000
    assert not memory.needs_offload(900, "cpu", copies=1)[0]       # 990 ≤ 1000
    _, report = compress(model, MoDeGPTConfig(ratio=0.3), tokens)
    assert report.extra["offload"]["streamed"] and "does not fit" in report.extra["offload"]["why"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 50)
    _, report = compress(model, MoDeGPTConfig(ratio=0.3), tokens)
    assert not report.extra["offload"]["streamed"]


def test_streamed_model_generates_like_the_dense_one(tokens, tmp_path):
    model = tiny_model("qwen2", layers=3)
    streamed = _checkpoint(model, tmp_path)
    expected = model.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False)
    assert torch.equal(streamed.generate(tokens[:1, :8], max_new_tokens=5, do_sample=False), expected)
    assert _resident_blocks(streamed) == 1


def test_cli_refuses_offload_with_healing(tmp_path, capsys):
    from compression.__main__ import main

    assert main(["compress", "--method", "layerdrop", "--ratio", "0.25", "--offload", "--heal-tokens", "64",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--heal-tokens" in capsys.readouterr().err


# --- statistics precision -----------------------------------------------------------------------

def test_precision_is_picked_by_device():
    assert precision_for("cpu") == "mixed"
    assert resolve_precision("auto", "cpu") == "mixed"
    for capability in ((6, 0), (7, 0), (8, 0), (9, 0), (10, 0)):      # P100 V100 A100 H100/H200 B200
        assert precision_for_gpu(capability) == "float64"
    for capability in ((6, 1), (7, 5), (8, 6), (8, 7), (8, 9), (10, 3), (12, 0)):  # consumer, Jetson, B300
        assert precision_for_gpu(capability) == "mixed"
    assert precision_for_gpu((9, 4), "gfx942:sramecc+:xnack-") == "float64"  # MI300 (ROCm)
    assert precision_for_gpu((11, 0), "gfx1100") == "mixed"                  # RDNA3
    assert resolve_precision("mixed", "cpu") == "mixed"
    with statistics_precision("mixed"):
        assert resolve_precision(None, "cpu") == "mixed"
        assert Gram(4).precision == "mixed"
    assert resolve_precision(None, "cpu") == "mixed"  # syrk in float32 on the CPU, added in float64
    with pytest.raises(ValueError, match="float64, mixed"):
        resolve_precision("half", "cpu")


def test_mixed_gram_is_float32_per_batch_and_float64_across():
    torch.manual_seed(0)
    batches = [torch.randn(2, 50, 6) * 100 + 3 for _ in range(3)]
    exact, mixed = Gram(6, precision="float64"), Gram(6, precision="mixed")
    for x in batches:
        exact.add(x)
        mixed.add(x)
    flat = [x.reshape(-1, 6).float() for x in batches]
    expected = sum((x.T @ x).double() for x in flat) / 300  # float32 products, float64 sum
    torch.testing.assert_close(mixed.mean, expected, rtol=1e-6, atol=0)
    assert torch.equal(mixed.mean, mixed.mean.T)
    assert not torch.equal(mixed.mean, exact.mean)  # really computed in float32
    torch.testing.assert_close(mixed.mean, exact.mean, rtol=1e-5, atol=0)


def test_precision_modes_agree_on_a_tiny_model(tokens):
    model = tiny_model("llama", layers=3)
    a, ra = compress(model, MoDeGPTConfig(ratio=0.3), tokens, precision="float64")
    b, rb = compress(model, MoDeGPTConfig(ratio=0.3), tokens, precision="mixed")
    assert (ra.extra["stats_precision"], rb.extra["stats_precision"]) == ("float64", "mixed")
    la, lb = logits(a, tokens), logits(b, tokens)
    assert not torch.equal(la, lb)
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-3)
    for x, y in zip(ra.layers, rb.layers):
        assert y.errors["mlp"] == pytest.approx(x.errors["mlp"], rel=1e-3)


@pytest.mark.parametrize("kind, config, cls", [
    ("llama", lambda: MoDeGPTConfig(ratio=0.3), "CompressedForCausalLM"),
    ("phi3", lambda: OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=0), "Phi3ForCausalLM"),
], ids=["remote-code", "native-fused"])
def test_streamed_save_loads_without_the_project(kind, config, cls, tokens, tmp_path):
    from test_portable import load_elsewhere

    model = tiny_model(kind, layers=3)
    ref, ref_report = compress(model, config(), tokens)
    out, report = compress(_checkpoint(model, tmp_path / "dense"), config(), tokens)
    streaming.save_streamed(out, None, tmp_path / "model")
    elsewhere = load_elsewhere(tmp_path / "model", tokens, tmp_path)
    assert elsewhere["cls"] == cls
    torch.testing.assert_close(elsewhere["logits"], logits(ref, tokens), **TIGHT)
    assert elsewhere["params"] == report.params_compressed == ref_report.params_compressed
