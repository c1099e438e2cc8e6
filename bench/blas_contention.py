"""Why ``compression`` sets ``OPENBLAS_THREAD_TIMEOUT``: SciPy's OpenBLAS and torch share the cores.

``python -m bench.blas_contention [--out bench/blas_contention.json]`` times a 1536-wide float32 syrk
(SciPy's OpenBLAS: the Gram matrices of MoDeGPT/Olica) and a linear layer (torch), each alone and
alternating, in a fresh process per OpenBLAS setting (the variable is read when OpenBLAS loads):
"28" is OpenBLAS's default (threads busy-wait about 2^28 cycles after a call), "4" what ``compression``
sets. Rounds alternate between the two settings. The extra time of alternating over the sum of the
two alone is the cost of the waiting threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench import marked

SECTION = ("<!-- blas-contention:start -->", "<!-- blas-contention:end -->")
SETTINGS = ("28", "4")

CHILD = """
import json, time, torch
from scipy.linalg.blas import ssyrk
x, w, h = torch.randn(4096, 1536), torch.randn(1536, 576), torch.randn(4096, 576)
def linear(): torch.nn.functional.linear(h, w)
def syrk(): ssyrk(1.0, x.numpy().T, trans=0, lower=0)
def seconds(steps, n=20):
    for f in steps: f()
    t = time.perf_counter()
    for _ in range(n):
        for f in steps: f()
    return (time.perf_counter() - t) / n
print(json.dumps({"linear_s": seconds([linear]), "syrk_s": seconds([syrk]), "alternating_s": seconds([syrk, linear])}))
"""


def measure(timeout: str) -> dict:
    env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": timeout}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["overhead"] = row["alternating_s"] / (row["linear_s"] + row["syrk_s"]) - 1
    return row


def markdown(result: dict) -> str:
    lines = ["## SciPy's OpenBLAS beside torch: threads that wait", "",
             f"`python -m bench.blas_contention` ({result['threads']} threads, {result['rounds']} rounds per "
             "setting, alternating): a 4096 × 1536 float32 syrk (SciPy's OpenBLAS, the methods' Gram matrices) "
             "and a 4096 × 576 → 1536 linear layer (torch), alone and alternating. Median extra time of "
             "alternating over the two alone:", "",
             "| OPENBLAS_THREAD_TIMEOUT | extra time when alternating |", "|---|---|"]
    for setting in SETTINGS:
        label = f"{setting} (OpenBLAS default)" if setting == "28" else f"{setting} (set by `compression`)"
        lines.append(f"| {label} | {result['median_overhead'][setting]:+.0%} |")
    return "\n".join(lines) + "\n\n"


def section(results: Path) -> str:
    """BENCHMARKS.md's section from ``results`` (bench/blas_contention.json); "" when absent."""
    return marked.section(results, SECTION, markdown)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/blas_contention.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    rows = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for s in SETTINGS:
            rows[s].append(measure(s))
            print(s, json.dumps(rows[s][-1]), flush=True)
    result = {"threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows,
              "median_overhead": {s: statistics.median(r["overhead"] for r in rows[s]) for s in SETTINGS}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    marked.write_section(args.markdown, SECTION, markdown(result))
    print(json.dumps(result["median_overhead"]))


if __name__ == "__main__":
    main()
