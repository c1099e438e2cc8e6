"""How good is the forecast? Predicted against measured per-layer errors and perplexity.

``python -m bench.preview [--calib 32x512] [--windows 8] [--reuse]``: one :func:`compression.preview.collect`
pass over the dense default model, then for each setting (MoDeGPT and Olica at 0.1 and 0.25, uniform
and automatic allocation, and MoDeGPT at 0.25 with the forecast's three best allocations) the forecast
(:func:`compression.preview.predict`) and a real :func:`compression.compress` run with held-out
per-layer errors and wiki perplexity. Written to ``bench/preview.json``:

- ``spearman``: rank correlation of predicted and measured per-layer module errors (every setting,
  layer and module, attn and mlp, pooled; target ≥ 0.9), with ``spearman_by`` breaking it down (per
  module, the per-layer total, within each setting over layers);
- ``spearman_ppl``: rank correlation of the predicted ``total`` and the measured perplexity over the
  settings;
- ``best_allocation``: the forecast's top three allocations at 0.25 against automatic allocation
  (forecast, parameters and perplexity of each);
- timings: ``collect_s`` and the median ``predict_ms``.

``--reuse`` keeps the measured side of rows already in the file (same calibration) and only redoes
the forecast, to iterate on the forecast without compressing again. BENCHMARKS.md gets the section
between ``<!-- preview:start -->`` and ``<!-- preview:end -->``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import marked

SECTION = ("<!-- preview:start -->", "<!-- preview:end -->")
MODEL = "smollm2-135m"
SETTINGS = tuple((method, ratio, allocation) for method in ("modegpt", "olica") for ratio in (0.1, 0.25)
                 for allocation in ("uniform", "auto"))
BEST_RATIO = 0.25
BEST_TOP = 3  # the forecast's best allocations at BEST_RATIO compressed for real


def label(method: str, ratio: float, allocation: str) -> str:
    return f"{method} {ratio:g} {allocation}"


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    value = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if math.isnan(value) else float(value)


def measure(model, tokenizer, config, fit, held_out, windows) -> dict:
    """Compress with ``config`` (held-out per-layer errors) and measure perplexity on ``windows``."""
    from compression import compress
    from compression.evaluate import perplexity

    t0 = time.perf_counter()
    out, report = compress(model, config, fit, held_out=held_out)
    seconds = time.perf_counter() - t0
    ppl = perplexity(out, windows)
    layers = report.to_dict()["layers"]
    errors = lambda key: [lay["errors"].get(key) for lay in layers]  # noqa: E731
    return {"params": report.params_compressed, "ppl": ppl, "compress_s": round(seconds, 1),
            "measured": {"attn": errors("attn"), "mlp": errors("mlp"),
                         "mlp_before_calibration": errors("mlp_before_calibration")},
            "calibrated_layers": report.config.get("calibrated", [])}


def predicted_part(p: dict) -> dict:
    return {k: p[k] for k in ("params", "total", "predicted_error", "attn", "mlp", "stream")}


def correlations(rows: list[dict], st) -> dict:
    """``spearman`` (pooled module errors) and its breakdown, and the total-vs-perplexity one."""
    from compression.preview import measured_errors

    pooled_p, pooled_m, by = [], [], {"attn": ([], []), "mlp": ([], []), "per_layer": ([], []),
                                      "mlp_before_calibration": ([], [])}
    within = {}
    for row in rows:
        pred, meas = row["predicted"], row["measured"]
        per_layer = measured_errors({"layers": [{"errors": {"attn": a, "mlp": m}}
                                                for a, m in zip(meas["attn"], meas["mlp"])]}, st)["per_layer"]
        for module in ("attn", "mlp"):
            pooled_p += pred[module]
            pooled_m += meas[module]
            by[module][0].extend(pred[module])
            by[module][1].extend(meas[module])
        by["per_layer"][0].extend(pred["predicted_error"])
        by["per_layer"][1].extend(per_layer)
        before = [b if b is not None else m for b, m in zip(meas["mlp_before_calibration"], meas["mlp"])]
        by["mlp_before_calibration"][0].extend(pred["mlp"])
        by["mlp_before_calibration"][1].extend(before)
        within[row["label"]] = {"attn": spearman(pred["attn"], meas["attn"]),
                                "mlp": spearman(pred["mlp"], meas["mlp"]),
                                "per_layer": spearman(pred["predicted_error"], per_layer)}
    levels = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for module in ("attn", "mlp"):
            ratios = [p / m for r in rows if r["method"] == method
                      for p, m in zip(r["predicted"][module], r["measured"][module]) if m]
            if ratios:
                levels[f"{method.removesuffix('Config')} {module}"] = {
                    "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return {"spearman": spearman(pooled_p, pooled_m), "levels": levels,
            "spearman_by": {**{k: spearman(*v) for k, v in by.items()}, "within_setting": within},
            "spearman_ppl": spearman([r["predicted"]["total"] for r in rows], [r["ppl"] for r in rows])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/preview.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--calib", default="32x512", help="calibration sequences x length (wiki)")
    parser.add_argument("--windows", type=int, default=8, help="1024-token wiki windows for perplexity")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the measured side of rows already in --out; only forecast again")
    args = parser.parse_args(argv)
    samples, length = (int(v) for v in args.calib.lower().split("x"))

    from compression.data import TextSpec, evaluation_windows
    from compression.evaluate import perplexity
    from compression.methods import get
    from compression.models import load_model
    from compression.modegpt import refit_shrinkage
    from compression.pipeline import calibration_tokens
    from compression.preview import collect, predict
    from compression.preview import best_allocation
    from compression.knobs import values

    model, tokenizer = load_model(MODEL)
    base = model.config
    spec = TextSpec(samples, length, source="wiki")
    fit, held_out, _ = calibration_tokens(MODEL, model, tokenizer, spec)
    windows = evaluation_windows(tokenizer, args.windows, 1024)
    old, old_dense = {}, None
    if args.reuse and args.out.exists():
        data = json.loads(args.out.read_text())
        if data["settings"]["calibration"] == [samples, length, "wiki"] and data["settings"]["windows"] == args.windows:
            old, old_dense = {r["label"]: r for r in data["rows"]}, data.get("dense_ppl")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    st = collect(model, fit, progress=lambda f, m: print(f"collect {f:.0%} {m}", file=sys.stderr, flush=True))
    collect_s = time.perf_counter() - t0
    configs = [(label(*s), get(s[0]).make_config({"ratio": s[1], "allocation": s[2]})) for s in SETTINGS]
    best, candidates = best_allocation(st, "modegpt", BEST_RATIO, base)
    picks = [(f"modegpt {BEST_RATIO:g} {c['label']} (forecast #{k + 1})", c["config"])
             for k, c in enumerate(candidates[:BEST_TOP])]
    configs += picks
    rows, predict_ms = [], []
    for name, config in configs:
        t1 = time.perf_counter()
        p = predict(st, config, base)
        predict_ms.append(1e3 * (time.perf_counter() - t1))
        measured = old.get(name)
        if measured is None:
            print(f"compressing {name}", file=sys.stderr, flush=True)
            measured = measure(model, tokenizer, config, fit, held_out, windows)
        row = {"label": name, "method": type(config).__name__, "config": _plain(values(config)),
               **{k: measured[k] for k in ("params", "ppl", "compress_s", "measured", "calibrated_layers")},
               "predicted": predicted_part(p)}
        rows.append(row)
        print(json.dumps({"label": name, "ppl": row["ppl"], "total": p["total"]}), flush=True)
    for _ in range(20):  # steadier timing: every setting again
        for _, config in configs:
            t1 = time.perf_counter()
            predict(st, config, base)
            predict_ms.append(1e3 * (time.perf_counter() - t1))
    dense_ppl = old_dense or perplexity(model, windows)
    auto = next(r for r in rows if r["label"] == label("modegpt", BEST_RATIO, "auto"))
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu", "load_average": round(load, 2)},
        "settings": {"model": MODEL, "calibration": [samples, length, "wiki"], "windows": args.windows,
                     "held_out_sequences": 0 if held_out is None else int(held_out.shape[0]),
                     "modegpt_refit_shrinkage": refit_shrinkage(configs[0][1], samples * length)},  # the μ used
        "collect_s": round(collect_s, 1), "predict_ms": round(statistics.median(predict_ms), 2),
        "predict_ms_max": round(max(predict_ms), 2), "dense_ppl": dense_ppl,
        **correlations(rows, st),
        "best_allocation": {"ratio": BEST_RATIO, "pick": candidates[0]["label"], "ppl": rows[-BEST_TOP]["ppl"],
                            "auto_ppl": auto["ppl"], "auto_total": auto["predicted"]["total"],
                            "auto_params": auto["params"], "top": [
                                {"label": c["label"], "total": c["total"], "params": r["params"], "ppl": r["ppl"]}
                                for c, r in zip(candidates, rows[-BEST_TOP:])],
                            "candidates": [
                                {"label": c["label"], "total": c["total"], "params": c["params"]}
                                for c in candidates]},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_section(args.markdown, result)
    print(json.dumps({k: result[k] for k in ("collect_s", "predict_ms", "spearman", "spearman_ppl")}))


def _plain(v: dict) -> dict:
    return json.loads(json.dumps(v))


# --- BENCHMARKS.md ----------------------------------------------------------------------------------

def _f(value, spec=".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s, by = result["settings"], result["spearman_by"]
    cal = s["calibration"]
    lines = ["## Forecast before compressing: how good is it?", "",
             f"`python -m bench.preview` ({result['machine']['device']}, {result['machine']['threads']} threads): "
             f"one `compression.preview.collect` pass over the dense {s['model']} on {cal[0]} × {cal[1]} "
             f"{cal[2]} tokens took {result['collect_s']:.0f} s (load average "
             f"{result['machine'].get('load_average', 0):.1f} on the machine's cores when it started: other jobs "
             "shared them); a forecast (`predict`) then takes "
             f"{result['predict_ms']:.1f} ms (median; slowest {result['predict_ms_max']:.1f} ms). Each setting "
             f"was also compressed for real, with per-layer errors on {s['held_out_sequences']} held-out "
             f"sequences and wiki perplexity on {s['windows']} windows of 1024 tokens (dense "
             f"{result['dense_ppl']:.2f}).", "",
             "| setting | params | forecast total | measured ppl | Spearman over layers (attn / mlp) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        w = by["within_setting"][r["label"]]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['predicted']['total']:.3f} | "
                     f"{r['ppl']:.2f} | {_f(w['attn'])} / {_f(w['mlp'])} |")
    b = result["best_allocation"]
    lines += ["",
              f"- **Spearman, predicted vs measured per-layer errors** (every setting, layer and module pooled): "
              f"**{_f(result['spearman'], '.3f')}** (target ≥ 0.9); attention alone {_f(by['attn'], '.3f')}, "
              f"MLP alone {_f(by['mlp'], '.3f')} (against Olica's errors before its calibration branches: "
              f"{_f(by['mlp_before_calibration'], '.3f')}), per-layer total {_f(by['per_layer'], '.3f')}.",
              f"- **Spearman, forecast total vs measured perplexity** over the {len(result['rows'])} settings: "
              f"{_f(result['spearman_ppl'], '.3f')}.",
              f"- **Best allocation by forecast** at {b['ratio']:g} (MoDeGPT; `compression.preview.best_allocation`, "
              f"{len(b['candidates'])} candidates: uniform, automatic at five ε, sparing the first or last k "
              f"layers): its top {len(b['top'])} compressed for real, against automatic allocation (ε = 0.1, "
              f"forecast {b['auto_total']:.3f}, perplexity {b['auto_ppl']:.2f}, {b['auto_params'] / 1e6:.2f} M "
              "parameters):", "",
              "| forecast rank | allocation | forecast total | params | measured ppl |", "|---|---|---|---|---|",
              *[f"| {k + 1} | {t['label']} | {t['total']:.3f} | {t['params'] / 1e6:.2f} M | {t['ppl']:.2f} |"
                for k, t in enumerate(b["top"])], "",
              "Levels, forecast ÷ measured per-layer error (median [min, max] over every layer of every setting): "
              + "; ".join(f"{k} {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                          for k, v in result.get("levels", {}).items()) + ".", ""]
    mu = result["settings"].get("modegpt_refit_shrinkage") or 0.0  # runs before it existed: least squares
    refit = ("- **MoDeGPT's refit here was least squares** (`refit_shrinkage` 0), the error the curve gives "
             "exactly in-sample." if mu == 0 else
             f"- **MoDeGPT's refit here was shrunk** (`refit_shrinkage` {mu:g}): in-sample, the least-squares "
             "curve is a lower bound of its error; held out it does better (`bench.refit_shrinkage`).")
    return "\n".join(lines + NOTES + [refit, ""])


NOTES = [
    "What is exact and what is not (`compression/preview_curves.py` says it per module): on the dense stream and "
    "the calibration tokens, MoDeGPT's MLP refit error (a Cholesky factor in leverage order gives every "
    "width), Olica's neuron-pruning error, the value-output rewrite's error (a quadratic form in the Gram "
    "of o_proj's input) and a dropped block's loss are exact; the query-key cut is measured on two "
    "calibration sequences; Olica's calibration branch is exact in which layers it picks and approximate "
    "(ridge shrinkage left out) in what it removes; the attention error adds the value and the pattern "
    "errors as if uncorrelated; SliceGPT's is a proxy (discarded PCA mass of the dense stream).", "",
    "Where the forecast is wrong, and why:", "",
    "- **The real run is sequential; the forecast is not.** Each block is calibrated and measured on the "
    "outputs of the already-compressed blocks, the forecast on the dense stream. The per-module errors are "
    "local (each module against its dense self on the same input), so this shifts them only through the "
    "input statistics: enough that no layer is forecast exactly, not enough to reorder them much.",
    "- **In-sample against held-out.** The curves come from the calibration tokens; the reports measure "
    "on held-out sequences. MoDeGPT's least-squares refit of down_proj fits the calibration tokens best, "
    "so its MLP error is forecast too low everywhere (the median ratio above), the more so with fewer "
    "tokens per MLP channel; Olica's MLP has no refit and its level is right.",
    "- **Olica's calibration branches** are fitted on the sequential stream: on the calibrated layers the "
    "forecast is off most (the last layer's MLP, calibrated, is the maximum above).",
    "- **The query-key pair scores alone do not rank attention errors.** An earlier run of this bench "
    "with the score proxy (`collect(..., qk_sequences=0)`) and the value-output spectrum in the "
    "input-correlation norm instead of the exact form gave attention 0.84 pooled and about 0.26 within "
    "each uniform setting, hence the measured query-key curve.",
    "- **The total is not perplexity, and it ranks allocations less well than settings.** It adds the "
    "error energy each layer injects relative to the stream, as if errors did not interact or grow "
    "downstream. Across settings it orders perplexity well, and it finds that sparing the first layers "
    "beats automatic allocation, but it wants to spare more of them than is best: its first choice "
    "(8 layers) is the worst of its top three, the third (4 layers) the best. The app's \"best by "
    "forecast\" is a good allocation, not the optimum.",
    "",
]


def section(results: Path) -> str:
    """BENCHMARKS.md's preview section from ``results`` (bench/preview.json); "" when absent."""
    return marked.section(results, SECTION, markdown)


def write_section(path: Path, result: dict) -> None:
    marked.write_section(path, SECTION, markdown(result))


if __name__ == "__main__":
    main()
