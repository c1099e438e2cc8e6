"""A model card (``README.md`` of a saved folder) generated from the run's report.

Everything a reader needs to trust and use the model: the method, the ratio asked and reached, the
parameters, the calibration, every metric with the settings that produced it, and how to load the
folder (plain transformers for the native format, ``trust_remote_code=True`` for the compressed one).
Report fields are data, not markup: every string from a report is escaped before it reaches the card,
and front-matter values are written as JSON strings (valid YAML whatever they contain).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# Packaged models are GGUF copies of hub models; the card names the original (as text only).
PACKAGED_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
}
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HEX = re.compile(r"[0-9a-f]{1,64}")
MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~&])")
PLACEHOLDER = "path/to/this/folder"


def escape(text: Any) -> str:
    """``text`` as literal markdown: one line, every markup character backslash-escaped."""
    one_line = " ".join(str(text).split())
    return MARKDOWN_SPECIALS.sub(r"\\\1", one_line)


def base_model(name: str) -> str | None:
    """The hub id of the dense model: packaged names map to their origin; a local folder has none."""
    if name in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name]
    if HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def _num(x: Any, spec: str = ".4g") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    return format(x, spec)


def _ci(interval: Any, spec: str = ".4g") -> str:
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
        return ""
    return f" (95% CI {_num(interval[0], spec)} – {_num(interval[1], spec)})"


def front_matter(report: dict) -> str:
    fmt = (report.get("export") or {}).get("format")
    tags = [str(report.get("method", "")), "compressed", "training-free"]
    if fmt == "remote_code":
        tags.append("custom_code")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    base = base_model(str(report.get("model", "")))
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    return "\n".join(lines + ["---"])


def method_section(report: dict) -> list[str]:
    from .methods import METHODS

    method = METHODS.get(report.get("method"))
    label = method.label if method else escape(report.get("method", "unknown"))
    rows = [f"## Method: {label}", ""]
    if method:
        rows += [method.summary, ""]
    target, achieved = report.get("ratio_target"), report.get("ratio_achieved")
    rows += ["| | dense | compressed |", "|---|---:|---:|",
             f"| parameters | {_num(report.get('params_dense'), ',')} | {_num(report.get('params_compressed'), ',')} |",
             f"| decoder-block parameters | {_num(report.get('block_params_dense'), ',')} | "
             f"{_num(report.get('block_params_compressed'), ',')} |", "",
             f"Decoder-block parameters removed: target {_num(target, '.1%') if target is not None else 'given as widths'}, "
             f"achieved {_num(achieved, '.1%')}."]
    config = report.get("config") or {}
    if config:
        settings = ", ".join(f"{escape(k)} = {escape(json.dumps(v))}" for k, v in sorted(config.items()))
        rows += ["", f"Settings: {settings}."]
    return rows


def calibration_section(report: dict) -> list[str]:
    cal = report.get("calibration") or {}
    if not cal:
        return ["## Calibration", "", "None recorded."]
    rows = ["## Calibration", "",
            f"- source: {escape(cal.get('source', 'unknown'))}",
            f"- {_num(cal.get('samples'), 'd')} samples × {_num(cal.get('seq_len'), 'd')} tokens "
            f"({_num(cal.get('tokens'), ',')} tokens, {_num(cal.get('distinct_tokens'), ',')} distinct)"]
    if "fingerprint" in cal:
        digest = str(cal["fingerprint"])
        shown = f"`{digest}`" if HEX.fullmatch(digest) else escape(digest)
        rows.append(f"- token fingerprint (sha256 of the ids, first 16 hex digits): {shown}")
    if "seed" in cal:
        rows.append(f"- seed: {_num(cal['seed'], 'd')}")
    return rows


def _ppl_rows(ppl: dict) -> list[str]:
    where = (f"{escape(ppl.get('text', 'wiki evaluation split'))}, {_num(ppl.get('windows'), 'd')} windows × "
             f"{_num(ppl.get('seq_len'), 'd')} tokens")
    return [f"- **Perplexity** ({where}): dense {_num(ppl.get('dense'))}{_ci(ppl.get('dense_ci'))}, "
            f"compressed {_num(ppl.get('compressed'))}{_ci(ppl.get('compressed_ci'))}"]


def _agreement_rows(agr: dict, chat: dict) -> list[str]:
    rows = []
    if agr:
        rows.append(f"- **Agreement with the dense model** (same windows, {_num(agr.get('windows'), 'd')} windows, "
                    f"{_num(agr.get('tokens'), ',')} tokens): mean token KL(dense ‖ compressed) "
                    f"{_num(agr.get('kl'))} nats{_ci(agr.get('kl_ci'))}, top-1 agreement "
                    f"{_num(agr.get('top1'), '.1%')}{_ci(agr.get('top1_ci'), '.1%')}, perplexity ratio "
                    f"{_num(agr.get('ppl_ratio'))}{_ci(agr.get('ppl_ratio_ci'))}")
    if chat:
        rows.append(f"- **Chat agreement** (dense model's greedy replies to {_num(chat.get('conversations'), 'd')} "
                    f"held-out instructions, {_num(chat.get('tokens'), ',')} reply tokens): KL "
                    f"{_num(chat.get('kl'))} nats, top-1 {_num(chat.get('top1'), '.1%')}")
    return rows


def _zero_shot_rows(zs: dict) -> list[str]:
    tasks = ", ".join(escape(t) for t in zs.get("tasks") or []) or "n/a"
    size = f"n = {_num(zs['n'], 'd')} items" if "n" in zs else f"at most {_num(zs.get('limit'), 'd')} items per task"
    stderr = zs.get("compressed_stderr")
    plus = f" ± {_num(stderr, '.3f')} (stderr)" if stderr is not None else ""
    return [f"- **Zero-shot accuracy** (lm-eval, mean over {tasks}; {size}): dense "
            f"{_num(zs.get('dense'), '.3f')}, compressed {_num(zs.get('compressed'), '.3f')}{plus}"]


def _heal_rows(heal: dict) -> list[str]:
    before, after = heal.get("ppl_before"), heal.get("ppl_after")
    change = f"; perplexity {_num(before)} → {_num(after)}" if after is not None else ""
    return [f"- **Recovery training (LoRA, merged)**: {_num(heal.get('tokens'), ',')} tokens in "
            f"{_num(heal.get('steps'), 'd')} steps{change}. The metrics above are from before it."]


def metrics_section(report: dict) -> list[str]:
    evaluation = report.get("evaluation") or {}
    rows = []
    if evaluation.get("ppl"):
        rows += _ppl_rows(evaluation["ppl"])
    rows += _agreement_rows(report.get("agreement") or {}, report.get("agreement_chat") or {})
    if evaluation.get("zero_shot"):
        rows += _zero_shot_rows(evaluation["zero_shot"])
    if report.get("heal"):
        rows += _heal_rows(report["heal"])
    return ["## Evaluation", ""] + (rows or ["Not evaluated: the run was saved without metrics."])


def loading_section(report: dict, location: str) -> list[str]:
    export = report.get("export") or {}
    remote = export.get("format") == "remote_code"
    path = json.dumps(location)
    extra = ", trust_remote_code=True" if remote else ""
    why = (f"The compressed layers have no standard transformers class ({escape(export.get('reason', ''))}), so "
           "the folder carries its own modeling code (`modeling_compressed.py`, `auto_map` in the config). "
           "Loading it needs only torch, transformers and safetensors, and runs that code: read it first."
           if remote else
           f"The result is exactly a standard architecture ({escape(export.get('reason', ''))}), saved as "
           "that class: plain transformers loads it, and so can tools that take that architecture.")
    return ["## How to load", "", why, "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"model = AutoModelForCausalLM.from_pretrained({path}{extra})",
            f"tokenizer = AutoTokenizer.from_pretrained({path})", "```", "",
            "Use this folder's path, or the hub repo id it was pushed to, in place of the one above."]


def model_card(report: dict, location: str = PLACEHOLDER) -> str:
    """Markdown (with YAML front matter) describing the saved model of ``report`` (a report dict)."""
    model = escape(report.get("model") or "a causal LM")
    warnings = [f"- {escape(w)}" for w in report.get("warnings") or []]
    sections = [
        front_matter(report), "", f"# {model}, compressed without training", "",
        "Saved by the LLM Compression Explorer. The numbers below come from the run's `report.json`, "
        "which is in this folder.", "",
        *([f"The dense model is the packaged copy of {PACKAGED_HUB_IDS[report['model']]}: its GGUF "
           "weights, dequantized to fp32.", ""] if report.get("model") in PACKAGED_HUB_IDS else []),
        *method_section(report), "", *calibration_section(report), "", *metrics_section(report), "",
        *(["## Warnings", "", *warnings, ""] if warnings else []),
        *loading_section(report, location),
    ]
    return "\n".join(sections) + "\n"
