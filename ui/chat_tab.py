"""The Chat tab: the dense model and up to three runs answer the same message side by side, and the
example prompts go through all of them at once into one table."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .chat import (NO_REPLY, Halt, Sampling, build_prompt, chat_stream, check_history, check_message, context_of,
                   generate)
from .common import STOP, Context, user_errors
from .jobs import progress_html, watch
from .runs import Stopped
from .page import HIDDEN, HOVER, JOB, LAST

MAX_RUNS = 3  # compressed panes next to the dense one
CHAT_HEIGHT = 480  # px: room for a prompt and a 128-token reply with two panes across
CHAT_EXAMPLES = ["Write a haiku about autumn.", "Explain photosynthesis to a ten-year-old.",
                 "What is the capital of France, and why is it famous?",
                 "Give me three tips for writing clean Python code."]
COMPARE_MAX_TOKENS = 96  # per reply in the comparison table: prompts x models replies on one slot
PROMPT_WIDTH = 16  # % of the comparison table's width for the prompt column
NOT_IN_MEMORY = "_(run {id}'s model is no longer in memory, only its report: compress or load it again)_"
STOPPED_CELL = f"{STOP} stopped"  # a comparison cell whose model was stopped before it answered
MAX_TABLE_ROWS = 64  # rows of a comparison table sent back with Stop (the page has as many as prompts)


class ChatTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def chat(self, session, message, dense_history=None, compressed_history=None, run_id=None, model_name="",
             temperature=0.7, top_p=0.9, max_new_tokens=128, repetition_penalty=1.1, seed=0,
             chat_template=True, run_ids=None, history_2=None, history_3=None):
        """Stream every reply in lockstep, same settings and seed.

        run_ids: up to three runs, one pane each after the dense one (None: ``run_id`` alone, the
        session's latest run when that is empty too; []: the dense model alone). ``compressed_history``,
        ``history_2`` and ``history_3`` are those panes' conversations. Yields (dense history, one
        history per run pane (empty for a pane not used), cleared input)."""
        with user_errors():
            runs = self.runs(session, run_ids, run_id)
            histories = [dense_history, compressed_history, history_2, history_3][:1 + len(runs)]
            names = ["the dense pane's"] + [f"run pane {i + 1}'s" for i in range(len(runs))]
            histories = [check_history(h, name) for h, name in zip(histories, names)]
            dense = self.ctx.store.get(runs[0].model_name if runs else model_name)
            message = check_message(dense[1], message)  # ChatError is a ValueError: shown as it is
            s = Sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, bool(chat_template))
            stop = session.start_job()  # RunError while another job of the session runs
        pairs = [dense] + [(r.model, r.tokenizer) if r.model is not None else None for r in runs]
        for pair, run, history in zip(pairs[1:], runs, histories[1:]):
            if pair is None:  # that pane says why it is silent
                history += [{"role": "user", "content": message},
                            {"role": "assistant", "content": NOT_IN_MEMORY.format(id=run.id)}]
        try:
            for histories in chat_stream(pairs, histories, message, s, stop, templates(dense, len(runs)),
                                         context_of(dense[0])):
                yield *padded(histories), ""
        finally:
            session.end_job(stop)

    def chat_page(self, *args):
        """:meth:`chat` as the page streams it: the message box is emptied by the first step only, so
        what the user types while the replies stream stays (and is sent when they end)."""
        for step, out in enumerate(self.chat(*args)):
            yield *out[:-1], out[-1] if step == 0 else gr.update()

    @staticmethod
    def runs(session, run_ids, run_id=None) -> list:
        """The session's runs for the panes: at most :data:`MAX_RUNS`, of one dense model."""
        if run_ids is None:  # API callers from before several runs: the one run, or the latest
            return [session.get(run_id)] if session.runs else []
        if not isinstance(run_ids, (list, tuple)):
            run_ids = [run_ids]
        run_ids = list(dict.fromkeys(str(r) for r in run_ids[:MAX_RUNS + 1] if r))  # ids are checked below
        if len(run_ids) > MAX_RUNS:
            raise ValueError(f"pick at most {MAX_RUNS} runs to chat with")
        runs = [session.get(r) for r in run_ids if r]
        if len({r.model_name for r in runs}) > 1:
            raise ValueError("the runs compress different models; pick runs of one model")
        return runs

    @staticmethod
    def choices(session, selected_run, current=None):
        """The run picker after the global run changed: every run of the session, the selection kept
        when it holds the global run, else the global run alone (and the panes emptied)."""
        choices = [(run.label, run.id) for run in session.runs.values()]
        current = [r for r in (current or []) if r in session.runs]
        value = current if selected_run in current else [selected_run] if selected_run in session.runs else []
        return gr.update(choices=choices, value=value)

    def panes(self, session, run_ids):
        """(dense pane, one update per run pane): labels name the runs; unused panes are hidden and
        every pane is emptied, since a new set of models starts a new conversation."""
        try:
            runs = self.runs(session, run_ids or [])
        except (ValueError, TypeError):
            runs = []
        dense_label = "Dense"
        if runs:
            dense_label += f" · {runs[0].report.get('params_dense', 0) / 1e6:,.1f}M"
        updates = [gr.update(label=dense_label, value=[])]
        for i in range(MAX_RUNS):
            run = runs[i] if i < len(runs) else None
            updates.append(gr.update(visible=run is not None, value=[],
                                     **({"label": pane_label(run)} if run else {})))
        return tuple(updates)

    def compare(self, session, run_ids=None, model_name="", temperature=0.0, top_p=0.9, max_new_tokens=128,
                repetition_penalty=1.1, seed=0, chat_template=True, prompts=None):
        """Every example prompt through the dense model and each run, same settings and seed (replies
        capped at :data:`COMPARE_MAX_TOKENS` tokens), one fresh conversation each. Yields (progress
        panel, update of the table {headers, data}: a row per prompt, a column per model); Stop keeps the replies
        so far. Runs whose model is no longer in memory are left out."""
        with user_errors():
            runs = [r for r in self.runs(session, run_ids or []) if r.model is not None]
            dense_name = runs[0].model_name if runs else model_name
            prompts = list(prompts or CHAT_EXAMPLES)
            s = Sampling(temperature, top_p, min(int(max_new_tokens), COMPARE_MAX_TOKENS), repetition_penalty,
                         seed, bool(chat_template))
        store = self.ctx.store
        headers = ["prompt", "dense"] + [pane_label(r) for r in runs]
        rows = [[p] + [""] * (len(headers) - 1) for p in prompts]

        def job(progress):
            dense = store.get(dense_name)
            models = [dense] + [(r.model, r.tokenizer) for r in runs]
            total, done, context = len(prompts) * len(models), 0, context_of(dense[0])
            for col, ((model, tok), template) in enumerate(zip(models, templates(dense, len(runs))), start=1):
                for row, prompt in enumerate(prompts):
                    where = f"{headers[col].split(' · ')[0]}, prompt {row + 1}/{len(prompts)}"
                    progress(done / total, f"{where}: prompt")
                    ids = build_prompt(tok, [], prompt, s.chat_template, template, context)
                    for text, n, _ in generate(model, tok, ids, s, context, Halt(progress.stop)):
                        rows[row][col] = text
                        progress((done + n / s.max_new_tokens) / total, f"{where}: {n} tokens")
                    rows[row][col] = rows[row][col] or NO_REPLY.strip("_")  # empty: "not answered" (Stop)
                    done += 1
            return rows

        widths = [f"{PROMPT_WIDTH}%"] + [f"{(100 - PROMPT_WIDTH) / (len(headers) - 1):.1f}%"] * (len(headers) - 1)

        def table():  # a copy: the worker keeps writing into rows; widths share the page between models
            return gr.update(value=dict(headers=headers, data=[list(r) for r in rows]), column_widths=widths)

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    yield progress_html(state, "Compare"), table()  # replies appear as they are written
        except Stopped:
            yield f"{STOP} Stopped; the replies so far are in the table.", stopped_table(table()["value"])

    @staticmethod
    def stopped(session, table=None):
        """(status, blank progress panel, comparison table) when Stop cancels a reply or the
        comparison: the session's job hears its stop flag within a token (a cancelled stream alone
        may never be pulled again, nor closed), and every model's cell the comparison had not
        reached says so (the cancelled stream cannot send its last table)."""
        session.request_stop()
        return f"{STOP} Stopped.", "", stopped_table(table)

    @staticmethod
    def clear():
        """Empty panes and message box."""
        return ([],) * (1 + MAX_RUNS) + ("",)

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        c = SimpleNamespace()
        c.runs = gr.Dropdown([], value=None, multiselect=True, max_choices=MAX_RUNS, allow_custom_value=True,
                             label=f"Runs to chat with (up to {MAX_RUNS})",
                             info="each answers next to the dense model; follows the run picked above; a new "
                                  "selection starts a new conversation")
        with gr.Row(elem_classes=["chat-panes"]):
            c.panes = [gr.Chatbot(label="Dense", height=CHAT_HEIGHT, buttons=["copy"])] + \
                      [gr.Chatbot(label=f"Run {i + 1}", height=CHAT_HEIGHT, buttons=["copy"], visible=False)
                       for i in range(MAX_RUNS)]
        c.msg = gr.Textbox(placeholder="Message every model…", show_label=False, submit_btn=True)
        c.status = gr.Markdown("")
        with gr.Row():
            c.stop_btn = gr.Button("Stop", variant="stop")
            c.clear_btn = gr.Button("Clear chat")
        gr.Examples(CHAT_EXAMPLES, inputs=[c.msg])
        c.compare_btn = gr.Button("Compare on these prompts")
        c.compare_progress = gr.HTML("")
        c.compare_table = gr.Dataframe(headers=["prompt", "dense"], label="The example prompts, every model (fresh "
                                       f"conversations, replies capped at {COMPARE_MAX_TOKENS} tokens)",
                                       interactive=False, wrap=True, max_height=800, elem_classes=["compare-table"])
        with gr.Accordion("Sampling (same settings and seed for every model)", open=False):
            with gr.Row():
                c.sampling = [gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                        elem_classes=HOVER),
                              gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p"),
                              gr.Slider(8, 512, value=128, step=8, label="Max new tokens"),
                              gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty"),
                              gr.Number(0, precision=0, label="Seed"),
                              gr.Checkbox(True, label="Chat template")]
        return c

    def wire(self, page, c: SimpleNamespace, state, run_dd, model) -> None:
        """The run picker follows the global run; a new selection relabels and empties the panes."""
        panes = c.panes
        run_dd.change(self.choices, [state, run_dd, c.runs], c.runs, **HIDDEN)
        c.runs.change(self.panes, [state, c.runs], panes, **HIDDEN, **LAST)
        inputs = [state, c.msg, panes[0], panes[1], run_dd, model, *c.sampling, c.runs, *panes[2:]]
        page.api_only.click(self.chat, inputs, [*panes, c.msg], api_name="chat", **JOB)
        # always_last: Enter while a reply streams sends that message once the reply ends (the page's
        # default, "once", silently dropped it)
        chat_evt = page.endpoint([c.msg.submit], self.chat_page, inputs, [*panes, c.msg], c.status,
                                 trigger_mode="always_last", **JOB)
        compare_evt = page.endpoint([c.compare_btn.click], self.compare, [state, c.runs, model, *c.sampling],
                                    [c.compare_progress, c.compare_table], c.status, clear=[c.compare_progress],
                                    show_progress="hidden", hold=c.compare_btn, **JOB)
        c.stop_btn.click(self.stopped, [state, c.compare_table], [c.status, c.compare_progress, c.compare_table],
                         cancels=[chat_evt, compare_evt], queue=False, **HIDDEN)
        c.clear_btn.click(self.clear, None, [*panes, c.msg], queue=False, **HIDDEN)


