"""Small file helpers: atomic writes (a crash never leaves half a file) and reads whose errors name
the file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class FileError(ValueError):
    """A file that cannot be read or is not what it should be; the message names the file."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def read_json(path: Path, max_bytes: int | None = None) -> Any:
    """Parsed JSON of ``path``; FileError naming the file when it is missing, too big or not JSON."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise FileError(f"{path}: {size:,} bytes is over the limit of {max_bytes:,}")
        return json.loads(path.read_text())
    except FileError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        kind = "is not valid JSON" if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)) \
            else f"cannot be read ({err.strerror or type(err).__name__})"
        raise FileError(f"{path} {kind}") from None
