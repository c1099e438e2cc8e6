"""Which calibration source keeps the chat: every method at a ratio, calibrated on each source.

For each (method, ratio, source): compress the default model, then measure wiki perplexity, code
perplexity (the pinned package's held-out files), and chat agreement with the dense model (KL and top-1
on the dense model's greedy replies to held-out instructions, chat template applied). Dense references
are built once per process. Rows are appended to ``bench/calibration_sources.json`` (resumable).

    python -m bench.calibration_sources --ratios 0.25,0.1 --sources wiki,self-chat [--methods modegpt]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compression import pipeline
from compression.data import TextSpec, code_split, evaluation_windows
from compression.files import read_json, write_json_atomic
from compression.methods import METHODS, get
from compression.models import DEFAULT_MODEL, load_model

VARIANTS = {name: m.headline for name, m in METHODS.items()}  # the best variant of each at 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--ratios", default="0.25,0.1")
    ap.add_argument("--sources", default="wiki,self-chat")
    ap.add_argument("--calib", default="32x512", help="samples x length")
    ap.add_argument("--windows", type=int, default=8, help="1024-token windows per domain")
    ap.add_argument("--chat", type=int, default=16, help="held-out instructions for chat agreement")
    ap.add_argument("--out", type=Path, default=Path("bench/calibration_sources.json"))
    args = ap.parse_args()
    samples, length = (int(x) for x in args.calib.split("x"))
    data = read_json(args.out) if args.out.exists() else {"rows": []}
    data["settings"] = {"model": args.model, "calibration": [samples, length], "windows": args.windows,
                        "chat_conversations": args.chat}
    done = {(r["method"], r["ratio"], r["source"]) for r in data["rows"]}
    dense, tokenizer = load_model(args.model)
    cache = pipeline.DenseCache()
    wiki = evaluation_windows(tokenizer, args.windows)
    code = evaluation_windows(tokenizer, args.windows, text=code_split("evaluation"))
    log = lambda f, m: None  # noqa: E731
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in args.methods.split(","):
            for source in args.sources.split(","):
                if (method, ratio, source) in done:
                    continue
                config = get(method).make_config({**VARIANTS[method], "ratio": ratio})
                t0 = time.perf_counter()
                model, report = pipeline.compress_and_measure(
                    args.model, dense, tokenizer, config, TextSpec(samples, length, source=source),
                    eval_windows=args.windows, chat_eval=args.chat, cache=cache, windows=wiki)
                seconds = time.perf_counter() - t0
                stages = pipeline.Stages(log, {"dense reference": 1, "compressed perplexity and agreement": 1})
                on_code = pipeline.measure_against(args.model, dense, model, code, cache, stages, "code")
                row = {"method": method, "ratio": ratio, "source": source, "config": report.config,
                       "params": report.params_compressed, "ratio_achieved": report.ratio_achieved,
                       "ppl_wiki": report.evaluation["ppl"], "ppl_code": on_code["ppl"],
                       "agreement_wiki": report.agreement, "agreement_code": on_code["agreement"],
                       "agreement_chat": report.agreement_chat, "calibration": report.calibration,
                       "seconds": seconds}
                data["rows"].append(row)
                write_json_atomic(args.out, data)
                print(json.dumps({"method": method, "ratio": ratio, "source": source,
                                  "wiki": round(row["ppl_wiki"]["compressed"], 2),
                                  "code": round(row["ppl_code"]["compressed"], 2),
                                  "chat_kl": round(row["agreement_chat"]["kl"], 4),
                                  "chat_top1": round(row["agreement_chat"]["top1"], 4),
                                  "seconds": round(seconds)}), flush=True)
                del model


if __name__ == "__main__":
    main()
