"""Per-session runs and loading them from files (the app's trust boundary; saving and zips: :mod:`ui.run_saving`).

The app may be a public Space, so every upload, folder name and report is hostile until checked:

- every folder the app writes is built from a run id the app generated (``r1``, ``r2``...) inside the
  session's own work folder, resolved and checked to lie inside it (:func:`inside`);
- uploads are accepted only from gradio's upload folder, capped in size, and a zip is extracted only
  if every member is a plain top-level file of an allowed kind (no folders, links or pickles);
- folders on the server are read only under the runs root (``runs/`` or ``COMPRESSION_RUNS_ROOT``),
  never searched, and not at all on a Space;
- a report is validated against the schema (:func:`compression.methods.validated_report`) before it
  touches the session, and errors never echo file contents;
- uploaded weights are checked before any model is built (:func:`ui.weights_check.check_weights`):
  every tensor the run's ``config.json`` implies must be in the safetensors files with its shape (never
  random weights), and the config may describe at most ``MAX_PARAMS_MULTIPLE`` × the parameters and
  layers of the dense model the app serves for the run; an uploaded run's own chat template is never
  rendered (the chat uses the dense model's);
- leftovers of killed jobs (session folders of ended processes, hidden save folders) are removed at
  start (:func:`clean_leftovers`); each session keeps one download, and one job runs per session.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compression.files import FileError, read_json
from compression.methods import validated_report
from compression.report import ReportError

from .weights_check import MEMBER, RunError, Served, check_weights, inside

RUN_ID = re.compile(r"r[0-9]{1,6}")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".md")
MAX_MEMBERS = 64
MAX_SIDE_FILE_BYTES = 64 << 20  # each member that is not weights (tokenizer.json of a large vocabulary: ~30 MB)
SESSION_PREFIX = "compression-session-"
INT_CALIBRATION = ("samples", "seq_len", "tokens", "distinct_tokens", "seed")  # whole numbers in a report
LAYER_KEY = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")  # names in a report's layer tables (plot legends, pickers)


def max_report_bytes() -> int:
    """Report size cap (``COMPRESSION_MAX_REPORT_MB``, default 8 MB: a 1B-parameter model's report is
    a few MB; a bigger one makes every Inspect redraw slow)."""
    return int(float(os.environ.get("COMPRESSION_MAX_REPORT_MB", "8")) * 2**20)


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
    note: str = ""  # what loading left out, and why (shown in the load status)
    saved: str = ""  # the folder under the runs root this session saved it to (ui.run_saving), or ""
    loaded_from: str = ""  # a folder name under the runs root, or "an upload"; "" when compressed here

    @property
    def origin(self) -> str:
        """Where the run came from: a loaded run is a copy of a saved one, not the run that made it."""
        return f"loaded from {self.loaded_from}" if self.loaded_from else "compressed in this session"

    @property
    def label(self) -> str:
        r = self.report
        loaded = f" · loaded from {self.loaded_from}" if self.loaded_from else ""
        return (f"{self.id} · {r.get('method')} −{100 * (r.get('ratio_achieved') or 0):.0f}% · "
                f"{Path(self.model_name).name or self.model_name}{loaded}")


class Session:
    """One browser session's runs, its stop flag and its private work folder (under ``base``)."""

    keep_models = 3  # compressed models kept in memory per session; older runs keep their report

    def __init__(self, base: Path | None = None):
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self._jobs: set[threading.Event] = set()  # one stop flag per running job
        self._counter = 0
        self._base = base
        self._workdir: Path | None = None
        self.served_files: list[Path] = []  # copies gradio made of this session's downloads

    def __deepcopy__(self, memo):  # gr.State deep-copies its value: a session holds live models
        return self

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            base = self._base or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            prefix = f"{SESSION_PREFIX}{os.getpid()}-"  # the pid tells clean_leftovers whose it is
            self._workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()
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

    job_wait = 10.0  # seconds a new job waits for the session's previous one to end (a cancelled one
    # ends within a second or two: its generator is closed, or its client is taken as gone)

    def start_job(self, wait: float | None = None) -> threading.Event:
        """A stop flag for a new job; Stop sets the flags of every job of the session. One job per
        session at a time: RunError when another job of the session still runs after ``wait``
        seconds (default :attr:`job_wait`; a job whose flag is set is stopping and does not count)."""
        deadline = time.monotonic() + (self.job_wait if wait is None else wait)
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy:
            raise RunError("this session is already running a job (compress, evaluate, heal, chat or "
                           "compare): wait for it to finish or press Stop")
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
        return any(not flag.is_set() for flag in list(self._jobs))

    def forget_served(self) -> None:
        """Delete gradio's copies of this session's earlier downloads (each holds a whole model)."""
        for copy in self.served_files:
            copy.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                copy.parent.rmdir()  # gradio's per-file hash folder, when empty
        self.served_files.clear()

    def close(self) -> None:
        """Free models and files (called when the session ends)."""
        self.request_stop()
        for run in self.runs.values():
            run.model = None
        self.runs.clear()
        self.forget_served()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


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
            if not m.filename.endswith(".safetensors") and m.file_size > MAX_SIDE_FILE_BYTES:
                raise RunError(f"a file of the zip other than weights is over the limit of "
                               f"{MAX_SIDE_FILE_BYTES >> 20} MB")
            total += m.file_size
        if total > max_upload_bytes():
            raise RunError(f"the zip unpacks to more than {max_upload_bytes() >> 20} MB")
        target.mkdir(parents=True)
        try:
            for m in members:
                if m.filename.endswith(ALLOWED_SUFFIXES):  # code and pickles are never unpacked
                    with zf.open(m) as src, open(inside(target, m.filename), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, zlib.error):
            raise RunError("the zip is damaged (a file in it cannot be unpacked)") from None


