"""Per-session runs and everything that touches files: save, zip, load (the app's trust boundary).

The app may be a public Space, so every upload, folder name and report is hostile until checked:

- every folder the app writes is built from a run id the app generated (``r1``, ``r2``...) inside the
  session's own work folder, resolved and checked to lie inside it (:func:`inside`);
- uploads are accepted only from gradio's upload folder, capped in size, and a zip is extracted only
  if every member is a plain top-level file of an allowed kind (no folders, links or pickles);
- folders on the server are read only under the runs root (``runs/`` or ``COMPRESSION_RUNS_ROOT``),
  never searched, and not at all on a Space;
- a report is validated against the schema (:meth:`compression.report.Report.from_dict`) before it
  touches the session, and errors never echo file contents.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression.files import FileError, read_json
from compression.report import Report, ReportError

RUN_ID = re.compile(r"r[0-9]{1,6}")
MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".md")
MAX_REPORT_BYTES = 64 << 20
MAX_MEMBERS = 64


def max_upload_bytes() -> int:
    """Upload cap (``COMPRESSION_MAX_UPLOAD_MB``, default 4096 MB: a 1B-parameter fp32 model fits)."""
    return int(float(os.environ.get("COMPRESSION_MAX_UPLOAD_MB", "4096")) * 2**20)


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def runs_root() -> Path | None:
    """Where saved runs may be loaded from by name; None (off) on a Space unless set explicitly."""
    configured = os.environ.get("COMPRESSION_RUNS_ROOT")
    if configured:
        return Path(configured).resolve()
    return None if on_space() else Path("runs").resolve()


class RunError(ValueError):
    """Bad input about runs (unknown id, unsafe upload, malformed report); the session is unchanged."""


def inside(root: Path, *parts: str) -> Path:
    """``root/parts`` resolved, refusing anything that would land outside ``root``."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise RunError("refused: that path leaves the app's work folder")
    return path


class Stopped(Exception):
    """Raised inside a long job when its user pressed Stop or went away."""


@dataclass
class Run:
    id: str
    model_name: str
    report: dict
    model: Any = None            # the compressed model (None once evicted, or for a report-only load)
    tokenizer: Any = None
    metrics: dict = field(default_factory=dict)  # settings-keyed evaluation results, see ui.evaluate

    @property
    def label(self) -> str:
        r = self.report
        return (f"{self.id} · {r.get('method')} −{100 * (r.get('ratio_achieved') or 0):.0f}% · "
                f"{Path(self.model_name).name or self.model_name}")


class Session:
    """One browser session's runs, its stop flag and its private work folder (under ``base``)."""

    keep_models = 3  # compressed models kept in memory per session; older runs keep their report

    def __init__(self, base: Path | None = None):
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self._jobs: set[threading.Event] = set()  # one stop flag per running job
        self._counter = 0
        self._base = base
        self._workdir: Path | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its value: a session holds live models
        return self

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            base = self._base or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self._workdir = Path(tempfile.mkdtemp(prefix="compression-session-", dir=base)).resolve()
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
            raise RunError("no run yet: compress a model (Compress tab) or load a saved run (Runs tab)")
        run_id = (run_id or "").split(" ")[0]  # accept the id or the full label
        if not run_id:
            return next(reversed(self.runs.values()))
        if not RUN_ID.fullmatch(run_id) or run_id not in self.runs:
            raise RunError(f"unknown run; this session has {', '.join(self.runs)}")
        return self.runs[run_id]

    def start_job(self) -> threading.Event:
        """A stop flag for a new job; Stop sets the flags of every job of the session."""
        flag = threading.Event()
        self._jobs.add(flag)
        return flag

    def end_job(self, flag: threading.Event) -> None:
        self._jobs.discard(flag)

    def request_stop(self) -> None:
        for flag in list(self._jobs):
            flag.set()

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def close(self) -> None:
        """Free models and files (called when the session ends)."""
        self.request_stop()
        for run in self.runs.values():
            run.model = None
        self.runs.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# --- saving --------------------------------------------------------------------------------------

def zip_run(session: Session, run: Run) -> Path:
    """``<workdir>/downloads/<id>-<method>.zip`` with the model and report.json at its top level.

    Safetensors do not compress, so members are stored, not deflated (seconds instead of a minute
    for a few hundred MB). The name comes from the app's run id and a validated method name."""
    from compression import pipeline

    if run.model is None:
        raise RunError(f"run {run.id}'s model is no longer in memory (only its report is); "
                       "compress or load it again to download it")
    Report.from_dict(run.report)  # the method name below is one of the registry's
    stage = inside(session.workdir, "downloads", run.id)
    archive = inside(session.workdir, "downloads", f"{run.id}-{run.report['method']}.zip")
    shutil.rmtree(stage, ignore_errors=True)
    pipeline.save(stage, run.model, run.tokenizer, run.report)
    tmp = archive.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(stage.iterdir()):
            if file.is_file():
                zf.write(file, arcname=file.name)
    tmp.replace(archive)
    shutil.rmtree(stage, ignore_errors=True)
    return archive


