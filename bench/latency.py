"""How long the app's default run takes, through the app's own code path, and what it gives.

``python -m bench.latency [--out bench/latency.json]``:

- cold: a fresh cache folder (``COMPRESSION_CACHE``), so only shipped assets help (the default model's
  self-chat and chat-reference replies in ``assets/self_chat``); the model is loaded first, as the
  app does at start-up, and its load time is reported apart (``model_load_s``, GGUF conversion
  included);
- ``first_s``: the Compress tab's handler (:meth:`ui.compress_tab.CompressTab.compress`) at the page's
  defaults, from the call to the result; ``second_s``: the same handler at another ratio on the same
  model (session caches warm);
- ``ppl_wiki_modegpt_025``: MoDeGPT 0.25 at the app's default calibration and allocation, measured on
  32 × 1024 wiki evaluation windows (as the 64 × 512 reference row in BENCHMARKS.md);
- each run's stage breakdown (``report.timing``);
- ``inference``: prefill and decode tokens/s of the four methods at 0.25 (each method's headline
  variant, compressed at the app's default calibration) against the dense model, at batch 1 and batch
  16, all models alternating in one process (:func:`compression.evaluate.speed_side_by_side`);
  ``--no-inference`` skips it, ``--inference-only`` adds it to an existing results file.

Results go to the JSON file and to BENCHMARKS.md's "Latency of the app's default run" section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import marked

SECTION = ("<!-- latency:start -->", "<!-- latency:end -->")


def last(generator):
    out = None
    for out in generator:
        pass
    return out


def app_run(tab, session, ratio: float) -> tuple[float, dict]:
    """Seconds of one Compress click at the page's CPU defaults, and the run's report."""
    from compression.methods import METHODS
    from ui.calibration_form import CALIBRATION_CPU, CALIBRATION_GPU
    from ui.compress_tab import DEFAULT_ALLOCATION, DEFAULT_METHOD

    samples, length = CALIBRATION_GPU if torch.cuda.is_available() else CALIBRATION_CPU
    t0 = time.perf_counter()
    out = last(tab.compress(session, "smollm2-135m", DEFAULT_METHOD, ratio, DEFAULT_ALLOCATION, "", False,
                            samples, length, 0, 8, 0.1, "", 4, None,
                            calib_source=METHODS[DEFAULT_METHOD].calibration, chat_eval=8))
    seconds = time.perf_counter() - t0
    run = session.runs[out[2]["run"]] if isinstance(out[2], dict) and "run" in out[2] else None
    if run is None:
        raise RuntimeError(f"the app's run failed: {out[1]}")
    return seconds, run.report


# (batch, prompt tokens, new tokens, rounds): batch 1 is the chat case (the Evaluate tab's 512-token
# prompt); batch 16 the throughput case the MoDeGPT paper's "+46% throughput" speaks of (shorter
# prompts keep it to minutes on 2 cores).
INFERENCE_SETTINGS = ((1, 512, 64, 5), (16, 128, 32, 5))


def paired_ratio(rates: list[float], dense_rates: list[float]) -> float:
    """Median over rounds of (model's rate ÷ the dense rate of the same round): the rounds alternate,
    so the ratio within a round cancels the machine's drift between rounds."""
    return statistics.median(r / d for r, d in zip(rates, dense_rates))


def inference(store, dense, tokenizer, spec, ratio: float = 0.25) -> dict:
    """Prefill/decode tokens/s of each method's headline variant at ``ratio`` (MoDeGPT with automatic
    allocation, as the app starts) against dense, per batch setting, with × dense per round."""
    from compression.evaluate import sizes, speed_side_by_side
    from compression.methods import METHODS
    from compression.pipeline import compress_and_measure

    models, params, unequal = {"dense": dense}, {"dense": sizes(dense)["params"]}, {}
    calibration = store.calibration("smollm2-135m", spec)
    for name, m in METHODS.items():
        config = m.make_config({**m.headline, "ratio": ratio})
        model, _ = compress_and_measure("smollm2-135m", dense, tokenizer, config, spec, cache=store.dense,
                                        calibration=calibration, time_forward=False)
        models[name], params[name] = model.eval(), sizes(model)["params"]
        attns = [getattr(layer, "self_attn", None) for layer in model.model.layers]
        unequal[name] = sum(getattr(a, "qk_dim", 0) != getattr(a, "v_dim", 0) for a in attns if a is not None)
        print(f"compressed {name}: {params[name]:,} params", flush=True)
    out = {"ratio": ratio, "params": params, "variants": {n: m.headline for n, m in METHODS.items()},
           "layers_with_unequal_qk_v": unequal, "settings": []}
    for batch, prompt_len, new_tokens, rounds in INFERENCE_SETTINGS:
        speeds = speed_side_by_side(models, prompt_len, new_tokens, rounds, batch=batch, memory=False)
        base = speeds["dense"]
        rows = {name: {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                       "prefill_vs_dense": paired_ratio(r["prefill_tok_s_rounds"], base["prefill_tok_s_rounds"]),
                       "decode_vs_dense": paired_ratio(r["decode_tok_s_rounds"], base["decode_tok_s_rounds"]),
                       "prefill_rounds": r["prefill_tok_s_rounds"], "decode_rounds": r["decode_tok_s_rounds"]}
                for name, r in speeds.items()}
        out["settings"].append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                                "rounds": rounds, "models": rows})
        print(json.dumps({"batch": batch, **{n: [round(r["prefill_vs_dense"], 3), round(r["decode_vs_dense"], 3)]
                                             for n, r in rows.items()}}), flush=True)
    return out


