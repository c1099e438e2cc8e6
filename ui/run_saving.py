"""Runs on disk: every finished run saved under the runs root, the saved runs listed for loading, and a
run's zip for download in the precision asked for.

Locally (:func:`ui.runs.runs_root` is not None) a compression is saved as it is added to the session
(:func:`keep_compressed`) and again when healing changes it (:func:`keep_healed`), by
:func:`compression.pipeline.save`: the folder ``compress --out`` writes, which the CLI, the Runs tab's
loading and ``from_pretrained`` all read. The folder's name is the run's id and the time of its first
save (``r3-20261206-153012``), never text from the user. A save that fails keeps the run in the
session and says why in the status. On a Space nothing is written there: runs live in the session.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import zipfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Callable

from compression.files import read_json, write_json_atomic
from compression.methods import validated_report
from compression.pipeline import Progress

from .common import WARN, md_code, md_text
from .runs import RUN_ID, Run, RunError, Session, Stopped, read_report, runs_root
from .weights_check import inside

MAX_LISTED = 50  # saved runs offered for loading (newest first)
SAVED_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # top-level names the folder box also accepts
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # zip precision -> torch / config name


# --- saving finished runs ------------------------------------------------------------------------

def new_folder_name(root: Path, run_id: str) -> str:
    """``<run id>-<yyyymmdd>-<hhmmss>`` (with ``-2``, ``-3``... when taken): app-made parts only."""
    if not RUN_ID.fullmatch(run_id):
        raise RunError("refused: not a run id of this app")
    stem = f"{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stem, 1
    while (root / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def save_to_root(run: Run, root: Path) -> str:
    """Save ``run`` under ``root`` in the CLI's layout: into the folder this session saved it to before
    (replaced whole: a healed run), else a new one. Returns the status note; a failed save raises
    nothing (the run stays in the session), the note says why."""
    from compression import pipeline

    try:
        name = run.saved or new_folder_name(root, run.id)
        pipeline.save(inside(root, name), run.model, run.tokenizer, run.report, replace=bool(run.saved))
    except Exception as err:  # noqa: BLE001  disk full, permissions, ...: the run must not be lost
        return (f"{WARN} not saved under {md_text(root.name)}/ ({type(err).__name__}: {md_text(err, 160)}); "
                "the run stays in this session only: download its zip from the Runs tab to keep it")
    run.saved = name
    return f"saved as {md_code(f'{root.name}/{name}')}"


def _announce(progress: Progress, message: str) -> None:
    """Tell the job's progress that saving begins. The work is done by now, so a Stop pressed this late
    (or a client gone) keeps and saves the run rather than discarding it."""
    with contextlib.suppress(Stopped):
        progress(0.0, message)


def keep_compressed(session: Session, run: Run, progress: Progress) -> str:
    """A finished compression: added to the session, then (locally) saved under the runs root; returns
    the status note ("" on a Space). Called in the job, so the page shows the saving stage."""
    root = runs_root()
    _announce(progress, f"saving to {root.name}/" if root is not None else "done")
    session.add(run)  # first: a save that fails never costs the run
    return save_to_root(run, root) if root is not None else ""


def apply_heal(run: Run, record: dict) -> None:
    """Write a heal record into the run's report: its perplexity is the healed model's now, and the
    evaluation numbers of the model before healing no longer apply."""
    run.report["heal"] = record
    if record.get("ppl_after") is not None:
        run.report["ppl_compressed"] = record["ppl_after"]
    run.metrics = {}


def keep_healed(run: Run, record: dict, progress: Progress) -> str:
    """A finished heal: recorded in the run's report, then (locally) the run saved again, into its
    folder when this session saved it (a loaded run gets a new one: its original stays as it was)."""
    root = runs_root()
    _announce(progress, f"saving to {root.name}/" if root is not None else "done")
    apply_heal(run, record)
    return save_to_root(run, root) if root is not None else ""


# --- listing saved runs --------------------------------------------------------------------------

def saved_label(name: str, report: dict) -> str:
    """The picker's text for a saved run: its folder, method, ratio and model (cut short)."""
    model = str(report.get("model") or "")
    return (f"{name} · {report.get('method')} −{100 * (report.get('ratio_achieved') or 0):.0f}% · "
            f"{(Path(model).name or model)[:60]}")


