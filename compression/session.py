"""UI-independent glue for the app: model cache, per-session runs, configs from form values, chat.

No algorithm lives here: every number comes from :mod:`compression` (``compress``, ``forecast``,
``evaluate``, ``zeroshot``). The objects are plain Python so the app's event functions can be tested
without a browser:

- :class:`ModelStore`: dense models and cheap "meta" skeletons, loaded lazily and cached by name,
  shared by all sessions (read-only: compression always works on a deep copy).
- :class:`Session`: one user's runs (compressed model + report dict + metrics) and a stop flag.
- :func:`make_config`: form values -> method config; :func:`plan_forecast`: what it will leave.
- :func:`run_compression`, :func:`evaluate_model`, :func:`chat_stream`, :func:`save_run`, :func:`load_run`.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .api import compress
from .arch import arch_for, count_params
from .data import TextSpec, chunk, tokenize, wiki_split
from .evaluate import perplexity, sizes, speed
from .forecast import forecast
from .layerdrop import LayerDropConfig
from .modegpt import MoDeGPTConfig
from .models import ModelError, default_device, load_config, load_model, resolve_dtype
from .olica import OlicaConfig
from .plan import Allocation
from .report import Report
from .slicegpt import SliceGPTConfig

Progress = Callable[[float, str], None]
METHODS = ("layerdrop", "slicegpt", "modegpt", "olica")
# Allocation choices shown per method (layer dropping picks blocks; SliceGPT has no influence-based plan).
ALLOCATIONS = {"layerdrop": ("automatic", "manual"), "slicegpt": ("uniform", "manual"),
               "modegpt": ("uniform", "automatic", "manual"), "olica": ("uniform", "automatic", "manual")}
REACH_TOLERANCE = 0.02  # a plan removing this much less than the target counts as unreachable


class Stopped(Exception):
    """Raised inside a long job when the user pressed Stop."""


# ------------------------------------------------------------------------------------------ models
@dataclass
class ModelInfo:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    params: int
    skeleton: Any  # the model built on the meta device: shapes without weights, for forecasts


class ModelStore:
    """Dense models by name, loaded on first use; at most ``max_models`` kept in memory."""

    def __init__(self, device: str | None = None, dtype: str | None = None, max_models: int = 1):
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_models = max_models
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._infos: dict[str, ModelInfo] = {}
        self.dense_metrics: dict[tuple, dict] = {}  # (name, what, settings) -> numbers, computed once
        self._tokens: dict[tuple, torch.Tensor] = {}  # (name, split) -> the wiki split tokenized once
        self._lock = threading.RLock()

    def info(self, name: str) -> ModelInfo:
        """Config-only facts about a model (raises ModelError / UnsupportedArchitecture on bad input)."""
        name = (name or "").strip()
        if not name:
            raise ModelError("enter a model: the packaged name, a Hugging Face id or a local folder")
        with self._lock:
            if name not in self._infos:
                from transformers import AutoModelForCausalLM

                config = load_config(name)
                arch_for(config)  # unsupported architectures fail here, before any weights are read
                with torch.device("meta"):
                    skeleton = AutoModelForCausalLM.from_config(config)
                self._infos[name] = ModelInfo(name, config.model_type, config.num_hidden_layers,
                                              config.hidden_size, count_params(skeleton), skeleton)
            return self._infos[name]

    def get(self, name: str):
        """``(model, tokenizer)`` of the dense model, shared: never change it in place."""
        name = (name or "").strip()
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            self.info(name)
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
            pair = load_model(name, self.device, self.dtype)
            self._models[name] = pair
            return pair

    def wiki_tokens(self, name: str, part: str) -> torch.Tensor:
        """The wiki ``part`` split tokenized with the model's tokenizer (once: ~1M tokens)."""
        key = (name.strip(), part)
        if key not in self._tokens:
            self._tokens[key] = tokenize(self.get(name)[1], wiki_split(part))
        return self._tokens[key]

    def calibration(self, name: str, spec: TextSpec) -> torch.Tensor:
        """``spec.batches(tokenizer)``, from the cached tokens for the default wiki text."""
        if spec.text is not None:
            return spec.batches(self.get(name)[1])
        return chunk(self.wiki_tokens(name, "calibration"), spec.num_samples, spec.seq_len, "calibration")

    def eval_windows(self, name: str, num_windows: int, seq_len: int = 1024) -> torch.Tensor:
        """``evaluation_windows(tokenizer, num_windows, seq_len)`` from the cached tokens."""
        return chunk(self.wiki_tokens(name, "evaluation"), num_windows, seq_len, "evaluation")

    def bytes_per_param(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    id: str
    model_name: str
    report: dict
    model: Any = None            # the compressed model (None once evicted, or for a report-only load)
    tokenizer: Any = None
    metrics: dict = field(default_factory=dict)  # {"dense": {...}, "compressed": {...}} from evaluate
    folder: Path | None = None   # where it was saved or loaded from

    @property
    def label(self) -> str:
        r = self.report
        return (f"{self.id} · {r.get('method')} −{100 * (r.get('ratio_achieved') or 0):.0f}% · "
                f"{Path(self.model_name).name or self.model_name}")


class Session:
    """One browser session's runs. Deep copies are the object itself (it holds live models)."""

    keep_models = 3  # compressed models kept in memory per session; older runs keep their report

    def __init__(self):
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self.stop = threading.Event()
        self._counter = 0
        self._workdir: Path | None = None

    def __deepcopy__(self, memo):
        return self

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="compression-session-"))
        return self._workdir

    def new_id(self) -> str:
        self._counter += 1
        return f"r{self._counter}"

    def add(self, run: Run) -> Run:
        self.runs[run.id] = run
        live = [r for r in self.runs.values() if r.model is not None]
        for old in live[:-self.keep_models]:
            old.model = None
        return run

    def get(self, run_id: str | None) -> Run:
        if not self.runs:
            raise ValueError("no run yet: compress a model (Compress tab) or load a saved run (Runs tab)")
        run_id = (run_id or "").split(" ")[0]  # accept the id or the full label
        if not run_id:
            return next(reversed(self.runs.values()))
        if run_id not in self.runs:
            raise ValueError(f"unknown run {run_id!r}; this session has {', '.join(self.runs)}")
        return self.runs[run_id]

    def close(self) -> None:
        """Free models and files (called when the session ends)."""
        self.stop.set()
        for run in self.runs.values():
            run.model = None
        self.runs.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# ------------------------------------------------------------------------------------------ configs
