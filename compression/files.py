"""Small file helpers: atomic writes (a crash never leaves half a file), reads whose errors name the
file, and the removal of temporary files a killed process left behind (:func:`remove_stale`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 32  # nesting levels a JSON file may have (a report needs about six)
STALE_AFTER = 3600.0  # seconds after which a temporary file without a process id is taken as left over
# Temporary names this project writes beside its outputs: ".NAME.<kind>-PID-..." (kind: tmp for
# write_text_atomic, save and old for compression.pipeline.save), and the older pid-less
# ".NAME.XXXXXXXX" (tempfile's eight random characters) with an optional ".tmp".
TEMP_WITH_PID = re.compile(r"\..+\.(?:tmp|save|old)-(?P<pid>[0-9]{1,10})-.*")
TEMP_WITHOUT_PID = re.compile(r"\..+\.[a-z0-9_]{8}(?:\.tmp)?")
OUR_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".md", ".py", ".tmp")


class FileError(ValueError):
    """A file that cannot be read or is not what it should be; the message names the file."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: Path, max_bytes: int | None = None, max_depth: int | None = None) -> Any:
    """Parsed JSON of ``path``; FileError naming the file when it is missing, over ``max_bytes``,
    nested deeper than ``max_depth`` levels (e.g. :data:`MAX_JSON_DEPTH`; None: any depth the parser
    takes) or not JSON."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise FileError(f"{path}: {size:,} bytes is over the limit of {max_bytes:,}")
        data = json.loads(path.read_text())
        if max_depth is not None and json_depth(data) > max_depth:
            raise FileError(f"{path} is nested more than {max_depth} levels deep")
        return data
    except FileError:
        raise
    except RecursionError:
        raise FileError(f"{path} is nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        kind = "is not valid JSON" if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)) \
            else f"cannot be read ({err.strerror or type(err).__name__})"
        raise FileError(f"{path} {kind}") from None


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs and (with ``since``, a time stamp) has run since before ``since``:
    a process that started later only reuses the number of the one that wrote the file."""
    try:
        import psutil

        return psutil.Process(pid).create_time() <= (since if since is not None else time.time()) + 1.0
    except ImportError:
        pass
    except Exception:  # noqa: BLE001  psutil.NoSuchProcess, AccessDenied: gone or not ours
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _ours(entry: Path, pid: bool) -> bool:
    """A temporary entry of this project: a folder holding only files it writes, or a file (one
    named with a process id, or ending in ``.tmp``)."""
    if entry.is_symlink():
        return False
    if entry.is_file():
        return pid or entry.name.endswith(".tmp")
    try:
        return entry.is_dir() and all(f.is_file() and not f.is_symlink() and f.name.endswith(OUR_SUFFIXES)
                                      for f in entry.iterdir())
    except OSError:
        return False


def stale(entry: Path, max_age: float = STALE_AFTER, now: float | None = None) -> bool:
    """Whether ``entry`` is a temporary file or folder of this project (see :data:`TEMP_WITH_PID`)
    whose writer is gone: its process has ended, or, without a process id, it is over ``max_age``
    seconds old."""
    try:
        mtime = entry.lstat().st_mtime
    except OSError:
        return False
    match = TEMP_WITH_PID.fullmatch(entry.name)
    if match:
        gone = not pid_alive(int(match["pid"]), since=mtime)
    elif TEMP_WITHOUT_PID.fullmatch(entry.name):
        gone = (now if now is not None else time.time()) - mtime > max_age
    else:
        return False
    return gone and _ours(entry, bool(match))


def remove_stale(folder: Path, name: str | None = None, max_age: float = STALE_AFTER) -> list[Path]:
    """Remove the temporary files and folders that killed writes left in ``folder`` (its top level
    only; with ``name``, only those of that output, ``.NAME.*``); returns what was removed. Safe to
    call while other processes write there: an entry is removed only when its writer is gone."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if name is not None and not entry.name.startswith(f".{name}."):
            continue
        if stale(entry, max_age):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
