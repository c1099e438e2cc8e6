"""The Evaluate tab: dense vs compressed on the same footing (perplexity with its window count,
zero-shot with its item count, speed, size); the dense side is computed once per setting."""
from __future__ import annotations

from types import SimpleNamespace

import json
from typing import Any

import gradio as gr

from compression.evaluate import sizes, speed_side_by_side
from compression.pipeline import Stages, measure_against

from .common import Context, megabytes, user_errors
from .jobs import progress_html, watch
from .runs import Stopped
from .page import HOVER, JOB

METRIC_NAMES = {"params": "parameters", "block_params": "block parameters", "bytes": "weights (MB)",
                "prefill_tok_s": "prefill tokens/s", "decode_tok_s": "decode tokens/s",
                "peak_mem_mb": "peak memory (MB)"}
MAX_LIMIT = 10_000
SPEED_ROUNDS = 5  # dense and compressed timed in turn, medians over rounds: drift hits both alike


def evaluate_model(model, tokenizer, tasks=(), limit=None, progress=lambda f, m: None) -> dict:
    """Sizes and zero-shot of one model, as one flat dict (perplexity, agreement and speed are
    measured for both models at once: :func:`compression.pipeline.measure_against`,
    :func:`compression.evaluate.speed_side_by_side`)."""
    out: dict[str, Any] = dict(sizes(model))
    if tasks:
        from compression.zeroshot import zero_shot

        threads = None if next(model.parameters()).is_cuda else 1  # lm-eval's small ops: 1 thread on CPU
        zs = zero_shot(model, tokenizer, tasks=tuple(tasks), limit=limit, threads=threads,
                       progress=lambda f, desc="": progress(0.9 * f, f"zero-shot: {desc}"))
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
    return f"{_fmt(key, m[key])} ({_fmt(key, m[f'{key}_min'])}–{_fmt(key, m[f'{key}_max'])}, {len(rounds)} rounds)"


def compare_rows(dense: dict, comp: dict) -> list[list]:
    """[metric, dense, compressed, Δ %] rows; every number carries its sample (windows, items, rounds)."""
    rows = []
    windows = comp.get("ppl_windows")
    for key in dict.fromkeys([*comp, *dense]):
        a, b = dense.get(key), comp.get(key)
        if key in ("threads", "ppl_windows", "ppl_ci", "agreement", "speed_rounds") or a is None or b is None:
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
            name += f" (median of {comp.get('speed_rounds')} alternating rounds; min–max)"
            shown_a, shown = _speed(key, dense), _speed(key, comp)
        if key == "ppl" and comp.get("ppl_ci"):
            shown += " [{:.2f}, {:.2f}]".format(*comp["ppl_ci"])
        rows.append([name, shown_a, shown, delta])
    return rows


class EvaluateTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def evaluate(self, session, run_id, ppl_windows=4, tasks=(), limit=50, measure_speed=True):
        """Yields (progress panel, table rows [metric, dense, compressed, Δ %])."""
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
        speed_args = {"rounds": SPEED_ROUNDS} if self.ctx.on_gpu else \
            {"prompt_len": 128, "new_tokens": 32, "rounds": SPEED_ROUNDS}
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
            dense, comp = dict(dense), dict(comp)
            if windows:
                measured = measure_against(run.model_name, dense_model, run.model,
                                           store.eval_windows(run.model_name, windows), store.dense, stages)
                ppl, agreement = measured["ppl"], measured["agreement"]
                dense["ppl"], comp["ppl"] = ppl["dense"], ppl["compressed"]
                comp["ppl_windows"] = dense["ppl_windows"] = windows
                comp["ppl_ci"] = ppl["compressed_ci"]
                comp["kl"], comp["top1"] = agreement["kl"], agreement["top1"]
                dense["kl"], dense["top1"] = 0.0, 1.0
                comp["agreement"] = agreement
            if measure_speed:
                stages.stage("speed, dense and compressed in alternating rounds")(0.0, "timing")
                timed = speed_side_by_side({"dense": dense_model, "compressed": run.model}, **speed_args)
                dense.update(timed["dense"])
                comp.update(timed["compressed"], speed_rounds=SPEED_ROUNDS)
            return dense, comp

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():
                        yield progress_html(state, "Evaluate"), []
        except Stopped:
            yield "", []
            return
        dense, comp = state.result
        settings = f"windows={windows} tasks={','.join(tasks)} limit={limit}"
        run.metrics[settings] = {"dense": dense, "compressed": comp}
        if "ppl" in comp:  # keep the perplexity measured on the most windows
            best = run.report.setdefault("evaluation", {}).get("ppl")
            if best is None or windows >= best.get("windows", 0):
                run.report["evaluation"]["ppl"] = {"dense": dense["ppl"], "compressed": comp["ppl"],
                                                   "compressed_ci": comp["ppl_ci"], "windows": windows,
                                                   "seq_len": 1024, "text": "wiki evaluation split"}
                run.report["ppl_dense"], run.report["ppl_compressed"] = dense["ppl"], comp["ppl"]
                run.report["agreement"] = comp["agreement"]
        if "zero_shot_avg" in comp:
            run.report.setdefault("evaluation", {})["zero_shot"] = {
                "dense": dense["zero_shot_avg"]["acc"], "compressed": comp["zero_shot_avg"]["acc"],
                "compressed_stderr": comp["zero_shot_avg"].get("stderr"), "tasks": list(tasks), "limit": limit}
        yield progress_html(state, "Evaluate"), compare_rows(dense, comp)

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
        c.btn = gr.Button("Evaluate dense vs compressed", variant="primary")
        c.progress = gr.HTML("")
        c.status = gr.Markdown("")
        c.table = gr.Dataframe(headers=["metric", "dense", "compressed", "Δ %"], label="dense vs compressed",
                               interactive=False, max_height=1000)
        return c

    def wire(self, page, c: SimpleNamespace, state, run_dd):
        """Returns the evaluate event (the runs view follows it)."""
        return page.endpoint([c.btn.click], self.evaluate, [state, run_dd, c.windows, c.tasks, c.limit, c.speed],
                             [c.progress, c.table], c.status, clear=[c.progress], api_name="evaluate",
                             show_progress="hidden", **JOB)
