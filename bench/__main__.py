"""``python -m bench``: dense plus every method at several ratios; results.json + BENCHMARKS.md.

Run from the repository root (``make bench``). Resumable: rows already in results.json are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compression.models import DEFAULT_MODEL

from . import runner


def parse(argv=None):
    b = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--device", default=None)
    b.add_argument("--out", type=Path, default=Path("bench"))
    b.add_argument("--ratios", default="0.1,0.2,0.25,0.3")
    b.add_argument("--slicing", default="0.1,0.2,0.25,0.3", help="SliceGPT's native slicing fractions")
    b.add_argument("--methods", default=None, help="comma-separated subset, e.g. slicegpt,olica")
    b.add_argument("--allocation", default="uniform", choices=("uniform", "auto"))
    b.add_argument("--tasks", default=None, help="zero-shot tasks (default: the five headline tasks and BoolQ)")
    b.add_argument("--limit", type=int, default=50,
                   help="zero-shot items per task (0: all); the published table uses 50")
    b.add_argument("--calib-samples", type=int, default=64)
    b.add_argument("--calib-len", type=int, default=512)
    b.add_argument("--eval-windows", type=int, default=32)
    b.add_argument("--keep", type=Path, default=None,
                   help="save each compressed model here (python -m bench.sweep --respeed re-measures them)")
    b.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    b.add_argument("--assets", type=Path, default=Path("assets"))
    return b.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    floats = lambda text: tuple(float(x) for x in text.split(",") if x.strip())  # noqa: E731
    tasks = None if args.tasks is None else tuple(t for t in args.tasks.split(",") if t)
    rows = runner.run(args.out, args.model, floats(args.ratios), floats(args.slicing),
                      None if not args.methods else tuple(args.methods.split(",")), tasks,
                      args.limit or None, (args.calib_samples, args.calib_len), args.eval_windows,
                      args.allocation, args.device, log=lambda m: print(m, file=sys.stderr), keep=args.keep)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    runner.write_markdown(args.out / "results.json", args.markdown, args.assets, command.strip())
    print(json.dumps({"rows": len(rows), "results": str(args.out / "results.json"),
                      "markdown": str(args.markdown)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
