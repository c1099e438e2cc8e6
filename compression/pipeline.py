"""One pipeline for the CLI, the app and the benchmark: calibrate → compress → evaluate → heal → save.

Each step is a function of plain inputs (:func:`calibration_tokens`, :func:`compress_and_measure`,
:func:`heal_and_measure`, :func:`save`), so the app runs them with its own model and reference caches
and the CLI (``compression.__main__``) one after the other. Progress goes through :class:`Stages`, which
labels every stage and maps its own 0..1 onto the whole job's bar.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .api import compress
from .data import TextSpec, chunk, tokenize
from .evaluate import ChatReference, DenseReference, chat_agreement, evaluate_against, perplexity
from .files import FileError, read_json, remove_stale, write_json_atomic
from .ops import fingerprint
from .report import Report

Progress = Callable[[float, str], None]
HELD_OUT_SEQUENCES = 2  # calibration-split sequences after the fitted ones, for per-layer errors
CHAT_CONVERSATIONS = 16  # held-out instructions scored for chat agreement by default


def _noop(fraction: float, message: str) -> None:
    pass


# --- progress ------------------------------------------------------------------------------------

class Stages:
    """Named stages with weights; ``stage(name)`` returns a progress callback for that stage that
    reports ``(overall fraction, "name: message")`` to ``progress``.

    Where ``progress`` has an ``enter_stage(name, begin, end)`` method (the app's job), it is told
    each stage's span of the overall fraction, so a time estimate can use each stage's own rate
    (generating calibration text and compressing go at very different speeds)."""

    def __init__(self, progress: Progress, weights: dict[str, float]):
        self.progress, self.names = progress, list(weights)
        total = sum(weights.values()) or 1.0
        self.start, acc = {}, 0.0
        for name, w in weights.items():
            self.start[name] = (acc / total, w / total)
            acc += w

    def stage(self, name: str) -> Progress:
        begin, width = self.start[name]
        label = f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"
        enter = getattr(self.progress, "enter_stage", None)
        if enter is not None:
            enter(name, begin, begin + width)

        def callback(fraction: float, message: str = "") -> None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            self.progress(begin + width * fraction, f"{label}: {message}" if message else label)
        callback(0.0)
        return callback


# --- calibration ---------------------------------------------------------------------------------

def calibration_tokens(name: str, model, tokenizer, spec: TextSpec, held_out: int = HELD_OUT_SEQUENCES,
                       cache: dict | None = None, progress: Progress = _noop):
    """(fit tokens (N, T), held-out tokens (n, T) or None, facts): the held-out sequences follow the
    fitted ones in the same text, so they are never in a statistic and never in the evaluation split.
    ``cache``: tokenized texts kept between calls (the app)."""
    from . import sources

    if spec.text is not None:
        ids = tokenize(tokenizer, spec.text)
        fit = chunk(ids, spec.num_samples, spec.seq_len, "calibration")
        rest = ids[fit.numel():]
        n = min(held_out, rest.numel() // spec.seq_len)
        return fit, (chunk(rest, n, spec.seq_len, "held-out") if n else None), {"source": "text"}
    return sources.calibration_tokens(spec.source, model_identity(name), model, tokenizer, spec.num_samples,
                                      spec.seq_len, held_out, progress, cache)


# --- the dense reference, computed once ----------------------------------------------------------

SHIPPED_DENSE = Path(__file__).resolve().parents[1] / "assets" / "dense" / "block_influence.json"


def model_identity(name: str) -> str:
    """What identifies the dense weights: a packaged model's packages (version, file, size), the
    resolved folder's weight files (path, size, mtime), or the name itself for a hub id."""
    from .models import PACKAGED_MODELS, resolve_source

    if name in PACKAGED_MODELS:
        return f"packaged:{name}:{PACKAGED_MODELS[name].identity()}"
    source = Path(resolve_source(name))
    weights = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    if not weights:
        return name
    return "|".join(f"{w.resolve()}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)


@dataclass
class DenseCache:
    """Dense-model metrics remembered per (weights, metric, settings): the dense model never changes
    and recomputing costs minutes on a CPU. In memory, and in a JSON file when ``path`` is set
    (written atomically; a corrupt file is named in the error)."""

    path: Path | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    references: dict[str, DenseReference] = field(default_factory=dict)  # in memory only (~100 MB)
    forward_seconds: dict[str, float] = field(default_factory=dict)  # in memory only: machine state
    influence: dict[str, list[float]] = field(default_factory=dict)  # Block Influence per model and tokens
    shipped: Path | None = SHIPPED_DENSE  # dense results shipped for the packaged default model

    def calibration_forward(self, name: str, model, tokens: torch.Tensor, batch_size: int = 8,
                            progress: Progress = _noop, timed_share: float = 1.0) -> tuple[float, float]:
        """(seconds, share timed) of one plain dense forward (logits included) over ``tokens`` in
        batches of ``batch_size``: the unit a compression's time is measured in. Every batch has the
        same shape, so the cost is linear in batches: ``timed_share`` < 1 times only the first
        ceil(share × batches) of them and scales (the app's first run would otherwise spend a whole
        forward, a fifth of its time, on a number). Timed once per model, tokens, share, device and
        thread count in this process (it describes this machine now, so not on disk)."""
        device = next(model.parameters()).device
        batches = math.ceil(tokens.shape[0] / batch_size)
        timed = max(1, min(batches, math.ceil(batches * timed_share)))
        key = self.key(name, "forward", tokens=fingerprint(tokens), shape=list(tokens.shape),
                       batch=batch_size, timed=timed, device=str(device), threads=torch.get_num_threads())
        if key in self.forward_seconds:
            progress(1.0, "cached")
            return self.forward_seconds[key], timed / batches
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(timed):
                model(tokens[b * batch_size:(b + 1) * batch_size].to(device), use_cache=False)
                progress((b + 1) / timed, "plain dense forward")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if timed < batches:  # the last batch may be short: scale by tokens, not batches
            seconds *= tokens.shape[0] / min(tokens.shape[0], timed * batch_size)
        self.forward_seconds[key] = seconds
        return seconds, timed / batches

    def block_influence(self, name: str, tokens: torch.Tensor) -> tuple[list[float] | None, str]:
        """(the dense model's Block Influence on ``tokens``, where it came from) when known: measured in
        this process, kept in the cache file, or shipped for the packaged default model at the app's
        calibrations (``assets/dense``, written by ``python -m bench.self_chat_assets``); else
        (None, "")."""
        key = self.influence_key(name, tokens)
        if key in self.influence:
            return self.influence[key], "remembered"
        for found, where in ((self.get(key), "remembered"), (self._shipped_entries().get(key), "shipped")):
            if isinstance(found, list) and found and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                         for x in found):
                self.influence[key] = [float(x) for x in found]
                return self.influence[key], where
        return None, ""

    def _shipped_entries(self) -> dict:
        """The shipped file's entries; none when it is absent or unreadable (it only saves time)."""
        try:
            data = read_json(self.shipped) if self.shipped and self.shipped.exists() else {}
        except FileError:
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    def remember_influence(self, name: str, tokens: torch.Tensor, values: list[float]) -> None:
        """Keep the dense model's Block Influence on ``tokens`` (a dense pass) in memory and on disk."""
        key = self.influence_key(name, tokens)
        self.influence[key] = [float(x) for x in values]
        self.put(key, self.influence[key])

    def influence_key(self, name: str, tokens: torch.Tensor) -> str:
        return self.key(name, "block influence", tokens=fingerprint(tokens), shape=list(tokens.shape))

    def key(self, name: str, metric: str, **settings) -> str:
        return json.dumps([model_identity(name), metric, settings], sort_keys=True)

    def get(self, key: str):
        if key not in self.memory and self.path is not None and self.path.exists():
            data = read_json(self.path)
            if not isinstance(data, dict):
                raise FileError(f"{self.path} is not a cache file (expected a JSON object)")
            self.memory.update(data)
        return self.memory.get(key)

    def put(self, key: str, value) -> None:
        self.memory[key] = value
        if self.path is not None:
            on_disk = read_json(self.path) if self.path.exists() else {}
            write_json_atomic(self.path, {**on_disk, key: value})

    def reference(self, name: str, model, windows: torch.Tensor, progress: Progress = _noop) -> DenseReference:
        """The dense side of agreement on ``windows`` (:class:`DenseReference`), built once."""
        key = self.key(name, "reference", windows=fingerprint(windows), shape=list(windows.shape))
        if key not in self.references:
            self.references[key] = DenseReference.build(model, windows, progress)
        else:
            progress(1.0, "cached")
        return self.references[key]


    def chat_reference(self, name: str, model, tokenizer, conversations: int,
                       progress: Progress = _noop) -> ChatReference:
        """The dense side of chat agreement on the first ``conversations`` held-out instructions."""
        from . import sources

        key = self.key(name, "chat", conversations=conversations)
        if key not in self.references:
            prompts = sources.chat_prompts("evaluation")[:conversations]
            replies = sources.cached_replies(model_identity(name), model, tokenizer, prompts, "evaluation",
                                             sources.CHAT_REFERENCE, sample=False, progress=lambda f, m: progress(0.8 * f, m))
            sequences, starts = [], []
            for prompt, reply in zip(prompts, replies):
                head = sources.render(tokenizer, prompt)
                ids = tokenize(tokenizer, sources.render(tokenizer, prompt, reply or "."))
                sequences.append(ids)
                starts.append(min(len(tokenize(tokenizer, head)), ids.numel() - 1))
            self.references[key] = ChatReference.build(model, sequences, starts,
                                                       lambda f, m: progress(0.8 + 0.2 * f, m))
        else:
            progress(1.0, "cached")
        return self.references[key]


def measure_against(name: str, dense, model, windows: torch.Tensor, cache: DenseCache,
                    stages: Stages, what: str = "wiki evaluation split") -> dict:
    """Perplexity of both models with 95% intervals and the compressed model's agreement with the
    dense one (KL, top-1, ppl ratio) on ``windows``: one dense and one compressed forward a window
    (streamed models: :func:`compression.streaming.measure_against`, under the same two stages)."""
    from . import streaming

    if streaming.is_streamed(model) or streaming.is_streamed(dense):
        stages.stage("dense reference")(1.0, "streamed with the compressed model")
        return streaming.measure_against(dense, model, windows,
                                         stages.stage("compressed perplexity and agreement"), what)
    reference = cache.reference(name, dense, windows, stages.stage("dense reference"))
    dense_stats = reference.ppl_stats()
    out = evaluate_against(model, reference, stages.stage("compressed perplexity and agreement"))
    return {"ppl": {"dense": dense_stats["ppl"], "dense_ci": dense_stats["ppl_ci"], "compressed": out["ppl"],
                    "compressed_ci": out["ppl_ci"], "windows": int(windows.shape[0]),
                    "seq_len": int(windows.shape[1]), "text": what},
            "agreement": out["agreement"]}


def default_cache() -> DenseCache:
    from .models import cache_root

    return DenseCache(cache_root() / "dense_metrics.json")


# --- one job ------------------------------------------------------------------------------------

def compress_and_measure(name: str, dense, tokenizer, config, spec: TextSpec, *, eval_windows: int = 0,
                         eval_len: int = 1024, chat_eval: int = 0, seed: int = 0,
                         cache: DenseCache | None = None, progress: Progress = _noop,
                         calibration: tuple | None = None, windows: torch.Tensor | None = None,
                         offload: bool | None = None, offload_folder: str | Path | None = None,
                         precision: str | None = None, time_forward: bool = True,
                         forward_share: float = 0.25):
    """Calibrate, compress a copy of ``dense`` and measure both models: wiki perplexity and agreement
    on ``eval_windows`` windows of ``eval_len`` tokens, and chat agreement on ``chat_eval`` held-out
    instructions (0 skips either). Returns (compressed model, Report).

    calibration: (fit, held-out, facts) already built from ``spec``; windows: evaluation windows
    already cut (the app caches both). offload, offload_folder, precision: as in
    :func:`compression.compress`. A streamed result is measured by streaming too
    (:func:`compression.streaming.measure_against`: both models block by block, nothing of the dense
    side cached, so no dense model is ever held whole).

    time_forward: time one plain dense forward over the calibration tokens (once per model and
    tokens in ``cache``), the report's ``timing.calibration_forward_s``: the unit of its compress
    time (skipped for streamed models, where a forward reads every block from disk). Only
    ``forward_share`` of its batches are run and the time scaled (``timing.calibration_forward_timed``
    says which share; ``bench.latency`` checks the scaled figure against a whole forward)."""
    from .data import evaluation_windows
    from .streaming import is_streamed

    weights = {"calibration text": 0.05 if spec.source != "self-chat" else 0.3, "compress": 1.0}
    time_forward = time_forward and not is_streamed(dense)
    if time_forward:
        weights["plain forward (time unit)"] = 0.6 * forward_share
    if eval_windows:
        weights.update({"dense reference": 0.15, "compressed perplexity and agreement": 0.15})
    if chat_eval:
        weights.update({"dense chat reference": 0.1, "chat agreement": 0.05})
    stages = Stages(progress, weights)
    cache = cache or DenseCache()
    step = stages.stage("calibration text")
    t0 = time.perf_counter()
    fit, held_out, facts = calibration if calibration is not None else \
        calibration_tokens(name, dense, tokenizer, spec, progress=step)
    facts = {**facts, "text_seconds": round(time.perf_counter() - t0, 3)}
    step(1.0, f"{fit.shape[0]} × {fit.shape[1]} tokens")
    torch.manual_seed(int(seed))
    auto = getattr(config, "allocation", None) == "auto"
    influence, where = cache.block_influence(name, fit) if auto else (None, "")
    model, report = compress(dense, config, fit, progress=stages.stage("compress"), held_out=held_out,
                             offload=offload, offload_folder=offload_folder, precision=precision,
                             influence=influence)
    if report.block_influence is not None and auto:
        if report.block_influence != influence:  # measured now (a stale or mismatched one is replaced)
            cache.remember_influence(name, fit, report.block_influence)
            where = "measured"
        facts["block_influence"] = where  # the dense pass it costs is skipped when remembered or shipped
    report.model = name
    report.calibration.update(facts, seed=int(seed))
    timing = {"calibration_text_s": facts["text_seconds"], "calibration_forward_s": None}
    if time_forward:
        unit, share = cache.calibration_forward(name, dense, fit, getattr(config, "batch_size", 8),
                                                stages.stage("plain forward (time unit)"), forward_share)
        timing.update(calibration_forward_s=round(unit, 6), calibration_forward_timed=round(share, 4),
                      compress_per_forward=round(report.compress_seconds / max(unit, 1e-9), 3))
    t0 = time.perf_counter()
    if eval_windows:
        if windows is None:
            windows = evaluation_windows(tokenizer, eval_windows, eval_len)
        measured = measure_against(name, dense, model, windows, cache, stages)
        report.evaluation["ppl"], report.agreement = measured["ppl"], measured["agreement"]
        report.ppl_dense, report.ppl_compressed = measured["ppl"]["dense"], measured["ppl"]["compressed"]
    if chat_eval:
        reference = cache.chat_reference(name, dense, tokenizer, chat_eval, stages.stage("dense chat reference"))
        report.agreement_chat = chat_agreement(model, reference, stages.stage("chat agreement"))
    report.timing.update(timing, evaluation_s=round(time.perf_counter() - t0, 3))
    return model, report


def heal_and_measure(model, tokenizer, heal_config, windows: torch.Tensor | None = None,
                     progress: Progress = _noop) -> dict:
    """Recovery-train ``model`` in place; the record has perplexity before/after on ``windows``."""
    from .heal import heal

    eval_fn = None if windows is None else (lambda m: perplexity(m, windows))
    return heal(model, tokenizer, heal_config, progress, eval_fn=eval_fn)


# --- saving: one layout --------------------------------------------------------------------------

def check_out_folder(folder: Path, force: bool = False) -> None:
    """``folder`` must be new or empty unless ``force`` (then it is replaced whole at the end)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise FileError(f"{folder} is not empty; choose a new folder or pass --force to replace it")
    parent = folder.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise FileError(f"{parent} is not writable")


def save(folder: Path, model, tokenizer, report: Report | dict, replace: bool = False) -> Path:
    """The one layout: the model (safetensors + config + tokenizer, loadable by ``from_pretrained``)
    and ``report.json`` side by side in ``folder``. Written to a temporary folder and renamed at the
    end, so there are no half-written runs and no old weight files mixed with new ones.

    The model is saved in the most portable exact format (:func:`compression.modeling.save_model`:
    the original architecture's class where the result fits it, else the compressed format with its
    modeling code); the report records which, under ``export``. A streamed model is written one shard
    per block (:func:`compression.streaming.save_streamed`), never whole in memory. ``README.md`` is the
    model card generated from that report (:func:`compression.card.model_card`)."""
    from .card import model_card
    from .modeling import save_model
    from .streaming import is_streamed, save_streamed

    folder = Path(folder)
    check_out_folder(folder, force=replace)
    remove_stale(folder.resolve().parent, folder.name)  # what a killed save of this folder left
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.save-{os.getpid()}-", dir=folder.resolve().parent))
    try:
        fmt, reason = (save_streamed if is_streamed(model) else save_model)(model, tokenizer, tmp)
        data = report.to_dict() if isinstance(report, Report) else dict(report)
        data["export"] = {"format": fmt, "reason": reason}
        if isinstance(report, Report):
            report.export = data["export"]
        write_json_atomic(tmp / "report.json", data)
        (tmp / "README.md").write_text(model_card(data), encoding="utf-8")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
