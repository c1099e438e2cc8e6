"""Saved models load where this project is not installed (issue 20).

The loader runs in a subprocess in isolated mode without the site module (``python -I -S``: no current
directory, no PYTHONPATH, no .pth files, so neither the repository nor its editable install is on
sys.path); only the virtual environment's site-packages directory is appended, so torch, transformers
and safetensors import and ``compression`` does not. It writes its logits, which must equal those of the
project's own load.
"""
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from conftest import logits, tiny_model
from transformers import AutoModelForCausalLM

from compression import LayerDropConfig, compress
from compression.modegpt import MoDeGPTConfig
from compression.modeling import export_format, save_model
from compression.olica import OlicaConfig

PRELUDE = """
import sys
sys.path.append(sys.argv[1])  # site-packages only: .pth files (the project's editable install) unread
"""
LOADER = PRELUDE + """
import torch
from transformers import AutoModelForCausalLM
folder, ids, out = sys.argv[2:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save({"logits": model(torch.load(ids)).logits, "cls": type(model).__name__,
                "params": sum(p.numel() for p in model.parameters())}, out)
"""


def _run(model, config, tokens):
    out = compress(model, config, tokens)
    return (out.model, out.report) if hasattr(out, "model") and hasattr(out, "report") else (out.compressed, out)


def isolated(code: str, *args: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", code, sysconfig.get_paths()["purelib"], *args]


def load_elsewhere(folder, tokens, tmp_path) -> dict:
    """Load ``folder`` in an isolated interpreter that cannot import this project."""
    torch.save(tokens, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(isolated(LOADER, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")),
                   check=True, cwd=tmp_path, env=env, timeout=300)
    return torch.load(tmp_path / "out.pt")


def test_the_loader_really_cannot_import_the_project(tmp_path):
    code = PRELUDE + "import torch, transformers, safetensors\nimport compression\n"
    probe = subprocess.run(isolated(code), cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode != 0
    assert "No module named 'compression'" in probe.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2", "olmo2"])
def test_modegpt_folder_loads_without_the_project(kind, tokens, tmp_path):
    model, report = _run(tiny_model(kind), MoDeGPTConfig(ratio=0.3), tokens)
    fmt, reason = save_model(model, None, tmp_path / "model")
    assert fmt == "remote_code" and "qk_dim" in reason
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (tmp_path / "model" / "modeling_compressed.py").exists()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    elsewhere = load_elsewhere(tmp_path / "model", tokens, tmp_path)
    assert elsewhere["cls"] == "CompressedForCausalLM"
    assert torch.equal(elsewhere["logits"], logits(ours, tokens))
    assert torch.equal(elsewhere["logits"], logits(model, tokens))
    assert elsewhere["params"] == report.params_compressed


@pytest.mark.parametrize("kind, config, cls", [
    ("llama", LayerDropConfig(ratio=0.3), "LlamaForCausalLM"),
    ("llama", OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=0), "LlamaForCausalLM"),
    ("phi3", OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=0), "Phi3ForCausalLM"),
    ("gemma3_text", OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=0), "Gemma3ForCausalLM"),
], ids=["layerdrop-llama", "uniform-mlp-llama", "uniform-mlp-phi3", "uniform-mlp-gemma3"])
def test_standard_results_save_as_the_original_class(kind, config, cls, tokens, tmp_path):
    model, report = _run(tiny_model(kind), config, tokens)
    ref = logits(model, tokens)
    fmt, _ = save_model(model, None, tmp_path / "model")
    assert fmt == "native"
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["architectures"] == [cls] and "auto_map" not in saved
    assert not (tmp_path / "model" / "modeling_compressed.py").exists()
    elsewhere = load_elsewhere(tmp_path / "model", tokens, tmp_path)
    assert elsewhere["cls"] == cls
    if kind == "phi3":  # Phi-3 fuses gate and up into one matmul: equal up to float32 rounding only
        torch.testing.assert_close(elsewhere["logits"], ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(elsewhere["logits"], ref)
    assert elsewhere["params"] == report.params_compressed


def test_non_uniform_or_branched_results_keep_the_format(tokens):
    from compression.slicegpt import SliceGPTConfig

    sliced, _ = _run(tiny_model("llama"), SliceGPTConfig(slicing=0.25), tokens)
    assert export_format(sliced)[0] == "remote_code" and "skip" in export_format(sliced)[1]
    branched, _ = _run(tiny_model("llama"), OlicaConfig(ratio=0.3, attn_share=0.0, calibrate_layers=1,
                                                        calibrate_rank=4), tokens)
    assert export_format(branched) == ("remote_code", export_format(branched)[1])
    assert "branch" in export_format(branched)[1]
