"""The benchmark: dense plus every method at several ratios on the same footing.

Every row starts from a fresh load of the dense model, uses the same calibration tokens and the same
evaluation (wiki perplexity, lm-eval zero-shot with a fixed per-task limit, prefill/decode speed in this
one process with the same thread count). Rows are appended to ``results.json`` as they finish, and a
rerun skips rows already there, so a long benchmark survives interruptions.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from compression import SliceGPTConfig, compress
from compression.data import TextSpec, evaluation_windows
from compression.evaluate import perplexity, sizes, speed, speed_side_by_side
from compression.files import read_json, write_json_atomic
from compression.methods import METHODS
from compression.models import load_model

RATIOS = (0.10, 0.20, 0.25, 0.30)
SLICING = (0.10, 0.20, 0.25, 0.30)
# The five headline tasks (their average is the table's zero-shot column) plus BoolQ.
BENCH_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq")


def method_configs(ratios=RATIOS, slicing=SLICING, allocation: str = "uniform") -> list[tuple[str, float, object]]:
    """(method label, ratio or slicing, config) for every benchmark row except dense."""
    tag = "" if allocation == "uniform" else f"-{allocation}"
    rows = []
    for r in ratios:
        for m in METHODS.values():  # methods with an allocation knob take the sweep's, tagged
            spread = m.has_knob("allocation")
            rows.append((m.name + (tag if spread else ""), r,
                         m.make_config({"ratio": r, "allocation": allocation if spread else None})))
    rows += [("slicegpt-slicing", s, SliceGPTConfig(slicing=s)) for s in slicing]
    return rows


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def evaluate_row(model, tokenizer, windows, tasks, limit, dense=None) -> dict:
    """Sizes, perplexity, speed and zero-shot of ``model``; with ``dense`` (the uncompressed model)
    the speeds of both are measured side by side and the dense ones stored as ``dense_*``."""
    row = {**sizes(model), "ppl": perplexity(model, windows)}
    if dense is None:
        row.update(speed(model))
    else:
        both = speed_side_by_side({"dense": dense, "compressed": model})
        row.update(both["compressed"], **versus_dense(both["compressed"], both["dense"]))
    if tasks:
        from compression.zeroshot import zero_shot

        t0 = time.perf_counter()
        zs = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=limit)
        row["zero_shot_seconds"] = time.perf_counter() - t0
        row["zero_shot_limit"] = limit
        row["zero_shot_avg"] = zs["average"]
        row["zero_shot"] = {t: v["value"] for t, v in zs["tasks"].items()}
        row["zero_shot_stderr"] = {t: v["stderr"] for t, v in zs["tasks"].items()}
    return row


def versus_dense(speed: dict, dense: dict) -> dict:
    """The dense reference speeds stored with a row, and the row's speed-ups over them."""
    return {"dense_prefill_tok_s": dense["prefill_tok_s"], "dense_decode_tok_s": dense["decode_tok_s"],
            "prefill_speedup": speed["prefill_tok_s"] / dense["prefill_tok_s"],
            "decode_speedup": speed["decode_tok_s"] / dense["decode_tok_s"]}


def key(row: dict) -> tuple:
    return row["model"], row["method"], row["ratio"]