def read_report(file: Path) -> dict:
    """A validated report dict from ``file``; RunError naming only our own field names. Besides the
    schema: at most :func:`max_report_bytes`, nested at most :data:`compression.files.MAX_JSON_DEPTH`
    levels, whole numbers where the calibration counts, and its model card must render (a download
    writes it)."""
    from compression.card import model_card
    from compression.files import MAX_JSON_DEPTH

    limit = max_report_bytes()
    try:
        size = file.stat().st_size
    except OSError:
        raise RunError("report.json cannot be read") from None
    if size > limit:
        raise RunError(f"report.json is {size / 2**20:,.1f} MB; the limit is {limit / 2**20:,.0f} MB")
    try:
        data = read_json(file, limit, MAX_JSON_DEPTH)
    except FileError as err:
        if "nested" in str(err):
            raise RunError(f"report.json is nested more than {MAX_JSON_DEPTH} levels deep; "
                           "a report needs about six") from None
        raise RunError("report.json is not valid JSON (or is over the size limit)") from None
    try:
        report = validated_report(data).to_dict()
    except ReportError as err:
        raise RunError(f"not a compression report: {err}") from None
    except (TypeError, ValueError, RecursionError):
        raise RunError("not a compression report") from None
    for i, layer in enumerate(report.get("layers") or []):
        for table in ("sizes", "spectra", "kept", "leverage", "errors"):
            if not all(LAYER_KEY.fullmatch(k) for k in layer.get(table) or {}):
                raise RunError(f"not a compression report: report.layers[{i}].{table} has a name that is "
                               "not letters, digits and _ . : + -")
    calibration = report.get("calibration") or {}
    for key in INT_CALIBRATION:
        value = calibration.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise RunError(f"not a compression report: report.calibration.{key} must be a non-negative integer")
    try:
        model_card(report)
    except Exception:  # noqa: BLE001  any value the card cannot show would break /download later
        raise RunError("not a compression report: a field has a value of the wrong kind "
                       "(its model card cannot be written)") from None
    return report


def load_run(session: Session, upload: str | Path | None = None, folder: str | None = None,
             load_weights: bool = True, device: str | None = None,
             served: Callable[[str], Served] | None = None) -> Run:
    """A saved run from an uploaded zip or report.json, or a folder name under :func:`runs_root`.

    served: the dense model the app serves for a report's ``model`` (:class:`Served`; ModelError or
    ValueError when it has none): the weights are checked against it (:func:`check_weights`), and a
    run whose dense model is not available here loads as its report only (``run.note`` says why).
    Nothing is added to the session unless everything checks out. An upload is deleted from
    gradio's folder once it has loaded."""
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
        notes = []
        if load_weights and where is not None and (where / "config.json").is_file():
            reference = None
            if served is not None:
                try:
                    reference = served(report.get("model") or "")
                except (ValueError, OSError):  # ModelError, an unsupported architecture, an absent model
                    notes.append("its weights are not loaded: the model it compresses is not available here")
            if served is None or reference is not None:
                check_weights(where, reference)
                try:  # safetensors only, never remote code: an upload cannot run anything
                    model, tokenizer = load_model(str(where), device or default_device(), safetensors_only=True)
                except ModelError:
                    raise RunError("the saved model in that run cannot be loaded") from None
                if getattr(tokenizer, "chat_template", None):
                    notes.append("chat uses the dense model's chat template, not the run's own")
    finally:
        if staging is not None and where is staging:
            shutil.rmtree(staging, ignore_errors=True)
    run = Run(session.new_id(), report.get("model") or "uploaded run", report, model, tokenizer,
              note="; ".join(notes), loaded_from="an upload" if upload else name)
    if upload:
        discard_upload(file)
    return session.add(run)


def discard_upload(file: Path) -> None:
    """Delete a loaded upload (and its folder, when empty) from gradio's upload folder."""
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder()).resolve()
    with contextlib.suppress(OSError):
        file.unlink(missing_ok=True)
        if file.parent != root and root in file.parent.parents:
            file.parent.rmdir()


def gradio_copy(path: Path) -> Path | None:
    """Where gradio will keep its copy of a file a handler returns (its cache folder, by content
    hash), so the session can delete it later; None when this gradio names copies otherwise."""
    try:
        from gradio.processing_utils import hash_file
        from gradio.utils import get_upload_folder
        from gradio_client.utils import strip_invalid_filename_characters

        return Path(get_upload_folder()).resolve() / hash_file(path) / strip_invalid_filename_characters(path.name)
    except (ImportError, OSError, AttributeError):
        return None


# --- leftovers of killed jobs ----------------------------------------------------------------------

def clean_leftovers(base: Path | None = None, root: Path | None = None) -> list[Path]:
    """Remove what killed jobs left (call once at app start); returns what was removed.

    - session folders (``compression-session-PID-*`` under ``base``, default the temp folder: unpacked
      uploads, download stages, zips) whose process has ended, and pid-less ones of older versions
      over an hour old;
    - hidden temporary save folders and files (:func:`compression.files.remove_stale`) at the top of
      ``root`` (default :func:`runs_root`), where the CLI and the app save runs."""
    from compression.files import STALE_AFTER, pid_alive, remove_stale

    base = Path(base or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = [p for p in base.iterdir() if p.name.startswith(SESSION_PREFIX)]
    except OSError:
        entries = []
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(SESSION_PREFIX):].split("-", 1)[0]
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            continue
        gone = not pid_alive(int(pid), since=mtime) if pid.isdigit() and "-" in entry.name[len(SESSION_PREFIX):] \
            else time.time() - mtime > STALE_AFTER
        if gone:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    root = root if root is not None else runs_root()
    if root is not None:
        removed += remove_stale(Path(root))
    return removed
