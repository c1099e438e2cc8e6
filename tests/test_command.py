"""The CLI line that reproduces a run parses back to the report's method config."""
import shlex

import pytest

from compression.__main__ import method_values, parse
from compression.command import command_for
from compression.methods import get


def _report(method, config, **extra):
    return {"method": method, "model": "smollm2-135m", "config": config,
            "calibration": {"source": "wiki+self-chat", "samples": 32, "seq_len": 512, "seed": 3},
            "evaluation": {"ppl": {"windows": 4}}, "agreement_chat": {"conversations": 8}, **extra}


@pytest.mark.parametrize("method,config", [
    ("modegpt", {"ratio": 0.25, "allocation": "manual", "layer_sparsity": [0.1, 0.2, 0.3], "epsilon": 0.1,
                 "ridge": 2.0}),
    ("olica", {"ratio": 0.3, "allocation": "uniform", "ridge": 0.01, "calibrate_layers": 0}),
    ("slicegpt", {"ratio": None, "slicing": None, "widths": [64, 48, 40], "round_to": 8}),
    ("layerdrop", {"ratio": None, "layers": [3, 7]}),
])
def test_command_parses_back_to_the_same_config(method, config):
    line = command_for(_report(method, config))
    args = parse(shlex.split(line)[3:])
    assert args.method == method and args.calib_samples == 32 and args.calib_len == 512 and args.seed == 3
    assert args.calibration == "wiki+self-chat" and args.eval_windows == 4 and args.chat_eval == 8
    assert get(method).make_config(method_values(args)) == get(method).make_config(config)


def test_automatic_spread_is_not_written_as_manual_values():
    line = command_for(_report("modegpt", {"ratio": 0.25, "allocation": "auto", "layer_sparsity": [0.2, 0.3]}))
    assert "--allocation auto" in line and "--layer-sparsity" not in line


def test_values_are_shell_quoted_and_custom_text_is_named():
    report = _report("layerdrop", {"ratio": 0.25}, model="x; rm -rf ~")
    report["calibration"]["source"] = "text"
    line = command_for(report)
    assert shlex.split(line.split("  #")[0])[5] == "x; rm -rf ~"
    assert "text:calibration.txt" in line and "save it as calibration.txt" in line


@pytest.mark.parametrize("method,config,asked", [
    ("slicegpt", {"ratio": 0.25, "slicing": None, "widths": [64, 48, 40]}, {"ratio": 0.25}),
    ("layerdrop", {"ratio": 0.3, "layers": [3, 7]}, {"ratio": 0.3}),
])
def test_what_the_plan_resolved_gives_way_to_what_was_asked(method, config, asked):
    """Reports record the widths or blocks a ratio resolved to; the command asks for the ratio."""
    args = parse(shlex.split(command_for(_report(method, config)))[3:])
    assert get(method).make_config(method_values(args)) == get(method).make_config(asked)
