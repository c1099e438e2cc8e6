"""BENCHMARKS.md sections beyond the sweep table: the headline rows (``bench.headline``) and the
calibration-source comparison (``bench.calibration_sources``). Each takes the loaded JSON and returns
Markdown; a missing file gives no section."""
from __future__ import annotations

from pathlib import Path

from compression.files import read_json
from compression.methods import METHODS

HEADLINE = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")


def _ci(value, ci, spec=".2f") -> str:
    if value is None:
        return "—"
    return format(value, spec) + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


def _acc(row: dict, task: str) -> str:
    acc, se = row.get("zero_shot", {}).get(task), row.get("zero_shot_stderr", {}).get(task)
    return "—" if acc is None else f"{acc:.3f}" + (f" ±{1.96 * se:.3f}" if se is not None else "")


def _ppl(row: dict, key: str) -> tuple:
    """(value, interval) of a row's perplexity on ``key`` ("ppl_wiki"/"ppl_code"); dense rows keep it
    under ``dense``."""
    p = row.get(key) or {}
    if "compressed" in p:
        return p["compressed"], p.get("compressed_ci")
    return p.get("dense"), p.get("dense_ci")


def _agreement(row: dict, key: str) -> str:
    a = row.get(key) or {}
    if not a:
        return "—"
    return f"{a['kl']:.3f} / {a['top1']:.3f}"


def _overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def headline_rows(paths: list[Path]) -> tuple[list[dict], dict]:
    rows, settings = [], {}
    for path in paths:
        data = read_json(path)
        rows += data["rows"]
        settings = settings or data["settings"]
    order = ("dense", *METHODS)
    rows.sort(key=lambda r: (r["ratio"], order.index(r["method"]) if r["method"] in order else 9))
    return rows, settings


