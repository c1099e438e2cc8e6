"""What a compression costs in plain forwards: MoDeGPT and Olica at 0.25 on the paper's calibration.

    python -m bench.compress_cost [--methods modegpt,olica] [--samples 64 --length 512] [--ppl-windows 32]

For each method, in one process: one whole plain dense forward over the calibration tokens (logits
included, batches of 8: the unit), then ``compress`` on the same tokens with its stage breakdown, then
wiki perplexity on held-out windows (the quality the speed must not cost). Writes
``bench/compress_cost.json`` and the BENCHMARKS.md section between ``compress-cost`` markers. Target
(the fast-loop issue): ``compress_s ≤ 1.5 × forward_s`` with perplexity within 1% of the sweep's
(``bench/results.json``, same calibration).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench import marked

SECTION = ("<!-- compress-cost:start -->", "<!-- compress-cost:end -->")
TARGET = 1.5  # compress_s ≤ TARGET × one plain forward over the calibration tokens
MODEL = "smollm2-135m"


def sweep_ppl(results: Path, method: str, ratio: float) -> float | None:
    """The sweep's perplexity for the same method and ratio (bench/results.json), when present."""
    if not results.exists():
        return None
    rows = json.loads(results.read_text()).get("rows", [])
    return next((r["ppl"] for r in rows if r.get("method") == method and r.get("ratio") == ratio), None)


def measure(methods: list[str], samples: int, length: int, ppl_windows: int, ratio: float) -> dict:
    from compression import compress
    from compression.data import TextSpec, evaluation_windows
    from compression.evaluate import perplexity
    from compression.methods import get
    from compression.models import load_model
    from compression.pipeline import DenseCache, calibration_tokens

    model, tokenizer = load_model(MODEL)
    fit, held_out, _ = calibration_tokens(MODEL, model, tokenizer,
                                          TextSpec(source="wiki", num_samples=samples, seq_len=length))
    windows = evaluation_windows(tokenizer, ppl_windows, 1024) if ppl_windows else None
    rows = []
    for name in methods:
        forward_s, _ = DenseCache().calibration_forward(MODEL, model, fit)  # a whole forward, timed afresh
        config = get(name).make_config({"ratio": ratio})
        t0 = time.perf_counter()
        compressed, report = compress(model, config, fit, held_out=held_out)
        compress_s = time.perf_counter() - t0
        row = {"method": name, "ratio": ratio, "forward_s": round(forward_s, 2), "compress_s": round(compress_s, 2),
               "per_forward": round(compress_s / forward_s, 3), "stages": report.timing.get("stages", {})}
        if windows is not None:
            row["ppl"] = perplexity(compressed, windows)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
        del compressed
    return {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "settings": {"model": MODEL, "calibration": [samples, length, "wiki"], "ppl_windows": ppl_windows},
            "target_per_forward": TARGET, "rows": rows}


def markdown(result: dict) -> str:
    s = result["settings"]
    sweep = Path(__file__).with_name("results.json")
    lines = ["## Compress time in plain forwards", "",
             f"`python -m bench.compress_cost` ({result['machine']['threads']} threads): each method at its "
             f"ratio on {s['calibration'][0]} × {s['calibration'][1]} wiki calibration tokens, the unit a whole "
             "plain dense forward over the same tokens timed just before it in the same process (so the "
             f"machine's speed cancels). Target: ≤ {result['target_per_forward']} × the forward, at the sweep's "
             "perplexity.", "",
             "| method | ratio | plain forward | compress | × forward | wiki ppl (sweep) | stages |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ref = sweep_ppl(sweep, r["method"], r["ratio"])
        ppl = "—" if r.get("ppl") is None else f"{r['ppl']:.2f}" + (f" ({ref:.2f})" if ref else "")
        stages = " · ".join(f"{k} {v:.1f}" for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1]) if v >= 0.05)
        lines.append(f"| {r['method']} | {r['ratio']} | {r['forward_s']:.1f} s | {r['compress_s']:.1f} s | "
                     f"{r['per_forward']:.2f}× | {ppl} | {stages} |")
    return "\n".join(lines) + "\n\n"


def section(results: Path) -> str:
    """BENCHMARKS.md's section from ``results`` (bench/compress_cost.json); "" when absent."""
    return marked.section(results, SECTION, markdown)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="modegpt,olica")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/compress_cost.json"))
    ap.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = ap.parse_args(argv)
    result = measure(args.methods.split(","), args.samples, args.length, args.ppl_windows, args.ratio)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    marked.write_section(args.markdown, SECTION, markdown(result))


if __name__ == "__main__":
    main()
