"""Simulate a Hugging Face Space: a fresh virtual environment with requirements.txt only, SPACE_ID set,
the app started as a Space starts it (``python app.py``), one small compression driven through
gradio_client. Exits non-zero (with the app's log tail) if any step fails.

    python3 .ci/space_sim.py            # `make space-sim`; SPACE_SIM_DIR keeps the venv between runs

Runs with any Python 3.11 (standard library only); the client half runs inside the new environment.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 900  # seconds for the app to listen: asset install + first GGUF dequantization
JOB_TIMEOUT = 600
COMPRESS = dict(model_name="smollm2-135m", method="layerdrop", ratio=0.25, allocation="auto",
                calib_samples=4, calib_len=64, ppl_windows=0)


def step(name: str, t0: float) -> None:
    print(f"space-sim: {name} ({time.monotonic() - t0:.0f} s)", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_venv(root: Path) -> Path:
    """A virtual environment with requirements.txt installed, nothing else (reused when up to date)."""
    python = root / "venv" / "bin" / "python"
    stamp = root / "venv" / ".requirements"
    wanted = (REPO / "requirements.txt").read_text()
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(root / "venv", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
        with open(root / "pip.log", "w") as log:  # pip's chatter goes to the log, shown on failure
            for args in (["--upgrade", "pip"], ["-r", str(REPO / "requirements.txt")]):
                done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], stdout=log,
                                      stderr=subprocess.STDOUT)
                if done.returncode:
                    tail = (root / "pip.log").read_text().splitlines()[-20:]
                    raise RuntimeError("pip install failed:\n" + "\n".join(tail))
        stamp.write_text(wanted)
    return python


def copy_app(dest: Path) -> Path:
    """The files a Space repository would hold: tracked and new unignored files of the work tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    shutil.rmtree(dest, ignore_errors=True)
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def space_env(root: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "COMPRESSION_"))}
    env.update(SPACE_ID="space-sim/llm-compression", GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_SERVER_PORT=str(port), COMPRESSION_CACHE=str(root / "cache"), HOME=str(root / "home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return env


def wait_listening(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the app did not listen on port {port} within {timeout:.0f} s")


def drive(url: str) -> int:
    """(inside the Space environment) one small compression through gradio_client; 0 when it worked."""
    from gradio_client import Client

    try:
        status = Client(url, verbose=False).predict(**COMPRESS, api_name="/compress")[1]
    except Exception as err:  # noqa: BLE001  the app's error, reported in one line
        print(f"space-sim: compress failed: {type(err).__name__}: {err}", flush=True)
        return 1
    print(f"space-sim: status: {status.splitlines()[0] if status else status!r}", flush=True)
    return 0 if status.startswith("✔") else 1


def simulate() -> int:
    """The whole simulation; a temporary folder (no SPACE_SIM_DIR) is removed when it passes."""
    kept = os.environ.get("SPACE_SIM_DIR")
    root = Path(kept or tempfile.mkdtemp(prefix="space-sim-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    code = run_in(root)
    if code == 0 and not kept:
        shutil.rmtree(root, ignore_errors=True)
    return code


def run_in(root: Path) -> int:
    t0 = time.monotonic()
    try:
        python = make_venv(root)
    except RuntimeError as err:
        print(f"space-sim: {err}", flush=True)
        return 1
    step(f"fresh environment with requirements.txt only in {root / 'venv'}", t0)
    app, port = copy_app(root / "app"), free_port()
    for stale in ("cache", "home"):  # a Space starts with neither
        shutil.rmtree(root / stale, ignore_errors=True)
        (root / stale).mkdir()
    log = open(root / "app.log", "w")
    server = subprocess.Popen([str(python), "app.py"], cwd=app, env=space_env(root, port), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(port, server, STARTUP_TIMEOUT)
        step("app listening", t0)
        result = subprocess.run([str(python), str(REPO / ".ci" / "space_sim.py"), "--drive",
                                 f"http://127.0.0.1:{port}/"], env=space_env(root, port), timeout=JOB_TIMEOUT)
        code = result.returncode
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"space-sim: {err}", flush=True)
        code = 1
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
    if code:
        print("space-sim: FAILED; app log tail:\n" + "".join((root / "app.log").read_text().splitlines(True)[-40:]))
    step("passed" if code == 0 else "failed", t0)
    print(f"space-sim: {int(code == 0)} passed, {int(code != 0)} failed", flush=True)  # CI's closing line
    return code


if __name__ == "__main__":
    sys.exit(drive(sys.argv[2]) if sys.argv[1:2] == ["--drive"] else simulate())
