"""Command line: ``python -m compression compress|eval|methods|preview ...``, printing JSON on stdout.

Every argument is checked before a model is loaded: bad input (unknown model, unsupported
architecture, an option that does not apply to the method, a number out of range, an ``--out`` folder
that is not new or empty) exits with status 2 and one line on stderr, so no long work is lost.
Method options come from the configs' knob metadata (:mod:`compression.knobs`).
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import os
import sys
from pathlib import Path

from . import knobs as K
from .data import CalibrationError, TextSpec, evaluation_windows
from .files import FileError, write_json_atomic
from .hub import HubError, check_target, push_folder
from .methods import METHODS, UnknownMethod, get
from .models import DEFAULT_MODEL, ModelError
from .report import ReportError
from .timing import breakdown


class UsageError(ValueError):
    pass


@contextmanager
def tqdm_progress(desc: str):
    """A progress(fraction, message) callback drawing one tqdm bar on stderr, closed (and its line
    cleared) however the block ends, so an error message starts on a line of its own."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message, refresh=True)
    try:
        yield progress
    except BaseException:
        bar.close()
        print(file=sys.stderr)  # a captured (non-terminal) stderr keeps the bar's text on its line
        raise
    bar.close()


# --- arguments ----------------------------------------------------------------------------------

def knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per meaning: knobs of several methods share a flag only when they share its name
    (``--ratio``); a knob whose meaning differs per method declares its own flag (MoDeGPT's
    ``--leverage-ridge``, Olica's ``--calibration-ridge``). Read as text, converted by the knob."""
    by_flag: dict[str, list] = {}
    for method in METHODS.values():
        for k in method.knobs():
            by_flag.setdefault(k.cli, []).append((method.name, k))
    group = parser.add_argument_group("method options (each applies to the methods named)")
    for flag, entries in by_flag.items():
        k = entries[0][1]
        if len({kk.help for _, kk in entries}) == 1:
            text = f"{k.help} ({', '.join(m for m, _ in entries)})"
        else:
            text = "; ".join(f"{m}: {kk.help} (default {kk.default})" for m, kk in entries)
        group.add_argument(flag, dest=_dest(flag), default=None, metavar=k.kind.upper(),
                           help=text.replace("%", "%%"))


def _dest(flag: str) -> str:
    return "knob_" + flag.lstrip("-").replace("-", "_")


def method_values(args) -> dict:
    """The knob values given on the command line, converted and checked for ``args.method``."""
    method = get(args.method)
    mine = {_dest(k.cli): k for k in method.knobs()}
    values = {}
    for dest, text in vars(args).items():
        if not dest.startswith("knob_") or text is None:
            continue
        if dest not in mine:
            options = " ".join(k.cli for k in mine.values())
            raise UsageError(f"--{dest[len('knob_'):].replace('_', '-')} does not apply to {args.method} "
                             f"(its options: {options})")
        k = mine[dest]
        if k.kind in ("float", "int"):
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"{k.cli} must be a number, got {text!r}") from None
        else:
            value = text
        values[k.name] = K.coerce(k, value)
    return values


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, HF id or local folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    p.add_argument("--eval-windows", type=int, default=32, help="1024-token wiki windows for ppl")
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m compression", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model into a new folder (model + report.json)")
    add_common(c)
    c.add_argument("--method", required=True, choices=list(METHODS))
    knob_flags(c)
    defaults = ", ".join(f"{m.name}: {m.calibration}" for m in METHODS.values())
    c.add_argument("--calibration", default=None,
                   help="calibration source: wiki, self-chat (the model's own replies under its chat "
                        "template), code, text:FILE, hf:NAME[:CONFIG][:SPLIT], or a mixture like wiki+self-chat "
                        f"(default: the method's own, {defaults})")
    c.add_argument("--chat-eval", type=int, default=None,
                   help="held-out instructions on which chat agreement with the dense model is measured "
                        "(0: skip; default 16, 0 with --offload: the dense replies are generated, and a "
                        "streamed model reads every block per token)")
    c.add_argument("--calib-samples", type=int, default=64)
    c.add_argument("--calib-len", type=int, default=512)
    c.add_argument("--no-eval", action="store_true", help="skip dense/compressed perplexity")
    c.add_argument("--heal-tokens", type=int, default=0, help="recovery-training token budget (0: none)")
    c.add_argument("--lora-rank", type=int, default=0, help="LoRA rank for healing (0: full-parameter)")
    c.add_argument("--heal-lr", type=float, default=None)
    c.add_argument("--heal-seq-len", type=int, default=256)
    c.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the model one decoder block at a time (weights stay memory-mapped on disk; "
                        "the compressed blocks go to disk, then into --out shard by shard). Default: on when "
                        "2.2 × the weights' bytes exceed the free memory of the device")
    c.add_argument("--stats-precision", choices=("auto", "float64", "mixed"), default="auto",
                   help="calibration statistics: float64 throughout, or float32 per batch accumulated in "
                        "float64 (mixed); auto: float64 on GPUs with full-rate float64, mixed on the CPU and other GPUs")
    c.add_argument("--time-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one plain dense forward over the calibration tokens, the unit the "
                        "report's compress time is given in (timing.compress_per_forward)")
    c.add_argument("--out", required=True, type=Path, help="a new or empty folder")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    c.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="after saving, upload the folder to this hub model repo (owner/name, created if "
                        "missing); needs the network and a token (HF_TOKEN or a saved login)")
    e = sub.add_parser("eval", help="perplexity, size, speed and zero-shot of a model; JSON out")
    add_common(e)
    e.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks (lm-eval), e.g. piqa,hellaswag")
    e.add_argument("--limit", type=int, default=None, help="zero-shot items per task")
    e.add_argument("--reference", default=None,
                   help="the dense model to measure agreement against (KL, top-1 and ppl ratio on the same "
                        "windows), e.g. smollm2-135m")
    e.add_argument("--code-windows", type=int, default=8,
                   help="1024-token windows of held-out source code for a second-domain perplexity (0: skip)")
    sub.add_parser("methods", help="the methods and their options, as JSON")
    add_preview(sub)
    return ap.parse_args(argv)


