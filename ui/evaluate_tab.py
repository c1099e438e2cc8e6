"""The Evaluate tab: dense vs compressed on the same footing (perplexity with its window count,
zero-shot with its item count, speed, size); the dense side is computed once per setting. Stop ends
every stage within a window, a zero-shot batch or a forward of the speed rounds; the results table
downloads as CSV and JSON; a compressed model that is not faster than dense gets a line on why."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import gradio as gr
import torch

from compression.arch import view
from compression.evaluate import sizes, speed_side_by_side
from compression.models import cached_step
from compression.pipeline import Stages, measure_against
from viz import range_text

from .common import STOP, WARN, Context, megabytes, user_errors
from .jobs import progress_html, watch
from .runs import Stopped
from .page import HIDDEN, HOVER, JOB
from .weights_check import inside

METRIC_NAMES = {"params": "parameters", "block_params": "block parameters", "bytes": "weights (MB)",
                "prefill_tok_s": "prefill tokens/s", "decode_tok_s": "decode tokens/s",
                "peak_mem_mb": "peak memory (MB)"}
MAX_LIMIT = 10_000
SPEED_ROUNDS = 5  # dense and compressed timed in turn, medians over rounds: drift hits both alike
SPEED_SETTINGS = {"cpu": {"prompt_len": 128, "new_tokens": 32}, "gpu": {"prompt_len": 512, "new_tokens": 128}}
MIN_GAIN = 1.05  # weights per token shrunk by less than this factor: too little to show in a timing
COLUMNS = ["metric", "dense", "compressed", "Δ %"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet would run a cell starting so


class Heartbeat:
    """A progress callback that keeps its last report, so :func:`beating` can repeat it from inside
    code that reports nothing itself (lm-eval's loop over requests): the job's stop flag, checked
    by every report, is heard there too."""

    def __init__(self, progress):
        self.progress, self.last = progress, (0.0, "")

    def __call__(self, fraction: float, message: str = "") -> None:
        self.last = (fraction, message)
        self.progress(fraction, message)

    def beat(self, *_) -> None:
        self.progress(*self.last)


@contextlib.contextmanager
def beating(model, heartbeat: Heartbeat):
    """``heartbeat`` repeats its last report before every forward of ``model`` in the block (a
    Stop raises there, between two batches of requests). Only forwards of this thread: the dense
    model is shared, and another session's chat must never hear this job's stop."""
    owner = threading.get_ident()

    def beat(*_):
        if threading.get_ident() == owner:
            heartbeat.beat()
    handle = model.register_forward_pre_hook(beat)
    try:
        yield
    finally:
        handle.remove()


def evaluate_model(model, tokenizer, tasks=(), limit=None, progress=lambda f, m: None) -> dict:
    """Sizes and zero-shot of one model, as one flat dict (perplexity, agreement and speed are
    measured for both models at once: :func:`compression.pipeline.measure_against`,
    :func:`compression.evaluate.speed_side_by_side`)."""
    out: dict[str, Any] = dict(sizes(model))
    if tasks:
        from compression.zeroshot import zero_shot

        threads = None if next(model.parameters()).is_cuda else 1  # lm-eval's small ops: 1 thread on CPU
        beat = Heartbeat(progress)
        with beating(model, beat):
            zs = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=limit, threads=threads,
                           progress=lambda f, desc="": beat(0.9 * f, f"zero-shot: {desc}"))
        for task, entry in zs["tasks"].items():
            out[f"zs:{task}"] = {"acc": entry["acc"], "metric": entry["metric"],
                                 "stderr": entry.get("stderr"), "n": entry.get("n")}
        mean = zs.get("mean") or {}
        if mean.get("acc") is not None:
            out["zero_shot_avg"] = {"acc": mean["acc"], "stderr": mean.get("stderr"), "n": mean.get("n"),
                                    "metric": f"mean of {len(tasks)} tasks"}
    return out


def _fmt(key: str, x) -> str:
    if x is None:
        return ""
    if key == "bytes":
        return megabytes(x)
    if key in ("params", "block_params"):
        return f"{x / 1e6:,.2f}M"
    if isinstance(x, dict):  # a zero-shot task
        n, se = x.get("n"), x.get("stderr")
        return f"{x['acc']:.3f}" + (f" ± {1.96 * se:.3f}" if se else "") + (f" (n={n})" if n else "")
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:,.3f}"


SPEEDS = ("prefill_tok_s", "decode_tok_s")
SPREAD_SUFFIXES = ("_rounds", "_min", "_max")  # shown next to the speed medians, not as rows


def _speed(key: str, m: dict) -> str:
    """``median (min–max, n rounds)`` of one model's speed, or the median alone without its spread."""
    rounds = m.get(f"{key}_rounds") or []
    if not rounds:
        return _fmt(key, m[key])
    return f"{_fmt(key, m[key])} ({range_text(m[f'{key}_min'], m[f'{key}_max'])}, {len(rounds)} rounds)"


def compare_rows(dense: dict, comp: dict) -> list[list]:
    """[metric, dense, compressed, Δ %] rows; every number carries its sample (windows, items, rounds)."""
    rows = []
    windows = comp.get("ppl_windows")
    for key in dict.fromkeys([*comp, *dense]):
        a, b = dense.get(key), comp.get(key)
        if key in ("threads", "batch", "ppl_windows", "ppl_ci", "agreement", "speed_rounds") or a is None or b is None:
            continue
        if key.startswith(SPEEDS) and key.endswith(SPREAD_SUFFIXES):
            continue
        name = METRIC_NAMES.get(key, key)
        if key == "ppl":
            name = f"perplexity (wiki, {windows} × 1024-token windows; 95% interval)"
        elif key.startswith("zs:"):
            name = f"zero-shot {key[3:]} ({b.get('metric', 'acc')}, 95% interval)"
            a_val, b_val = a["acc"], b["acc"]
        elif key == "zero_shot_avg":
            name = "zero-shot average of the tasks run (95% interval)"
        elif key == "kl":
            name = f"KL(dense ‖ compressed) per token, nats ({windows} windows)"
        elif key == "top1":
            name = f"top-1 next-token agreement with dense ({windows} windows)"
        a_val = a["acc"] if isinstance(a, dict) else a
        b_val = b["acc"] if isinstance(b, dict) else b
        delta = f"{100 * (b_val - a_val) / a_val:+.1f}%" if a_val else ""
        shown_a, shown = _fmt(key, a), _fmt(key, b)
        if key in SPEEDS:
            name += (f" (median of {comp.get('speed_rounds')} alternating rounds"
                     + (f" at batch {comp['batch']}" if comp.get("batch") else "") + "; min – max)")
            shown_a, shown = _speed(key, dense), _speed(key, comp)
        if key == "ppl":  # each interval at the precision of both its ends
            shown_a += f" [{range_text(*dense['ppl_ci'])}]" if dense.get("ppl_ci") else ""
            shown += f" [{range_text(*comp['ppl_ci'])}]" if comp.get("ppl_ci") else ""
        rows.append([name, shown_a, shown, delta])
    return rows


# --- why a compressed model is not faster ----------------------------------------------------------

@torch.no_grad()
def kv_bytes_per_token(model, tokens: int = 8) -> float | None:
    """Bytes the KV cache grows by per token, measured on a short prompt (None when the cache is of
    a kind not read here)."""
    ids = torch.zeros((1, tokens), dtype=torch.long, device=next(model.parameters()).device)
    _, cache = cached_step(model, ids)
    tensors = [t for layer in getattr(cache, "layers", None) or ()
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    total = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total / tokens if total else None


def speed_facts(model) -> dict:
    """What a token goes through that compression may or may not have shrunk: the decoder blocks,
    the output head's parameters and the KV cache's bytes per token."""
    model_view = view(model)
    return {"blocks": len(model_view.layers), "head_params": model_view.lm_head.weight.numel(),
            "kv_bytes": kv_bytes_per_token(model)}


def speed_notes(dense: dict, comp: dict, facts: dict) -> list[str]:
    """One line for each speed (prefill, decode) at which the compressed model is not faster than
    the dense one, with the likely reason drawn from the numbers: the weights a token goes through
    (blocks and output head) and how much of them went, whether the rounds overlap, the batch, prompt
    and device of the timing, and what did not shrink (head, blocks, KV cache).

    dense, comp: each model's row dict (speeds with their min/max, ``block_params``); facts:
    ``device``, ``threads``, ``batch``, ``prompt_len``, ``new_tokens`` and :func:`speed_facts` of
    each model under "dense" and "compressed"."""
    d, c = facts["dense"], facts["compressed"]
    weights_d, weights_c = dense["block_params"] + d["head_params"], comp["block_params"] + c["head_params"]
    removed, bound = 1 - weights_c / weights_d, weights_d / weights_c
    unchanged = []
    if c["head_params"] == d["head_params"]:
        unchanged.append(f"the output head ({d['head_params'] / 1e6:,.1f}M parameters)")
    if c["blocks"] == d["blocks"]:
        unchanged.append(f"the number of blocks ({d['blocks']}, each with its norms, attention and per-layer overhead)")
    kv_same = d["kv_bytes"] and c["kv_bytes"] and c["kv_bytes"] >= 0.99 * d["kv_bytes"]
    where = f"on {facts['device']}" + (f" ({facts['threads']} threads)" if facts.get("threads") else "")
    notes = []
    for key, name in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
        if key not in comp or key not in dense or comp[key] > dense[key]:
            continue
        line = (f"{WARN} {name} is not faster than dense ({comp[key] / dense[key]:.2f}×; rounds "
                f"{comp[f'{key}_min']:,.1f}–{comp[f'{key}_max']:,.1f} vs {dense[f'{key}_min']:,.1f}–"
                f"{dense[f'{key}_max']:,.1f} tokens/s): ")
        if bound < MIN_GAIN:
            line += f"only {removed:.1%} of the weights a token goes through were removed, too little to show"
        else:
            work = (f"at batch {facts['batch']} with {facts['prompt_len']}-token prompts" if name == "prefill"
                    else f"decoding one token per sequence at batch {facts['batch']}")
            what = unchanged + ([f"the KV cache ({d['kv_bytes'] / 1024:,.1f} KB a token) read over up to "
                                 f"{facts['prompt_len'] + facts['new_tokens']} cached tokens"]
                                if name == "decode" and kv_same else [])
            line += (f"{work} {where}, the matrix products are too small for what was removed to matter "
                     f"({removed:.0%} fewer weights per token would give {bound:.2f}× if time followed them)"
                     + (f"; unchanged: {', '.join(what)}" if what else ""))
        if comp[f"{key}_max"] >= dense[f"{key}_min"]:
            line += "; the rounds overlap, so part of the gap is this machine's noise"
        notes.append(line + ".")
    return notes


# --- the table as files -----------------------------------------------------------------------------

def csv_cell(value) -> str:
    """A table cell as CSV text; one a spreadsheet would take for a formula gets a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def table_csv(rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows([csv_cell(cell) for cell in row] for row in rows)
    return out.getvalue()


def finite(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@dataclass
class Evaluation:
    """One finished evaluation: the table, the raw numbers behind it, and the notes on speed."""

    run: Any
    settings: dict
    dense: dict
    comp: dict
    rows: list
    notes: list = field(default_factory=list)

    def files(self, session) -> tuple[str, str]:
        """(CSV, JSON) of this evaluation, written into the session's work folder under names built
        from the run's id (which the app generated), replacing the run's previous ones."""
        folder = inside(session.workdir, "exports")
        folder.mkdir(exist_ok=True)
        paths = (inside(folder, f"{self.run.id}-evaluation.csv"), inside(folder, f"{self.run.id}-evaluation.json"))
        record = {"run": self.run.id, "model": self.run.model_name, "method": self.run.report.get("method"),
                  "settings": self.settings, "columns": COLUMNS, "rows": self.rows, "notes": self.notes,
                  "dense": self.dense, "compressed": self.comp}
        paths[0].write_text(table_csv(self.rows), encoding="utf-8", newline="")
        paths[1].write_text(json.dumps(finite(record), indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        return str(paths[0]), str(paths[1])


class EvaluateTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def evaluate(self, session, run_id, ppl_windows=4, tasks=(), limit=50, measure_speed=True):
        """Yields (progress panel, table rows [metric, dense, compressed, Δ %]); a stopped evaluation
        ends with a blank panel and no rows (the /evaluate endpoint)."""
        try:
            for panel, rows, _ in self.evaluation(session, run_id, ppl_windows, tasks, limit, measure_speed):
                yield panel, rows
        except Stopped:
            yield "", []

    def evaluate_page(self, session, run_id, ppl_windows=4, tasks=(), limit=50, measure_speed=True):
        """The page's evaluation: yields (progress panel, rows, CSV download, JSON download, status).
        While it runs the downloads are hidden and the status is blank (no line of an earlier run
        stays); at the end the downloads hold this table and the status the notes on speed."""
        hidden = gr.update(value=None, visible=False)
        try:
            for panel, rows, done in self.evaluation(session, run_id, ppl_windows, tasks, limit, measure_speed):
                if done is None:
                    yield panel, rows, hidden, hidden, ""
                    continue
                with user_errors():
                    csv_path, json_path = done.files(session)
                yield (panel, rows, gr.update(value=csv_path, visible=True),
                       gr.update(value=json_path, visible=True), "\n\n".join(done.notes))
        except Stopped:
            yield "", gr.update(), hidden, hidden, f"{STOP} Stopped."

    @staticmethod
    def stop(session):
        """(progress panel, status) at once: the click cancels the page's stream, so it cannot say
        so itself; the worker hears the session's stop flag within a window, a zero-shot batch or a
        forward of the speed rounds, and frees the model slot."""
        session.request_stop()
        return "", f"{STOP} Stopped."

    def evaluation(self, session, run_id, ppl_windows=4, tasks=(), limit=50, measure_speed=True):
        """Yields (progress panel, rows, None) while the job runs, then (panel, rows,
        :class:`Evaluation`); raises Stopped when the job is stopped."""
        store = self.ctx.store
        with user_errors():
            run = session.get(run_id)
            if run.model is None:
                raise ValueError(f"run {run.id} has only its report in memory; compress or load it again")
            limit = int(limit) if limit else None
            windows = int(ppl_windows or 0)
            if not 0 <= windows <= 64 or (limit is not None and not 1 <= limit <= MAX_LIMIT):
                raise ValueError(f"perplexity windows must be in [0, 64] and zero-shot items in [1, {MAX_LIMIT}]")
            from compression.zeroshot import TASKS

            tasks = tuple(tasks or ())
            if any(t not in TASKS for t in tasks):
                raise ValueError(f"zero-shot tasks must be among {', '.join(TASKS)}")
        speed_args = {"rounds": SPEED_ROUNDS, **SPEED_SETTINGS["gpu" if self.ctx.on_gpu else "cpu"]}
        args = dict(tasks=tasks, limit=limit)

        def job(progress):
            weights = {"dense model": 1.0, "compressed model": 1.0}
            if windows:
                weights.update({"dense reference": 0.5, "compressed perplexity and agreement": 0.5})
            if measure_speed:
                weights["speed, dense and compressed in alternating rounds"] = 0.3
            stages = Stages(progress, weights)
            key = json.dumps([run.model_name, "eval", list(tasks), limit])
            dense = store.dense.get(key)
            step = stages.stage("dense model")
            dense_model, tok = store.get(run.model_name)
            if dense is None:
                dense = evaluate_model(dense_model, tok, progress=step, **args)
                store.dense.put(key, dense)
            comp = evaluate_model(run.model, run.tokenizer, progress=stages.stage("compressed model"), **args)
            dense, comp, facts = dict(dense), dict(comp), {}
            if windows:
                measured = measure_against(run.model_name, dense_model, run.model,
                                           store.eval_windows(run.model_name, windows), store.dense, stages)
                ppl, agreement = measured["ppl"], measured["agreement"]
                dense["ppl"], comp["ppl"] = ppl["dense"], ppl["compressed"]
                comp["ppl_windows"] = dense["ppl_windows"] = windows
                comp["ppl_ci"], dense["ppl_ci"] = ppl["compressed_ci"], ppl.get("dense_ci")
                comp["kl"], comp["top1"] = agreement["kl"], agreement["top1"]
                dense["kl"], dense["top1"] = 0.0, 1.0
                comp["agreement"] = agreement
            if measure_speed:
                models = {"dense": dense_model, "compressed": run.model}
                timed = speed_side_by_side(models, **speed_args,
                                           progress=stages.stage("speed, dense and compressed in alternating rounds"))
                dense.update(timed["dense"])
                comp.update(timed["compressed"], speed_rounds=SPEED_ROUNDS)
                facts = {"device": store.device, "threads": None if self.ctx.on_gpu else timed["dense"]["threads"],
                         "batch": timed["dense"]["batch"], "prompt_len": speed_args["prompt_len"],
                         "new_tokens": speed_args["new_tokens"],
                         **{name: speed_facts(m) for name, m in models.items()}}
            return dense, comp, facts

        with user_errors():
            for state in watch(job, session, self.ctx.slot):
                if not state.done.is_set():
                    yield progress_html(state, "Evaluate"), [], None
        dense, comp, facts = state.result
        settings = f"windows={windows} tasks={','.join(tasks)} limit={limit}"
        run.metrics[settings] = {"dense": dense, "compressed": comp}
        self.keep_in_report(run, windows, tasks, limit, dense, comp)
        rows = compare_rows(dense, comp)
        notes = speed_notes(dense, comp, facts) if facts else []
        done = Evaluation(run, {"ppl_windows": windows, "tasks": list(tasks), "limit": limit,
                                "speed": bool(measure_speed)}, dense, comp, rows, notes)
        yield progress_html(state, "Evaluate"), rows, done

    @staticmethod
    def keep_in_report(run, windows, tasks, limit, dense: dict, comp: dict) -> None:
        """The run's report keeps the perplexity measured on the most windows and the last zero-shot."""
        if "ppl" in comp:
            best = run.report.setdefault("evaluation", {}).get("ppl")
            if best is None or windows >= best.get("windows", 0):
                run.report["evaluation"]["ppl"] = {"dense": dense["ppl"], "compressed": comp["ppl"],
                                                   "compressed_ci": comp["ppl_ci"], "dense_ci": dense.get("ppl_ci"),
                                                   "windows": windows,
                                                   "seq_len": 1024, "text": "wiki evaluation split"}
                run.report["ppl_dense"], run.report["ppl_compressed"] = dense["ppl"], comp["ppl"]
                run.report["agreement"] = comp["agreement"]
        if "zero_shot_avg" in comp:
            run.report.setdefault("evaluation", {})["zero_shot"] = {
                "dense": dense["zero_shot_avg"]["acc"], "compressed": comp["zero_shot_avg"]["acc"],
                "compressed_stderr": comp["zero_shot_avg"].get("stderr"), "tasks": list(tasks), "limit": limit}

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        gpu, c = self.ctx.on_gpu, SimpleNamespace()
        try:
            from compression.zeroshot import available_tasks
            tasks_ok, note = available_tasks(), ""
        except Exception as err:  # noqa: BLE001  lm-eval or the task files missing
            tasks_ok, note = (), f"_Zero-shot disabled: {err}_"
        with gr.Row():
            c.windows = gr.Slider(0, 64, value=32 if gpu else 4, step=1, label="Perplexity windows",
                                  info="1024-token held-out wiki windows (reference: 32)", elem_classes=HOVER)
            c.limit = gr.Number(50, precision=0, label="Zero-shot items per task",
                                info="the interval shrinks as 1/√n: 50 items ≈ ±14 points", elem_classes=HOVER)
            c.speed = gr.Checkbox(True, label="Measure speed and memory",
                                  info="prefill / decode tokens per second", elem_classes=HOVER)
        c.tasks = gr.CheckboxGroup(list(tasks_ok), value=[], label="Zero-shot tasks (lm-eval, offline)",
                                   interactive=bool(tasks_ok))
        gr.Markdown(note or "Peak memory on CPU is the process's peak resident size.")
        with gr.Row():
            c.btn = gr.Button("Evaluate dense vs compressed", variant="primary")
            c.stop_btn = gr.Button("Stop", variant="stop")
        c.progress = gr.HTML("")
        c.status = gr.Markdown("")
        c.table = gr.Dataframe(headers=COLUMNS, label="dense vs compressed", interactive=False, max_height=1000)
        with gr.Row():
            c.csv = gr.DownloadButton("Download the table (CSV)", visible=False)
            c.json = gr.DownloadButton("Download the table and its numbers (JSON)", visible=False)
        return c

    def wire(self, page, c: SimpleNamespace, state, run_dd):
        """Returns the page's evaluate event (the runs view follows it). The /evaluate endpoint
        returns (progress, table) as before; the page's event also fills the downloads and the notes."""
        inputs = [state, run_dd, c.windows, c.tasks, c.limit, c.speed]
        page.api_only.click(self.evaluate, inputs, [c.progress, c.table], api_name="evaluate",
                            show_progress="hidden", **JOB)
        evaluate_evt = page.endpoint([c.btn.click], self.evaluate_page, inputs,
                                     [c.progress, c.table, c.csv, c.json, c.status], c.status, clear=[c.progress],
                                     show_progress="hidden", hold=c.btn, **JOB)
        c.stop_btn.click(self.stop, state, [c.progress, c.status], cancels=[evaluate_evt], queue=False, **HIDDEN)
        return evaluate_evt