def run(out: Path, model_name: str = "smollm2-135m", ratios=RATIOS, slicing=SLICING,
        methods: tuple[str, ...] | None = None, tasks=None, limit: int | None = 100,
        calib: tuple[int, int] = (64, 512), eval_windows: int = 32, allocation: str = "uniform",
        device: str | None = None, log=print, rows=None, keep: Path | None = None) -> list[dict]:
    """Run (or resume) the benchmark; returns all rows of ``out/results.json``.

    rows: explicit (label, ratio, config) triples instead of every method at ``ratios``/``slicing``.
    tasks: zero-shot tasks (default ``BENCH_TASKS``; an empty tuple skips zero-shot).
    keep: save each compressed model under ``keep/<label>-<ratio>`` (see :func:`respeed`).
    """
    tasks = BENCH_TASKS if tasks is None else tasks
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = read_json(path) if path.exists() else {"rows": []}
    data["machine"], data["settings"] = machine(), {
        "model": model_name, "calibration": list(calib), "eval_windows": eval_windows,
        "zero_shot_limit": limit, "tasks": list(tasks)}
    # A row is done when it is there with everything this run asks for; a row measured without
    # zero-shot is measured again (and replaced) when zero-shot is asked, since the model is not kept.
    done = {key(r) for r in data["rows"] if set(tasks) <= set(r.get("zero_shot", {}))}

    def save(row):
        data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
        write_json_atomic(path, data)

    model, tokenizer = load_model(model_name, device)
    windows = evaluation_windows(tokenizer, eval_windows)
    calibration = TextSpec(*calib).batches(tokenizer)
    if (model_name, "dense", 0.0) not in done:
        log("dense")
        save({"model": model_name, "method": "dense", "ratio": 0.0,
              **evaluate_row(model, tokenizer, windows, tasks, limit)})
    del model
    todo = rows if rows is not None else method_configs(ratios, slicing, allocation)
    for label, ratio, config in todo:
        if methods and label.split("-")[0] not in methods:
            continue
        if (model_name, label, ratio) in done:
            continue
        log(f"{label} {ratio}")
        model, tokenizer = load_model(model_name, device)
        t0 = time.perf_counter()
        compressed, report = compress(model, config, calibration)
        row = {"model": model_name, "method": label, "ratio": ratio,
               "ratio_achieved": report.ratio_achieved, "compress_seconds": time.perf_counter() - t0,
               "calibration_seconds": report.calibration_seconds,
               "config": report.config}
        # A fresh dense copy (cached load, < 1 s) so each row's speeds are measured side by side:
        # timings on a shared machine drift, alternating rounds keeps the comparison fair.
        dense, _ = load_model(model_name, device)
        row.update(evaluate_row(compressed, tokenizer, windows, tasks, limit, dense=dense))
        save(row)
        if keep is not None:
            folder = kept_path(keep, label, ratio)
            compressed.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        del model, compressed, report, dense
    return data["rows"]


def kept_path(keep: Path, label: str, ratio: float) -> Path:
    return Path(keep) / f"{label}-{ratio:g}"


def respeed(out: Path, keep: Path, model_name: str = "smollm2-135m", rounds: int = 3,
            device: str | None = None, log=print) -> list[dict]:
    """Measure the speed of every kept model and the dense one again, all side by side in one
    process (rounds alternate over all of them), and update their rows of ``out/results.json``.

    Rows measured in different runs saw different machine load; this puts every row's speed on the
    same footing. Rows without a kept model keep their speeds and their ``speed_round``."""
    path = out / "results.json"
    data = read_json(path)
    rows = {key(r): r for r in data["rows"] if r["model"] == model_name}
    models = {("dense", 0.0): load_model(model_name, device)[0]}
    for (_, label, ratio), row in rows.items():
        folder = kept_path(keep, label, ratio)
        if label != "dense" and (folder / "config.json").exists():
            models[(label, ratio)] = load_model(str(folder), device)[0]
            params = sizes(models[(label, ratio)])["params"]
            if params != row["params"]:
                raise ValueError(f"{folder} has {params} parameters, its row {row['params']}: "
                                 "not the benchmarked model")
    log(f"speed of {len(models)} models, {rounds} rounds")
    speeds = speed_side_by_side(models, rounds=rounds)
    dense = speeds[("dense", 0.0)]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for (label, ratio), s in speeds.items():
        row = rows[(model_name, label, ratio)]
        row.update(s, speed_round=stamp)
        if label != "dense":
            row.update(versus_dense(s, dense))
    write_json_atomic(path, data)
    return data["rows"]


# --- BENCHMARKS.md ---------------------------------------------------------------------------------------

def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


HEADLINE = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")


def zero_shot_interval(row: dict) -> float | None:
    """95% half-width of a row's five-task average: 1.96 · sqrt(Σ se_i²) / 5 (independent tasks)."""
    se = row.get("zero_shot_stderr") or {}
    if row.get("zero_shot_avg") is None or not all(se.get(t) is not None for t in HEADLINE):
        return None
    return 1.96 * sum(se[t] ** 2 for t in HEADLINE) ** 0.5 / len(HEADLINE)


