"""The benchmark's table and summary lines from constructed rows (no model, no lm-eval)."""
from compression import bench


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
    assert lines[1].endswith("then olica 35.00, layerdrop 90.00")


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