def templates(dense: tuple, runs: int) -> list:
    """The chat template of every pane: the dense model's own, and the dense model's for each run
    too. A run is a compression of that dense model, and an uploaded run's own template is never
    rendered (a template is a program: nested loops in one could hold the model slot for hours)."""
    from .chat import OWN

    return [OWN] + [getattr(dense[1], "chat_template", None)] * runs


def stopped_table(table):
    """The comparison table after Stop: each model's empty cell (no answer yet) says "■ stopped";
    prompts and replies stay as they are. ``table``: the table as the page holds it (a DataFrame,
    or {headers, data}); at most :data:`MAX_TABLE_ROWS` rows of it come back. No rows: no change."""
    if table is None:
        return gr.update()
    if isinstance(table, dict):
        headers, data = list(table.get("headers") or []), table.get("data") or []
    else:  # the page sends a pandas DataFrame
        headers, data = [str(h) for h in table.columns], table.values.tolist()
    if not data:
        return gr.update()
    rows = [[cell if isinstance(cell, str) else "" for cell in row] for row in list(data)[:MAX_TABLE_ROWS]]
    rows = [row[:1] + [cell or STOPPED_CELL for cell in row[1:]] for row in rows]
    return gr.update(value=dict(headers=headers, data=rows))


def padded(histories: list) -> list:
    """Histories for the dense pane and all :data:`MAX_RUNS` run panes (unused ones empty)."""
    return list(histories) + [[] for _ in range(1 + MAX_RUNS - len(histories))]


def pane_label(run) -> str:
    """``r2 · modegpt −25% · 108.0M · chat KL 0.87, top-1 61%``: the run, and its chat agreement with
    the dense model when the report has one."""
    r = run.report
    label = (f"{run.id} · {r.get('method')} −{100 * (r.get('ratio_achieved') or 0):.0f}% · "
             f"{(r.get('params_compressed') or 0) / 1e6:,.1f}M")
    chat = r.get("agreement_chat") or {}
    if isinstance(chat.get("kl"), (int, float)) and isinstance(chat.get("top1"), (int, float)):
        label += f" · chat KL {chat['kl']:.2f}, top-1 {chat['top1']:.0%}"
    return label
