"""Benchmark smoke run: one ratio, every method, tiny limits, on a tiny model with the real tokenizer."""
import json

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench import runner as bench
from compression.models import resolve_source

pytestmark = pytest.mark.slow  # lm-eval builds its task objects per row: minutes, not seconds


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024, tie_word_embeddings=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bench_smoke_writes_rows_markdown_and_plots(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    keep = tmp_path / "kept"
    rows = bench.run(out, str(tiny_folder), ratios=(0.25,), slicing=(0.25,), limit=2,
                     tasks=("arc_easy", "piqa"), calib=(4, 64), eval_windows=2, log=lambda m: None,
                     keep=keep)
    methods = sorted(r["method"] for r in rows)
    assert methods == ["dense", "layerdrop", "modegpt", "olica", "slicegpt", "slicegpt-slicing"]
    for r in rows:
        for key in ("params", "ppl", "prefill_tok_s", "decode_tok_s", "peak_mem_mb"):
            assert r[key] is not None, (r["method"], key)
        assert set(r["zero_shot"]) == {"arc_easy", "piqa"}
        assert r["zero_shot_avg"] is None  # the headline average needs all five tasks
        if r["method"] != "dense":
            assert r["decode_speedup"] > 0 and r["ratio_achieved"] is not None
    dense = next(r for r in rows if r["method"] == "dense")
    assert all(r["params"] < dense["params"] for r in rows if r["method"] in ("layerdrop", "modegpt", "olica"))
    # A rerun resumes: nothing is recomputed, nothing duplicated.
    again = bench.run(out, str(tiny_folder), ratios=(0.25,), slicing=(0.25,), limit=2,
                      tasks=("arc_easy", "piqa"), calib=(4, 64), eval_windows=2,
                      log=lambda m: pytest.fail(f"recomputed {m}"))
    assert len(again) == len(rows)
    # Rows measured with zero-shot also serve a run that asks for none.
    bench.run(out, str(tiny_folder), ratios=(0.25,), slicing=(0.25,), tasks=(), calib=(4, 64),
              eval_windows=2, log=lambda m: pytest.fail(f"recomputed {m}"))
    # Every kept model's speed measured again side by side with dense; the rows are updated in place.
    assert len(list(keep.glob("*/config.json"))) == len(rows) - 1
    again = bench.respeed(out, keep, str(tiny_folder), rounds=1, log=lambda m: None)
    assert all(r.get("speed_round") for r in again) and len(again) == len(rows)
    assert all(r["decode_speedup"] > 0 for r in again if r["method"] != "dense")
    md = tmp_path / "BENCHMARKS.md"
    bench.write_markdown(out / "results.json", md, tmp_path / "assets", "python -m bench")
    text = md.read_text()
    assert text.count("\n| ") >= 1 + len(rows) and "olica" in text
    assert len(list((tmp_path / "assets").glob("*.png"))) == 2
    assert json.loads((out / "results.json").read_text())["machine"]["threads"] >= 1


def test_headline_with_limit_zero_measures_perplexity_and_agreement_only(tiny_folder, tmp_path):
    from bench import headline

    out = tmp_path / "headline.json"
    headline.main(["--model", str(tiny_folder), "--methods", "dense,olica", "--limit", "0", "--windows", "2",
                   "--code-windows", "2", "--chat", "2", "--calib", "4x64", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "olica"]
    assert not any(k.startswith("zero_shot") for r in rows for k in r)
    olica = rows[1]
    assert olica["ppl_code"]["compressed"] > 0 and olica["agreement_wiki"]["kl"] > 0
    assert olica["params"] < rows[0]["params"]


def test_scaling_reads_the_os_peak_of_each_mode_and_plots(tiny_folder, tmp_path):
    from bench import scaling

    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    scaling.main(["--models", str(tiny_folder), "--calib", "4x64", "--windows", "1", "--out", str(out),
                  "--plot", str(png)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["offload", "no-offload"]
    for r in rows:
        assert r["max_rss_mb"] > 50 and r["peak_memory_mb"] > 0 and r["ppl_compressed"] > 0
    assert rows[0]["ppl_compressed"] == pytest.approx(rows[1]["ppl_compressed"], rel=1e-5)
    assert png.stat().st_size > 10_000


def test_refit_shrinkage_bench_reads_its_grid_and_writes_its_table(tmp_path):
    from bench import refit_shrinkage

    rows = refit_shrinkage.parse_grid(["32x512:wiki+self-chat:0,0.5", "64x512:wiki:0.15"])
    assert rows == [(32, 512, "wiki+self-chat", 0.0), (32, 512, "wiki+self-chat", 0.5), (64, 512, "wiki", 0.15)]
    result = {"settings": {"ratio": 0.25, "windows": 8, "default": 0.5}, "dense_ppl": 13.32,
              "rows": [{"samples": 32, "seq_len": 512, "source": "wiki", "mu": m, "ppl": p, "kl": 0.9,
                        "compress_s": 55.0} for m, p in ((0.5, 29.9), (0.0, 31.6))]}
    (tmp_path / "refit_shrinkage.json").write_text(json.dumps(result))
    text = refit_shrinkage.section(tmp_path / "refit_shrinkage.json")
    assert text.index("| 0 | 31.60 |") < text.index("| 0.5 | 29.90 |")  # rows by μ within a calibration
    assert refit_shrinkage.SECTION[0] in text and "6,144 / n for n calibration tokens" in text
    assert refit_shrinkage.section(tmp_path / "absent.json") == ""