def _at_least(value: int, low: int, flag: str) -> None:
    if value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}")


def check_model(name: str, trust_remote_code: bool):
    from .arch import arch_for
    from .models import load_config

    config = load_config(name, trust_remote_code)
    arch_for(config)
    return config


# --- commands -----------------------------------------------------------------------------------

def cmd_methods(args) -> dict:
    return {m.name: {"label": m.label, "config": m.config.__name__,
                     "options": [{"flag": k.cli, "kind": k.kind, "default": k.default, "help": k.help,
                                  "range": k.range_text(), "choices": k.choices} for k in m.knobs()]}
            for m in METHODS.values()}


def decide_offload(args) -> tuple[bool, str]:
    """(stream?, why): ``--offload``/``--no-offload`` as given, else on when the dense model and its
    working copy, 2.2 × the weights' bytes at the load dtype, exceed the free memory of the device
    (:func:`compression.streaming.needs_offload`). The decision is printed on stderr."""
    from .models import default_device, weight_bytes
    from .streaming import needs_offload

    if args.offload is not None:
        offload, why = args.offload, "--offload" if args.offload else "--no-offload"
    else:
        device = args.device or default_device()
        offload, why = needs_offload(weight_bytes(args.model, args.dtype, device, args.trust_remote_code),
                                     device, copies=2)
    print(f"offload: {'on' if offload else 'off'} ({why})", file=sys.stderr)
    return offload, why


def tokens_up_front(args, model, tokenizer, spec: TextSpec, eval_windows: int):
    """For a streamed run: the calibration (fit, held-out, facts) and evaluation tokens cut before any
    model work, then the article text they came from dropped (its cache and the allocator's free
    pages: ~0.45 GB with the offline Wikipedia), so the text is not part of the run's peak memory."""
    import time

    from . import data, pipeline
    from .evaluate import _release_free_memory

    t0 = time.perf_counter()
    fit, held_out, facts = pipeline.calibration_tokens(args.model, model, tokenizer, spec)
    facts = {**facts, "text_seconds": round(time.perf_counter() - t0, 3)}
    windows = evaluation_windows(tokenizer, eval_windows, args.eval_len) if eval_windows else None
    data.wiki_articles.cache_clear()
    _release_free_memory()
    return (fit, held_out, facts), windows


