"""A BENCHMARKS.md section between two HTML-comment markers, written by one benchmark and kept by the
others when they rewrite the file (bench.latency, bench.compress_cost, bench.preview)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable


def section(results: Path, markers: tuple[str, str], render: Callable[[dict], str]) -> str:
    """The marked section rendered from ``results`` (a JSON file); "" when the file is absent."""
    if not results.exists():
        return ""
    return f"\n{markers[0]}\n{render(json.loads(results.read_text()))}{markers[1]}\n"


def write_section(path: Path, markers: tuple[str, str], body: str) -> None:
    """Replace the marked section of ``path`` with ``body`` (appended when the markers are absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{markers[0]}\n{body}{markers[1]}"
    pattern = re.compile(re.escape(markers[0]) + ".*?" + re.escape(markers[1]), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