def _newest_reports(root: Path) -> list[tuple[int, str, int]]:
    """(mtime, folder name, size) of every top-level folder of ``root`` with a report.json, newest first
    (no file is read: a stat each)."""
    found = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        report = entry / "report.json"
        if not SAVED_FOLDER.fullmatch(entry.name) or entry.is_symlink() or report.is_symlink():
            continue
        try:
            stat = report.stat()
        except OSError:
            continue
        found.append((stat.st_mtime_ns, entry.name, stat.st_size))
    return sorted(found, reverse=True)


def saved_runs(root: Path | None, labels: MutableMapping | None = None) -> list[tuple[str, str]]:
    """(label, folder name) of the newest :data:`MAX_LISTED` runs saved under ``root``, newest first.
    Only each report.json is read, by :func:`ui.runs.read_report` (size-capped, validated); a folder
    whose report does not check out is left out (at most twice as many are read). ``labels`` caches
    the result per (name, mtime, size), so a redraw reads only what changed."""
    if root is None:
        return []
    listed = []
    for mtime, name, size in _newest_reports(root)[:2 * MAX_LISTED]:
        if len(listed) == MAX_LISTED:
            break
        key = (name, mtime, size)
        label = labels.get(key) if labels is not None else None
        if label is None:
            try:
                label = saved_label(name, read_report(root / name / "report.json"))
            except RunError:
                label = ""  # remembered as unreadable until the file changes
            if labels is not None:
                labels[key] = label
        if label:
            listed.append((label, name))
    return listed


# --- the download zip ----------------------------------------------------------------------------

def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    if file.is_file():
        data = read_json(file)  # written by this app a moment ago
        edit(data)
        write_json_atomic(file, data)


def cast_saved(folder: Path, dtype: str) -> None:
    """Cast the floating-point weights of the saved run in ``folder`` to ``dtype`` (a key of
    :data:`DTYPES`), one safetensors file at a time (each written beside the old one, then renamed over
    it); config.json's ``dtype`` and report.json's ``export.dtype`` say so."""
    import torch
    from safetensors.torch import load_file, save_file

    name = DTYPES[dtype]
    target, total = getattr(torch, name), 0
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        if any(v.is_floating_point() and v.dtype != target for v in tensors.values()):
            tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
            tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, file)  # the old file's pages stay readable until its tensors are freed
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors

    def config(data: dict) -> None:
        data["dtype"] = name
        if "torch_dtype" in data:  # older transformers read this key
            data["torch_dtype"] = name

    def index(data: dict) -> None:
        if isinstance(data.get("metadata"), dict):
            data["metadata"]["total_size"] = total

    _edit_json(folder / "config.json", config)
    _edit_json(folder / "model.safetensors.index.json", index)
    _edit_json(folder / "report.json", lambda data: data.setdefault("export", {}).update(dtype=name))


def zip_run(session: Session, run: Run, dtype: str | None = None) -> Path:
    """``<workdir>/downloads/<id>-<method>[-<dtype>].zip`` with the model and report.json at its top level;
    ``dtype`` (fp32, bf16 or fp16) casts the weights, None keeps the model's own.

    Safetensors do not compress, so members are stored, not deflated (seconds instead of a minute
    for a few hundred MB). The name comes from the app's run id, a validated method name and a key of
    :data:`DTYPES`."""
    from compression import pipeline

    if run.model is None:
        raise RunError(f"run {run.id}'s model is no longer in memory (only its report is); "
                       "compress or load it again to download it")
    if dtype is not None and dtype not in DTYPES:
        raise RunError(f"choose the weights' precision among {', '.join(DTYPES)}")
    validated_report(run.report)  # the method name below is one of the registry's
    stage = inside(session.workdir, "downloads", run.id)
    suffix = f"-{dtype}" if dtype else ""
    archive = inside(session.workdir, "downloads", f"{run.id}-{run.report['method']}{suffix}.zip")
    downloads = inside(session.workdir, "downloads")
    if downloads.is_dir():  # one download per session: the page shows only the latest
        for old in downloads.iterdir():
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    pipeline.save(stage, run.model, run.tokenizer, run.report)
    if dtype is not None:
        cast_saved(stage, dtype)
    tmp = archive.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(stage.iterdir()):
            if file.is_file():
                zf.write(file, arcname=file.name)
    tmp.replace(archive)
    shutil.rmtree(stage, ignore_errors=True)
    return archive