@contextmanager
def offload_folder(out: Path, offload: bool):
    """A scratch folder beside ``out`` for the streamed run's compressed blocks (same file system, so
    saving reads them back cheaply), removed however the command ends; None without offload."""
    import shutil
    import tempfile

    if not offload:
        yield None
        return
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{Path(out).name}.offload-", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cmd_compress(args) -> dict:
    from . import pipeline
    from .models import load_model

    config = get(args.method).make_config(method_values(args))
    if args.offload and args.heal_tokens:
        raise UsageError("--heal-tokens trains the whole model in memory; it cannot follow --offload")
    for value, low, flag in ((args.calib_samples, 1, "--calib-samples"), (args.calib_len, 2, "--calib-len"),
                             (args.eval_windows, 0, "--eval-windows"), (args.eval_len, 2, "--eval-len"),
                             (args.heal_tokens, 0, "--heal-tokens"), (args.lora_rank, 0, "--lora-rank"),
                             (args.chat_eval or 0, 0, "--chat-eval")):
        _at_least(value, low, flag)
    from .sources import MAX_CALIBRATION_TOKENS, parse as parse_source

    if args.calib_samples * args.calib_len > MAX_CALIBRATION_TOKENS:
        raise UsageError(f"calibration of --calib-samples × --calib-len = {args.calib_samples * args.calib_len:,} "
                         f"tokens; the limit is {MAX_CALIBRATION_TOKENS:,}")

    chosen = args.calibration is not None
    args.calibration = args.calibration or METHODS[args.method].calibration
    for part in parse_source(args.calibration):
        if part.startswith("text:") and not Path(part[5:]).expanduser().is_file():
            raise UsageError(f"--calibration {part}: no such file")
    heal_config = None
    if args.heal_tokens:
        from .heal import HealConfig
        # Healing reads the calibration split after the tokens used to calibrate the compression.
        heal_config = HealConfig(tokens=args.heal_tokens, lora_rank=args.lora_rank, lr=args.heal_lr,
                                 seq_len=args.heal_seq_len, seed=args.seed,
                                 offset=args.calib_samples * args.calib_len)
    pipeline.check_out_folder(args.out, args.force)
    if args.push_to_hub:
        check_target(args.push_to_hub)
    check_model(args.model, args.trust_remote_code)
    offload, why = decide_offload(args)
    if offload and heal_config is not None:
        raise UsageError(f"the model would be streamed ({why}); --heal-tokens needs it in memory")
    if offload and not chosen and "self-chat" in parse_source(args.calibration):
        # Generating replies with a streamed model reads every block once per token: hours, not minutes.
        print(f"calibration: wiki, not the method's default {args.calibration} (self-chat replies would be "
              "generated block by block under --offload; pass --calibration to insist)", file=sys.stderr)
        args.calibration = "wiki"
    default_chat = 0 if offload else pipeline.CHAT_CONVERSATIONS
    chat_eval = 0 if args.no_eval else (args.chat_eval if args.chat_eval is not None else default_chat)
    if offload:
        from .streaming import return_large_frees

        return_large_frees()
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code, offload=offload)
    spec = TextSpec(args.calib_samples, args.calib_len, source=args.calibration)
    eval_windows = 0 if args.no_eval else args.eval_windows
    calibration, windows = tokens_up_front(args, model, tokenizer, spec, eval_windows) if offload else (None, None)
    with offload_folder(args.out, offload) as spill:
        with tqdm_progress(args.method) as bar:
            compressed, report = pipeline.compress_and_measure(
                args.model, model, tokenizer, config, spec, eval_windows=eval_windows,
                eval_len=args.eval_len, chat_eval=chat_eval, seed=args.seed,
                cache=pipeline.default_cache(), progress=bar, offload=offload, offload_folder=spill,
                precision=args.stats_precision, calibration=calibration, windows=windows,
                time_forward=args.time_forward)
        del model
        if calibration is not None:
            report.calibration["text_seconds"] = calibration[2]["text_seconds"]
        report.extra["offload"]["why"] = why
        if offload and not chat_eval and not args.no_eval:
            report.extra["offload"]["chat_eval"] = "skipped (pass --chat-eval N to measure it streamed)"
        if heal_config is not None:
            windows = None if args.no_eval else evaluation_windows(tokenizer, args.eval_windows, args.eval_len)
            with tqdm_progress("heal") as bar:
                record = pipeline.heal_and_measure(compressed, tokenizer, heal_config, windows, bar)
            report.heal = record
        pipeline.save(args.out, compressed, tokenizer, report, replace=args.force)
    summary = {k: v for k, v in report.to_dict().items() if not isinstance(v, (list, dict))}
    if report.heal:
        summary.update(heal_tokens=report.heal["tokens"], heal_seconds=report.heal["seconds"],
                       ppl_healed=report.heal.get("ppl_after"))
    summary["warnings"] = report.warnings
    summary["timing"] = report.timing
    summary["offload"] = offload
    summary["out"] = str(args.out)
    if args.push_to_hub:
        summary["hub_url"] = push_folder(args.out, args.push_to_hub)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(breakdown(report.timing), file=sys.stderr)
    return summary


