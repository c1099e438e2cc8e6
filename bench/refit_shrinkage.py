"""MoDeGPT's down_proj refit: plain least squares against a refit shrunk toward the kept columns.

The Nyström refit W' = (SᵀCS)⁺ SᵀC W_downᵀ is fitted on the calibration tokens only; with a few
thousand tokens per layer it also fits their sampling noise. ``refit_shrinkage`` μ adds
μ·mean diag(SᵀCS)·‖W' − W_S‖² to the fit (:func:`compression.ops.nystrom_mlp`). This benchmark runs
MoDeGPT at one ratio (automatic allocation, as the app starts) for each (calibration size, source, μ)
through the app's own pipeline (:func:`compression.pipeline.compress_and_measure`) and measures wiki
perplexity and KL to the dense model on the evaluation windows. Rows resume from ``--out``.

    python -m bench.refit_shrinkage [--grid 32x512:wiki+self-chat:0,0.1,0.3,0.5,1,3 ...] [--windows 8]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import marked
from compression.files import read_json, write_json_atomic
from compression.modegpt import AUTO_SHRINKAGE

SECTION = ("<!-- refit-shrinkage:start -->", "<!-- refit-shrinkage:end -->")
GRID = ("32x512:wiki+self-chat:0,0.1,0.3,0.5,1,3", "24x512:wiki+self-chat:0,0.5",
        "20x512:wiki+self-chat:0,0.5", "64x512:wiki:0,0.15,0.5")


def parse_grid(items) -> list[tuple[int, int, str, float]]:
    """"NxT:source:mu,mu" items -> (samples, seq_len, source, mu) rows."""
    rows = []
    for item in items:
        size, source, mus = item.split(":")
        samples, length = (int(x) for x in size.split("x"))
        rows += [(samples, length, source, float(mu)) for mu in mus.split(",")]
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["## MoDeGPT's refit: least squares or shrunk", "",
             f"`python -m bench.refit_shrinkage` (MoDeGPT {s['ratio']}, automatic allocation; wiki perplexity "
             f"and KL to the dense model on {s['windows']} evaluation windows of 1024 tokens, dense "
             f"{result['dense_ppl']:.2f}). μ = 0 is the paper's least-squares refit of down_proj; μ > 0 shrinks "
             "it toward the kept columns as they are (`refit_shrinkage`; every row sets μ itself; the default "
             f"is automatic, {AUTO_SHRINKAGE:,.0f} / n for n calibration tokens: 0.5 at 24 × 512, 0.19 at 64 × 512, "
             "where 0.5 costs 1.5% on 32 windows).", "",
             "| calibration | μ | wiki ppl | KL to dense |", "|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["source"], -r["samples"], r["mu"])):
        lines.append(f"| {r['samples']} × {r['seq_len']} {r['source']} | {r['mu']:g} | {r['ppl']:.2f} | "
                     f"{r['kl']:.3f} |")
    return "\n".join(lines) + "\n\n"


def section(results: Path) -> str:
    """BENCHMARKS.md's section from ``results`` (bench/refit_shrinkage.json); "" when absent."""
    return marked.section(results, SECTION, markdown)


def main(argv=None) -> None:
    from compression.data import TextSpec, evaluation_windows
    from compression.modegpt import MoDeGPTConfig
    from compression.models import DEFAULT_MODEL, load_model
    from compression.pipeline import DenseCache, calibration_tokens, compress_and_measure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=list(GRID))
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/refit_shrinkage.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    result = read_json(args.out) if args.out.exists() else {"rows": []}
    result["settings"] = {"ratio": args.ratio, "windows": args.windows, "model": DEFAULT_MODEL,
                          "default": f"{AUTO_SHRINKAGE:g} / tokens"}
    done = {(r["samples"], r["seq_len"], r["source"], r["mu"]) for r in result["rows"]
            if r["ratio"] == args.ratio and r["windows"] == args.windows}
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    windows = evaluation_windows(tokenizer, args.windows, 1024)
    cache, calibrations = DenseCache(), {}  # tokens per calibration, shared by its μ rows
    for samples, length, source, mu in parse_grid(args.grid):
        if (samples, length, source, mu) in done:
            continue
        spec = TextSpec(samples, length, source=source)
        if spec not in calibrations:
            calibrations[spec] = calibration_tokens(DEFAULT_MODEL, model, tokenizer, spec)
        calibration = calibrations[spec]
        config = MoDeGPTConfig(ratio=args.ratio, allocation="auto", refit_shrinkage=mu)
        t0 = time.perf_counter()
        _, report = compress_and_measure(DEFAULT_MODEL, model, tokenizer, config, spec, cache=cache,
                                         calibration=calibration, windows=windows, eval_windows=args.windows,
                                         time_forward=False)
        row = {"samples": samples, "seq_len": length, "source": source, "mu": mu, "ratio": args.ratio,
               "windows": args.windows, "ppl": report.ppl_compressed, "kl": report.agreement["kl"],
               "compress_s": report.timing["compress_s"], "seconds": round(time.perf_counter() - t0, 1)}
        result["dense_ppl"] = report.ppl_dense
        result["rows"].append(row)
        write_json_atomic(args.out, result)
        print(json.dumps(row), flush=True)
    marked.write_section(args.markdown, SECTION, markdown(result))


if __name__ == "__main__":
    main()
