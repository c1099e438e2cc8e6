"""Recovery training (heal) of the selected run, in the Compress tab: its controls, the job, and the
healed run recorded in its report and saved again (:func:`ui.run_saving.keep_healed`)."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

import viz
from compression.heal import HealConfig, check_fits
from compression.pipeline import Stages, heal_and_measure

from .common import OK, STOP, Context, user_errors
from .jobs import progress_html, watch
from .page import HIDDEN, HOVER, JOB
from .run_saving import keep_healed
from .runs import Stopped

HEAL_STOPPED = ("Stopped. LoRA adapters are discarded (the run's model is as before); a full-parameter heal "
                "(rank 0) keeps the steps already taken.")


class HealView:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def heal(self, session, run_id, tokens=16384, lora_rank=8, seq_len=256, ppl_windows=4):
        """Recovery-train the run's compressed model in place, then save it again (locally); yields
        (progress, status, loss figure)."""
        store = self.ctx.store
        with user_errors():
            run = session.get(run_id)
            if run.model is None:
                raise ValueError(f"run {run.id}'s model is no longer in memory; compress or load it again")
            calib = run.report.get("calibration") or {}
            config = HealConfig(tokens=int(tokens), lora_rank=int(lora_rank), seq_len=int(seq_len),
                                offset=int(calib.get("tokens", 0)))
            check_fits(config, run.model, store.info(run.model_name).context)  # before any work
            windows = int(ppl_windows)
            if not 0 <= windows <= 64:
                raise ValueError("perplexity windows must be in [0, 64]")

        def job(progress):
            stages = Stages(progress, {"healing": 1.0, "saving": 0.05})
            eval_windows = store.eval_windows(run.model_name, windows) if windows else None
            record = heal_and_measure(run.model, run.tokenizer, config, eval_windows, stages.stage("healing"))
            return record, keep_healed(run, record, stages.stage("saving"))

        try:
            with user_errors():
                for state in watch(job, session, self.ctx.slot):
                    if not state.done.is_set():
                        yield progress_html(state, "Heal"), "", gr.update()
        except Stopped:
            yield "", f"{STOP} {HEAL_STOPPED}", viz.loss_figure([])
            return
        rec, saved = state.result
        ppl = (f" · ppl {rec['ppl_before']:.2f} → **{rec['ppl_after']:.2f}** ({windows} windows)"
               if rec.get("ppl_after") is not None else "")
        status = (f"{OK} healed **{run.id}** on {rec['tokens']:,} tokens in {rec['seconds']:.0f} s · loss "
                  f"{rec['loss'][0]:.3f} → {rec['loss'][-1]:.3f}{ppl}" + (f" · {saved}" if saved else ""))
        yield progress_html(state, "Heal"), status, viz.loss_figure(rec["loss"], rec.get("tokens_seen"))

    def stopped(self, session):
        session.request_stop()
        return "", f"{STOP} {HEAL_STOPPED}"

    @staticmethod
    def build(c: SimpleNamespace, gpu: bool) -> None:
        """Lay out the heal accordion; its components go into ``c`` (``heal_*``)."""
        with gr.Accordion("Recovery training (heal) of the selected run", open=False):
            gr.Markdown("A short causal-LM fine-tune of the compressed model on calibration text (after the "
                        "tokens it was calibrated on), LoRA merged back, or every parameter with rank 0. It "
                        "changes the run's model in place.")
            with gr.Row():
                c.heal_tokens = gr.Number(1_000_000 if gpu else 16_384, precision=0, label="Tokens",
                                          elem_classes=HOVER, info="training budget; LayerChop uses far more")
                c.heal_rank = gr.Number(8, precision=0, label="LoRA rank", elem_classes=HOVER,
                                        info="0 trains every parameter")
                c.heal_len = gr.Number(256, precision=0, label="Sequence length")
                c.heal_windows = gr.Number(32 if gpu else 4, precision=0, label="Perplexity windows",
                                           elem_classes=HOVER, info="held-out windows measured before and after (0: skip)")
            with gr.Row():
                c.heal_btn = gr.Button("Heal")
                c.heal_stop = gr.Button("Stop healing", variant="stop")
            c.heal_progress = gr.HTML("")
            c.heal_md = gr.Markdown("")
            c.heal_plot = gr.Plot(label="loss")

    def wire(self, page, c: SimpleNamespace, state, run_dd):
        """Connect Heal and its Stop; returns the heal event (the summary and the runs view follow it)."""
        heal_evt = page.endpoint([c.heal_btn.click], self.heal, [state, run_dd, c.heal_tokens, c.heal_rank,
                                                                 c.heal_len, c.heal_windows],
                                 [c.heal_progress, c.heal_md, c.heal_plot], c.heal_md, clear=[c.heal_progress],
                                 api_name="heal", show_progress="hidden", hold=c.heal_btn, **JOB)
        c.heal_stop.click(self.stopped, state, [c.heal_progress, c.heal_md], cancels=[heal_evt], queue=False,
                          **HIDDEN)
        return heal_evt