def parse_list(text: str | list | tuple | None, kind=float) -> list:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [kind(x) for x in text]
    try:
        return [kind(x) for x in re.split(r"[,\s]+", str(text).strip()) if x]
    except ValueError as err:
        raise ValueError(f"cannot read the per-layer values {text!r}: {err}") from None


def make_config(method: str, ratio: float, allocation: str = "uniform", per_layer=None, *,
                num_layers: int, hidden_size: int, slicing: bool = False, epsilon: float = 0.1,
                ridge: float | None = None, attn_share: float = 1.0, calibrate_layers: int = 8,
                calibrate_rank: int = 64, batch_size: int = 8):
    """The method config for form values; ValueError with a readable message on bad input.

    per_layer: for ``manual`` allocation, the indices of the blocks to drop (layerdrop) or one sparsity
    per layer in [0, 0.95] (the others; for SliceGPT the fraction of hidden dims deleted in that layer).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "layerdrop" and allocation == "uniform":
        allocation = "automatic"  # the same for layer dropping: Block Influence picks the blocks
    if allocation not in ALLOCATIONS[method]:
        raise ValueError(f"{method} supports allocation {' / '.join(ALLOCATIONS[method])}, not {allocation!r}")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 0.9:
        raise ValueError(f"the target ratio must be in [0, 0.9], got {ratio}")
    manual = allocation == "manual"
    if method == "layerdrop":
        if not manual:
            return LayerDropConfig(ratio=ratio)
        layers = parse_list(per_layer, int)
        if not layers:
            raise ValueError("manual layer dropping: pick at least one layer to drop")
        config = LayerDropConfig(ratio=None, layers=tuple(layers))
        config.validate_for(num_layers)
        return config
    values = parse_list(per_layer, float) if manual else []
    if manual and len(values) != num_layers:
        raise ValueError(f"manual allocation needs {num_layers} per-layer values, got {len(values)}")
    if method == "slicegpt":
        if manual:
            if not all(0.0 <= v < 1.0 for v in values):
                raise ValueError("per-layer slicing fractions must be in [0, 1)")
            step = SliceGPTConfig.round_to
            widths = [max(step, int((1 - v) * hidden_size) // step * step) for v in values]
            return SliceGPTConfig(widths=tuple(widths), batch_size=batch_size)
        if slicing:
            return SliceGPTConfig(slicing=ratio, batch_size=batch_size)
        return SliceGPTConfig(ratio=ratio, batch_size=batch_size)
    alloc = Allocation(kind={"automatic": "auto"}.get(allocation, allocation), epsilon=float(epsilon),
                       per_layer=tuple(values) if manual else None)
    extra = {} if ridge is None else {"ridge": float(ridge)}
    if method == "modegpt":
        return MoDeGPTConfig(ratio=ratio, allocation=alloc, batch_size=batch_size, **extra)
    return OlicaConfig(ratio=ratio, allocation=alloc, attn_share=float(attn_share),
                       calibrate_layers=int(calibrate_layers), calibrate_rank=int(calibrate_rank),
                       batch_size=batch_size, **extra)


def target_of(config) -> float | None:
    """The parameter ratio a config promises (None when sizes were given per layer)."""
    if isinstance(config, LayerDropConfig):
        return None if config.layers is not None else config.ratio
    if isinstance(config, SliceGPTConfig):
        return config.ratio
    return None if config.allocation.kind == "manual" else config.ratio


def plan_forecast(store: ModelStore, name: str, config) -> dict:
    """forecast() on the weightless skeleton, plus sizes; ValueError if the target is out of reach."""
    info = store.info(name)
    fc = dict(forecast(info.skeleton, config))
    fc["params_dense"] = info.params
    fc["bytes"] = fc["params"] * store.bytes_per_param()
    fc["bytes_dense"] = info.params * store.bytes_per_param()
    target = target_of(config)
    if target is not None and fc["ratio"] < target - REACH_TOLERANCE:
        raise ValueError(f"{name} cannot reach a ratio of {target:.0%} with {type(config).__name__}: the "
                         f"closest plan removes {fc['ratio']:.1%} of the block parameters")
    return fc


# ------------------------------------------------------------------------------------------ jobs
def _checked(progress: Progress, stop: threading.Event | None) -> Progress:
    def callback(fraction: float, message: str) -> None:
        if stop is not None and stop.is_set():
            raise Stopped("stopped by the user")
        progress(fraction, message)
    return callback


def dense_perplexity(store: ModelStore, name: str, windows: int, progress: Progress) -> float:
    key = (name, "ppl", windows)
    if key not in store.dense_metrics:
        store.dense_metrics[key] = perplexity(store.get(name)[0], store.eval_windows(name, windows),
                                              progress=progress)
    return store.dense_metrics[key]


def run_compression(store: ModelStore, session: Session, name: str, config, spec: TextSpec,
                    seed: int = 0, ppl_windows: int = 0, progress: Progress = lambda f, m: None) -> Run:
    """Compress a deep copy of the dense model (the shared dense model is never touched).

    Raises Stopped when ``session.stop`` is set (checked at every progress tick of the method).
    """
    check = _checked(progress, session.stop)
    plan_forecast(store, name, config)  # bad plans fail before any work
    dense, tokenizer = store.get(name)
    calibration = store.calibration(name, spec)  # CalibrationError on too little text
    check(0.0, "copying the dense model")
    model = copy.deepcopy(dense)
    torch.manual_seed(int(seed))
    try:
        report = compress(model, config, calibration, progress=check)
    except Stopped:
        del model
        raise
    report.model = name
    report.extra = {**(report.extra or {}), "calibration": {"samples": spec.num_samples,
                                                            "seq_len": spec.seq_len, "seed": int(seed),
                                                            "custom_text": spec.text is not None}}
    if ppl_windows:
        report.ppl_dense = dense_perplexity(store, name, ppl_windows, check)
        report.ppl_compressed = perplexity(report.compressed, store.eval_windows(name, ppl_windows),
                                           progress=check)
        report.extra["ppl_windows"] = ppl_windows
    run = Run(session.new_id(), name, report.to_dict(), report.compressed, tokenizer)
    return session.add(run)


def heal_run(store: ModelStore, session: Session, run: Run, tokens: int, lora_rank: int = 8,
             seq_len: int = 256, ppl_windows: int = 0, progress: Progress = lambda f, m: None) -> dict:
    """Recovery-train ``run.model`` in place (compression.heal) and record it in the run's report.

    Training text starts after the tokens the compression calibrated on; with ``ppl_windows`` the
    record has perplexity before and after. Raises Stopped when ``session.stop`` is set.
    """
    from .heal import HealConfig, heal

    if run.model is None:
        raise ValueError(f"run {run.id}'s model is no longer in memory; compress or load it again")
    calib = (run.report.get("extra") or {}).get("calibration") or {}
    config = HealConfig(tokens=int(tokens), lora_rank=int(lora_rank), seq_len=int(seq_len),
                        offset=int(calib.get("samples", 0)) * int(calib.get("seq_len", 0)))
    eval_fn = None
    if ppl_windows:
        windows = store.eval_windows(run.model_name, int(ppl_windows))
        eval_fn = lambda model: perplexity(model, windows)  # noqa: E731
    record = heal(run.model, run.tokenizer, config, _checked(progress, session.stop), eval_fn=eval_fn)
    run.report["heal"] = record
    if record.get("ppl_after") is not None:
        run.report["ppl_compressed"] = record["ppl_after"]
    run.metrics = {}  # evaluation numbers describe the model before healing
    return record


def evaluate_model(model, tokenizer, windows: torch.Tensor | None = None, tasks=(),
                   limit: int | None = None, measure_speed: bool = False,
                   progress: Progress = lambda f, m: None, speed_args: dict | None = None) -> dict:
    """Sizes, perplexity on ``windows`` (N, T) token ids, zero-shot and speed, as one flat dict."""
    out: dict[str, Any] = dict(sizes(model))
    if windows is not None:
        out["ppl"] = perplexity(model, windows, progress=progress)
    if tasks:
        from .zeroshot import zero_shot

        zs = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=limit,
                       progress=lambda f, desc="": progress(f, desc))
        for task, entry in zs["tasks"].items():
            out[f"{task} ({entry['metric']})"] = entry["value"]
        if zs.get("average") is not None:
            out["zero_shot_avg"] = zs["average"]
    if measure_speed:
        progress(0.99, "measuring speed")
        out.update(speed(model, **(speed_args or {})))
    return out


METRIC_NAMES = {"params": "parameters", "block_params": "block parameters", "bytes": "weights (MB)",
                "ppl": "perplexity (wiki)", "zero_shot_avg": "zero-shot average (5 tasks)",
                "prefill_tok_s": "prefill tokens/s", "decode_tok_s": "decode tokens/s",
                "peak_mem_mb": "peak memory (MB)"}


def compare_rows(dense: dict, comp: dict) -> list[list]:
    """[metric, dense, compressed, delta, delta %] rows for the metrics both sides have."""
    rows = []
    for key in dict.fromkeys([*comp, *dense]):
        a, b = dense.get(key), comp.get(key)
        if key == "threads" or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        if key == "bytes":
            a, b = a / 2**20, b / 2**20
        delta = b - a
        rows.append([METRIC_NAMES.get(key, key), _fmt(a), _fmt(b), _fmt(delta, sign=True),
                     f"{100 * delta / a:+.1f}%" if a else ""])
    return rows


def _fmt(x: float, sign: bool = False) -> str:
    s = "+" if sign else ""
    if isinstance(x, int) or (abs(x) >= 1000 and float(x).is_integer()):
        return f"{x:{s},}"
    return f"{x:{s}.4g}"


# ------------------------------------------------------------------------------------------ chat
@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    repetition_penalty: float = 1.1
    seed: int = 0
    chat_template: bool = True


STATS = re.compile(r"\n*<sub>[^<]*tok/s</sub>\s*$")  # the tokens/s line appended under a reply
NO_REPLY = "_(no reply: the model ended its turn at once)_"


def build_prompt(tokenizer, history: list[dict], message: str, use_template: bool) -> torch.Tensor:
    """Token ids for the conversation so far plus ``message`` (stats lines stripped)."""
    turns = [{"role": m["role"], "content": STATS.sub("", _text(m["content"])).replace(NO_REPLY, "")}
             for m in history or [] if m.get("role") in ("user", "assistant")]
    turns.append({"role": "user", "content": message})
    if use_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}\n"
                       for t in turns) + "Assistant:"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio may send [{"type": "text", "text": ...}]
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def _sample(logits: torch.Tensor, previous: list[int], s: Sampling, gen: torch.Generator) -> int:
    logits = logits.float().cpu()
    if s.repetition_penalty != 1.0 and previous:
        idx = torch.tensor(sorted(set(previous)))
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model, tokenizer, prompt: torch.Tensor, s: Sampling) -> Iterator[tuple[str, int, float]]:
    """Yield (text so far, tokens, seconds spent in the model) after every new token (KV cache)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(s.seed))
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    limit = getattr(model.config, "max_position_embeddings", 2048) - int(s.max_new_tokens)
    ids, cache, out, seconds = prompt[:, -max(limit, 1):].to(device), None, [], 0.0
    context = prompt[0].tolist()
    for _ in range(int(s.max_new_tokens)):
        t0 = time.perf_counter()
        result = model(ids, past_key_values=cache, use_cache=True)
        token = _sample(result.logits[0, -1], context + out, s, gen)
        seconds += time.perf_counter() - t0
        if token in eos:
            break
        cache, ids = result.past_key_values, torch.tensor([[token]], device=device)
        out.append(token)
        yield tokenizer.decode(out, skip_special_tokens=True), len(out), seconds
    yield tokenizer.decode(out, skip_special_tokens=True), len(out), seconds


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def chat_stream(pairs: list[tuple], histories: list[list[dict]], message: str, s: Sampling,
                stop: threading.Event | None = None) -> Iterator[list[list[dict]]]:
    """Answer ``message`` with every (model, tokenizer) in ``pairs`` in lockstep, same settings and seed.

    Yields the updated histories (gradio "messages" format) after each step; a ``<sub>... tok/s</sub>``
    line with tokens and tokens/s closes every reply. A pair may be None (that side is left alone).
    """
    histories = [list(h or []) for h in histories]
    streams = []
    for (pair, hist) in zip(pairs, histories):
        if pair is None:
            streams.append(None)
            continue
        model, tok = pair
        streams.append(generate(model, tok, build_prompt(tok, hist, message, s.chat_template), s))
        hist += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    alive = [st is not None for st in streams]
    while any(alive):
        for i, st in enumerate(streams):
            if not alive[i]:
                continue
            if stop is not None and stop.is_set():
                alive[i] = False
                continue
            try:
                text, n, seconds = next(st)
            except StopIteration:
                alive[i] = False
                continue
            rate = n / seconds if seconds else 0.0
            text = text or NO_REPLY
            histories[i][-1] = {"role": "assistant",
                                "content": f"{text}\n\n<sub>{n} tokens · {rate:.1f} tok/s</sub>"}
        yield histories


