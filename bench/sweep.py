"""The per-issue measurement sweep: ppl, params, time and tok/s for every method and variant at
0.1/0.2/0.25/0.3 (no zero-shot; `python -m compression bench` adds that). Resumable.

    .venv/bin/python bench/sweep.py [--out bench/sweep] [--only slicegpt,modegpt]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression import bench  # noqa: E402
from compression.layerdrop import LayerDropConfig  # noqa: E402
from compression.modegpt import MoDeGPTConfig  # noqa: E402
from compression.olica import OlicaConfig  # noqa: E402
from compression.plan import Allocation  # noqa: E402
from compression.slicegpt import SliceGPTConfig  # noqa: E402

RATIOS = (0.25, 0.1, 0.2, 0.3)


def rows():
    out = []
    for r in RATIOS:  # ratio-major, so an interrupted sweep still has whole ratios
        out += [("layerdrop", r, LayerDropConfig(ratio=r)),
                ("slicegpt-slicing", r, SliceGPTConfig(slicing=r)),
                ("modegpt", r, MoDeGPTConfig(ratio=r)),
                ("olica", r, OlicaConfig(ratio=r)),
                ("modegpt-auto", r, MoDeGPTConfig(ratio=r, allocation=Allocation("auto"))),
                ("olica-nocal", r, OlicaConfig(ratio=r, calibrate_layers=0))]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/sweep"))
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    only = None if not args.only else tuple(args.only.split(","))
    bench.run(args.out, rows=rows(), methods=only, tasks=(), log=lambda m: print(m, flush=True))
    bench.write_markdown(args.out / "results.json", args.out / "SWEEP.md", args.out,
                         "python bench/sweep.py")
