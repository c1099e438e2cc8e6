"""Dense vs saved compressed models: prefill and decode speed, interleaved in one process.

Rounds alternate between the models (A B C ... A B C ...) so drift on a shared machine hits all of them
alike; medians over rounds. Same thread count for all.

    .venv/bin/python -m bench.speed runs/slice25/model runs/modegpt25/model ... [--rounds 5] [--json F]
"""
import argparse
import json
from pathlib import Path


from compression.evaluate import sizes, speed_side_by_side
from compression.models import DEFAULT_MODEL, load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dense", default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = [args.dense, *args.models]
    models = {n: load_model(n)[0] for n in names}
    speeds = speed_side_by_side(models, rounds=args.rounds)
    dense = speeds[args.dense]
    rows = []
    for n in names:
        rows.append({"model": n, "params": sizes(models[n])["params"], **speeds[n],
                     "prefill_vs_dense": speeds[n]["prefill_tok_s"] / dense["prefill_tok_s"],
                     "decode_vs_dense": speeds[n]["decode_tok_s"] / dense["decode_tok_s"],
                     "rounds": args.rounds})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