def headline_section(paths: list[Path], title: str = "") -> str:
    """The headline table (every row of ``paths``), its settings and the per-ratio ranking lines."""
    if not paths:
        return ""
    rows, s = headline_rows(paths)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"}) or s.get("ratios") or [s["ratio"]]
    title = title or f"Headline rows at ratio {', '.join(f'{r:g}' for r in ratios)}: enough items to rank"
    n = s["limit"]
    tasks = HEADLINE if n else ()
    head = ["method", "ratio", "params (M)", "wiki ppl [95%]", "code ppl [95%]", "wiki KL / top-1", "code KL / top-1",
            "chat KL [95%]", "chat top-1", *tasks, *(["0-shot avg [95%]"] if n else []), "compress s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        chat = r.get("agreement_chat") or {}
        lines.append("| " + " | ".join([
            r["method"], f"{r['ratio']:g}", f"{r['params'] / 1e6:.1f}", _ci(*_ppl(r, "ppl_wiki")), _ci(*_ppl(r, "ppl_code")),
            _agreement(r, "agreement_wiki"), _agreement(r, "agreement_code"),
            _ci(chat.get("kl"), chat.get("kl_ci"), ".3f"), _ci(chat.get("top1"), None, ".3f"),
            *[_acc(r, t) for t in tasks],
            *([_ci(r.get("zero_shot_avg"), r.get("zero_shot_avg_ci"), ".3f")] if n else []),
            "—" if r.get("compress_seconds") is None else f"{r['compress_seconds']:.0f}",
            "—" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:.0f}"]) + " |")
    zero_shot = (f"""Zero-shot: the first {n} items of each task (±1.96 stderr from lm-eval per
task; the average's interval is 1.96 · sqrt(Σ se²) / 5, about ±{100 * 1.96 * (0.25 / (5 * n)) ** 0.5:.1f}
points at this n).""" if n else "Zero-shot was not run for these rows (`--limit 0`).")
    return f"""
## {title}

`python -m bench.headline --model {s['model']}` ({', '.join(f'`{p}`' for p in paths)}): dense and each method's
best variant (MoDeGPT with automatic allocation; Olica with its linear calibration; SliceGPT and layer
dropping at the same parameter target), calibrated on {s['calibration'][0]} × {s['calibration'][1]} wiki
tokens. Perplexity on {s['wiki_windows']} wiki and {s['code_windows']} code windows of 1024 tokens, with 95%
bootstrap intervals over windows; KL(dense ‖ compressed) and top-1 agreement on the same windows; chat
agreement on the dense model's greedy replies to {s['chat_conversations']} held-out instructions (reply
tokens only, template applied). {zero_shot}

{chr(10).join(lines)}

{chr(10).join(ranking([r for r in rows if r["ratio"] in (0.0, ratio)], ratio) for ratio in ratios)}
"""


def scale_section(small: list[Path], big: list[Path]) -> str:
    """Per method and ratio present in both runs: what compression costs each model, as the compressed
    perplexity over the same model's dense perplexity and as KL to its own dense model (wiki windows)."""
    if not small or not big:
        return ""
    (a, sa), (b, sb) = headline_rows(small), headline_rows(big)
    dense = {id(rows): next((_ppl(r, "ppl_wiki")[0] for r in rows if r["method"] == "dense"), None) for rows in (a, b)}
    if None in dense.values():
        return ""
    at = lambda rows, m, q: next((r for r in rows if r["method"] == m and r["ratio"] == q), None)  # noqa: E731
    lines = ["| method | ratio | wiki ppl ÷ dense, small | wiki ppl ÷ dense, big | wiki KL, small | wiki KL, big |",
             "|---|---|---|---|---|---|"]
    for r in a:
        other = at(b, r["method"], r["ratio"]) if r["method"] != "dense" else None
        if other is None:
            continue
        lines.append(f"| {r['method']} | {r['ratio']:g} | {_ppl(r, 'ppl_wiki')[0] / dense[id(a)]:.2f} | "
                     f"{_ppl(other, 'ppl_wiki')[0] / dense[id(b)]:.2f} | {r['agreement_wiki']['kl']:.3f} | "
                     f"{other['agreement_wiki']['kl']:.3f} |")
    if len(lines) == 2:
        return ""
    return f"""
### What each method loses: {sa['model']} (small) vs {sb['model']} (big)

Each model against its own dense perplexity and logits (small: {sa['calibration'][0]} × {sa['calibration'][1]}
calibration tokens, {sa['wiki_windows']} windows; big: {sb['calibration'][0]} × {sb['calibration'][1]}, {sb['wiki_windows']} windows).

{chr(10).join(lines)}
"""


# The sweep's label (bench/results.json) for each headline method: the variant the headline runs.
SWEEP_LABEL = {name: m.headline_label for name, m in METHODS.items()}


def ratio_section(sweep: list[dict], big: list[Path]) -> str:
    """Wiki perplexity ÷ the model's own dense, by target ratio: the small model's sweep rows
    (``bench/results.json``) next to the big model's headline rows, for every method and ratio the
    big run has."""
    if not sweep or not big:
        return ""
    b, sb = headline_rows(big)
    small_model = next((r.get("model") for r in sweep if r.get("model")), "small")
    dense_small = next((r["ppl"] for r in sweep if r["method"] == "dense"), None)
    dense_big = next((_ppl(r, "ppl_wiki")[0] for r in b if r["method"] == "dense"), None)
    ratios = sorted({r["ratio"] for r in b if r["method"] != "dense"})
    if not dense_small or not dense_big or not ratios:
        return ""
    lines = []
    for method, label in SWEEP_LABEL.items():
        cells = []
        for q in ratios:
            small = next((r["ppl"] for r in sweep if r["method"] == label and r["ratio"] == q), None)
            large = next((_ppl(r, "ppl_wiki")[0] for r in b if r["method"] == method and r["ratio"] == q), None)
            cells.append(f"{small / dense_small:.2f} → {large / dense_big:.2f}" if small and large else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = "| method | " + " | ".join(f"{q:g}" for q in ratios) + " |"
    return f"""
### Perplexity ÷ dense by ratio: {small_model} → {sb['model']}

Each cell: the small model's wiki perplexity over its dense one (the sweep above: {dense_small:.2f} dense,
its own calibration and windows) → the big model's (the headline rows: {dense_big:.2f} dense,
{sb['calibration'][0]} × {sb['calibration'][1]} calibration tokens, {sb['wiki_windows']} windows). The two
protocols differ in window count and calibration size, so compare the ratios, not the perplexities.

{head}
{"|---" * (len(ratios) + 1)}|
{chr(10).join(lines)}
"""


def ranking(rows: list[dict], ratio: float) -> str:
    """Which compressed rows the intervals separate, for wiki ppl, chat KL and the zero-shot average."""
    comp = [r for r in rows if r["method"] != "dense"]
    if len(comp) < 2:
        return ""
    out = []
    for label, value, ci, lower_better in (
            ("wiki perplexity", lambda r: _ppl(r, "ppl_wiki")[0], lambda r: _ppl(r, "ppl_wiki")[1], True),
            ("code perplexity", lambda r: _ppl(r, "ppl_code")[0], lambda r: _ppl(r, "ppl_code")[1], True),
            ("chat KL", lambda r: (r.get("agreement_chat") or {}).get("kl"),
             lambda r: (r.get("agreement_chat") or {}).get("kl_ci"), True),
            ("zero-shot average", lambda r: r.get("zero_shot_avg"), lambda r: r.get("zero_shot_avg_ci"), False)):
        have = [r for r in comp if value(r) is not None and ci(r)]
        if len(have) < 2:
            continue
        ranked = sorted(have, key=value, reverse=not lower_better)
        first, second = ranked[0], ranked[1]
        apart = not _overlap(ci(first), ci(second))
        out.append(f"- {label}: " + " > ".join(r["method"] for r in ranked) + f" (best first); "
                   f"{first['method']} vs {second['method']}: intervals "
                   + ("do not overlap" if apart else "overlap — not separated at this sample size"))
    return (f"Ranking at {ratio:g} by each measure, and whether the top two are told apart:\n\n"
            + "\n".join(out) + "\n")


def calibration_section(path: Path) -> str:
    if not path.exists():
        return ""
    data = read_json(path)
    s = data["settings"]
    head = ["method", "ratio", "calibration", "wiki ppl [95%]", "code ppl [95%]", "chat KL [95%]",
            "chat top-1 [95%]", "compress + measure s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = tuple(METHODS)
    rows = sorted(data["rows"], key=lambda r: (-r["ratio"], order.index(r["method"]) if r["method"] in order
                                               else 9, r["source"]))
    dense = rows[0]["ppl_wiki"]["dense"] if rows else None
    for r in rows:
        chat = r["agreement_chat"]
        lines.append("| " + " | ".join([
            r["method"], f"{r['ratio']:g}", r["source"], _ci(r["ppl_wiki"]["compressed"], r["ppl_wiki"]["compressed_ci"]),
            _ci(r["ppl_code"]["compressed"], r["ppl_code"]["compressed_ci"]),
            _ci(chat["kl"], chat.get("kl_ci"), ".3f"), _ci(chat["top1"], chat.get("top1_ci"), ".3f"),
            f"{r['seconds']:.0f}"]) + " |")
    code_dense = rows[0]["ppl_code"]["dense"] if rows else None
    defaults = ", ".join(f"{m.name} `{m.calibration}`" for m in METHODS.values())
    return f"""
## Calibration source: what keeps the chat

`python -m bench.calibration_sources` (rows in `bench/calibration_sources.json`): each method's best
variant calibrated on {s['calibration'][0]} × {s['calibration'][1]} tokens of the Wikipedia split (`wiki`), of
the model's own replies to the shipped instructions under its chat template (`self-chat`), or half of
each (`wiki+self-chat`). Perplexity on
{s['windows']} windows of 1024 tokens per domain (dense: wiki {dense:.2f}, code {code_dense:.2f}); chat agreement
on the dense model's greedy replies to {s['chat_conversations']} held-out instructions (reply tokens only).
Times include the dense references of the first row and were taken while other jobs shared the 2 cores.

{chr(10).join(lines)}

Each method's default source (`compression/methods.py`, used by the CLI and the app unless one is
picked): {defaults}.
"""
