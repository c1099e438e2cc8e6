"""Publishing a saved folder as a Hugging Face model repository (``--push-to-hub REPO``).

Offline use is the norm for this project, so the push refuses at once, with one readable line, when
the hub is switched off (``HF_HUB_OFFLINE``) or cannot be reached within a few seconds; it never
waits on a dead network.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CONNECT_TIMEOUT = 10.0  # seconds to reach the hub before giving up
READ_TIMEOUT = 120.0  # seconds of silence from a reached hub before giving up (uploads send, not read)
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TRUE = ("1", "true", "yes", "on")


class HubError(RuntimeError):
    """The push cannot happen (offline, unreachable, refused); the message is one line for the user."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_target(repo_id: str) -> None:
    """HubError now if a push to ``repo_id`` cannot work (bad id, offline mode): call before long jobs."""
    if not REPO_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repo id (expected owner/name)")
    if offline():
        raise HubError("cannot push to the hub: offline mode is on (HF_HUB_OFFLINE); unset it to publish")


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create ``repo_id`` (a model repo; kept if it exists) and upload ``folder`` to it; returns its URL.
    ``token``: a hub token, else the one huggingface_hub finds (HF_TOKEN or a saved login)."""
    folder = Path(folder)
    check_target(repo_id)
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not a saved model folder (no config.json)")
    from huggingface_hub import HfApi, get_session

    session = get_session()  # huggingface_hub's shared client: unbounded waits by default
    previous = session.timeout
    session.timeout = type(previous)(None, connect=CONNECT_TIMEOUT, read=READ_TIMEOUT, pool=CONNECT_TIMEOUT)
    api = HfApi(token=token)
    try:
        api.whoami()  # the cheapest authenticated call: fails fast on a dead network or a bad token
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload a model compressed with the LLM Compression Explorer")
    except Exception as err:  # noqa: BLE001  network, auth and hub errors all become one line
        raise HubError(f"cannot push {folder} to {repo_id}: {_one_line(err)}") from None
    finally:
        session.timeout = previous
    return str(url)