# ------------------------------------------------------------------------------------------ files
def save_run(run: Run, folder: Path) -> Path:
    """model (safetensors + config + tokenizer) and report.json in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if run.model is None:
        raise ValueError(f"run {run.id}'s model is no longer in memory (only its report is); "
                         "compress again to download it")
    run.model.save_pretrained(folder, safe_serialization=True)
    if run.tokenizer is not None:
        run.tokenizer.save_pretrained(folder)
    (folder / "report.json").write_text(json.dumps(run.report, indent=1))
    return folder


def zip_run(run: Run, workdir: Path) -> Path:
    folder = save_run(run, Path(workdir) / f"{run.id}-{run.report.get('method')}")
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
    shutil.rmtree(folder, ignore_errors=True)
    return Path(archive)


def load_run(session: Session, path: str | Path, load_weights: bool = True) -> Run:
    """A saved run: a folder or zip with report.json (and the model, if saved), or a report.json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.suffix == ".zip":
        target = session.workdir / f"upload-{session._counter + 1}"
        with zipfile.ZipFile(path) as zf:
            zf.extractall(target)
        path = target
    if path.is_dir():
        found = sorted(path.rglob("report.json"))
        if not found:
            raise ValueError(f"no report.json in {path}")
        report_file = found[0]
    else:
        report_file = path
    try:
        report = Report.load(report_file).to_dict()  # validates the schema
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{report_file.name} is not a compression report: {err}") from None
    model = tokenizer = None
    folder = report_file.parent
    weights = next((f for f in (folder, folder / "model") if (f / "config.json").exists()), None)
    if load_weights and weights is not None:  # the app's zip layout, or the CLI's DIR/model/
        try:
            model, tokenizer = load_model(str(weights), default_device())
        except ModelError as err:
            raise ValueError(f"the saved model in {folder} cannot be loaded: {err}") from None
    run = Run(session.new_id(), report.get("model") or str(folder), report, model, tokenizer,
              folder=folder)
    return session.add(run)


