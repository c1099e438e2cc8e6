"""The method registry carries every method fact the app, the architecture checks, streaming and the
benchmarks need: a method added to it works through the form without any name check elsewhere."""
import dataclasses
import inspect

import pytest

from compression import compress
from compression.methods import METHODS, get
from compression.modeling_compressed import CompressedForCausalLM
from compression.plan import FormInput
from compression.slicegpt import plan_widths
from conftest import tiny_model

pytest.importorskip("gradio")
from ui import forms  # noqa: E402
from ui.compress_tab import CompressTab  # noqa: E402


@pytest.mark.parametrize("name", list(METHODS))
def test_takes_influence_says_what_run_accepts(name):
    m = METHODS[name]
    assert m.takes_influence == ("influence" in inspect.signature(m.run).parameters)


@pytest.mark.parametrize("name", list(METHODS))
def test_keeps_class_says_what_run_returns(name, tokens):
    m = METHODS[name]
    form = FormInput({"batch_size": 8}, 0.3, m.allocations[0] if m.allocations[0] != "manual" else "uniform")
    out, _ = compress(tiny_model("llama", layers=4), m.from_form(form), tokens)
    assert isinstance(out, CompressedForCausalLM) != m.keeps_class


def test_slicegpt_manual_fractions_become_widths_the_plan_keeps():
    model = tiny_model("llama")
    D = model.config.hidden_size
    config = forms.make_config("slicegpt", 0.25, "manual", "0.0,0.5,0.26", num_layers=3, hidden_size=D)
    assert D == 64 and config.widths == (64, 32, 40)  # 0.74 × 64 = 47.4 → 40, a multiple of round_to 8
    assert plan_widths(config, model.config) == list(config.widths)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        forms.make_config("slicegpt", 0.25, "manual", "0.0,1.0,0.2", num_layers=3, hidden_size=D)


def test_a_method_added_to_the_registry_drives_the_form(monkeypatch):
    """A renamed copy of layer dropping: the form builds its config, the editor shows block
    checkboxes and no ε; nothing outside the registry knows its name."""
    copy = dataclasses.replace(get("layerdrop"), name="dropper", label="Dropper")
    monkeypatch.setitem(METHODS, "dropper", copy)
    config = forms.make_config("dropper", 0.25, "manual", "1,2", num_layers=4, hidden_size=64)
    assert config.layers == (1, 2)
    row, checkboxes, *sliders = CompressTab.editor_layout(4, "dropper", "manual")
    assert checkboxes["visible"] and not row["visible"]
    assert CompressTab.editor_values("0,3", "dropper", 4)[0] == [0, 3]
    tab = CompressTab(ctx=None)
    layout = tab.layout("dropper", "auto")
    assert layout[5]["visible"] is False  # no ε for a config without one
