"""The held-out probe's per-layer MLP errors are what they claim: the compressed MLP against the dense
one on the probe's own stream, recomputed here from scratch (the probe reuses the dense activations
of a cut MLP instead of running gate/up again)."""
import copy

import pytest
import torch
from conftest import VOCAB, tiny_model

from compression import compress
from compression.modegpt import MoDeGPTConfig
from compression.olica import OlicaConfig


def _mlp_inputs(model, tokens) -> list[torch.Tensor]:
    """Each block's input to its post-attention norm (the stream after attention), for ``tokens``."""
    seen, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("config", [MoDeGPTConfig(ratio=0.4), OlicaConfig(ratio=0.4, calibrate_layers=0)],
                         ids=["modegpt", "olica"])
def test_held_out_mlp_errors_are_the_compressed_mlp_against_the_dense_one(config):
    torch.manual_seed(0)
    dense = tiny_model("llama")
    fit, probe = torch.randint(0, VOCAB, (8, 32)), torch.randint(0, VOCAB, (2, 32))
    model, report = compress(copy.deepcopy(dense), config, fit, held_out=probe)
    assert report.extra["errors_measured_on"] == "held-out"
    for i, (mid, layer) in enumerate(zip(_mlp_inputs(model, probe), model.model.layers)):
        with torch.no_grad():
            ref = dense.model.layers[i]
            want = ref.mlp(ref.post_attention_layernorm(mid))
            got = layer.mlp_out(mid)
        expected = float((got - want).norm() / want.norm())
        assert expected > 1e-3  # the layer was really cut
        assert report.layers[i].errors["mlp"] == pytest.approx(expected, rel=1e-4)
