"""Which temperature ε for MoDeGPT's automatic allocation φ_i = L·φ_avg·softmax(−s_i/ε)?

Block Influence s_i is measured once on the dense model (the same 64 × 512 calibration tokens as the
benchmark); each ε then gives per-layer sparsities, applied as a manual allocation (identical to
``Allocation("auto", epsilon=ε)``, without measuring the influence again), and the compressed model's
wiki perplexity is measured on the benchmark's 32 × 1024 evaluation windows. Results resume from and
are written to ``bench/epsilon.json``; "uniform" is ε → ∞.

    .venv/bin/python -m bench.epsilon [--ratio 0.25] [--epsilons 0.03,0.1,0.3,uniform]
"""
import argparse
import json
import time
from pathlib import Path


from compression import compress
from compression.calibration import prepare_sequential
from compression.data import TextSpec, evaluation_windows
from compression.evaluate import perplexity, sizes
from compression.files import read_json, write_json_atomic
from compression.modegpt import MoDeGPTConfig
from compression.models import load_model
from compression.plan import Allocation


def dense_influence(model, calibration) -> list[float]:
    """Block Influence of every layer of the dense ``model`` (converted in place by the set-up)."""
    config = MoDeGPTConfig(ratio=0.0, allocation="auto")
    return prepare_sequential(model, config, calibration, None, lambda f, m: None).influence


def allocation(eps: str) -> Allocation:
    """The allocation an ε names: "uniform", or automatic at temperature ε."""
    return Allocation() if eps == "uniform" else Allocation("auto", epsilon=float(eps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--epsilons", default="0.03,0.1,0.3,uniform")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/epsilon.json"))
    args = ap.parse_args()

    data = read_json(args.out) if args.out.exists() else {"rows": []}
    done = {(r["model"], r["ratio"], r["epsilon"]) for r in data["rows"]}
    model, tokenizer = load_model(args.model)
    calibration = TextSpec(64, 512).batches(tokenizer)
    windows = evaluation_windows(tokenizer, args.eval_windows)
    influences = data.setdefault("influence", {})  # per model: it does not depend on ratio or ε
    if args.model not in influences:
        influences[args.model] = dense_influence(model, calibration)
    del model
    influence = influences[args.model]
    for eps in args.epsilons.split(","):
        if (args.model, args.ratio, eps) in done:
            continue
        per_layer = allocation(eps).sparsities(args.ratio, len(influence), influence)
        model, _ = load_model(args.model)
        t0 = time.perf_counter()
        compressed, report = compress(model, MoDeGPTConfig(ratio=args.ratio, allocation=Allocation(
            "manual", per_layer=tuple(per_layer))), calibration)
        row = {"model": args.model, "ratio": args.ratio, "epsilon": eps, "per_layer": per_layer,
               "params": sizes(compressed)["params"],
               "ppl": perplexity(compressed, windows),
               "compress_seconds": time.perf_counter() - t0}
        print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)
        data["rows"].append(row)
        write_json_atomic(args.out, data)
        del model, compressed, report
    for r in sorted(data["rows"], key=lambda r: (r["ratio"], r["epsilon"])):
        print(f"ratio {r['ratio']:g}  ε {r['epsilon']:>7}  sparsity {min(r['per_layer']):.3f}–"
              f"{max(r['per_layer']):.3f}  params {r['params'] / 1e6:.2f}M  ppl {r['ppl']:.2f}")


if __name__ == "__main__":
    main()
