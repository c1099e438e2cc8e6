"""The benchmark's table and summary lines from constructed rows (no model, no lm-eval)."""
import pytest

from bench import runner as bench


def row(method, ratio, ppl, params, zs=None):
    return {"model": "m", "method": method, "ratio": ratio, "ppl": ppl, "params": params,
            "prefill_tok_s": 100.0, "decode_tok_s": 10.0, "zero_shot_avg": zs}


ROWS = [row("dense", 0.0, 10.0, 100, 0.5), row("layerdrop", 0.25, 90.0, 75, 0.40),
        row("modegpt", 0.25, 30.0, 76, 0.45), row("olica", 0.25, 35.0, 76),
        row("slicegpt-slicing", 0.25, 20.0, 88), row("modegpt", 0.1, 15.0, 90, 0.48)]


def test_best_by_ratio_picks_lowest_ppl_and_ignores_slicing_rows():
    lines = bench.best_by_ratio(ROWS).splitlines()
    assert len(lines) == 2  # one per target ratio, dense excluded
    assert lines[0].startswith("- 0.10: **modegpt**, ppl 15.00 (dense 10.00, 1.50×)")
    assert lines[1].startswith("- 0.25: **modegpt**, ppl 30.00")  # not slicegpt-slicing's 20.00
    assert "zero-shot 0.450 (dense 0.500)" in lines[1] and "0.760× the dense parameters" in lines[1]
    assert "then olica 35.00, layerdrop 90.00." in lines[1]
    assert "modegpt vs olica: no perplexity interval recorded" in lines[1]


def _se(value):
    return {t: value for t in bench.HEADLINE}


def test_separation_of_the_top_two_uses_their_intervals():
    a = dict(row("modegpt", 0.25, 30.0, 76, 0.45), zero_shot_stderr=_se(0.07), ppl_ci=[29.0, 31.0])
    b = dict(row("olica", 0.25, 35.0, 76, 0.42), zero_shot_stderr=_se(0.07), ppl_ci=[33.5, 36.5])
    text = bench.separation(a, b)
    assert "perplexity intervals do not overlap" in text and "does not separate them" in text
    near = dict(b, ppl_ci=[30.5, 36.0], zero_shot_avg=0.20, zero_shot_stderr=_se(0.01))
    text = bench.separation(dict(a, zero_shot_stderr=_se(0.01)), near)
    assert "perplexity intervals overlap" in text and "separated by their 95% intervals" in text
    assert bench.zero_shot_interval(a) == pytest.approx(1.96 * (5 * 0.07 ** 2) ** 0.5 / 5)
    assert "0.450 ±0.061" in bench.table([a])


def test_table_has_a_line_per_row_sorted_by_ratio():
    text = bench.table(ROWS)
    body = text.splitlines()[2:]
    assert len(body) == len(ROWS)
    assert body[0].startswith("| dense | 0.00") and body[1].startswith("| modegpt | 0.10")


def test_respeed_note_names_the_rows_left_out_of_the_last_round():
    assert bench.respeed_note(ROWS) == ""
    rows = [dict(r, speed_round="2026-01-02 10:00") for r in ROWS[:-1]]
    rows += [dict(ROWS[-1], speed_round="2026-01-01 09:00")]
    note = bench.respeed_note(rows)
    assert "2026-01-02 10:00" in note and note.endswith("keep their own measurement: modegpt 0.1.")


def _headline(method, wiki, wiki_ci, avg, avg_ci):
    ppl = {"compressed": wiki, "compressed_ci": wiki_ci} if method != "dense" else {"dense": wiki, "dense_ci": wiki_ci}
    return {"method": method, "ratio": 0.0 if method == "dense" else 0.25, "params": 1e8, "ppl_wiki": ppl, "ppl_code": ppl, "zero_shot_avg": avg,
            "zero_shot_avg_ci": avg_ci, "zero_shot": {"piqa": avg}, "zero_shot_stderr": {"piqa": 0.02},
            "agreement_wiki": {"kl": 0.5, "top1": 0.6}}


def test_headline_section_ranks_and_says_which_intervals_separate(tmp_path):
    import json

    from bench.sections import headline_section
    rows = [_headline("dense", 13.0, [12.0, 14.0], 0.50, [0.48, 0.52]),
            _headline("olica", 35.0, [33.0, 37.0], 0.44, [0.42, 0.46]),
            _headline("modegpt", 28.0, [26.0, 30.0], 0.45, [0.43, 0.47])]
    settings = {"model": "m", "ratio": 0.25, "limit": 300, "calibration": [64, 512], "wiki_windows": 16, "code_windows": 16,
                "chat_conversations": 32}
    path = tmp_path / "headline.json"
    path.write_text(json.dumps({"settings": settings, "rows": rows}))
    text = headline_section([path])
    assert text.index("| dense |") < text.index("| modegpt |") < text.index("| olica |")
    assert "28.00 [26.00, 30.00]" in text and "0.450 [0.430, 0.470]" in text and "0.500 ±0.039" in text
    assert "- wiki perplexity: modegpt > olica (best first); modegpt vs olica: intervals do not overlap" in text
    assert "- zero-shot average: modegpt > olica (best first); modegpt vs olica: intervals overlap" in text
    assert headline_section([]) == ""


