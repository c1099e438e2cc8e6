"""Compress time and peak memory against model size, with and without block streaming (``--offload``).

Each row runs the CLI in a subprocess (MoDeGPT at ``--ratio``, wiki calibration, a few evaluation
windows, no chat evaluation) and reads the child's resident high-water mark from the OS
(``os.wait4``'s ``ru_maxrss``: what ``/usr/bin/time -v`` prints as "Maximum resident set size"), next
to the report's own ``peak_memory_mb``, compress seconds and compressed perplexity. The plot puts both
modes against the fp32 weights' size; ``bench.block_memory`` carries the per-block part to 8B and 70B.

    python -m bench.scaling --models smollm2-135m,qwen2.5-coder-0.5b --out bench/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from compression.files import read_json, write_json_atomic

MODES = ("offload", "no-offload")


def run_one(model: str, mode: str, calib: tuple[int, int], ratio: float, windows: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "compression", "compress", "--model", model, "--method", "modegpt",
               "--ratio", str(ratio), "--calibration", "wiki", "--calib-samples", str(calib[0]),
               "--calib-len", str(calib[1]), "--eval-windows", str(windows), "--chat-eval", "0",
               f"--{mode}", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{model} --{mode} failed: {stderr.strip().splitlines()[-1:]}")
        report = read_json(out / "report.json")
    agreement = report.get("agreement") or {}
    return {"model": model, "mode": mode, "calibration": list(calib), "ratio": ratio, "threads": threads,
            "params": report["params_dense"], "fp32_weights_mb": report["params_dense"] * 4 / 2**20,
            "max_rss_mb": usage.ru_maxrss / 1024, "peak_memory_mb": report["peak_memory_mb"],
            "compress_seconds": report["compress_seconds"], "ppl_dense": report["ppl_dense"],
            "ppl_compressed": report["ppl_compressed"], "kl": agreement.get("kl")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in zip(MODES, "os"):
        part = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["params"])
        size = [r["fp32_weights_mb"] / 1024 for r in part]
        mem.plot(size, [r["max_rss_mb"] / 1024 for r in part], marker=marker, label=f"--{mode}")
        sec.plot(size, [r["compress_seconds"] for r in part], marker=marker, label=f"--{mode}")
    top = max(r["fp32_weights_mb"] for r in rows) / 1024
    mem.plot([0, top], [0, top], ls=":", color="grey", label="fp32 weights")
    mem.set(xlabel="fp32 weights (GiB)", ylabel="max resident (GiB, OS)", title="peak memory")
    sec.set(xlabel="fp32 weights (GiB)", ylabel="seconds", title="compress time (shared 2-core CPU)")
    for ax in (mem, sec):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--calib", default="32x256", help="samples x length")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/scaling.json"))
    ap.add_argument("--plot", type=Path, default=Path("assets/scaling_memory.png"))
    args = ap.parse_args(argv)
    calib = tuple(int(x) for x in args.calib.split("x"))
    data = read_json(args.out) if args.out.exists() else {"rows": []}
    for model in args.models.split(","):
        for mode in MODES:
            if any(r["model"] == model and r["mode"] == mode and r["calibration"] == list(calib) for r in data["rows"]):
                continue
            row = run_one(model, mode, calib, args.ratio, args.windows, args.threads)
            data["rows"].append(row)
            write_json_atomic(args.out, data)
            print(json.dumps(row), flush=True)
    plot(data["rows"], args.plot)


if __name__ == "__main__":
    main()
