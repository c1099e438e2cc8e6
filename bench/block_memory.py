"""Memory of compressing one block, measured at the dimensions of real models (random weights).

A streamed run (``--offload``) holds the outside tensors (embeddings, final norm, head) plus one block's
working set: the materialized block and its rewrite, the calibration activations and the method's
statistics. Only the second part depends on depth, so it decides the largest model a GPU can compress.
This benchmark measures that per-block peak on the CPU: a 2-block Llama of the named dimensions with a
tiny vocabulary, MoDeGPT at ``--ratio`` streamed block by block over random calibration tokens; the
figure is the process's resident high-water mark during ``compress`` minus the resident set before it
(one subprocess per row, so every high-water mark starts fresh). It is compared with
:func:`estimate_block_bytes`, the count of what the code holds at its peak, which the README uses for
sizes this machine cannot hold.

    python -m bench.block_memory --models smollm2-135m,qwen2.5-0.5b,llama-3-8b --out bench/block_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from compression.files import read_json, write_json_atomic

# hidden, MLP width, attention heads, kv heads, vocabulary, untied head, blocks: the published configs.
DIMS = {
    "smollm2-135m": (576, 1536, 9, 3, 49152, False, 30),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 151936, True, 24),
    "llama-3.2-3b": (3072, 8192, 24, 8, 128256, False, 28),
    "llama-3-8b": (4096, 14336, 32, 8, 128256, True, 32),
    "llama-2-13b": (5120, 13824, 40, 40, 32000, True, 40),
    "qwen2.5-14b": (5120, 13824, 40, 8, 152064, True, 48),
    "qwen2.5-32b": (5120, 27648, 40, 8, 152064, True, 64),
    "llama-3-70b": (8192, 28672, 64, 8, 128256, True, 80),
}
GPUS_GB = (16, 24, 48, 80, 141)
CUDA_SLACK = 1 << 30  # CUDA context and allocator fragmentation: an allowance, not a measurement


def block_params(hidden: int, ff: int, heads: int, kv: int) -> int:
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    return attention + 3 * hidden * ff + 2 * hidden


def estimate_block_bytes(hidden: int, ff: int, heads: int, kv: int, tokens: int, weight_bytes: int = 4,
                         act_bytes: int = 4) -> dict[str, int]:
    """What MoDeGPT holds at its peak for one block, by part (bytes).

    - weights: the materialized block and its rewrite (two copies at most);
    - activations: the block input, the attention's dense and new outputs, the mid-block state and the
      MLP's dense and new outputs (``modegpt.run``), plus the next block's input: 7 × tokens × hidden;
    - statistics: the MLP's accumulated XᵀX and its mean (ff × ff, float64 each) and, in
      ``ops.ridge_leverage``, the shifted copy, the solver's LU factors and the solution: 5 × ff² float64,
      the largest single piece from 0.5B up.
    """
    weights = 2 * block_params(hidden, ff, heads, kv) * weight_bytes
    activations = 7 * tokens * hidden * act_bytes
    statistics = 5 * ff * ff * 8
    return {"weights": weights, "activations": activations, "statistics": statistics,
            "total": weights + activations + statistics}


def outside_bytes(hidden: int, vocab: int, untied: bool, weight_bytes: int) -> int:
    return (2 if untied else 1) * vocab * hidden * weight_bytes


def correction(rows: list[dict]) -> float:
    """Measured over estimated per-block peak at the widest MLP measured (at small widths the fixed
    costs of the first LAPACK call dominate; at large ones the count should be close); 1 without rows."""
    if not rows:
        return 1.0
    widest = max(rows, key=lambda r: r["ff"])
    return max(1.0, widest["measured_mb"] / widest["estimate_mb"])


def needs(name: str, tokens: int = 64 * 512, weight_bytes: int = 2, factor: float = 1.0) -> dict[str, float]:
    """GiB a model needs on one GPU at ``weight_bytes`` per weight (bf16: 2; activations at the same
    width): in memory (the dense model and its working copy, 2.2 × the weights: the CLI's rule) and
    streamed (the outside tensors, one block's estimated peak × ``factor``, :data:`CUDA_SLACK`)."""
    hidden, ff, heads, kv, vocab, untied, blocks = DIMS[name]
    outside = outside_bytes(hidden, vocab, untied, weight_bytes)
    weights = blocks * block_params(hidden, ff, heads, kv) * weight_bytes + outside
    block = factor * estimate_block_bytes(hidden, ff, heads, kv, tokens, weight_bytes, weight_bytes)["total"]
    return {"params_b": weights / weight_bytes / 1e9, "in_memory_gib": 2.2 * weights / 2**30,
            "streamed_gib": (outside + block + CUDA_SLACK) / 2**30}


def gpu_table(tokens: int = 64 * 512, factor: float = 1.0) -> str:
    """Markdown: per model, GiB needed each way; per GPU size, the largest listed model each way."""
    rows = {name: needs(name, tokens, factor=factor) for name in DIMS}
    lines = ["| model | params | in memory (2.2 × bf16 weights) | streamed (`--offload`) |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['params_b']:.2f} B | {r['in_memory_gib']:.1f} GiB | {r['streamed_gib']:.1f} GiB |"
              for n, r in rows.items()]
    lines += ["", "| GPU memory | largest in memory (GiB needed) | largest streamed (GiB needed) |", "|---|---|---|"]

    def fit(key: str, gb: int) -> str:
        name = max((n for n, r in rows.items() if r[key] <= gb * 1e9 / 2**30),
                   key=lambda n: rows[n]["params_b"], default=None)
        return "none listed" if name is None else f"{name} ({rows[name][key]:.1f})"

    for gb in GPUS_GB:
        lines.append(f"| {gb} GB = {gb * 1e9 / 2**30:.1f} GiB | {fit('in_memory_gib', gb)} | {fit('streamed_gib', gb)} |")
    return "\n".join(lines)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(name: str, tokens: tuple[int, int], ratio: float, threads: int) -> dict:
    """One row, in this process: per-block peak over the resident set before ``compress``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compression import MoDeGPTConfig, compress

    torch.set_num_threads(threads)
    hidden, ff, heads, kv, *_ = DIMS[name]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 1024, tokens)
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():  # ru_maxrss covers the model build too; sampling sees only the compress window
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    compress(model, MoDeGPTConfig(ratio=ratio), calibration, offload=True)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    estimate = estimate_block_bytes(hidden, ff, heads, kv, tokens[0] * tokens[1])
    return {"model": name, "hidden": hidden, "ff": ff, "heads": heads, "kv_heads": kv,
            "calibration": list(tokens), "block_params": block_params(hidden, ff, heads, kv),
            "measured_mb": (peak[0] - before) / 2**20, "estimate_mb": estimate["total"] / 2**20,
            "estimate_parts_mb": {k: v / 2**20 for k, v in estimate.items() if k != "total"},
            "seconds": seconds, "threads": threads, "ratio": ratio}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,llama-3-8b")
    ap.add_argument("--calib", default="16x256", help="calibration, samples x length")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/block_memory.json"))
    ap.add_argument("--table", action="store_true", help="print the per-GPU table (estimates) and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure this model, print JSON
    args = ap.parse_args(argv)
    tokens = tuple(int(x) for x in args.calib.split("x"))
    if args.table:
        factor = correction(read_json(args.out)["rows"] if args.out.exists() else [])
        print(f"per-block estimate × {factor:.2f} (measured over estimated, widest MLP in {args.out})\n")
        print(gpu_table(tokens[0] * tokens[1], factor))
        return
    if args.one:
        print(json.dumps(measure(args.one, tokens, args.ratio, args.threads)))
        return
    unknown = set(args.models.split(",")) - set(DIMS)
    if unknown:
        raise SystemExit(f"unknown model dimensions: {', '.join(sorted(unknown))}; known: {', '.join(DIMS)}")
    data = read_json(args.out) if args.out.exists() else {"rows": []}
    for name in args.models.split(","):
        if any(r["model"] == name and r["calibration"] == list(tokens) for r in data["rows"]):
            continue
        child = [sys.executable, "-m", "bench.block_memory", "--one", name, "--calib", args.calib,
                 "--ratio", str(args.ratio), "--threads", str(args.threads)]
        row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        data["rows"].append(row)
        write_json_atomic(args.out, data)
        print(json.dumps({k: row[k] for k in ("model", "calibration", "measured_mb", "estimate_mb", "seconds")}),
              flush=True)


if __name__ == "__main__":
    main()
