"""The trade-off explorer (compression.preview): exact curves, agreement with real runs and the
forecast of parameters, the CLI's JSON and the figures."""
import json

import pytest
import torch

from compression import LayerDropConfig, MoDeGPTConfig, OlicaConfig, SliceGPTConfig, compress, forecast
from compression.ops import nystrom_mlp
from compression.preview import StatisticsCache, collect, predict
from compression.preview_curves import nystrom_curve, pruning_curve
from compression.preview import best_allocation, measured_errors
from conftest import logits, tiny_model


@pytest.fixture(scope="module")
def tiny():
    """A 4-layer tiny Llama, its calibration tokens (one batch: the runs' in-sample errors then cover
    every token, as the curves do) and its statistics."""
    model = tiny_model("llama", layers=4)
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (8, 32))
    return model, tokens, collect(model, tokens, batch_size=8)


def _activations(n=400, m=24, d=10, seed=0):
    """Correlated intermediate activations Z (n, m) with a few near-dead channels, and W_down (d, m)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64) @ torch.randn(6, m, generator=g, dtype=torch.float64)
    z += 0.3 * torch.randn(n, m, generator=g, dtype=torch.float64)
    z[:, :3] *= 0.01
    return z, torch.randn(d, m, generator=g, dtype=torch.float64)


def test_modegpt_mlp_curve_is_the_least_squares_refit_error_at_every_k():
    z, w = _activations()
    c = z.T @ z / z.shape[0]
    curve = nystrom_curve(c, w, ridge=1.0)
    dense = z @ w.T
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    for k in (1, 4, 12, 23):
        index, refit, _ = nystrom_mlp(c, w, k, ridge=1.0)  # the method's own choice and refit
        brute = (z[:, index] @ refit.T - dense).square().sum() / dense.square().sum()
        assert curve[k] == pytest.approx(float(brute), rel=1e-6, abs=1e-12), k
    assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))  # more channels never fit worse


def test_olica_mlp_curve_is_the_dropped_output_energy_at_every_k():
    from compression.olica import neuron_importance

    z, w = _activations(seed=3)
    c = z.T @ z / z.shape[0]
    z_sq = z.square().mean(0)
    curve = pruning_curve(c, w, z_sq)
    dense = z @ w.T
    for k in (0, 2, 9, 20, 24):
        keep = torch.topk(neuron_importance(z_sq, w), k).indices
        brute = (z[:, keep] @ w[:, keep].T - dense).square().sum() / dense.square().sum()
        assert curve[k] == pytest.approx(float(brute), rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: value biases folded into o_proj's
def test_attention_curves_are_the_rewritten_attention_error(kind):
    """The value-output curve is the error of the real rewrite (every token); the query-key curve the
    error of the real pair cut on the sequences it was measured on."""
    import copy

    from compression.arch import view
    from compression.calibration import Gram, capture_block_inputs
    from compression.modeling import to_compressed
    from compression.rewrite import compress_value_output, keep_rotary_pairs

    model = tiny_model(kind, layers=2)
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (8, 32))
    st = collect(model, tokens, batch_size=4, qk_sequences=2)
    mv = view(to_compressed(copy.deepcopy(model)).requires_grad_(False))
    inputs = capture_block_inputs(mv, tokens, 4)
    layer, kwargs = mv.layers[1], inputs.kwargs_for(1)
    hidden = [mv.layers[0](h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs_for(0))]
    dense = [layer.attention_out(h, kw) for h, kw in zip(hidden, kwargs)]
    gram = Gram.of([layer.input_layernorm(h) for h in hidden]).mean

    @torch.no_grad()
    def error(cut, batches):
        new = [cut.attention_out(h, kw)[:2 if batches == 1 else None] for h, kw in zip(hidden[:batches], kwargs)]
        ref = [d[:2 if batches == 1 else None] for d in dense[:batches]]
        return float(sum((a - b).double().square().sum() for a, b in zip(new, ref))
                     / sum(b.double().square().sum() for b in ref))

    for v in (2, 7, 13):
        cut = copy.deepcopy(layer)
        compress_value_output(cut.self_attn, gram, v)
        assert st.layers[1].vo[v] == pytest.approx(error(cut, len(hidden)), rel=1e-4), v
    for r in (1, 3, 6):
        cut = copy.deepcopy(layer)
        keep_rotary_pairs(cut.self_attn, gram, r)
        assert st.layers[1].qk[r] == pytest.approx(error(cut, 1), rel=1e-4), r
    assert st.layers[1].qk[8] == 0.0 and st.layers[1].vo[16] == pytest.approx(0.0, abs=1e-9)


def test_collect_leaves_the_model_as_it_was(tiny):
    model, tokens, _ = tiny
    before = logits(model, tokens)
    params = {n: p.clone() for n, p in model.named_parameters()}
    collect(model, tokens[:4], batch_size=2)
    assert torch.equal(logits(model, tokens), before)
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("config", [MoDeGPTConfig(ratio=0.0), OlicaConfig(ratio=0.0), SliceGPTConfig(slicing=0.0),
                                    MoDeGPTConfig(ratio=0.0, allocation="auto")], ids=repr)
def test_no_compression_forecasts_no_error(tiny, config):
    model, _, st = tiny
    p = predict(st, config, model.config)
    assert p["total"] == 0.0
    assert all(v == 0.0 for key in ("predicted_error", "attn", "mlp", "stream") for v in p[key])


@pytest.mark.parametrize("config", [
    MoDeGPTConfig(ratio=0.3), MoDeGPTConfig(ratio=0.3, allocation="manual", layer_sparsity=(0.1, 0.5, 0.2, 0.6)),
    OlicaConfig(ratio=0.25), OlicaConfig(ratio=0.4, attn_share=0.5, calibrate_layers=2, calibrate_rank=4),
    SliceGPTConfig(ratio=0.2), SliceGPTConfig(widths=(48, 40, 56, 32)), LayerDropConfig(layers=(1, 2)),
    LayerDropConfig(ratio=0.25)], ids=repr)
def test_params_agree_with_the_forecast(tiny, config):
    model, _, st = tiny
    p, f = predict(st, config, model.config), forecast(model, config)
    assert (p["params"], p["block_params"]) == (f["params"], f["block_params"])
    assert p["ratio"] == pytest.approx(f["ratio"])
    assert len(p["predicted_error"]) == len(p["attn"]) == len(p["mlp"]) == 4
    assert p["total"] > 0 and any(v > 0 for v in p["predicted_error"])


@pytest.mark.parametrize("config", [MoDeGPTConfig(ratio=0.3, allocation="auto", refit_shrinkage=0.0),
                                    OlicaConfig(ratio=0.3, allocation="auto", calibrate_layers=0)], ids=repr)
def test_a_real_run_has_the_forecast_widths_and_params_and_its_first_mlp_error(tiny, config):
    """Automatic allocation from the statistics' Block Influence plans the run's own widths; block 0
    sees the dense input in the run too, so its MLP curve is the run's in-sample error (MoDeGPT's with
    the least-squares refit the curve describes)."""
    model, tokens, st = tiny
    p = predict(st, config, model.config)
    report = compress(model, config, tokens).report
    assert report.block_influence == pytest.approx(st.influence, rel=1e-6)
    assert [s["mlp_dim"] for s in p["sizes"]] == [lay.sizes["mlp_dim"] for lay in report.layers]
    assert [s["v_dim"] for s in p["sizes"]] == [lay.sizes["v_dim"] for lay in report.layers]
    assert p["params"] == report.params_compressed
    assert p["mlp"][0] == pytest.approx(report.layers[0].errors["mlp"], rel=1e-3)
    measured = measured_errors(report, st)
    assert len(measured["per_layer"]) == 4 and measured["total"] > 0


def test_the_least_squares_curve_bounds_the_shrunk_refit_in_sample(tiny):
    """MoDeGPT's default refit is shrunk toward the kept columns: on the calibration tokens it fits
    worse than least squares (the curve), by a little."""
    model, tokens, st = tiny
    config = MoDeGPTConfig(ratio=0.3, allocation="auto")
    assert config.refit_shrinkage is None  # automatic: ∝ 1/tokens
    curve = predict(st, config, model.config)["mlp"][0]
    report = compress(model, config, tokens).report
    assert report.extra["refit_shrinkage"] == pytest.approx(0.5 * 12_288 / tokens.numel())
    measured = report.layers[0].errors["mlp"]
    assert curve * (1 + 1e-3) < measured < 2 * curve


def test_olica_calibration_branches_are_forecast_on_the_layers_the_run_picks(tiny):
    """With attention untouched (attn_share 0) block 0's MLP sees the dense stream in the run too: its
    branch's fit and the error after it are the forecast's (up to the ridge's shrinkage term); the
    run calibrates the layers the forecast names."""
    model, tokens, st = tiny
    config = OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=4, calibrate_rank=6)
    p = predict(st, config, model.config)
    report = compress(model, config, tokens).report
    assert p["calibrated"] == report.config["calibrated"] == [0, 1, 2, 3]
    explained = report.extra["explained_by_linear_fit"][0]
    assert st.branch_explained(0, p["sizes"][0]["mlp_dim"], config.ridge)[0] == pytest.approx(explained, rel=1e-3)
    first = report.layers[0].errors
    assert p["mlp_before_calibration"][0] == pytest.approx(first["mlp_before_calibration"], rel=1e-3)
    assert p["mlp"][0] == pytest.approx(first["mlp"], rel=2e-2) and p["mlp"][0] < p["mlp_before_calibration"][0]
    none = predict(st, OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=0), model.config)
    assert none["calibrated"] == [] and none["mlp_before_calibration"] == [None] * 4


def test_layer_dropping_forecasts_what_the_dropped_block_adds(tiny):
    model, tokens, st = tiny
    p = predict(st, LayerDropConfig(ratio=0.25), model.config)
    dropped = min(range(4), key=lambda i: st.influence[i])
    assert p["dropped"] == [dropped]
    seen = {}
    hook = model.model.layers[dropped].register_forward_hook(
        lambda module, args, out: seen.update(x=args[0], y=out[0] if isinstance(out, tuple) else out))
    try:
        logits(model, tokens)
    finally:
        hook.remove()
    lost = (seen["y"] - seen["x"]).double().square().sum() / seen["y"].double().square().sum()
    assert p["predicted_error"][dropped] == pytest.approx(float(lost) ** 0.5, rel=1e-4)
    assert p["total"] == pytest.approx(float(lost) ** 0.5, rel=1e-4)
    assert all(p["predicted_error"][i] == 0 for i in range(4) if i != dropped)
    energy, n = st.layers[dropped].energy, seen["x"].shape[0] * seen["x"].shape[1]
    assert energy["stream_in"] == pytest.approx(float(seen["x"].double().square().sum()) / n, rel=1e-5)
    assert energy["stream_out"] == pytest.approx(float(seen["y"].double().square().sum()) / n, rel=1e-5)
    # a per-block rewrite injects its modules' error energy relative to the stream leaving the block
    q = predict(st, MoDeGPTConfig(ratio=0.3), model.config)
    lost = q["attn"][dropped] ** 2 * energy["attn"] + q["mlp"][dropped] ** 2 * energy["mlp"]
    assert q["stream"][dropped] ** 2 == pytest.approx(lost / energy["stream_out"])
    assert q["predicted_error"][dropped] ** 2 == pytest.approx(lost / (energy["attn"] + energy["mlp"]))
    assert q["total"] ** 2 == pytest.approx(sum(v ** 2 for v in q["stream"]))


def test_forecast_grows_with_the_ratio(tiny):
    model, _, st = tiny
    totals = [predict(st, MoDeGPTConfig(ratio=r), model.config)["total"] for r in (0.1, 0.3, 0.5)]
    assert totals[0] < totals[1] < totals[2]


def test_best_allocation_is_the_lowest_forecast_within_the_budget(tiny):
    model, _, st = tiny
    config, rows = best_allocation(st, "modegpt", 0.3, model.config)
    uniform = predict(st, MoDeGPTConfig(ratio=0.3), model.config)
    assert rows[0]["config"] is config and rows[0]["total"] <= uniform["total"]
    fair = [r for r in rows if r["params"] <= uniform["params"] + 0.005 * st.params_blocks]
    assert rows[0]["total"] == min(r["total"] for r in fair)
    assert {r["label"] for r in rows} >= {"uniform", "auto ε=0.1", "spare first 1", "spare last 1"}
    with pytest.raises(ValueError, match="no per-layer allocation"):
        best_allocation(st, "slicegpt", 0.3, model.config)


def test_cache_collects_once_per_model_and_calibration(tiny, monkeypatch):
    from compression import preview_statistics
    from compression.data import TextSpec

    model, tokens, st = tiny
    calls = []
    monkeypatch.setattr(preview_statistics, "collect", lambda *a, **k: calls.append(1) or st)
    cache = StatisticsCache(size=2)
    spec = TextSpec(8, 32, source="wiki")
    for _ in range(2):
        assert cache.get_or_collect("smollm2-135m", model, spec, lambda: tokens) is st
    assert len(calls) == 1
    cache.get_or_collect("smollm2-135m", model, TextSpec(8, 32, source="code"), tokens)
    cache.get_or_collect("smollm2-135m", model, TextSpec(4, 32, source="wiki"), tokens)
    assert len(calls) == 3 and cache.get("smollm2-135m", spec) is None  # the oldest went


def test_grams_can_go_and_other_ridges_then_fail_clearly(tiny):
    model, tokens, _ = tiny
    st = collect(model, tokens, batch_size=8)
    wide = predict(st, MoDeGPTConfig(ratio=0.3, ridge=10.0), model.config)  # built on first use
    assert "modegpt:10" in st.layers[0].mlp and wide["total"] > 0
    held = st.nbytes()
    st.drop_grams()
    assert st.nbytes() == held - sum(4 * (64 * 64 + 96 * 96) for _ in range(4)) > 0  # float32 Grams gone
    predict(st, MoDeGPTConfig(ratio=0.3), model.config)
    with pytest.raises(ValueError, match="collect again"):
        predict(st, MoDeGPTConfig(ratio=0.3, ridge=3.0), model.config)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compression.models import DEFAULT_MODEL, resolve_source

    folder = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(resolve_source(DEFAULT_MODEL))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _preview(capsys, *args):
    from compression.__main__ import main

    code = main(["preview", "--calibration", "wiki", "--calib-samples", "4", "--calib-len", "32", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_cli_prints_one_json_row_per_ratio(tiny_folder, capsys):
    code, data = _preview(capsys, "--model", str(tiny_folder), "--method", "modegpt", "--ratios", "0.1,0.2,0.3")
    assert code == 0
    assert [r["ratio"] for r in data["rows"]] == [0.1, 0.2, 0.3]
    for row in data["rows"]:
        assert len(row["predicted_error"]) == len(row["attn"]) == len(row["mlp"]) == 3
        assert all(isinstance(v, float) for v in row["predicted_error"])
    params = [r["params"] for r in data["rows"]]
    assert params[0] > params[1] > params[2]
    assert data["calibration"]["samples"] == 4 and len(data["block_influence"]) == 3


def test_cli_takes_manual_values_and_best_allocation(tiny_folder, capsys):
    code, data = _preview(capsys, "--model", str(tiny_folder), "--method", "olica", "--layer-sparsity", "0,0.5,0.2",
                          "--calibrate-layers", "0")
    assert code == 0 and len(data["rows"]) == 1
    assert data["rows"][0]["sparsity"] == [0.0, 0.5, 0.2] and data["rows"][0]["mlp"][0] == 0.0
    code, data = _preview(capsys, "--model", str(tiny_folder), "--method", "modegpt", "--ratios", "0.2",
                          "--allocation", "best")
    assert code == 0 and data["rows"][0]["allocation"]
    code, data = _preview(capsys, "--model", str(tiny_folder), "--method", "layerdrop", "--layers", "1")
    assert code == 0 and data["rows"][0]["dropped"] == [1]


@pytest.mark.parametrize("args, message", [
    (["--method", "modegpt", "--ratio", "0.2", "--ratios", "0.1"], "not both"),
    (["--method", "modegpt", "--ratios", "0.1,x"], "cannot read --ratios"),
    (["--method", "slicegpt", "--allocation", "best"], "has none"),
    (["--method", "layerdrop", "--leverage-ridge", "2"], "does not apply")])
def test_cli_usage_errors_exit_2_before_loading(args, message, capsys):
    code, err = _preview(capsys, "--model", "no/such-model", *args)
    assert code == 2 and message in err


def test_figures_draw_the_forecast_and_the_measured_errors_over_it(tiny):
    import viz

    model, tokens, st = tiny
    p = predict(st, MoDeGPTConfig(ratio=0.3), model.config)
    fig = viz.preview_errors_figure(p)
    assert [t.name for t in fig.data] == ["attention (forecast)", "MLP (forecast)", "block update (forecast)"]
    assert list(fig.data[0].y) == pytest.approx(p["attn"])
    measured = {"attn": [0.1, 0.2, None, 0.3], "mlp": [0.2, 0.1, 0.3, 0.4], "per_layer": [0.15] * 4}
    fig = viz.preview_errors_figure(p, measured)
    names = [t.name for t in fig.data]
    assert "attention (measured)" in names and "block update (measured)" in names
    assert list(fig.data[names.index("attention (measured)")].y) == [0.1, 0.2, None, 0.3]
    drop = predict(st, LayerDropConfig(layers=(2,)), model.config)
    assert len(viz.preview_errors_figure(drop).layout.shapes) == 1  # the dropped block shaded
    assert viz.preview_errors_figure({}).layout.annotations[0].text == "no data"

    rows = [{"ratio": r, "total": predict(st, MoDeGPTConfig(ratio=r), model.config)["total"]} for r in (0.3, 0.1, 0.2)]
    fig = viz.tradeoff_figure(rows, [{"ratio": 0.2, "total": 0.5, "label": "run 1", "ppl": 30.0}], current=0.25)
    assert list(fig.data[0].x) == [0.1, 0.2, 0.3] and fig.data[1].name == "runs (measured)"
    assert "ppl 30.00" in fig.data[1].text[0]
    assert viz.tradeoff_figure([], []).layout.annotations[0].text == "no data"


def test_tradeoff_curve_and_a_run_as_a_measured_point(tiny):
    from compression.preview import run_point, tradeoff_curve

    model, tokens, st = tiny
    curve = tradeoff_curve(st, "olica", model.config, {"allocation": "manual", "layer_sparsity": (0.1,) * 4,
                                                       "calibrate_layers": 0}, ratios=(0.1, 0.3, 0.5))
    assert [r["ratio"] for r in curve] == [0.1, 0.3, 0.5]
    assert curve[0]["total"] < curve[1]["total"] < curve[2]["total"]
    assert curve[1]["total"] == predict(st, OlicaConfig(ratio=0.3, calibrate_layers=0), model.config)["total"]
    report = compress(model, OlicaConfig(ratio=0.3, calibrate_layers=0), tokens).report
    point = run_point(report, st, "run 1")
    assert point["label"] == "run 1" and point["ratio"] == pytest.approx(report.ratio_achieved)
    assert point["total"] == measured_errors(report, st)["total"] > 0


def test_bench_section_replaces_only_its_own_markers(tmp_path):
    from bench import preview as bench

    assert bench.spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert bench.spearman([1, 2], [1, 2]) is None
    rows = [{"label": f"modegpt {r} auto", "method": "MoDeGPTConfig", "params": 1e8, "ppl": 10 + 40 * r,
             "predicted": {"total": r, "attn": [r, 2 * r], "mlp": [r, 3 * r], "predicted_error": [r, 2 * r]},
             "measured": {"attn": [r, 2.1 * r], "mlp": [0.9 * r, 3 * r], "mlp_before_calibration": [None, None]}}
            for r in (0.1, 0.25)]
    result = {"machine": {"device": "cpu", "threads": 2, "load_average": 1.0},
              "settings": {"model": "m", "calibration": [4, 8, "wiki"], "windows": 2, "held_out_sequences": 2},
              "collect_s": 1.0, "predict_ms": 0.5, "predict_ms_max": 2.0, "dense_ppl": 9.0,
              **bench.correlations(rows, None), "rows": rows,
              "best_allocation": {"ratio": 0.25, "pick": "uniform", "ppl": 20.0, "auto_ppl": 21.0, "auto_total": 0.3,
                                  "auto_params": 1e8, "top": [{"label": "uniform", "total": 0.2, "params": 1e8,
                                                               "ppl": 20.0}], "candidates": []}}
    assert 0.95 < result["spearman"] < 1 and result["spearman_ppl"] is None  # 2 settings only
    path = tmp_path / "B.md"
    path.write_text("# head\n\nkept text\n")
    for _ in range(2):
        bench.write_section(path, result)
    text = path.read_text()
    assert text.startswith("# head\n\nkept text\n") and text.count(bench.SECTION[0]) == 1
    assert "| modegpt 0.25 auto | 100.0 M | 0.250 | 20.00 |" in text and "Where the forecast is wrong" in text