def cmd_eval(args) -> dict:
    """Size, wiki and code perplexity with 95% intervals, agreement with ``--reference``, speed and
    zero-shot (per task acc, stderr and n) of one model."""
    from . import pipeline
    from .data import code_split
    from .evaluate import perplexity_stats, sizes, speed
    from .models import load_model

    _at_least(args.eval_windows, 1, "--eval-windows")
    _at_least(args.eval_len, 2, "--eval-len")
    _at_least(args.code_windows, 0, "--code-windows")
    if args.limit is not None:
        _at_least(args.limit, 1, "--limit")
    if args.json is not None and args.json.is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file name")
    tasks = None
    if args.tasks:
        from .zeroshot import TASKS
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise UsageError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    check_model(args.model, args.trust_remote_code)
    if args.reference:
        check_model(args.reference, args.trust_remote_code)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    domains = {"wiki": evaluation_windows(tokenizer, args.eval_windows, args.eval_len)}
    if args.code_windows:
        domains["code"] = evaluation_windows(tokenizer, args.code_windows, args.eval_len, text=code_split("evaluation"))
    result = {"model": args.model, **sizes(model)}
    if args.reference:
        dense, _ = load_model(args.reference, args.device, args.dtype, args.trust_remote_code)
        cache = pipeline.DenseCache()
        with tqdm_progress("perplexity and agreement") as bar:
            stages = pipeline.Stages(bar, {f"{d} {s}": 1.0 for d in domains
                                           for s in ("dense reference", "compressed perplexity and agreement")})
            for domain, windows in domains.items():
                measured = pipeline.measure_against(args.reference, dense, model, windows, cache,
                                                    _DomainStages(stages, domain), what=f"{domain} evaluation split")
                suffix = "" if domain == "wiki" else f"_{domain}"
                result[f"ppl{suffix}"] = measured["ppl"]["compressed"]
                result[f"ppl{suffix}_ci"] = measured["ppl"]["compressed_ci"]
                result[f"ppl{suffix}_dense"] = measured["ppl"]["dense"]
                result[f"ppl{suffix}_windows"] = measured["ppl"]["windows"]
                result[f"agreement{suffix}"] = measured["agreement"]
        del dense, cache
    else:
        for domain, windows in domains.items():
            with tqdm_progress(f"{domain} perplexity") as bar:
                stats = perplexity_stats(model, windows, progress=bar)
            suffix = "" if domain == "wiki" else f"_{domain}"
            result[f"ppl{suffix}"], result[f"ppl{suffix}_ci"] = stats["ppl"], stats["ppl_ci"]
            result[f"ppl{suffix}_windows"] = stats["windows"]
    if not args.no_speed:
        result.update(speed(model))
    if tasks:
        from .zeroshot import zero_shot
        # One thread on a CPU: lm-eval's many small ops oversubscribe a shared machine (3.5x faster).
        threads = None if next(model.parameters()).is_cuda else 1
        result["zero_shot"] = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=args.limit, threads=threads)
    if args.json:
        write_json_atomic(args.json, result)
    return result


