"""The Chat tab: the dense model and the selected run answer the same message side by side."""
from __future__ import annotations

import gradio as gr

from .chat import ChatError, Sampling, chat_stream, check_message
from .common import Context, user_errors


class ChatTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def chat(self, session, message, dense_history, compressed_history, run_id=None, model_name="",
             temperature=0.7, top_p=0.9, max_new_tokens=128, repetition_penalty=1.1, seed=0,
             chat_template=True):
        """Stream both replies in lockstep; yields (dense history, compressed history, cleared input)."""
        with user_errors():
            run = session.get(run_id) if session.runs else None
            dense = self.ctx.store.get(run.model_name if run else model_name)
            try:
                message = check_message(dense[1], message)
                s = Sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, bool(chat_template))
            except ChatError as err:
                raise gr.Error(str(err), print_exception=False) from None
        if run is None or run.model is None:
            gr.Warning("No compressed model in memory: only the dense model answers.")
        pairs = [dense, (run.model, run.tokenizer) if run and run.model is not None else None]
        histories = [dense_history or [], compressed_history or []]
        stop = session.start_job()
        try:
            for histories in chat_stream(pairs, histories, message, s, stop):
                yield histories[0], histories[1], ""
        finally:
            session.end_job(stop)

    @staticmethod
    def pane_label(session, run_id) -> dict:
        """The compressed pane names its run (method, ratio, params)."""
        try:
            run = session.get(run_id)
        except ValueError:
            return gr.update(label="Compressed (no run yet)")
        r = run.report
        return gr.update(label=f"Compressed · {run.id} · {r.get('method')} −{r.get('ratio_achieved', 0):.0%}"
                               f" · {r.get('params_compressed', 0) / 1e6:,.1f}M params")
