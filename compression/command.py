"""The command line that reproduces a run: ``python -m compression compress ...`` from its report.

Every value is shell-quoted (model names and sources come from users). Knobs at their default are left
out, so the line stays readable; the method config it gives equals the report's (a test parses it back).
Custom calibration text is not in a report: the line then reads it from ``calibration.txt`` and says so.
"""
from __future__ import annotations

import shlex

from .methods import get

PER_LAYER_ONLY_WHEN_MANUAL = "layer_sparsity"  # a record of the computed spread otherwise, not an input


def config_flags(report: dict) -> list[str]:
    """``--flag value`` pairs of the method config's knobs that differ from their defaults."""
    method = get(report["method"])
    values = dict(report.get("config") or {})
    if values.get("allocation") not in (None, "manual"):
        values.pop(PER_LAYER_ONLY_WHEN_MANUAL, None)
    for key, asked_by in method.resolved.items():
        if any(values.get(k) is not None for k in asked_by):
            values.pop(key, None)
    config = method.make_config(values)
    flags = []
    for k in method.knobs():
        value = getattr(config, k.name)
        if value is None or value == k.default:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        flags += [k.cli, str(value)]
    return flags


def command_for(report: dict, out: str = "compressed") -> str:
    """The CLI line that compresses the same model with the same config, calibration, seed and
    evaluation as ``report`` (the app's "copy as command")."""
    cal = report.get("calibration") or {}
    source = cal.get("source") or "wiki"
    custom = source == "text"
    args = ["python", "-m", "compression", "compress", "--model", str(report.get("model") or ""),
            "--method", report["method"], *config_flags(report),
            "--calibration", "text:calibration.txt" if custom else str(source)]
    if cal.get("samples") and cal.get("seq_len"):
        args += ["--calib-samples", str(cal["samples"]), "--calib-len", str(cal["seq_len"])]
    if cal.get("seed"):
        args += ["--seed", str(cal["seed"])]
    ppl = (report.get("evaluation") or {}).get("ppl") or {}
    args += ["--eval-windows", str(ppl["windows"])] if ppl.get("windows") else ["--no-eval"]
    chat = (report.get("agreement_chat") or {}).get("conversations")
    args += ["--chat-eval", str(int(chat or 0))]
    args += ["--out", out]
    line = " ".join(shlex.quote(a) for a in args)
    return line + ("  # custom text: save it as calibration.txt first" if custom else "")
