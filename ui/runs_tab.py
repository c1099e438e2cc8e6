"""The Runs tab: this session's runs in a table and two plots, loading saved runs, downloading a zip."""
from __future__ import annotations

from types import SimpleNamespace

import html
from pathlib import Path

import gradio as gr

import viz

from .common import OK, Context, user_errors
from .runs import Session, gradio_copy, load_run, runs_root, zip_run
from .page import HIDDEN, JOB

RUN_COLUMNS = ["run", "model", "method", "target", "achieved", "params (M)", "ppl dense", "ppl",
               "ppl windows", "zero-shot avg (tasks, limit)", "compress s", "model in memory"]


def _round(x, digits: int = 3):
    return None if x is None else round(float(x), digits)


def runs_table(session: Session) -> list[list]:
    rows = []
    for run in session.runs.values():
        r = run.report
        ev = r.get("evaluation") or {}
        ppl, zs = ev.get("ppl") or {}, ev.get("zero_shot") or {}
        zs_text = (f"{zs['compressed']:.3f} ({len(zs.get('tasks', []))}, {zs.get('limit') or 'all'})"
                   if zs.get("compressed") is not None else "")
        rows.append([run.id, run.model_name, r.get("method"),
                     None if r.get("ratio_target") is None else round(r["ratio_target"], 3),
                     round(r.get("ratio_achieved") or 0, 3), round((r.get("params_compressed") or 0) / 1e6, 2),
                     _round(ppl.get("dense", r.get("ppl_dense"))), _round(ppl.get("compressed", r.get("ppl_compressed"))),
                     ppl.get("windows"), zs_text, round(r.get("compress_seconds") or 0, 1),
                     "yes" if run.model is not None else "report only"])
    return rows


def pareto_runs(session: Session) -> list[dict]:
    """Points for viz.pareto_figure / accuracy_figure: every run plus each model's dense point."""
    points, dense = [], {}
    for run in session.runs.values():
        r = run.report
        zs = (r.get("evaluation") or {}).get("zero_shot") or {}
        points.append({"method": r.get("method"), "params": r.get("params_compressed"),
                       "ppl": r.get("ppl_compressed"), "ratio": r.get("ratio_achieved"),
                       "label": run.id, "zero_shot_avg": zs.get("compressed")})
        if r.get("ppl_dense") is not None:
            dense[run.model_name] = {"method": "dense", "params": r.get("params_dense"),
                                     "ppl": r["ppl_dense"],  # plot text renders tags: escaped
                                     "label": html.escape(f"dense {Path(run.model_name).name}"[:100]),
                                     "zero_shot_avg": zs.get("dense")}
    return list(dense.values()) + points


class RunsTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def view(self, session):
        points = pareto_runs(session)
        return runs_table(session), viz.pareto_figure(points), viz.accuracy_figure(points)

    def load_saved(self, session, upload=None, folder="", request: gr.Request = None):
        """Load a saved run (uploaded zip / report.json, or a folder name under the runs root)."""
        from .compress_tab import CompressTab

        self.ctx.register(request, session)
        if isinstance(upload, dict):  # the API may send gradio's FileData dict
            upload = upload.get("path")
        with user_errors():
            with self.ctx.slot:
                run = load_run(session, upload or None, (folder or "").strip() or None,
                               device=self.ctx.store.device, served=self.ctx.store.served)
        what = "model and report" if run.model is not None else "report only (no model weights)"
        note = f" Note: {run.note}." if run.note else ""
        return (f"{OK} Loaded **{run.id}** ({what}).{note}", CompressTab.runs_dropdown(session, run.id),
                session)

    def download(self, session, run_id):
        """The run's zip; gradio's copies of this session's earlier downloads are deleted first
        (each holds a whole model), and this one's is deleted with the next or at session end."""
        with user_errors():
            run = session.get(run_id)
            session.forget_served()
            path = zip_run(session, run)
        copy = gradio_copy(path)
        if copy is not None:
            session.served_files.append(copy)
        return str(path)

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        root, c = runs_root(), SimpleNamespace()
        c.table = gr.Dataframe(headers=RUN_COLUMNS, label="This session's runs", interactive=False)
        with gr.Row():
            c.pareto, c.accuracy = gr.Plot(label="pareto"), gr.Plot(label="accuracy")
        with gr.Row():
            with gr.Column():
                c.upload = gr.File(label="Load a saved run (.zip or report.json)", file_types=[".zip", ".json"])
                c.folder = gr.Textbox(label=f"…or a saved run's folder name under {root}" if root else
                                      "Loading folders from the server is off on a Space", interactive=root is not None)
                c.load_btn = gr.Button("Load run")
                c.load_md = gr.Markdown("")
            with gr.Column():
                c.dl_btn = gr.Button("Zip the selected run (safetensors + config + report)")
                c.dl_file = gr.File(label="download", interactive=False)
                c.dl_status = gr.Markdown("")
        return c

    def wire(self, page, c: SimpleNamespace, tab, state, run_dd, after: list) -> None:
        """``after``: events of other tabs that change the runs (the table and plots follow them)."""
        outputs = [c.table, c.pareto, c.accuracy]
        load_evt = page.endpoint([c.load_btn.click], self.load_saved, [state, c.upload, c.folder],
                                 [c.load_md, run_dd, state], c.load_md, api_name="load_run", **JOB)
        for event in [*after, load_evt]:
            event.then(self.view, state, outputs, **HIDDEN)
        tab.select(self.view, state, outputs, **HIDDEN)  # drawn while hidden, the legend came back clipped
        page.endpoint([c.dl_btn.click], self.download, [state, run_dd], [c.dl_file], c.dl_status,
                      api_name="download", **JOB)