def whole_forward(store, dense, spec) -> float:
    """Seconds of a whole plain forward over the app's calibration tokens: the check on the runs'
    unit, which times a share of the batches and scales."""
    fit = store.calibration("smollm2-135m", spec)[0]
    seconds, _ = store.dense.calibration_forward("smollm2-135m", dense, fit, timed_share=1.0)
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/latency.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--second-ratio", type=float, default=0.25)
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure prefill/decode speed of the four methods at 0.25 (minutes)")
    parser.add_argument("--inference-only", action="store_true",
                        help="measure only the inference speed and add it to an existing --out file")
    args = parser.parse_args(argv)
    os.environ["COMPRESSION_CACHE"] = tempfile.mkdtemp(prefix="latency-cache-")  # cold: shipped assets only

    import app
    from compression.data import TextSpec
    from compression.methods import METHODS
    from compression.pipeline import compress_and_measure
    from ui.calibration_form import CALIBRATION_CPU, CALIBRATION_GPU
    from ui.compress_tab import DEFAULT_ALLOCATION, DEFAULT_METHOD, DEFAULT_RATIO
    from ui.runs import Session
    from ui.store import ModelStore

    store = ModelStore()
    t0 = time.perf_counter()
    dense, tokenizer = store.get("smollm2-135m")
    load_s = time.perf_counter() - t0
    samples, length = CALIBRATION_GPU if torch.cuda.is_available() else CALIBRATION_CPU
    spec = TextSpec(samples, length, source=METHODS[DEFAULT_METHOD].calibration)
    if args.inference_only:
        result = json.loads(args.out.read_text())
        result["inference"] = inference(store, dense, tokenizer, spec)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        write_section(args.markdown, result)
        return
    ctx = app.Context(store)
    tab, session = app.CompressTab(ctx), Session()
    first_s, first = app_run(tab, session, DEFAULT_RATIO)
    second_s, second = app_run(tab, session, args.second_ratio)

    unit_whole = whole_forward(store, dense, spec)
    config = METHODS[DEFAULT_METHOD].make_config({"ratio": 0.25, "allocation": DEFAULT_ALLOCATION})
    _, ppl_report = compress_and_measure("smollm2-135m", dense, tokenizer, config, spec, eval_windows=32,
                                         cache=store.dense, calibration=store.calibration("smollm2-135m", spec))
    result = {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "settings": {"method": DEFAULT_METHOD, "allocation": DEFAULT_ALLOCATION,
                     "calibration": [samples, length, spec.source], "ppl_windows": 4, "chat_eval": 8,
                     "first_ratio": DEFAULT_RATIO, "second_ratio": args.second_ratio},
        "app_default": {
            "model_load_s": round(load_s, 1), "first_s": round(first_s, 1), "second_s": round(second_s, 1),
            "ppl_wiki_modegpt_025": ppl_report.ppl_compressed, "ppl_wiki_dense": ppl_report.ppl_dense,
            "ppl_windows": 32, "first_timing": first.get("timing"), "second_timing": second.get("timing"),
            "ppl_run_timing": ppl_report.timing, "unit_whole_forward_s": round(unit_whole, 3),
        },
        "targets": {"first_s": 120, "second_s": 60, "ppl_wiki_modegpt_025": 34.5,
                    "batch16_vs_dense": 1.15},
    }
    if args.inference:
        result["inference"] = inference(store, dense, tokenizer, spec)
    elif args.out.exists() and "inference" in json.loads(args.out.read_text()):  # keep, and say so
        earlier = json.loads(args.out.read_text())["inference"]
        earlier.setdefault("kept_from", "`--no-inference` left the inference speed of the previous results file")
        result["inference"] = earlier
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_section(args.markdown, result)
    print(json.dumps({k: v for k, v in result["app_default"].items() if not k.endswith("timing")}))