# --- loading -------------------------------------------------------------------------------------

def _checked_upload(path: str | Path) -> Path:
    """An uploaded file: inside gradio's upload folder, a regular file, under the size cap."""
    from gradio.utils import get_upload_folder

    upload_root = Path(get_upload_folder()).resolve()
    try:
        file = inside(upload_root, str(path))
    except RunError:
        raise RunError("refused: that file was not uploaded through this app") from None
    if not file.is_file() or file.is_symlink():
        raise RunError("refused: that upload is not a file")
    if file.stat().st_size > max_upload_bytes():
        raise RunError(f"the upload is over the limit of {max_upload_bytes() >> 20} MB")
    return file


def read_text_upload(path: str | Path, max_bytes: int) -> str:
    """The text of an uploaded ``.txt`` file: read from gradio's upload folder only, at most
    ``max_bytes``, strict UTF-8 (a byte-order mark is dropped); RunError otherwise. Nothing is
    written: the caller keeps the text in memory."""
    file = _checked_upload(path)
    if file.suffix.lower() != ".txt":
        raise RunError("upload the calibration text as a .txt file")
    if file.stat().st_size > max_bytes:
        raise RunError(f"the calibration text file is over the limit of {max_bytes >> 20} MB")
    data = file.read_bytes()[:max_bytes + 1]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RunError("the calibration file is not UTF-8 text; save it as UTF-8 plain text") from None
    if "\x00" in text:
        raise RunError("the calibration file holds binary data, not plain text")
    return text


def _extract(archive: Path, target: Path) -> None:
    """Extract a run zip: plain top-level members of allowed kinds only, sizes capped."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError):
        raise RunError("the upload is not a readable zip file") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            raise RunError(f"the zip has more than {MAX_MEMBERS} files; a saved run has about ten")
        total = 0
        for m in members:
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if m.is_dir() or is_link or not MEMBER.fullmatch(m.filename):
                raise RunError("refused: a saved run's zip holds only plain files at its top level")
            total += m.file_size
        if total > max_upload_bytes():
            raise RunError(f"the zip unpacks to more than {max_upload_bytes() >> 20} MB")
        target.mkdir(parents=True)
        for m in members:
            if m.filename.endswith(ALLOWED_SUFFIXES):  # code and pickles are never unpacked
                with zf.open(m) as src, open(inside(target, m.filename), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def read_report(file: Path) -> dict:
    """A validated report dict from ``file``; RunError naming only our own field names."""
    try:
        return Report.from_dict(read_json(file, MAX_REPORT_BYTES)).to_dict()
    except FileError:
        raise RunError("report.json is not valid JSON (or is over the size limit)") from None
    except (ReportError, TypeError) as err:
        raise RunError(f"not a compression report: {err}" if isinstance(err, ReportError)
                       else "not a compression report") from None


def load_run(session: Session, upload: str | Path | None = None, folder: str | None = None,
             load_weights: bool = True, device: str | None = None) -> Run:
    """A saved run from an uploaded zip or report.json, or a folder name under :func:`runs_root`.

    Nothing is added to the session unless everything checks out."""
    from compression.models import ModelError, default_device, load_model

    staging = None
    if upload:
        file = _checked_upload(upload)
        if file.suffix == ".zip":
            staging = inside(session.workdir, "uploads", f"u{session._counter + 1}-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _extract(file, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            where = staging
        elif file.suffix == ".json":
            where = None
            report = read_report(file)
        else:
            raise RunError("upload a saved run's .zip or its report.json")
    elif folder:
        root = runs_root()
        if root is None:
            raise RunError("loading folders from the server is switched off here (a Space); "
                           "upload the run's zip instead")
        name = folder.strip().strip("/")
        if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", name) or ".." in name.split("/"):
            raise RunError("give the run's folder name under the runs folder (letters, digits, . _ -)")
        where = inside(root, name)
        if not (where / "report.json").is_file():
            raise RunError(f"no saved run of that name under {root.name}/ (a folder with report.json)")
    else:
        raise RunError("upload a run (.zip or report.json) or enter a saved run's folder name")
    try:
        if where is not None:
            if not (where / "report.json").is_file():
                raise RunError("the zip has no report.json at its top level")
            report = read_report(where / "report.json")
        model = tokenizer = None
        if load_weights and where is not None and (where / "config.json").is_file():
            try:  # safetensors only, never remote code: an upload cannot run anything
                model, tokenizer = load_model(str(where), device or default_device(), safetensors_only=True)
            except ModelError:
                raise RunError("the saved model in that run cannot be loaded") from None
    finally:
        if staging is not None and where is staging:
            shutil.rmtree(staging, ignore_errors=True)
    run = Run(session.new_id(), report.get("model") or "uploaded run", report, model, tokenizer)
    return session.add(run)
