"""Headline rows: dense and each method's best variant at one ratio, measured sharply enough to rank.

The cheap sweep (``python -m bench``) scores zero-shot on 50 items a task, where the five-task average
has a ±6-point interval and cannot separate compressed rows. Here every row gets:

- wiki perplexity with its 95% bootstrap interval over windows, and agreement with the dense model
  (KL(dense ‖ compressed), top-1) on the same windows;
- the same on held-out source code (the pinned package of :func:`compression.data.code_split`);
- chat agreement on the dense model's greedy replies to held-out instructions;
- lm-eval zero-shot on the five headline tasks at ``--limit`` items each (300: about ±2.5 points on
  the average), per-task stderr and item counts kept.

Rows go to ``--out`` (resumable by method); BENCHMARKS.md shows them (``bench.sections``).

    python -m bench.headline --methods dense,modegpt,olica --out bench/headline.json --threads 1
    python -m bench.headline --model qwen2.5-coder-0.5b --ratios 0.1,0.2,0.25,0.3 --out bench/qwen/headline.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compression import pipeline
from compression.data import TextSpec, code_split, evaluation_windows
from compression.evaluate import sizes
from compression.files import read_json, write_json_atomic
from compression.methods import METHODS, get
from compression.models import DEFAULT_MODEL, load_model
from compression.zeroshot import HEADLINE_TASKS, zero_shot

# The best variant of each method at 0.25 in the limit-50 sweep (lowest wiki perplexity among the rows
# that remove 25% of the block parameters; SliceGPT's slicing-fraction rows remove far fewer): each
# method's ``headline`` entry.
VARIANTS = {name: m.headline for name, m in METHODS.items()}


def zero_shot_fields(model, tokenizer, tasks, limit: int, threads) -> dict:
    """The row's zero-shot part: per-task acc, stderr and n, the five-task average and its interval;
    nothing when ``limit`` is 0 (perplexity and agreement only: a bigger model on a CPU)."""
    if limit == 0:
        return {}
    result = zero_shot(model, tokenizer, tasks, limit, threads=threads)
    tasks = result["tasks"]
    return {"zero_shot": {t: v["acc"] for t, v in tasks.items()},
            "zero_shot_stderr": {t: v["stderr"] for t, v in tasks.items()},
            "zero_shot_n": {t: v["n"] for t, v in tasks.items()},
            "zero_shot_avg": result["average"], "zero_shot_avg_ci": result["average_ci"],
            "zero_shot_limit": result["limit"], "zero_shot_seconds": result["seconds"],
            "zero_shot_items_per_s": result["items_per_s"]}


def dense_row(name, dense, tokenizer, cache, wiki, code, chat, tasks, limit, threads) -> dict:
    log = lambda f, m: None  # noqa: E731
    on = {}
    for label, windows in (("wiki", wiki), ("code", code)):
        stats = cache.reference(name, dense, windows, log).ppl_stats()
        on[label] = {"dense": stats["ppl"], "dense_ci": stats["ppl_ci"], "windows": int(windows.shape[0])}
    cache.chat_reference(name, dense, tokenizer, chat, log)
    row = {"method": "dense", "ratio": 0.0, "params": sizes(dense)["params"], "ppl_wiki": on["wiki"],
           "ppl_code": on["code"]}
    return {**row, **zero_shot_fields(dense, tokenizer, tasks, limit, threads)}


def method_row(name, method, ratio, dense, tokenizer, cache, wiki, code, chat, calib, tasks, limit,
               threads) -> dict:
    config = get(method).make_config({**VARIANTS[method], "ratio": ratio})
    t0 = time.perf_counter()
    model, report = pipeline.compress_and_measure(
        name, dense, tokenizer, config, TextSpec(*calib, source="wiki"), eval_windows=int(wiki.shape[0]),
        chat_eval=chat, cache=cache, windows=wiki)
    seconds = time.perf_counter() - t0
    stages = pipeline.Stages(lambda f, m: None, {"dense reference": 1, "compressed perplexity and agreement": 1})
    on_code = pipeline.measure_against(name, dense, model, code, cache, stages, "code")
    row = {"method": method, "ratio": ratio, "config": report.config, "params": report.params_compressed,
           "ratio_achieved": report.ratio_achieved, "calibration_seconds": report.calibration_seconds,
           "compress_seconds": report.compress_seconds, "seconds_with_measurement": seconds, "peak_memory_mb": report.peak_memory_mb,
           "ppl_wiki": report.evaluation["ppl"], "ppl_code": on_code["ppl"],
           "agreement_wiki": report.agreement, "agreement_code": on_code["agreement"],
           "agreement_chat": report.agreement_chat, "calibration": report.calibration}
    return {**row, **zero_shot_fields(model, tokenizer, tasks, limit, threads)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--methods", default="dense," + ",".join(VARIANTS))
    ap.add_argument("--ratios", default="0.25", help="comma-separated target ratios")
    ap.add_argument("--limit", type=int, default=300, help="zero-shot items per task (0: no zero-shot)")
    ap.add_argument("--windows", type=int, default=16, help="1024-token wiki windows")
    ap.add_argument("--code-windows", type=int, default=16, help="1024-token code windows")
    ap.add_argument("--chat", type=int, default=32, help="held-out instructions for chat agreement")
    ap.add_argument("--calib", default="64x512", help="wiki calibration, samples x length")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the whole run")
    ap.add_argument("--out", type=Path, default=Path("bench/headline.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = tuple(int(x) for x in args.calib.split("x"))
    data = read_json(args.out) if args.out.exists() else {"rows": []}
    ratios = [float(r) for r in args.ratios.split(",")]
    data["settings"] = {"model": args.model, "ratios": ratios, "limit": args.limit, "tasks": list(HEADLINE_TASKS),
                        "wiki_windows": args.windows, "code_windows": args.code_windows,
                        "chat_conversations": args.chat, "calibration": list(calib),
                        "threads": torch.get_num_threads()}
    done = {(r["method"], r["ratio"]) for r in data["rows"]}
    dense, tokenizer = load_model(args.model)
    cache = pipeline.DenseCache()
    wiki = evaluation_windows(tokenizer, args.windows)
    code = evaluation_windows(tokenizer, args.code_windows, text=code_split("evaluation"))
    common = (dense, tokenizer, cache, wiki, code, args.chat)
    jobs = [("dense", 0.0)] if "dense" in args.methods.split(",") else []
    jobs += [(m, r) for r in ratios for m in args.methods.split(",") if m != "dense"]
    for method, ratio in jobs:
        if (method, ratio) in done:
            continue
        t0 = time.perf_counter()
        if method == "dense":
            row = dense_row(args.model, *common, HEADLINE_TASKS, args.limit, args.threads)
        else:
            row = method_row(args.model, method, ratio, *common, calib, HEADLINE_TASKS, args.limit,
                             args.threads)
        row["seconds"] = time.perf_counter() - t0
        data["rows"].append(row)
        write_json_atomic(args.out, data)
        print(json.dumps({"method": method, "ratio": ratio, "wiki": round(row["ppl_wiki"].get("compressed", row["ppl_wiki"]["dense"]), 2),
                          "zero_shot_avg": row.get("zero_shot_avg"),
                          "items_per_s": round(row.get("zero_shot_items_per_s", 0.0), 2),
                          "seconds": round(row["seconds"])}), flush=True)


if __name__ == "__main__":
    main()