def cpu_model() -> str:
    """The CPU's model name (Linux), so results from different machines are not compared blindly."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _stages(timing: dict | None) -> str:
    from compression.timing import breakdown

    return breakdown(timing or {}).removeprefix("timing: ")


def markdown(result: dict) -> str:
    a, s = result["app_default"], result["settings"]
    cal = s["calibration"]
    rows = [
        f"| first run (cold caches, shipped assets only), ratio {s['first_ratio']} | {a['first_s']:.1f} s | ≤ 120 s |",
        f"| second run, ratio {s['second_ratio']}, same model | {a['second_s']:.1f} s | ≤ 60 s |",
        f"| wiki ppl, MoDeGPT 0.25 at this calibration ({a['ppl_windows']} windows; dense "
        f"{a['ppl_wiki_dense']:.2f}) | {a['ppl_wiki_modegpt_025']:.2f} | ≤ 34.5 |",
    ]
    return "\n".join([
        "## Latency of the app's default run",
        "",
        f"`python -m bench.latency` ({result['machine']['device']}, {result['machine'].get('cpu', '?')}, "
        f"{result['machine']['threads']} threads): "
        f"the Compress tab's handler at the page's defaults ({s['method']}, {s['allocation']} allocation, "
        f"{cal[2]}, {cal[0]} × {cal[1]} tokens, {s['ppl_windows']} perplexity windows, {s['chat_eval']} chat "
        f"conversations), click to result. Model load ({a['model_load_s']:.1f} s, at app start) not included.",
        "",
        "| what | measured | target |",
        "|---|---|---|",
        *rows,
        "",
        f"- first run: {_stages(a['first_timing'])}",
        f"- second run: {_stages(a['second_timing'])}",
        f"- ppl run: {_stages(a['ppl_run_timing'])}",
        *unit_check(a),
        "",
        *inference_markdown(result.get("inference")),
    ])


def unit_check(a: dict) -> list[str]:
    """One line comparing the runs' scaled unit with a whole forward timed after them."""
    timing, whole = a.get("first_timing") or {}, a.get("unit_whole_forward_s")
    unit, share = timing.get("calibration_forward_s"), timing.get("calibration_forward_timed")
    if not (whole and unit and share):
        return []
    return [f"- the runs time {share:.0%} of the calibration batches and scale ({unit:.1f} s); a whole "
            f"forward timed after them took {whole:.1f} s ({unit / whole - 1:+.0%})."]


def inference_markdown(inf: dict | None) -> list[str]:
    """The inference-speed table: tokens/s and × dense per method, batch setting and phase."""
    if not inf:
        return []
    head = ["method", "params"]
    for st in inf["settings"]:
        head += [f"prefill b{st['batch']}", f"decode b{st['batch']}"]
    lines = [f"### Inference speed at {inf['ratio']}", "",
             *([f"Kept from an earlier run: {inf['kept_from']}.", ""] if inf.get("kept_from") else []),
             "Tokens/s of the whole batch (median over rounds; × dense: the median of each round's ratio to "
             "the dense model, rounds alternating between all models in one process). Each method's headline "
             "variant (MoDeGPT with automatic allocation, as the app starts). Settings: "
             + "; ".join(f"batch {st['batch']}: {st['prompt_len']}-token prompts, {st['new_tokens']} greedy "
                         f"tokens, {st['rounds']} rounds" for st in inf["settings"]) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, params in inf["params"].items():
        cells = [name, f"{params / 1e6:.1f} M"]
        for st in inf["settings"]:
            r = st["models"][name]
            cells += [f"{r['prefill_tok_s']:.0f} ({r['prefill_vs_dense']:.2f}×)",
                      f"{r['decode_tok_s']:.1f} ({r['decode_vs_dense']:.2f}×)"]
        lines.append("| " + " | ".join(cells) + " |")
    wide = max(inf["settings"], key=lambda st: st["batch"])
    short = [f"{name} {phase} ({r[f'{phase}_vs_dense']:.3f}×)" for name, r in wide["models"].items()
             for phase in ("prefill", "decode") if name != "dense" and r[f"{phase}_vs_dense"] < 1.15]
    lines += ["", f"Target at batch {wide['batch']}: ≥ 1.15× dense. " + (
        "Below it: " + ", ".join(short) + ". " if short else "Every method reaches it. ") +
        "No method touches the output head (vocabulary × hidden), the KV-cache appends or the per-token "
        "attention over the cache, and at this model size they are a large share of a decode step, so "
        "decoding gains less than the parameter count; layer dropping removes whole blocks, their "
        "attention and cache included. MoDeGPT's and Olica's q/k and v widths differ in many layers; "
        "the attention pads them to one width so SDPA keeps its fused kernel (exact)."]
    return lines + [""]


def section(results: Path) -> str:
    """BENCHMARKS.md's latency section from ``results`` (bench/latency.json); "" when absent."""
    return marked.section(results, SECTION, markdown)


def write_section(path: Path, result: dict) -> None:
    marked.write_section(path, SECTION, markdown(result))


if __name__ == "__main__":
    main()
