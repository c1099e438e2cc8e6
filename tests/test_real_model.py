"""End to end on the real default model (SmolLM2-135M from the packaged GGUF). Marked slow.

Sizes are kept small (8 x 256 calibration tokens, 4 evaluation windows) except the dense perplexity
check, which runs the full published protocol (32 x 1024 tokens) once.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compression.arch import count_params

pytestmark = pytest.mark.slow
SMALL = ["--calib-samples", "8", "--calib-len", "256", "--eval-windows", "4", "--chat-eval", "4"]


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "compression", *args], capture_output=True,
                          text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def dense_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "dense.json"
    cli("eval", "--model", "smollm2-135m", "--json", str(out))
    return json.loads(out.read_text())


def test_dense_perplexity_matches_the_published_protocol(dense_eval):
    assert dense_eval["ppl"] == pytest.approx(13.93, abs=0.05)
    assert dense_eval["params"] == 134_515_008
    assert dense_eval["prefill_tok_s"] > 0 and dense_eval["decode_tok_s"] > 0


def compress_and_reload(tmp_path, *args):
    out = tmp_path / "run"
    cli("compress", "--model", "smollm2-135m", *args, *SMALL, "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    import compression  # noqa: F401  registers the compressed format
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert count_params(model) == report["params_compressed"]
    assert math.isfinite(report["ppl_compressed"]) and report["ppl_compressed"] > report["ppl_dense"]
    return report, model


def test_layerdrop_quarter_reloads_with_plain_transformers(tmp_path):
    report, model = compress_and_reload(tmp_path, "--method", "layerdrop", "--ratio", "0.25")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(l["removed"] for l in report["layers"]) == 8
    assert model.config.num_hidden_layers == 22
    assert report["block_params_compressed"] <= 0.75 * report["block_params_dense"]


@pytest.mark.parametrize("method_args", [
    ("--method", "slicegpt", "--slicing", "0.25"),
    ("--method", "modegpt", "--ratio", "0.25"),
    ("--method", "olica", "--ratio", "0.25"),
], ids=["slicegpt", "modegpt", "olica"])
def test_methods_at_quarter(tmp_path, method_args):
    report, model = compress_and_reload(tmp_path, *method_args)
    assert report["params_compressed"] <= 0.92 * report["params_dense"]
    assert report["ppl_compressed"] < 10 * report["ppl_dense"]
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_cli_rejects_bad_input_before_work():
    for args, message in [
        (["--model", "no-such-model-anywhere/xyz/abc"], "does not exist"),
        (["--ratio", "0.95"], "[0, 0.9]"),
        (["--calib-samples", "100000"], "calibration"),
    ]:
        base = ["compress", "--method", "layerdrop", "--ratio", "0.25", "--out", "/tmp/never"]
        proc = cli(*base, *args, check=False)
        assert proc.returncode == 2
        lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and message in lines[0]


def test_self_chat_calibration_keeps_source_and_chat_agreement(tmp_path):
    report, model = compress_and_reload(tmp_path, "--method", "modegpt", "--ratio", "0.25",
                                        "--calibration", "self-chat")
    assert report["calibration"]["source"] == "self-chat"
    chat = report["agreement_chat"]
    assert chat["conversations"] == 4 and chat["kl"] > 0 and 0 < chat["top1"] < 1
    assert report["agreement"]["kl"] > 0 and report["peak_memory_mb"] > 0


def test_shipped_block_influence_is_the_default_models_on_the_apps_calibration():
    """assets/dense holds the dense Block Influence under the keys the app's runs look up, and it is
    what the library measures (a stale asset would silently change the automatic allocation)."""
    from compression.calibration import dense_block_influence
    from compression.data import TextSpec
    from compression.methods import METHODS
    from compression.models import DEFAULT_MODEL, load_model
    from compression.pipeline import DenseCache, calibration_tokens
    from ui.calibration_form import CALIBRATION_CPU, CALIBRATION_GPU

    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    cache = DenseCache()
    for samples, length in (CALIBRATION_GPU, CALIBRATION_CPU):  # the CPU one last: it is re-measured
        fit = calibration_tokens(DEFAULT_MODEL, model, tokenizer,
                                 TextSpec(samples, length, source=METHODS["modegpt"].calibration))[0]
        shipped, where = cache.block_influence(DEFAULT_MODEL, fit)
        assert where == "shipped" and len(shipped) == model.config.num_hidden_layers
    torch.testing.assert_close(torch.tensor(dense_block_influence(model, fit)), torch.tensor(shipped),
                               rtol=1e-4, atol=1e-5)