def _with_interval(value, half, spec=".3f") -> str:
    return _fmt(value, spec) + ("" if half is None or value is None else f" ±{half:{spec}}")


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r.get("zero_shot", {})})
    head = ["method", "ratio", "achieved", "params (M)", "wiki ppl", "0-shot avg ±95%", *tasks,
            "compress s", "prefill tok/s", "decode tok/s", "decode vs dense", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"dense": 0, **{m.name: m.table_rank for m in METHODS.values()}}
    rank = lambda label: next((i for name, i in order.items() if label.startswith(name)), 9)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["ratio"], rank(r["method"]), r["method"])):
        label = r["method"]
        cells = [label, _fmt(r["ratio"]), _fmt(r.get("ratio_achieved", 0.0), ".3f"),
                 _fmt(r["params"] / 1e6, ".1f"),
                 _fmt(r["ppl"]) + (" [{:.2f}, {:.2f}]".format(*r["ppl_ci"]) if r.get("ppl_ci") else ""),
                 _with_interval(r.get("zero_shot_avg"), zero_shot_interval(r)),
                 *[_fmt(r.get("zero_shot", {}).get(t), ".3f") for t in tasks],
                 _fmt(r.get("compress_seconds"), ".0f"), _fmt(r["prefill_tok_s"], ".0f"),
                 _fmt(r["decode_tok_s"], ".1f"), _fmt(r.get("decode_speedup"), ".2f") + ("×" if r.get("decode_speedup") else ""),
                 _fmt(r.get("peak_mem_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_by_ratio(rows: list[dict]) -> str:
    """A line per target ratio: the lowest-perplexity method and how it compares with dense.

    Only rows whose ``ratio`` is a fraction of block parameters compete (``-slicing`` rows are
    SliceGPT's hidden-size fraction and remove far fewer parameters, so they are left out here)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = []
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != "dense"}):
        rivals = [r for r in rows if r["ratio"] == ratio and r["method"] != "dense"
                  and not r["method"].endswith("-slicing")]
        if not rivals:
            continue
        best = min(rivals, key=lambda r: r["ppl"])
        text = f"- {ratio:.2f}: **{best['method']}**, ppl {best['ppl']:.2f}"
        if dense:
            text += f" (dense {dense['ppl']:.2f}, {best['ppl'] / dense['ppl']:.2f}×)"
            if best.get("zero_shot_avg") is not None and dense.get("zero_shot_avg") is not None:
                text += f", zero-shot {best['zero_shot_avg']:.3f} (dense {dense['zero_shot_avg']:.3f})"
            text += f", {best['params'] / dense['params']:.3f}× the dense parameters"
        others = sorted((r for r in rivals if r is not best), key=lambda r: r["ppl"])
        if others:
            text += "; then " + ", ".join(f"{r['method']} {r['ppl']:.2f}" for r in others)
            text += ". " + separation(best, others[0])
        lines.append(text)
    return "\n".join(lines)


def separation(best: dict, second: dict) -> str:
    """Whether the top two are told apart: perplexity intervals (rows that have them) and zero-shot
    average intervals."""
    notes = []
    if best.get("ppl_ci") and second.get("ppl_ci"):
        apart = not _overlap(tuple(best["ppl_ci"]), tuple(second["ppl_ci"]))
        notes.append(f"perplexity intervals {'do not overlap' if apart else 'overlap'}")
    else:
        notes.append("no perplexity interval recorded for these rows")
    hb, hs = zero_shot_interval(best), zero_shot_interval(second)
    if hb is not None and hs is not None:
        a = (best["zero_shot_avg"] - hb, best["zero_shot_avg"] + hb)
        b = (second["zero_shot_avg"] - hs, second["zero_shot_avg"] + hs)
        notes.append(f"zero-shot averages {best['zero_shot_avg']:.3f} vs {second['zero_shot_avg']:.3f} are "
                     + ("within each other's 95% interval: zero-shot does not separate them" if _overlap(a, b)
                        else "separated by their 95% intervals"))
    return f"{best['method']} vs {second['method']}: " + "; ".join(notes) + "."


def plots(rows: list[dict], assets: Path, stem: str) -> list[Path]:
    """ppl-vs-params and zero-shot-vs-params PNGs (matplotlib: static files need no browser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assets.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ylabel, log in (("ppl", "wiki perplexity", True), ("zero_shot_avg", "zero-shot average", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in sorted({r["method"] for r in rows}):  # one line per method label
            pts = sorted((r["params"] / 1e6, r[key]) for r in rows
                         if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="*" if method == "dense" else "o",
                        linestyle="none" if method == "dense" else "-", label=method, markersize=9)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:  # the zero-shot plot is empty when no row ran the five headline tasks
            ax.legend()
        path = assets / f"{stem}_{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def respeed_note(rows: list[dict]) -> str:
    """Which rows' speeds come from the last all-together round of :func:`respeed`."""
    stamps = sorted({r["speed_round"] for r in rows if r.get("speed_round")})
    if not stamps:
        return ""
    others = [f"{r['method']} {r['ratio']:g}" for r in rows if r.get("speed_round") != stamps[-1]]
    text = (f" Speeds were measured again on {stamps[-1]} for every kept model at once, all alternating"
            " with dense in one process (`python -m bench.sweep --respeed`)")
    return text + (f"; these rows keep their own measurement: {', '.join(others)}." if others else ".")


def write_markdown(results: Path, markdown: Path, assets: Path, command: str) -> None:
    data = read_json(results)
    rows, settings, m = data["rows"], data["settings"], data["machine"]
    stem = "bench_" + settings["model"].replace("/", "_").replace(".", "")
    pngs = plots(rows, assets, stem)
    rel = [p.relative_to(markdown.parent) if p.is_relative_to(markdown.parent) else p for p in pngs]
    limit = settings.get("zero_shot_limit")
    text = f"""# Benchmarks: {settings['model']}

Rows accumulate in `bench/results.json` from `make bench` (`python -m bench`: dense and
every method at each ratio) and `python -m bench.sweep` (the same rows plus method variants); both
resume, skipping rows already measured, and each row records its config. Last command: `{command}`

Machine: {m['processor']}, {m['platform']}, torch {m['torch']}, {m['threads']} threads, device {m['device']}.
Calibration: {settings['calibration'][0]} x {settings['calibration'][1]} tokens of the wiki calibration split.
Perplexity: the first {settings['eval_windows']} non-overlapping 1024-token windows of the held-out wiki split.
Zero-shot: lm-eval 0-shot on the offline task files, the first {limit if limit else 'all'} items of each
validation set (lm-eval's `limit`: the same items for every row, not a random sample)
(acc_norm for PIQA, HellaSwag, ARC; acc for WinoGrande, BoolQ); the average is over PIQA, HellaSwag,
ARC-e, ARC-c and WinoGrande, shown with its 95% interval from lm-eval's per-task standard errors
(1.96 · sqrt(Σ se²) / 5). At n = {limit} items a task accuracy has a 95% interval of about
±{_fmt(100 * 1.96 * (0.25 / limit) ** 0.5 if limit else 0, '.0f')} points, the five-task average about
±{_fmt(100 * 1.96 * (0.25 / (5 * limit)) ** 0.5 if limit else 0, '.0f')} points: this table is the cheap
overview, and zero-shot cannot separate rows whose intervals overlap.
`ratio` is the target fraction of decoder-block parameters removed (`slicegpt-slicing`: the paper's
slicing fraction of the hidden size); `achieved` is what the method removed, skip matrices and
calibration branches included. Speeds: prefill of a 512-token prompt and greedy decode of 128 tokens
with the KV cache (batch 1, fp32 on CPU), medians over rounds that alternate between the compressed
and the dense model in one process; "decode vs dense" divides by that dense measurement.{respeed_note(rows)}

{table(rows)}

Lowest perplexity at each target ratio (computed from the rows above):

{best_by_ratio(rows)}

![perplexity vs parameters]({rel[0]})
![zero-shot vs parameters]({rel[1]})
"""
    from .sections import calibration_section, headline_section, ratio_section, scale_section

    text += headline_section(sorted(results.parent.glob("headline*.json")))
    text += calibration_section(results.parent / "calibration_sources.json")
    text += headline_section(sorted((results.parent / "qwen").glob("headline*.json")),
                             title="Qwen2.5-Coder-0.5B (630M): does the ranking hold at 0.5B?")
    text += scale_section(sorted(results.parent.glob("headline*.json")),
                          sorted((results.parent / "qwen").glob("headline*.json")))
    text += ratio_section(rows, sorted((results.parent / "qwen").glob("headline*.json")))
    from .latency import section as latency_section
    from .compress_cost import section as compress_cost_section
    from .preview import section as preview_section
    from .blas_contention import section as blas_contention_section
    from .refit_shrinkage import section as refit_shrinkage_section

    text += latency_section(results.parent / "latency.json")
    text += compress_cost_section(results.parent / "compress_cost.json")
    text += preview_section(results.parent / "preview.json")
    text += blas_contention_section(results.parent / "blas_contention.json")
    text += refit_shrinkage_section(results.parent / "refit_shrinkage.json")
    markdown.write_text(text)
