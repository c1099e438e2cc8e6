"""Command line: ``python -m compression compress|eval ...``, printing and writing JSON.

Bad input (unknown model, unsupported architecture, ratio outside [0, 0.9], too little calibration
text) exits with status 2 and one line on stderr, before any long work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import methods
from .api import compress
from .arch import arch_for
from .data import CalibrationError, TextSpec, evaluation_windows
from .evaluate import perplexity, sizes, speed
from .models import DEFAULT_MODEL, ModelError, load_config, load_model


class UsageError(ValueError):
    pass


def tqdm_progress(desc: str):
    """A progress(fraction, message) callback drawing one tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message, refresh=True)
    progress.close = bar.close
    return progress


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, HF id or local folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    p.add_argument("--eval-windows", type=int, default=32, help="1024-token wiki windows for ppl")
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m compression", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model, write DIR/report.json and DIR/model/")
    add_common(c)
    c.add_argument("--method", required=True, choices=sorted(methods.METHODS))
    c.add_argument("--ratio", type=float, default=None,
                   help="fraction of decoder-block parameters to remove, in [0, 0.9]")
    methods.add_method_arguments(c)
    c.add_argument("--calib-samples", type=int, default=64)
    c.add_argument("--calib-len", type=int, default=512)
    c.add_argument("--calib-batch", type=int, default=8)
    c.add_argument("--no-eval", action="store_true", help="skip dense/compressed perplexity")
    c.add_argument("--heal-tokens", type=int, default=0, help="recovery-training token budget (0: none)")
    c.add_argument("--lora-rank", type=int, default=0, help="LoRA rank for healing (0: full-parameter)")
    c.add_argument("--heal-lr", type=float, default=None)
    c.add_argument("--heal-seq-len", type=int, default=256)
    c.add_argument("--out", required=True, type=Path)
    e = sub.add_parser("eval", help="perplexity, size and speed of a model; JSON out")
    add_common(e)
    e.add_argument("--json", type=Path, default=None, help="write the results here")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks (lm-eval), e.g. piqa,hellaswag")
    e.add_argument("--limit", type=int, default=None, help="zero-shot items per task")
    b = sub.add_parser("bench", help="every method at several ratios; results.json + BENCHMARKS.md")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--device", default=None)
    b.add_argument("--out", type=Path, default=Path("bench"))
    b.add_argument("--ratios", default="0.1,0.2,0.25,0.3")
    b.add_argument("--slicing", default="0.1,0.2,0.25,0.3", help="SliceGPT's native slicing fractions")
    b.add_argument("--methods", default=None, help="comma-separated subset, e.g. slicegpt,olica")
    b.add_argument("--allocation", default="uniform", choices=("uniform", "auto"))
    b.add_argument("--tasks", default=None,
                   help="zero-shot tasks (default: the five headline tasks and BoolQ)")
    b.add_argument("--limit", type=int, default=50,
                   help="zero-shot items per task (0: all); the published table uses 50")
    b.add_argument("--calib-samples", type=int, default=64)
    b.add_argument("--calib-len", type=int, default=512)
    b.add_argument("--eval-windows", type=int, default=32)
    b.add_argument("--keep", type=Path, default=None,
                   help="save each compressed model here (bench/sweep.py --respeed re-measures them)")
    b.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    b.add_argument("--assets", type=Path, default=Path("assets"))
    return ap.parse_args(argv)


def check_model(name: str, trust_remote_code: bool):
    config = load_config(name, trust_remote_code)
    arch_for(config)
    return config