def runs_table(session: Session) -> list[list]:
    rows = []
    for run in session.runs.values():
        r, m = run.report, run.metrics.get("compressed", {})
        rows.append([run.id, run.model_name, r.get("method"),
                     None if r.get("ratio_target") is None else round(r["ratio_target"], 3),
                     round(r.get("ratio_achieved") or 0, 3), r.get("params_compressed"),
                     _round(r.get("ppl_dense")), _round(r.get("ppl_compressed")),
                     _round(m.get("zero_shot_avg")), round(r.get("compress_seconds") or 0, 1),
                     "yes" if run.model is not None else "report only"])
    return rows


RUN_COLUMNS = ["run", "model", "method", "target", "achieved", "params", "ppl dense", "ppl",
               "zero-shot avg", "seconds", "model in memory"]


def _round(x, digits: int = 3):
    return None if x is None else round(float(x), digits)


def pareto_runs(session: Session) -> list[dict]:
    """Points for viz.pareto_figure / accuracy_figure: every run plus each model's dense point."""
    points, dense = [], {}
    for run in session.runs.values():
        r = run.report
        zs = run.metrics.get("compressed", {}).get("zero_shot_avg")
        points.append({"method": r.get("method"), "params": r.get("params_compressed"),
                       "ppl": r.get("ppl_compressed"), "ratio": r.get("ratio_achieved"),
                       "label": run.id, "zero_shot_avg": zs})
        if r.get("ppl_dense") is not None:
            dense[run.model_name] = {"method": "dense", "params": r.get("params_dense"),
                                     "ppl": r["ppl_dense"], "label": f"dense {Path(run.model_name).name}",
                                     "zero_shot_avg": run.metrics.get("dense", {}).get("zero_shot_avg")}
    return list(dense.values()) + points
