"""The method-variant sweep: the benchmark's rows plus the variants the method issues ask for
(MoDeGPT with automatic allocation, Olica without linear calibration), written into the same
``bench/results.json`` as `make bench`, so one table holds everything measured on the same footing.

Resumable: rows already in results.json (with zero-shot, when it is asked for) are skipped.

    .venv/bin/python -m bench.sweep [--labels modegpt,olica-nocal] [--ratios 0.25,0.1] [--limit 50]
    .venv/bin/python -m bench.sweep --respeed   # every kept model's speed again, side by side
"""
import argparse
import sys
from pathlib import Path


from bench import runner as bench
from compression.layerdrop import LayerDropConfig
from compression.models import cache_root
from compression.modegpt import MoDeGPTConfig
from compression.olica import OlicaConfig
from compression.plan import Allocation
from compression.slicegpt import SliceGPTConfig

RATIOS = (0.25, 0.1, 0.2, 0.3)
VARIANTS = {
    "layerdrop": lambda r: LayerDropConfig(ratio=r),
    "slicegpt-slicing": lambda r: SliceGPTConfig(slicing=r),
    "slicegpt": lambda r: SliceGPTConfig(ratio=r),
    "modegpt": lambda r: MoDeGPTConfig(ratio=r),
    "olica": lambda r: OlicaConfig(ratio=r),
    "modegpt-auto": lambda r: MoDeGPTConfig(ratio=r, allocation=Allocation("auto")),
    "olica-nocal": lambda r: OlicaConfig(ratio=r, calibrate_layers=0),
}


def rows(labels=tuple(VARIANTS), ratios=RATIOS):
    """(label, ratio, config), ratio-major in the order given, so an interrupted sweep has whole ratios."""
    return [(label, r, VARIANTS[label](r)) for r in ratios for label in labels]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--labels", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--limit", type=int, default=50, help="zero-shot items per task (0: no zero-shot)")
    ap.add_argument("--keep", type=Path, default=cache_root() / "bench-models" / "smollm2-135m",
                    help="where each compressed model is saved, for --respeed")
    ap.add_argument("--respeed", action="store_true",
                    help="only measure the speed of every kept model and dense again, side by side")
    args = ap.parse_args()
    if args.respeed:
        bench.respeed(args.out, args.keep, log=lambda m: print(m, flush=True))
        bench.write_markdown(args.out / "results.json", Path("BENCHMARKS.md"), Path("assets"),
                             "python -m bench.sweep --respeed")
        sys.exit(0)
    labels = tuple(args.labels.split(","))
    unknown = [x for x in labels if x not in VARIANTS]
    if unknown:
        sys.exit(f"unknown labels {unknown}; choose from {list(VARIANTS)}")
    ratios = tuple(float(x) for x in args.ratios.split(","))
    tasks = bench.BENCH_TASKS if args.limit else ()
    bench.run(args.out, rows=rows(labels, ratios), tasks=tasks, limit=args.limit or None,
              log=lambda m: print(m, flush=True), keep=args.keep)
    bench.write_markdown(args.out / "results.json", Path("BENCHMARKS.md"), Path("assets"),
                         f"python -m bench.sweep --labels {args.labels} --ratios {args.ratios} "
                         f"--limit {args.limit}")
