"""Recovery training on the model's own chat vs on Wikipedia, after one compression.

Compress the default model once (``--method``/``--ratio``/``--source``), then heal two copies with the
same LoRA budget, one on wiki calibration text (after the calibration tokens) and one on the self-chat
conversations (the same cached replies calibration used: generating more costs minutes a round on CPU,
and the chat evaluation prompts are disjoint from them either way). Wiki perplexity and chat agreement
are measured before and after each. Results: ``bench/heal_chat.json``.

    python -m bench.heal_chat --method modegpt --ratio 0.25 --source self-chat --tokens 16384 --rank 8
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from compression import pipeline
from compression.data import TextSpec, evaluation_windows
from compression.evaluate import chat_agreement
from compression.files import write_json_atomic
from compression.heal import HealConfig, heal
from compression.methods import get
from compression.models import DEFAULT_MODEL, load_model
from compression.sources import self_chat_text

from .calibration_sources import VARIANTS


def measure(name, dense, model, windows, cache, chat_reference) -> dict:
    stages = pipeline.Stages(lambda f, m: None, {"dense reference": 1, "compressed perplexity and agreement": 1})
    on_wiki = pipeline.measure_against(name, dense, model, windows, cache, stages)
    return {"ppl_wiki": on_wiki["ppl"], "agreement_wiki": on_wiki["agreement"],
            "agreement_chat": chat_agreement(model, chat_reference)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--method", default="modegpt")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--source", default="self-chat", help="calibration source of the compression")
    ap.add_argument("--calib", default="32x512")
    ap.add_argument("--tokens", type=int, default=16_384, help="heal budget (the app's CPU default)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--chat", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/heal_chat.json"))
    args = ap.parse_args(argv)
    samples, length = (int(x) for x in args.calib.split("x"))
    dense, tokenizer = load_model(args.model)
    cache = pipeline.DenseCache()
    windows = evaluation_windows(tokenizer, args.windows)
    config = get(args.method).make_config({**VARIANTS[args.method], "ratio": args.ratio})
    compressed, report = pipeline.compress_and_measure(
        args.model, dense, tokenizer, config, TextSpec(samples, length, source=args.source))
    chat_reference = cache.chat_reference(args.model, dense, tokenizer, args.chat, lambda f, m: None)
    rows = [{"heal": "none", **measure(args.model, dense, compressed, windows, cache, chat_reference)}]
    chat_text = self_chat_text(pipeline.model_identity(args.model), dense, tokenizer, samples * length)
    for label, text, offset in (("wiki", None, samples * length), ("self-chat", chat_text, 0)):
        model = copy.deepcopy(compressed)
        record = heal(model, tokenizer, HealConfig(tokens=args.tokens, lora_rank=args.rank, offset=offset), text=text)
        rows.append({"heal": label, "heal_seconds": record["seconds"], "heal_tokens": record["tokens"],
                     "epochs": record["epochs"], "final_loss": record["loss"][-1],
                     **measure(args.model, dense, model, windows, cache, chat_reference)})
        del model
    data = {"settings": {**vars(args), "out": str(args.out), "config": report.config,
                         "calibration": report.calibration}, "rows": rows}
    write_json_atomic(args.out, data)
    for r in rows:
        print(json.dumps({"heal": r["heal"], "wiki": round(r["ppl_wiki"]["compressed"], 2),
                          "chat_kl": round(r["agreement_chat"]["kl"], 4),
                          "chat_top1": round(r["agreement_chat"]["top1"], 4)}), flush=True)


if __name__ == "__main__":
    main()