def _write(path, rows, **settings):
    import json

    base = {"model": "m", "ratios": [0.25], "limit": 300, "calibration": [64, 512], "wiki_windows": 16,
            "code_windows": 16, "chat_conversations": 32}
    path.write_text(json.dumps({"settings": {**base, **settings}, "rows": rows}))
    return path


def test_headline_without_zero_shot_has_no_zero_shot_columns(tmp_path):
    from bench.sections import headline_section

    rows = [{k: v for k, v in _headline(m, w, [w - 1, w + 1], 0, None).items() if not k.startswith("zero_shot")}
            for m, w in (("dense", 10.0), ("modegpt", 20.0))]
    text = headline_section([_write(tmp_path / "h.json", rows, limit=0)])
    assert "not run" in text and "piqa" not in text and "0-shot" not in text
    assert "| modegpt | 0.25 | 100.0 | 20.00 [19.00, 21.00] |" in text


def test_scale_section_divides_each_model_by_its_own_dense(tmp_path):
    from bench.sections import scale_section

    small = _write(tmp_path / "s.json", [_headline("dense", 10.0, [9, 11], 0.5, None),
                                         _headline("olica", 30.0, [29, 31], 0.4, None)])
    big = [_headline("dense", 8.0, [7, 9], 0.5, None), _headline("olica", 12.0, [11, 13], 0.4, None)]
    big[1]["agreement_wiki"] = {"kl": 0.25, "top1": 0.7}
    big = _write(tmp_path / "b.json", big, model="q")
    text = scale_section([small], [big])
    assert "| olica | 0.25 | 3.00 | 1.50 | 0.500 | 0.250 |" in text and "m (small) vs q (big)" in text
    assert scale_section([small], []) == ""


def test_ratio_section_puts_each_models_loss_side_by_side(tmp_path):
    from bench.sections import ratio_section

    sweep = [{"model": "s", "method": "dense", "ratio": 0.0, "ppl": 10.0},
             {"model": "s", "method": "modegpt-auto", "ratio": 0.1, "ppl": 15.0},
             {"model": "s", "method": "modegpt", "ratio": 0.25, "ppl": 99.0},  # uniform: not the headline variant
             {"model": "s", "method": "modegpt-auto", "ratio": 0.25, "ppl": 30.0}]
    big = [_headline("dense", 8.0, [7, 9], 0.5, None), _headline("modegpt", 12.0, [11, 13], 0.4, None),
           {**_headline("modegpt", 10.0, [9, 11], 0.4, None), "ratio": 0.1},
           _headline("layerdrop", 16.0, [15, 17], 0.4, None)]
    text = ratio_section(sweep, [_write(tmp_path / "b.json", big, model="q")])
    assert "| method | 0.1 | 0.25 |" in text and "s → q" in text
    assert "| modegpt | 1.50 → 1.25 | 3.00 → 1.50 |" in text
    assert "| layerdrop |" not in text  # no sweep row to compare with
    assert ratio_section([], [tmp_path / "b.json"]) == "" and ratio_section(sweep, []) == ""


def test_inference_section_names_what_falls_short_of_the_target():
    from bench.latency import inference_markdown

    def row(p, d):
        return {"prefill_tok_s": 100 * p, "decode_tok_s": 10 * d, "prefill_vs_dense": p, "decode_vs_dense": d}

    inf = {"ratio": 0.25, "params": {"dense": 134e6, "modegpt": 108e6},
           "settings": [{"batch": 1, "prompt_len": 512, "new_tokens": 64, "rounds": 5,
                         "models": {"dense": row(1, 1), "modegpt": row(1.1, 1.0)}},
                        {"batch": 16, "prompt_len": 128, "new_tokens": 32, "rounds": 5,
                         "models": {"dense": row(1, 1), "modegpt": row(1.2, 1.125)}}]}
    text = "\n".join(inference_markdown(inf))
    assert "| modegpt | 108.0 M | 110 (1.10×) | 10.0 (1.00×) | 120 (1.20×) | 11.2 (1.12×) |" in text
    assert "Below it: modegpt decode (1.125×)." in text and "prefill (" not in text


def test_compress_cost_section_gives_the_ratio_to_the_forward_and_the_sweeps_ppl(tmp_path):
    from bench import compress_cost

    result = {"machine": {"threads": 2}, "settings": {"calibration": [64, 512, "wiki"], "ppl_windows": 32},
              "target_per_forward": 1.5,
              "rows": [{"method": "olica", "ratio": 0.25, "forward_s": 50.0, "compress_s": 66.0, "per_forward": 1.32,
                        "ppl": 35.59, "stages": {"forwards": 40.0, "statistics": 17.0, "copy": 0.01}}]}
    path = tmp_path / "compress_cost.json"
    path.write_text(__import__("json").dumps(result))
    text = compress_cost.section(path)
    assert text.startswith("\n" + compress_cost.SECTION[0])
    row = next(line for line in text.splitlines() if line.startswith("| olica"))
    assert "1.32×" in row and "forwards 40.0 · statistics 17.0 |" in row  # largest first, tiny stages left out
    assert "35.59 (35.59)" in row  # the sweep's perplexity from bench/results.json beside it
