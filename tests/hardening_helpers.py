"""Fixtures and helpers of the hardening tests (#27): a tiny dense model on disk, runs of it as zip
members and uploads, the tabs."""
import io
import json
import os
import random
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from conftest import saved_tiny_chat_llama  # noqa: E402
from ui import runs as R  # noqa: E402
from ui.chat_tab import ChatTab  # noqa: E402
from ui.common import WARN, Context, on_page  # noqa: E402
from ui.compress_tab import CompressTab  # noqa: E402
from ui.inspect_tab import InspectTab  # noqa: E402
from ui.runs_tab import RunsTab  # noqa: E402
from ui.store import ModelStore  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
         "{% endfor %}{% endfor %}{% endfor %}{{ 'never' }}")


# --- fixtures: a tiny dense model on disk, a run of it as zip members, the tabs -----------------------
@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A 2-layer random Llama (64 wide, 2048 positions) with the default model's tokenizer and template."""
    return saved_tiny_chat_llama(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def tabs():
    from types import SimpleNamespace

    ctx = Context(ModelStore("cpu"))
    return SimpleNamespace(ctx=ctx, runs=RunsTab(ctx), chat=ChatTab(ctx), inspect=InspectTab(ctx),
                           compress=CompressTab(ctx))


def report_for(dense_folder, **changes) -> dict:
    return {"method": "layerdrop", "model": dense_folder, "params_dense": 1, **changes}


def run_members(dense_folder, config=None, weights=None, **files) -> dict[str, bytes]:
    """The files of a saved run of the dense model (a layer-dropping run at 0%): its files, a report,
    and any member replaced (``config``: changes to config.json; ``weights``: model.safetensors)."""
    members = {p.name: p.read_bytes() for p in Path(dense_folder).iterdir() if p.is_file()}
    members["report.json"] = json.dumps(report_for(dense_folder)).encode()
    if config:
        members["config.json"] = json.dumps({**json.loads(members["config.json"]), **config}).encode()
    if weights is not None:
        members["model.safetensors"] = weights
    members.update(files)
    return members


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload(name: str, data: bytes) -> str:
    """Put ``data`` where gradio keeps uploads; returns the path gr.File would hand the handler."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"test-{random.getrandbits(48):x}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return str(folder / name)


def refused(fn, *args, outputs: int, status: int, **kwargs) -> str:
    """A refusal both ways: the handler raises gr.Error (scripts), the page shows it as ⚠ text."""
    import inspect

    def call(f):
        out = f(*args, **kwargs)
        if inspect.isgenerator(out):
            last = None
            for last in out:
                pass
            return last
        return out

    with pytest.raises(gr.Error) as err:
        call(fn)
    shown = call(on_page(fn, outputs, status))
    assert shown[status] == f"{WARN} {err.value.message}"
    assert "\n" not in err.value.message  # one line
    return err.value.message


def refused_load(tabs, data: bytes, name: str = "run.zip") -> str:
    session = R.Session()
    message = refused(tabs.runs.load_saved, session, upload(name, data), "", outputs=3, status=0)
    assert not session.runs
    return message


def empty_safetensors() -> bytes:
    from safetensors.torch import save

    return save({})


def loaded(tabs, dense_folder, **kw) -> R.Session:
    session = R.Session()
    md, _, _ = tabs.runs.load_saved(session, upload("run.zip", zip_bytes(run_members(dense_folder, **kw))), "")
    assert "model and report" in md, md
    return session
