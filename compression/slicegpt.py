"""SliceGPT (Ashkboos et al., 2024, arXiv 2401.15024): rotate the residual stream, delete directions.

1. Fold every block norm's scale into the linear layers that read it; the norms become scale-free, so
   an orthogonal Q with QᵀQ = I passes through them: RMSNorm(x Q) = RMSNorm(x) Q.
2. Layer by layer, in sequence (each PCA sees the already-sliced layers before it): the principal
   components of the residual stream entering the MLP (Q_mid) and leaving the block (Q_out), from the
   uncentred XᵀX of calibration activations (float64, relative damping). Weights that read the stream
   are rotated on their inputs, weights that write it on their outputs, and only the top-d directions
   are kept. The skip connection carries the small matrix between consecutive bases.

Unlike the reference code, which rotates the embeddings and unties a tied lm_head (adding vocab x
hidden parameters), the stream enters block 0 and leaves the last block in the original basis: block 0
reads the full-width embeddings and its skip matrix maps D -> d, the last block's skip and down
projection map back d -> D, and the final norm and (tied) head stay untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .arch import view
from .calibration import IN_SAMPLE_BATCHES, Gram, capture_block_inputs
from .modeling import spec_params, to_compressed
from .ops import (new_linear, pca, relative_error, rotate_inputs, rotate_outputs, round_down,
                  scale_inputs)
from .knobs import build, check, knob, values
from .plan import FormInput, Plan
from .report import LayerReport, Report


@dataclass
class SliceGPTConfig:
    """Exactly one of ``slicing`` (fraction of hidden dims deleted, the paper's knob), ``ratio``
    (fraction of block parameters to remove, skip matrices counted) or ``widths`` (one kept width per
    layer) sets the sizes; with none given, ``ratio`` = 0.25."""

    ratio: float | None = knob(None, kind="float", label="Target ratio", low=0.0, high=0.9, optional=True,
                               help="fraction of decoder-block parameters to remove (skip matrices "
                                    "counted)")
    slicing: float | None = knob(None, kind="float", label="Slicing fraction", low=0.0, high=1.0,
                                 high_open=True, optional=True,
                                 help="fraction of hidden dimensions deleted (the paper's knob)")
    widths: tuple[int, ...] | None = knob(None, kind="ints", label="Per-layer widths", low=1,
                                          optional=True, help="kept width of every layer, comma-separated")
    round_to: int = knob(8, kind="int", label="Round widths to", low=1, high=4096, advanced=True,
                         help="kept widths are multiples of this (hardware friendly, as the paper)")
    damping: float = knob(0.01, kind="float", label="PCA damping", low=0.0, high=1.0, advanced=True,
                          help="relative damping of the eigendecomposition (the reference's value)")
    batch_size: int = knob(8, kind="int", label="Calibration batch", low=1, high=4096, flag="--calib-batch",
                           help="calibration sequences per forward pass", advanced=True)

    def __post_init__(self):
        check(self)
        given = [x is not None for x in (self.slicing, self.ratio, self.widths)]
        if not any(given):
            self.ratio = 0.25
        elif sum(given) != 1:
            raise ValueError("SliceGPT takes exactly one of ratio, slicing or widths")


def sliced_specs(base, widths: list[int]) -> list[dict]:
    """Block shapes when layer i keeps ``widths[i]`` directions (the last block writes width D)."""
    from .modeling import dense_spec

    D, last = base.hidden_size, len(widths) - 1
    specs = []
    for i, w in enumerate(widths):
        spec = dense_spec(base)
        spec.update(d_in=D if i == 0 else widths[i - 1], d_mid=w, d_out=D if i == last else w,
                    attn_skip=True, mlp_skip=True, norm_scale=False)
        specs.append(spec)
    return specs


def plan_widths(config: SliceGPTConfig, base) -> list[int]:
    """Per-layer kept widths from the config (validated against the model)."""
    D, L = base.hidden_size, base.num_hidden_layers
    if config.widths is not None:
        if len(config.widths) != L or max(config.widths) > D:
            raise ValueError(f"widths must be {L} values in [1, {D}]")
        return list(config.widths)
    if config.slicing is not None:
        return [round_down((1 - config.slicing) * D, config.round_to)] * L
    from .modeling import dense_spec

    dense = L * spec_params(dense_spec(base), base)
    for d in range(round_down(D, config.round_to), 0, -config.round_to):  # widest that reaches it
        widths = [d] * L
        if 1 - sum(spec_params(s, base) for s in sliced_specs(base, widths)) / dense >= config.ratio - 1e-9:
            return widths
    raise ValueError(f"ratio {config.ratio} cannot be reached by slicing")


def fold_norms(layer) -> None:
    """Fold both block norms' scales into q/k/v and gate/up; the norms become scale-free."""
    attn, mlp = layer.self_attn, layer.mlp
    for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                          (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
        if norm.weight is not None:
            for linear in readers:
                scale_inputs(linear, norm.weight.detach())
            norm.weight = None


def principal_basis(signals: list[torch.Tensor], width: int, damping: float):
    """Eigenvalues and the top-``width`` eigenvectors (D, width) of Σ xxᵀ over the signals."""
    gram = Gram(signals[0].shape[-1], signals[0].device)
    for x in signals:
        gram.add(x)
    vals, vecs = pca(gram.mean, damping)
    return vals, vecs[:, :width]


def slice_layer(layer, inputs: list[torch.Tensor], kwargs: list[dict], q_in: torch.Tensor,
                width: int, last: bool, damping: float):
    """Rotate and slice one block whose inputs are in basis ``q_in`` (D, d_in).

    Returns (outputs in the new basis, q_out, spectra).
    """
    dev = inputs[0].device
    attn, mlp = layer.self_attn, layer.mlp
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
        rotate_inputs(linear, q_in)
    # Stream entering the MLP, in the original basis: x Q_inᵀ + attention output.
    z = [x.double() @ q_in.T + layer.attention_out(x, kw).double() for x, kw in zip(inputs, kwargs)]
    vals_mid, q_mid = principal_basis(z, width, damping)
    like = attn.o_proj.weight
    layer.attn_skip = new_linear((q_mid.T @ q_in).to(dev), like)     # (d_mid, d_in)
    rotate_outputs(attn.o_proj, q_mid)
    rotate_inputs(mlp.gate_proj, q_mid)
    rotate_inputs(mlp.up_proj, q_mid)
    x_mid = [(zi @ q_mid).to(like.dtype) for zi in z]
    # Stream leaving the block, original basis: x_mid Q_midᵀ + MLP output on the sliced input.
    u = [xm.double() @ q_mid.T + layer.mlp_out(xm).double() for xm in x_mid]
    if last:
        vals_out, q_out = principal_basis(u, u[0].shape[-1], damping)
        q_out = torch.eye(u[0].shape[-1], dtype=torch.float64, device=dev)
    else:
        vals_out, q_out = principal_basis(u, width, damping)
    layer.mlp_skip = new_linear((q_out.T @ q_mid).to(dev), like)     # (d_out, d_mid)
    rotate_outputs(mlp.down_proj, q_out)
    outputs = [(ui @ q_out).to(like.dtype) for ui in u]
    return outputs, q_out, {"mlp_input": vals_mid.tolist(), "block_output": vals_out.tolist()}


def refusal(arch, config, model_type: str) -> str | None:
    """SliceGPT needs every read of the residual stream to go through a pre-norm RMSNorm whose scale
    folds into the next linear layers (paper, §3). Gemma 2/3 and OLMo 2 normalise the sub-block
    *outputs* in the original basis before the residual add, so a rotated, sliced stream would need a
    full D×D map after every such norm: refused."""
    if arch.attn_post_norm is not None or arch.attn_norm is None:
        return (f"SliceGPT needs pre-norm blocks; {model_type} normalises each sub-block's output before "
                "the residual add, so the rotation cannot be folded through those norms")
    return None


def widths_for_fractions(fractions, hidden_size: int, round_to: int) -> list[int]:
    """Kept widths for per-layer slicing fractions, rounded down as the slicing knob is."""
    if not all(0.0 <= v < 1.0 for v in fractions):
        raise ValueError("per-layer slicing fractions must be in [0, 1)")
    return [round_down((1 - v) * hidden_size, round_to) for v in fractions]


def from_form(form: FormInput) -> SliceGPTConfig:
    """Manual allocation: one slicing fraction per layer, kept widths as the slicing knob rounds them;
    otherwise the target as a parameter ratio or, with ``form.slicing``, as the slicing fraction."""
    if form.allocation == "manual":
        round_to = int(form.options.get("round_to") or SliceGPTConfig.round_to)
        return build(SliceGPTConfig, {**form.options,
                                      "widths": widths_for_fractions(form.per_layer, form.hidden_size, round_to)})
    return build(SliceGPTConfig, {**form.options, ("slicing" if form.slicing else "ratio"): form.ratio})


def plan(config: SliceGPTConfig, base, influence=None) -> Plan:
    """Block shapes of the sliced model: layer i keeps ``plan_widths(...)[i]`` directions."""
    return Plan(sliced_specs(base, plan_widths(config, base)))


def run(model, config: SliceGPTConfig, calibration, progress, held_out=None):
    """Rotate and slice ``model`` (a private copy) layer by layer; returns (model, Report).

    The per-layer "block" error compares the sliced stream (rotated back) with the dense stream on
    ``held_out`` tokens when given, else on the first calibration batches (in-sample).
    """
    if calibration is None:
        raise ValueError("SliceGPT needs calibration tokens")
    model = to_compressed(model)
    mv = view(model)
    base = mv.config
    widths = plan_widths(config, base)
    D = base.hidden_size
    t0 = time.perf_counter()
    progress(0.0, "calibration: capturing block inputs")
    inputs = capture_block_inputs(mv, calibration, config.batch_size)
    if held_out is None:
        probe = inputs.head(IN_SAMPLE_BATCHES)
    else:
        probe = capture_block_inputs(mv, held_out, config.batch_size)
    calibration_seconds = time.perf_counter() - t0
    dense_probe, sliced_probe = probe.hidden, [h.clone() for h in probe.hidden]
    hidden, q_in = inputs.hidden, torch.eye(D, dtype=torch.float64, device=mv.device)
    layers, last = [], len(mv.layers) - 1
    for i, layer in enumerate(mv.layers):
        params_dense = sum(p.numel() for p in layer.parameters())
        kw_probe = probe.kwargs_for(i)
        dense_probe = [layer(h, **kw) for h, kw in zip(dense_probe, kw_probe)]
        fold_norms(layer)
        hidden, q_out, spectra = slice_layer(layer, hidden, inputs.kwargs_for(i), q_in, widths[i],
                                             i == last, config.damping)
        sliced_probe = [layer(h, **kw) for h, kw in zip(sliced_probe, kw_probe)]
        errors = {"block": relative_error(torch.cat([h.double() @ q_out.T for h in sliced_probe]),
                                          torch.cat(dense_probe))}
        q_in = q_out
        layers.append(LayerReport(
            index=i, params_dense=params_dense, params_compressed=sum(p.numel() for p in layer.parameters()),
            sizes={k: layer.spec()[k] for k in ("d_in", "d_mid", "d_out")}, spectra=spectra,
            kept={"mlp_input": widths[i], "block_output": D if i == last else widths[i]},
            errors=errors))
        progress((i + 1) / len(mv.layers), f"layer {i + 1}/{len(mv.layers)}: rotated and sliced")
    model.sync_config()
    return model, Report(method="slicegpt", ratio_target=config.ratio, layers=layers,
                         calibration_seconds=calibration_seconds,
                         config={**values(config), "widths": widths},
                         extra={"errors_measured_on": "held-out" if held_out is not None
                                else "calibration (in-sample)"})
