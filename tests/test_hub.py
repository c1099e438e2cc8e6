"""--push-to-hub refuses offline with one clear line, and never hangs on an unreachable or silent hub.

No test reaches the network: the hub endpoint is pointed at local sockets (closed, or open and silent).
"""
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from compression import hub
from compression.hub import HubError, check_target, push_folder


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("card")
    return tmp_path


@pytest.fixture
def online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: CI exports it, so lift it there too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_mode_is_refused_before_any_network_use(folder, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(constants, "ENDPOINT", "http://192.0.2.1:9")  # would hang if it were used
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"offline mode is on \(HF_HUB_OFFLINE\)") as err:
        push_folder(folder, "someone/model")
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 1


@pytest.mark.parametrize("repo", ["not a repo", "a/b/c", "owner/name\n"])
def test_bad_repo_ids_are_refused_before_any_work(folder, repo):
    for call in (lambda: check_target(repo), lambda: push_folder(folder, repo)):
        with pytest.raises(HubError, match="not a hub repo id"):
            call()


def test_check_target_refuses_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        check_target("someone/model")


def test_a_folder_without_a_model_is_refused(tmp_path, online):
    with pytest.raises(HubError, match="not a saved model folder"):
        push_folder(tmp_path, "someone/model")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_one_line_at_once(folder, monkeypatch, online):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"cannot push .* to someone/model: \w+") as err:
        push_folder(folder, "someone/model", token="hf_test")
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10


def test_a_silent_hub_times_out_instead_of_hanging(folder, monkeypatch, online):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub, "READ_TIMEOUT", 1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(HubError, match="(?i)timeout|timed out"):
            push_folder(folder, "someone/model", token="hf_test")
    finally:
        server.close()
    assert accepted and time.monotonic() - t0 < 10