def add_preview(sub) -> None:
    v = sub.add_parser("preview", help="forecast parameters and per-layer errors of settings from one "
                                       "calibration pass over the dense model, as JSON (no compression)",
                       description="One calibration pass over the dense model, then one row per --ratios value (or "
                                   "one): parameters and each layer's predicted error per module (compression.preview)."
                                   " --allocation best: per ratio, the allocation of lowest forecast; "
                                   "--layer-sparsity alone implies --allocation manual.")
    v.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, HF id or local folder")
    v.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    v.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--method", required=True, choices=list(METHODS))
    knob_flags(v)
    v.add_argument("--ratios", default=None, help="comma-separated targets, one row each (instead of --ratio)")
    v.add_argument("--calibration", default=None, help="calibration source, as for compress (default: the method's)")
    v.add_argument("--calib-samples", type=int, default=64)
    v.add_argument("--calib-len", type=int, default=512)
    v.add_argument("--stats-precision", choices=("auto", "float64", "mixed"), default="auto", help="as for compress")


def _preview_configs(args) -> tuple[list, bool]:
    """The configs of the rows (one per --ratios value, else one) and whether --allocation best."""
    from .knobs import parse_list

    best, method = args.knob_allocation == "best", get(args.method)
    args.knob_allocation = None if best else args.knob_allocation
    values = method_values(args)
    if values.get("layer_sparsity") is not None and "allocation" not in values:
        values["allocation"] = "manual"
    if args.ratios is not None and "ratio" in values:
        raise UsageError("give --ratio or --ratios, not both")
    ratios = [values.get("ratio")] if args.ratios is None else parse_list(args.ratios, float, "--ratios")
    if not ratios:
        raise UsageError("--ratios needs at least one value")
    if best and ("auto" not in method.allocations or not method.has_knob("layer_sparsity")):
        raise UsageError(f"--allocation best ranks per-layer allocations; {args.method} has none")
    return [method.make_config({**values, "ratio": r}) for r in ratios], best


def cmd_preview(args) -> dict:
    """Parameters and per-layer predicted errors of each setting (compression.preview), as JSON."""
    import time

    from . import pipeline
    from .calibration import statistics_precision
    from .models import load_model
    from .preview import collect
    from .preview import rows
    from .sources import MAX_CALIBRATION_TOKENS, parse as parse_source

    configs, best = _preview_configs(args)
    _at_least(args.calib_samples, 1, "--calib-samples")
    _at_least(args.calib_len, 2, "--calib-len")
    if args.calib_samples * args.calib_len > MAX_CALIBRATION_TOKENS:
        raise UsageError(f"--calib-samples × --calib-len over the limit of {MAX_CALIBRATION_TOKENS:,} tokens")
    args.calibration = args.calibration or METHODS[args.method].calibration
    for part in parse_source(args.calibration):
        if part.startswith("text:") and not Path(part[5:]).expanduser().is_file():
            raise UsageError(f"--calibration {part}: no such file")
    check_model(args.model, args.trust_remote_code)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    spec = TextSpec(args.calib_samples, args.calib_len, source=args.calibration)
    with tqdm_progress("calibration text") as bar:
        fit, _, _ = pipeline.calibration_tokens(args.model, model, tokenizer, spec, progress=bar)
    t0 = time.perf_counter()
    with tqdm_progress("statistics") as bar, statistics_precision(args.stats_precision):
        statistics = collect(model, fit, getattr(configs[0], "batch_size", 8), bar)
    t1 = time.perf_counter()
    out = rows(statistics, configs, model.config, best)
    return {"model": args.model, "method": args.method,
            "calibration": {"source": args.calibration, "samples": int(fit.shape[0]), "seq_len": int(fit.shape[1])},
            "collect_s": round(t1 - t0, 3), "predict_ms": round(1e3 * (time.perf_counter() - t1) / len(out), 3),
            "block_influence": statistics.influence, "rows": out}


class _DomainStages:
    """Stage callbacks of one domain within the eval command's progress bar."""

    def __init__(self, stages, domain: str):
        self.stages, self.domain = stages, domain

    def stage(self, name: str):
        return self.stages.stage(f"{self.domain} {name}")


def main(argv=None) -> int:
    args = parse(argv)
    commands = {"compress": cmd_compress, "eval": cmd_eval, "methods": cmd_methods, "preview": cmd_preview}
    try:
        result = commands[args.command](args)
    except (UsageError, ModelError, CalibrationError, FileError, ReportError, UnknownMethod, HubError,
            ValueError, OSError) as err:
        if os.environ.get("COMPRESSION_DEBUG"):
            raise
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.filename:
            text = f"{err.filename}: {err.strerror or text}"
        print(f"error: {text}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