def cmd_compress(args) -> dict:
    if args.ratio is not None and not 0.0 <= args.ratio <= 0.9:
        raise UsageError(f"--ratio must be in [0, 0.9], got {args.ratio}")
    config = methods.config_from_args(args)  # validates method options before loading anything
    heal_config = None
    if args.heal_tokens:
        from .heal import HealConfig
        # Healing reads the calibration split after the tokens used to calibrate the compression.
        heal_config = HealConfig(tokens=args.heal_tokens, lora_rank=args.lora_rank, lr=args.heal_lr,
                                 seq_len=args.heal_seq_len, seed=args.seed,
                                 offset=args.calib_samples * args.calib_len)
    check_model(args.model, args.trust_remote_code)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    t0 = time.perf_counter()
    calib = TextSpec(args.calib_samples, args.calib_len).batches(tokenizer)
    tokenize_seconds = time.perf_counter() - t0
    windows = None if args.no_eval else evaluation_windows(tokenizer, args.eval_windows, args.eval_len)
    ppl_dense = None
    if windows is not None:
        ppl_dense = cached_dense_perplexity(args, model, windows)
    bar = tqdm_progress(f"{args.method}")
    report = compress(model, config, calib, progress=bar)
    bar.close()
    model = report.compressed
    report.model = args.model
    report.ppl_dense = ppl_dense
    report.calibration_seconds += tokenize_seconds
    if windows is not None:
        bar = tqdm_progress("compressed perplexity")
        report.ppl_compressed = perplexity(model, windows, progress=bar)
        bar.close()
    if heal_config is not None:
        from .heal import heal
        bar = tqdm_progress("heal")
        record = heal(model, tokenizer, heal_config, progress=bar)
        bar.close()
        record["ppl_before"] = report.ppl_compressed
        record["ppl_after"] = None if windows is None else perplexity(model, windows)
        report.heal = record
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    report.save(args.out / "report.json")
    summary = {k: v for k, v in report.to_dict().items() if not isinstance(v, (list, dict))}
    if report.heal:
        summary.update(heal_tokens=report.heal["tokens"], heal_seconds=report.heal["seconds"],
                       ppl_healed=report.heal["ppl_after"])
    summary["out"] = str(args.out)
    return summary


def cached_dense_perplexity(args, model, windows) -> float:
    """Dense perplexity, remembered per (weights file, protocol): the dense model never changes, and
    recomputing it costs minutes on a CPU. The key includes the weights' size and mtime."""
    from .models import cache_root, resolve_source

    source = Path(resolve_source(args.model))
    weights = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    key = None
    if weights:
        stat = weights[0].stat()
        key = f"{weights[0].resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tuple(windows.shape)}|" \
              f"{hash(tuple(windows[:, :8].flatten().tolist()))}|{next(model.parameters()).dtype}|{next(model.parameters()).device.type}"
    path = cache_root() / "dense_ppl.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key and key in cache:
        return cache[key]
    bar = tqdm_progress("dense perplexity")
    ppl = perplexity(model, windows, progress=bar)
    bar.close()
    if key:
        cache[key] = ppl
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    return ppl


def cmd_eval(args) -> dict:
    tasks = None
    if args.tasks:
        from .zeroshot import TASKS
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise UsageError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    check_model(args.model, args.trust_remote_code)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    windows = evaluation_windows(tokenizer, args.eval_windows, args.eval_len)
    result = {"model": args.model, **sizes(model)}
    bar = tqdm_progress("perplexity")
    result["ppl"] = perplexity(model, windows, progress=bar)
    bar.close()
    if not args.no_speed:
        result.update(speed(model))
    if tasks:
        from .zeroshot import zero_shot
        result["zero_shot"] = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=args.limit)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def cmd_bench(args) -> dict:
    from . import bench

    floats = lambda text: tuple(float(x) for x in text.split(",") if x.strip())  # noqa: E731
    tasks = None if args.tasks is None else tuple(t for t in args.tasks.split(",") if t)
    check_model(args.model, False)
    rows = bench.run(args.out, args.model, floats(args.ratios), floats(args.slicing),
                     None if not args.methods else tuple(args.methods.split(",")), tasks,
                     args.limit or None, (args.calib_samples, args.calib_len), args.eval_windows,
                     args.allocation, args.device, log=lambda m: print(m, file=sys.stderr),
                     keep=args.keep)
    command = "python -m compression " + " ".join(sys.argv[1:] if argv_is_cli() else ["bench"])
    bench.write_markdown(args.out / "results.json", args.markdown, args.assets, command)
    return {"rows": len(rows), "results": str(args.out / "results.json"), "markdown": str(args.markdown)}


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name in ("__main__.py", "compression")


def main(argv=None) -> int:
    args = parse(argv)
    try:
        result = {"compress": cmd_compress, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
    except (UsageError, ModelError, CalibrationError, ValueError) as err:
        if os.environ.get("COMPRESSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
