"""The Runs tab: this session's runs in a table (also as CSV and JSON files) and two plots, the runs saved
under the runs root (loadable after a page reload), loading uploaded runs, and a run's zip to download."""
from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

import viz
from compression.files import write_text_atomic

from .common import OK, WARN, Context, md_code, md_text, user_errors
from .run_saving import DTYPES, MAX_LISTED, saved_runs, zip_run
from .runs import Session, gradio_copy, load_run, runs_root
from .page import HIDDEN, JOB
from .store import LRU
from .weights_check import inside

RUN_COLUMNS = ["run", "model", "method", "target", "achieved", "params (M)", "ppl dense", "ppl",
               "ppl windows", "zero-shot avg (tasks, limit)", "compress s", "model in memory", "origin",
               "saved as"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula
ZIP_BUTTON = "run-zip-download"  # elem_id of the zip's download button, clicked once the zip is ready
CLICK_ZIP = (f"(status) => {{ if (!String(status || '').startsWith('{WARN}')) "
             f"document.getElementById('{ZIP_BUTTON}')?.click(); return []; }}")


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
                     "yes" if run.model is not None else "report only", run.origin, run.saved])
    return rows


def csv_cell(value):
    """A cell as a CSV file holds it: text a spreadsheet would take for a formula gets a leading quote
    (report text such as a model name is untrusted); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return "" if value is None else value


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_tables(session: Session) -> tuple[Path, Path]:
    """``runs.csv`` and ``runs.json`` of the Runs table in the session's own work folder (fixed names)."""
    folder = inside(session.workdir, "tables")
    folder.mkdir(parents=True, exist_ok=True)
    rows = runs_table(session)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(RUN_COLUMNS)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    records = [{k: _json_value(v) for k, v in zip(RUN_COLUMNS, row)} for row in rows]
    csv_file, json_file = folder / "runs.csv", folder / "runs.json"
    write_text_atomic(csv_file, text.getvalue())  # two redraws at once never serve half a file
    write_text_atomic(json_file, json.dumps(records, indent=1, allow_nan=False))
    return csv_file, json_file


def where_runs_live(root: Path | None) -> str:
    """What happens to the session's runs: saved under the runs root, or (a Space) gone with the page."""
    if root is None:
        return (f"{WARN} **Runs live only in this browser session: reloading or closing the page loses them.** "
                "Nothing is kept on this server. To keep a run, download its zip (one click, below) and "
                "upload it here later.")
    return (f"Every run is saved under {md_code(root)} as it finishes (and again after healing); after a page "
            f"reload, load it from **Saved runs** below (the newest {MAX_LISTED}).")


def pareto_runs(session: Session) -> list[dict]:
    """Points for viz.pareto_figure / accuracy_figure: every run plus each model's dense point."""
    points, dense = [], {}
    for run in session.runs.values():
        r = run.report
        ev = r.get("evaluation") or {}
        zs, ppl = ev.get("zero_shot") or {}, ev.get("ppl") or {}
        points.append({"method": r.get("method"), "params": r.get("params_compressed"),
                       "ppl": r.get("ppl_compressed"), "ppl_ci": ppl.get("compressed_ci"),
                       "ratio": r.get("ratio_achieved"), "label": run.id, "zero_shot_avg": zs.get("compressed"),
                       "zero_shot_avg_stderr": zs.get("compressed_stderr")})  # drawn as 95% error bars
        if r.get("ppl_dense") is not None:
            dense[run.model_name] = {"method": "dense", "params": r.get("params_dense"),
                                     "ppl": r["ppl_dense"], "ppl_ci": ppl.get("dense_ci"),
                                     # plot text renders tags: escaped
                                     "label": html.escape(f"dense {Path(run.model_name).name}"[:100]),
                                     "zero_shot_avg": zs.get("dense")}
    return list(dense.values()) + points


class RunsTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.labels = LRU(4 * MAX_LISTED)  # saved runs' picker labels by (folder, mtime, size)

    def view(self, session):
        points = pareto_runs(session)
        return runs_table(session), viz.pareto_figure(points), viz.accuracy_figure(points)

    @staticmethod
    def tables(session):
        """(CSV file, JSON file) of the Runs table for the two download buttons; None without runs."""
        return write_tables(session) if session.runs else (None, None)

    def saved_choices(self, current=None):
        """The saved-runs picker: the runs under the runs root, newest first (none on a Space); the
        ``current`` pick stays while it is listed, else the newest is picked."""
        choices = saved_runs(runs_root(), self.labels)
        names = [name for _, name in choices]
        return gr.update(choices=choices, value=current if current in names else (names or [None])[0])

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
        return (f"{OK} Loaded **{run.id}** ({what}, {md_text(run.origin)}).{note}",
                CompressTab.runs_dropdown(session, run.id), session)

    def load_listed(self, session, name, request: gr.Request = None):
        """Load the run picked among the saved runs (a folder name under the runs root)."""
        return self.load_saved(session, None, name or "", request)

    def download(self, session, run_id, dtype=""):
        """The run's zip, its weights in ``dtype`` (fp32, bf16, fp16; empty: the model's own). Gradio's
        copies of this session's earlier downloads are deleted first (each holds a whole model), and
        this one's is deleted with the next or at session end."""
        with user_errors():
            run = session.get(run_id)
            session.forget_served()
            path = zip_run(session, run, dtype or None)
        copy = gradio_copy(path)
        if copy is not None:
            session.served_files.append(copy)
        return str(path)

    # --- layout and wiring ---------------------------------------------------------------------
    def build(self) -> SimpleNamespace:
        """Lay out the tab (inside ``gr.Tab``); returns its components by name."""
        root, c = runs_root(), SimpleNamespace()
        c.where = gr.Markdown(where_runs_live(root))
        c.table = gr.Dataframe(headers=RUN_COLUMNS, label="This session's runs", interactive=False)
        with gr.Row():
            c.csv = gr.DownloadButton("Runs table as CSV", size="sm")
            c.json = gr.DownloadButton("Runs table as JSON", size="sm")
        with gr.Row():
            c.pareto, c.accuracy = gr.Plot(label="pareto"), gr.Plot(label="accuracy")
        with gr.Row():
            with gr.Column():
                with gr.Row(visible=root is not None, equal_height=True):
                    c.saved = gr.Dropdown([], label=f"Saved runs under {root.name if root else ''}/ (newest first)",
                                          scale=3)
                    c.saved_btn = gr.Button("Load saved run", scale=1)
                c.upload = gr.File(label="Load a saved run (.zip or report.json)", file_types=[".zip", ".json"])
                c.folder = gr.Textbox(label=f"…or a saved run's folder name under {root}" if root else
                                      "Loading folders from the server is off on a Space", interactive=root is not None)
                c.load_btn = gr.Button("Load run")
                c.load_md = gr.Markdown("")
            with gr.Column():
                own = {v: k for k, v in DTYPES.items()}.get(str(self.ctx.store.dtype).split(".")[-1], "fp32")
                c.dl_dtype = gr.Radio(list(DTYPES), value=own, label="Weights in the zip",
                                      info="bf16 and fp16 halve the download; config and report say which")
                c.dl_btn = gr.Button("Download the selected run (zip: safetensors + config + report)")
                c.dl_file = gr.DownloadButton("Download the last zip again", size="sm", elem_id=ZIP_BUTTON)
                c.dl_status = gr.Markdown("")
        return c

    def wire(self, page, c: SimpleNamespace, tab, state, run_dd, after: list) -> None:
        """``after``: events of other tabs that change the runs (the table, files and plots follow them)."""
        outputs = [c.table, c.pareto, c.accuracy]
        loaded = [c.load_md, run_dd, state]
        load_evt = page.endpoint([c.load_btn.click], self.load_saved, [state, c.upload, c.folder], loaded,
                                 c.load_md, api_name="load_run", **JOB)
        listed_evt = page.endpoint([c.saved_btn.click], self.load_listed, [state, c.saved], loaded, c.load_md, **JOB)
        for event in [*after, load_evt, listed_evt]:
            event.then(self.view, state, outputs, **HIDDEN).then(self.tables, state, [c.csv, c.json], **HIDDEN)
        for event in after:  # a finished compression or heal is saved: list it
            event.then(self.saved_choices, c.saved, c.saved, **HIDDEN)
        tab.select(self.view, state, outputs, **HIDDEN)  # drawn while hidden, the legend came back clipped
        tab.select(self.tables, state, [c.csv, c.json], **HIDDEN)
        tab.select(self.saved_choices, c.saved, c.saved, **HIDDEN)
        zipped = page.endpoint([c.dl_btn.click], self.download, [state, run_dd, c.dl_dtype], [c.dl_file],
                               c.dl_status, api_name="download", **JOB)
        zipped.then(None, c.dl_status, None, js=CLICK_ZIP, **HIDDEN)  # one click: the zip downloads when ready
