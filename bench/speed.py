"""Dense vs saved compressed models: prefill and decode speed, interleaved in one process.

Rounds alternate between the models (A B C ... A B C ...) so drift on a shared machine hits all of them
alike; medians over rounds. Same thread count for all.

    .venv/bin/python bench/speed.py runs/slice25/model runs/modegpt25/model ... [--rounds 5] [--json F]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.evaluate import sizes, speed  # noqa: E402
from compression.models import DEFAULT_MODEL, load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dense", default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = [args.dense, *args.models]
    models = {n: load_model(n)[0] for n in names}
    samples = {n: {"prefill": [], "decode": []} for n in names}
    for _ in range(args.rounds):
        for n, m in models.items():
            s = speed(m, repeats=1)
            samples[n]["prefill"].append(s["prefill_tok_s"])
            samples[n]["decode"].append(s["decode_tok_s"])
    dense = samples[args.dense]
    rows = []
    for n in names:
        p, d = statistics.median(samples[n]["prefill"]), statistics.median(samples[n]["decode"])
        rows.append({"model": n, "params": sizes(models[n])["params"], "prefill_tok_s": p,
                     "decode_tok_s": d,
                     "prefill_vs_dense": p / statistics.median(dense["prefill"]),
                     "decode_vs_dense": d / statistics.median(dense["decode"]),
                     "threads": torch.get_num_threads(), "rounds": args.rounds})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
