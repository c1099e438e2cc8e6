"""Ship the default model's own chat replies and Block Influence, so that no first run measures them.

``python -m bench.self_chat_assets [--tokens N] [--chat 8,16]`` runs the project's own code
(:func:`compression.sources.self_chat_text` and the dense chat reference's
:func:`compression.sources.cached_replies`) on the packaged default model with the library's settings,
then copies the reply files it wrote to the user cache into ``assets/self_chat/`` (same file names:
the key is the model's portable identity, the prompts and the settings) and writes a manifest with
the settings, the model identity and the seconds each part took. ``cached_replies`` reads a shipped
file when the user cache has none.

It also measures the dense model's Block Influence (:func:`compression.calibration.dense_block_influence`)
on the app's default calibration tokens (wiki+self-chat at the CPU and GPU sizes) and writes
``assets/dense/block_influence.json`` under the same keys the cache uses (model identity and the
tokens' fingerprint), so the automatic allocation's dense pass is skipped on a first run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

from compression.models import DEFAULT_MODEL, cache_root, load_model
from compression.pipeline import DenseCache, model_identity
from compression import sources


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=34 * 512,
                        help="self-chat tokens to cover (default: 64 × 512 wiki+self-chat: 32 + 2 held-out)")
    parser.add_argument("--chat", default="8,16", help="chat-agreement conversation counts to ship")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    identity = model_identity(DEFAULT_MODEL)
    folder = cache_root() / "self_chat"
    before = set(folder.glob("*.json")) if folder.exists() else set()
    seconds = {}
    t0 = time.perf_counter()
    text = sources.self_chat_text(identity, model, tokenizer, args.tokens,
                                  progress=lambda f, m: print(f"{f:5.1%} {m}", flush=True))
    seconds["self_chat"] = round(time.perf_counter() - t0, 1)
    cache = DenseCache()
    for n in (int(x) for x in args.chat.split(",") if x):
        t0 = time.perf_counter()
        cache.chat_reference(DEFAULT_MODEL, model, tokenizer, n)
        seconds[f"chat_reference_{n}"] = round(time.perf_counter() - t0, 1)
    out = sources.SHIPPED_REPLIES
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p.name for p in folder.glob("*.json"))
    for name in files:
        shutil.copy2(folder / name, out / name)
    manifest = {
        "model": DEFAULT_MODEL, "identity": identity,
        "calibration_settings": sources.SELF_CHAT.__dict__, "chat_reference_settings": sources.CHAT_REFERENCE.__dict__,
        "self_chat_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        "chat_conversations": args.chat, "files": files, "generated_now": sorted(p.name for p in
                                                                                set(folder.glob("*.json")) - before),
        "seconds": seconds, "command": "python -m bench.self_chat_assets " + " ".join(argv or []),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["seconds"]))
    ship_block_influence(model, tokenizer)


def ship_block_influence(model, tokenizer) -> None:
    """``assets/dense/block_influence.json``: the dense model's Block Influence on each default
    calibration of the app, keyed as :meth:`compression.pipeline.DenseCache.block_influence` looks it up."""
    from compression.calibration import dense_block_influence
    from compression.data import TextSpec
    from compression.methods import METHODS
    from compression.pipeline import SHIPPED_DENSE, calibration_tokens
    from ui.calibration_form import CALIBRATION_CPU, CALIBRATION_GPU

    cache, entries, settings = DenseCache(), {}, []
    for samples, length in (CALIBRATION_CPU, CALIBRATION_GPU):
        spec = TextSpec(samples, length, source=METHODS["modegpt"].calibration)
        fit = calibration_tokens(DEFAULT_MODEL, model, tokenizer, spec)[0]
        t0 = time.perf_counter()
        entries[cache.influence_key(DEFAULT_MODEL, fit)] = dense_block_influence(model, fit)
        settings.append({"samples": samples, "seq_len": length, "source": spec.source,
                         "seconds": round(time.perf_counter() - t0, 1)})
    SHIPPED_DENSE.parent.mkdir(parents=True, exist_ok=True)
    SHIPPED_DENSE.write_text(json.dumps({"model": DEFAULT_MODEL, "identity": model_identity(DEFAULT_MODEL),
                                         "calibrations": settings, "command": "python -m bench.self_chat_assets",
                                         "entries": entries}, indent=1) + "\n")
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
