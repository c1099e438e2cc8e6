"""The trade-off explorer's statistics and forecast (public surface: :mod:`compression.preview`):
:func:`collect` (one pass over the dense model), :class:`Statistics` and its cache, :func:`predict`."""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .arch import ARCHITECTURES, BlockView, count_params, view
from .calibration import Gram, capture_block_inputs, cosine_influence, mlp_activations, mlp_outputs
from .methods import method_for
from .modeling import CompressedDecoderLayer, block_math, dense_spec, spec_params
from .modeling_compressed import BlockMath, Shape
from .ops import fingerprint
from .preview_curves import (at as _at, branch_basis, branch_spectrum, eigen_curve, explained_curve, nystrom_curve,
                             olica_order, pruning_curve, qk_curve, score_curve, sequences, vo_curve)
from .rewrite import keep_rotary_pairs

Progress = Callable[[float, str], None]
DEFAULT_RIDGE = 1.0  # MoDeGPT's default leverage ridge: its curve is built by collect
OLICA_RIDGE = 1e-3   # Olica's default calibration ridge: its explained curve too


@dataclass
class LayerStatistics:
    """One block's statistics on the dense stream (plain tensors and lists).

    attn_gram: Gram of the attention input (D × D, float32; None once dropped); mlp_gram: of the MLP's
    intermediate activations (m × m, float32; None once dropped). energy: per-token mean squared norms
    of the block input ``stream_in``, attention output ``attn``, MLP input stream ``mid``, MLP output
    ``mlp``, block output
    ``stream_out`` and update ``update`` (= stream_out − stream_in). drop: relative squared error of the
    stream when the block is dropped. Curves (index = kept width, value = relative squared error):
    ``qk`` (kept rotary pairs per head), ``vo`` (kept value dims per kv group), ``mlp`` ({rule: curve
    over kept channels}: ``"olica"``, ``"modegpt:<ridge>"``), ``slice_mid`` / ``slice_out`` (kept
    directions of the stream entering the MLP / leaving the block).
    """

    index: int
    influence: float
    energy: dict[str, float]
    drop: float
    qk: list[float]
    vo: list[float]
    mlp: dict[str, list[float]]
    slice_mid: list[float]
    slice_out: list[float]
    attn_gram: torch.Tensor | None = None
    mlp_gram: torch.Tensor | None = None
    z_sq: torch.Tensor | None = None       # Σ z_j² / n per channel (Olica's ranking), float64
    w_down: torch.Tensor | None = None     # a reference to down_proj's weight (D × m), for other ridges
    branch: dict | None = None             # Olica's calibration-branch basis (:func:`branch_basis`)
    fits: dict = field(default_factory=dict, repr=False)  # (kept, ridge, rank) -> branch_spectrum


@dataclass
class Statistics:
    """What :func:`predict` needs, from one pass over the dense model (see :func:`collect`)."""

    layers: list[LayerStatistics]
    influence: list[float]
    params_total: int
    params_blocks: int
    tokens: tuple[int, int]
    fingerprint: str
    seconds: float

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        """Bytes of the tensors it holds of its own: the Gram matrices and Olica's cross moments (the
        rest is a few curves per layer; W_down is a reference to the model's weight)."""
        return sum(g.numel() * g.element_size() for lay in self.layers
                   for g in (lay.attn_gram, lay.mlp_gram, (lay.branch or {}).get("cross")) if g is not None)

    def drop_grams(self) -> None:
        """Free the Gram matrices (MoDeGPT curves at a leverage ridge not built yet then fail)."""
        for lay in self.layers:
            lay.attn_gram = lay.mlp_gram = None

    def branch_explained(self, layer: int, kept: int, ridge: float) -> tuple[float, float]:
        """(share of the pruning residual Olica's ridge fit explains, the residual's energy per token)
        for ``layer`` pruned to ``kept`` channels (:func:`explained_curve`, built once per ridge)."""
        lay = self.layers[layer]
        curves = lay.branch.setdefault("explained", {})
        if float(ridge) not in curves:
            curves[float(ridge)] = explained_curve(lay.branch, ridge)
        r_sq = _at(lay.mlp["olica"], kept) * lay.energy["mlp"]
        if kept >= len(curves[float(ridge)]) - 1 or r_sq <= 0:
            return 1.0, 0.0  # nothing pruned: Olica's fit "explains all" of a zero residual
        return 1.0 - (r_sq - _at(curves[float(ridge)], kept)) / max(r_sq, 1e-30), r_sq

    def branch_gain(self, layer: int, kept: int, ridge: float, rank: int) -> float:
        """What a rank-``rank`` branch removes from the residual of ``layer`` (:func:`branch_spectrum`),
        remembered per width."""
        lay = self.layers[layer]
        key = (int(kept), float(ridge), int(rank))
        if key not in lay.fits:
            lay.fits[key] = branch_spectrum(lay.branch, int(kept), ridge, rank)
        return lay.fits[key]

    def mlp_curve(self, layer: int, rule: str, ridge: float = DEFAULT_RIDGE) -> list[float]:
        """The MLP curve of ``layer`` for ``rule`` ("olica" or "modegpt"), built on first use for a
        MoDeGPT leverage ridge other than the default (seconds: one Cholesky per layer)."""
        lay = self.layers[layer]
        key = rule if rule == "olica" else f"modegpt:{float(ridge):g}"
        if key not in lay.mlp:
            if lay.mlp_gram is None or lay.w_down is None:
                raise ValueError(f"no MoDeGPT curve at leverage ridge {ridge:g}: the statistics' Gram "
                                 "matrices were dropped; collect again")
            lay.mlp[key] = nystrom_curve(lay.mlp_gram.double(), lay.w_down, ridge)
        return lay.mlp[key]


# --- collecting ---------------------------------------------------------------------------------

def compressed_view(block: BlockView, base, math: BlockMath, shape: Shape):
    """A dense :class:`CompressedDecoderLayer` reading ``block``'s own modules (nothing copied but a
    fused projection's parts), so the methods' helpers (``attention_out``, ``mlp.inner``) run on it;
    the model is left untouched. (:func:`compression.modeling.to_compressed` does this for every block
    in place.)"""
    if isinstance(block.module, CompressedDecoderLayer):
        return block.module
    with torch.device("meta"):
        layer = CompressedDecoderLayer(base, dense_spec(base, block.index), block.index, math)
    target = BlockView(block.index, layer, ARCHITECTURES["compressed_decoder"])
    for part, linear in block.projections(shape).items():
        target.set(part, linear)
    for part in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm"):
        source = block.get(part)
        if source is not None:
            target.get(part).weight = source.weight
    return layer.eval()


def _cross(x: list[torch.Tensor], z: list[torch.Tensor]) -> torch.Tensor:
    """Σ xᵀz over the batches (D × m, float64), each batch's product in the statistics precision."""
    from .calibration import resolve_precision

    dtype = torch.float32 if resolve_precision(None, x[0].device) == "mixed" else torch.float64
    flat = lambda t: t.to(dtype).flatten(0, 1)  # noqa: E731
    return sum((flat(a).T @ flat(b)).double() for a, b in zip(x, z))


def _energy(batches: list[torch.Tensor]) -> tuple[float, int]:
    """Σ ‖row‖² over every token of ``batches`` (float64) and the token count."""
    total = sum(float(b.double().square().sum()) for b in batches)
    return total, sum(b.numel() // b.shape[-1] for b in batches)


@torch.no_grad()
def collect(model, calibration_tokens: torch.Tensor, batch_size: int = 8, progress: Progress | None = None,
            keep_grams: bool = True, qk_sequences: int = 2) -> Statistics:
    """One pass over the dense ``model`` on ``calibration_tokens`` (N, T): per layer the Gram matrices,
    Block Influence, energies and error curves :func:`predict` reads (see the module docstring).

    The model is not changed. keep_grams: keep the two Gram matrices per layer (float32; SmolLM2-135M:
    about 320 MB) so MoDeGPT curves at other leverage ridges can be built later; without them only the
    default ridge is forecast. qk_sequences: calibration sequences the query-key cuts are run on (one
    attention forward per kept width and layer, :func:`qk_curve`); 0 uses the pair-score proxy
    (:func:`score_curve`) instead. A streamed (offloaded) model is not supported."""
    progress = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    mv = view(model)
    base, shape = mv.config, mv.shape
    math_ = BlockMath.of(base, block_math(base, mv.arch))
    progress(0.0, "capturing block inputs")
    inputs = capture_block_inputs(mv, calibration_tokens, batch_size)
    hidden, layers, L = inputs.hidden, [], len(mv.layers)
    for i, block in enumerate(mv.blocks):
        layer = compressed_view(block, base, math_, shape)
        attn = layer.self_attn
        x = [layer.input_layernorm(h) for h in hidden]
        g_attn = Gram.of(x).mean
        del x
        kwargs = inputs.kwargs_for(i)
        context = Gram(attn.num_heads * attn.v_dim, g_attn.device)
        bias = None if attn.v_proj.bias is None else \
            attn.v_proj.bias.detach().view(attn.num_kv_heads, -1).repeat_interleave(attn.num_key_value_groups, 0)
        hook = attn.o_proj.register_forward_pre_hook(
            lambda module, args: context.add(args[0] if bias is None else args[0] - bias.reshape(-1)))
        try:
            a = [layer.attention_out(h, kw) for h, kw in zip(hidden, kwargs)]
        finally:
            hook.remove()
        if qk_sequences:
            probe = [sequences(hidden[0], kwargs[0], qk_sequences)]
            qk = qk_curve(layer, g_attn, [p[0] for p in probe], [p[1] for p in probe],
                          [a[0][:qk_sequences]])
        else:
            qk = score_curve(keep_rotary_pairs(attn, g_attn, attn.head_dim // 2))  # all kept: scores only
        mid = [h + y for h, y in zip(hidden, a)]
        h_mid, z = mlp_activations(layer, mid)
        gram_z = Gram.of(z)
        c = gram_z.mean
        z_sq = sum(zb.square().sum(dim=(0, 1), dtype=torch.float64) for zb in z) / gram_z.count
        g_x = Gram.of(h_mid).mean
        cross = _cross(h_mid, z) / gram_z.count
        m = mlp_outputs(layer, h_mid, z)
        del h_mid, z
        out = [y + w for y, w in zip(mid, m)]
        e_in, n = _energy(hidden)
        e_attn, e_mid, e_mlp, e_out = _energy(a)[0], _energy(mid)[0], _energy(m)[0], _energy(out)[0]
        e_update = _energy([o - h for o, h in zip(out, hidden)])[0]
        bi = sum(cosine_influence(h, o)[0] for h, o in zip(hidden, out)) / n
        slice_mid, slice_out = eigen_curve(Gram.of(mid).mean), eigen_curve(Gram.of(out).mean)
        del a, m, mid
        w_down = layer.mlp.down_proj.weight.detach()
        basis = branch_basis(g_x, cross, w_down, olica_order(z_sq, w_down))
        basis["explained"] = {OLICA_RIDGE: explained_curve(basis, OLICA_RIDGE)}
        del cross
        layers.append(LayerStatistics(
            index=i, influence=bi,
            energy={"stream_in": e_in / n, "attn": e_attn / n, "mid": e_mid / n, "mlp": e_mlp / n,
                    "stream_out": e_out / n,
                    "update": e_update / n},
            drop=e_update / max(e_out, 1e-30), qk=qk, vo=vo_curve(attn, g_attn, context.mean, e_attn / n),
            mlp={"olica": pruning_curve(c, w_down, z_sq),
                 f"modegpt:{DEFAULT_RIDGE:g}": nystrom_curve(c, w_down, DEFAULT_RIDGE)},
            slice_mid=slice_mid, slice_out=slice_out,
            attn_gram=g_attn.float() if keep_grams else None, mlp_gram=c.float() if keep_grams else None,
            z_sq=z_sq, w_down=w_down if keep_grams else None, branch=basis))
        hidden = out
        progress((i + 1) / L, f"layer {i + 1}/{L}: statistics and error curves")
    return Statistics(layers=layers, influence=[lay.influence for lay in layers],
                      params_total=count_params(model), params_blocks=count_params(mv.layers),
                      tokens=tuple(calibration_tokens.shape), fingerprint=fingerprint(calibration_tokens),
                      seconds=time.perf_counter() - t0)


# --- the cache ------------------------------------------------------------------------------------

@dataclass
class StatisticsCache:
    """Statistics kept in memory per (model identity, calibration source, samples, length), at most
    ``size`` of them (the oldest goes first). No global state: the app holds one per process."""

    size: int = 2
    entries: dict = field(default_factory=dict)

    @staticmethod
    def key(name: str, spec) -> tuple:
        """The key of model ``name`` calibrated by ``spec`` (a :class:`compression.data.TextSpec`)."""
        from .pipeline import model_identity

        text = None if spec.text is None else hashlib.sha256(spec.text.encode()).hexdigest()[:16]
        return (model_identity(name), spec.source if text is None else f"text:{text}",
                int(spec.num_samples), int(spec.seq_len))

    def get(self, name: str, spec) -> Statistics | None:
        return self.entries.get(self.key(name, spec))

    def put(self, name: str, spec, statistics: Statistics) -> Statistics:
        key = self.key(name, spec)
        self.entries.pop(key, None)
        self.entries[key] = statistics
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        return statistics

    def get_or_collect(self, name: str, model, spec, tokens: Callable[[], torch.Tensor] | torch.Tensor,
                       batch_size: int = 8, progress: Progress | None = None) -> Statistics:
        """The cached statistics, or :func:`collect` on ``tokens`` (the tensor, or a function giving
        it, called only on a miss) and remembered."""
        found = self.get(name, spec)
        if found is not None:
            (progress or (lambda f, m: None))(1.0, "cached")
            return found
        fit = tokens() if callable(tokens) else tokens
        return self.put(name, spec, collect(model, fit, batch_size, progress))


# --- predicting -----------------------------------------------------------------------------------

# What predict's "attn" and "mlp" lists hold, in words (SliceGPT's are the two slices of the stream).
MODULE_LABELS = {"attn": "attention", "mlp": "MLP", "predicted_error": "block update"}
SLICED_LABELS = {"attn": "stream into the MLP (sliced)", "mlp": "block output (sliced)",
                 "predicted_error": "stream"}


def _mlp_rule(config) -> tuple[str, float] | None:
    """Which channel rule a per-block config's MLP follows: ("modegpt", ridge) keeps channels by ridge
    leverage and refits; ("olica", 0) prunes by importance. Keyed by config type (the methods' own)."""
    from .modegpt import MoDeGPTConfig
    from .olica import OlicaConfig

    if isinstance(config, MoDeGPTConfig):
        return "modegpt", float(config.ridge)
    if isinstance(config, OlicaConfig):
        return "olica", 0.0
    return None


def _combine(attn_f: float, mlp_f: float, energy: dict) -> tuple[float, float]:
    """(relative squared error of the block's update, error energy over the stream leaving the block)
    from the modules' relative squared errors, weighted by their output energies."""
    lost = attn_f * energy["attn"] + mlp_f * energy["mlp"]
    return lost / max(energy["attn"] + energy["mlp"], 1e-30), lost / max(energy["stream_out"], 1e-30)


def _calibrate(statistics: Statistics, config, base_config, specs: list, modules: dict) -> tuple[dict, list[int]]:
    """Olica's calibration branches: the layers whose pruning residual a linear map explains best get
    a rank-r branch (:func:`explained_curve`, :func:`branch_spectrum`); their MLP error in ``modules``
    becomes the residual after it.
    Returns ({layer: MLP error before}, the calibrated layers)."""
    from .olica import branch_cost

    n_cal, _, _ = branch_cost(config, base_config)
    if not n_cal or not modules:
        return {}, []
    fits = {i: statistics.branch_explained(i, specs[i]["mlp_dim"], config.ridge) for i in modules}
    chosen = sorted(fits, key=lambda j: fits[j][0], reverse=True)[:n_cal]
    before = {}
    for j in chosen:
        r_sq, energy = fits[j][1], statistics.layers[j].energy["mlp"]
        gain = statistics.branch_gain(j, specs[j]["mlp_dim"], config.ridge, config.calibrate_rank) if r_sq else 0.0
        before[j] = modules[j][1]
        modules[j][1] = max(r_sq - gain, 0.0) / max(energy, 1e-30)
    return before, sorted(chosen)


def predict(statistics: Statistics, config, base_config) -> dict:
    """Forecast of ``config`` (any method's) from ``statistics``: ``params``, ``block_params``, ``ratio``
    (as :func:`compression.forecast.forecast`), per layer ``predicted_error``, ``attn``, ``mlp`` and
    ``stream`` (relative errors, 0 for an untouched module; see the module docstring), ``total``
    (√Σ stream²), ``sizes`` (the planned widths; None for a dropped block), ``sparsity`` (the
    per-layer sparsity of the per-block methods' plans, else None), ``dropped`` (block indices) and
    ``labels`` (what "attn", "mlp" and "predicted_error" hold, in words: SliceGPT's are the two slices
    of the stream). Widths come from ``method.plan(config,
    base_config, statistics.influence)``, the one place widths are set."""
    method = method_for(config)
    L = statistics.num_layers
    if base_config.num_hidden_layers != L:
        raise ValueError(f"statistics have {L} layers, the model {base_config.num_hidden_layers}")
    plan = method.plan(config, base_config, statistics.influence)
    blocks = sum(spec_params(s, base_config) for s in plan.specs if s is not None) + plan.extra_params
    rule = _mlp_rule(config)
    attn, mlp, per_layer, stream, sizes, modules = [], [], [], [], [], {}
    for i, (lay, spec) in enumerate(zip(statistics.layers, plan.specs)):
        sizes.append(None if spec is None else {k: spec[k] for k in ("d_mid", "d_out", "qk_dim", "v_dim", "mlp_dim")})
        if spec is not None and not spec.get("attn_skip"):  # a per-block rewrite: module errors
            mlp_f = 0.0 if rule is None else _at(statistics.mlp_curve(i, *rule), spec["mlp_dim"])
            modules[i] = [min(_at(lay.vo, spec["v_dim"]) + _at(lay.qk, spec["qk_dim"] // 2), 1.0), mlp_f]
    olica = rule is not None and rule[0] == "olica"
    before, calibrated = _calibrate(statistics, config, base_config, plan.specs, modules) if olica else ({}, [])
    for i, (lay, spec) in enumerate(zip(statistics.layers, plan.specs)):
        e = lay.energy
        if spec is None:  # dropped: the stream keeps the block's input
            attn.append(1.0), mlp.append(1.0), per_layer.append(math.sqrt(lay.drop)), stream.append(lay.drop)
        elif i not in modules:  # sliced residual stream (SliceGPT)
            f_mid, f_out = _at(lay.slice_mid, spec["d_mid"]), _at(lay.slice_out, spec["d_out"])
            s = (f_mid * e["mid"] + f_out * e["stream_out"]) / max(e["stream_out"], 1e-30)
            attn.append(math.sqrt(f_mid)), mlp.append(math.sqrt(f_out))
            per_layer.append(math.sqrt(min(s, 1.0))), stream.append(s)
        else:
            attn_f, mlp_f = modules[i]
            update, s = _combine(attn_f, mlp_f, e)
            attn.append(math.sqrt(attn_f)), mlp.append(math.sqrt(mlp_f))
            per_layer.append(math.sqrt(update)), stream.append(s)
    sparsity = config.sparsities(L, statistics.influence) if hasattr(config, "sparsities") else None
    sliced = any(s is not None and s.get("attn_skip") for s in plan.specs)
    return {"params": statistics.params_total - statistics.params_blocks + blocks, "block_params": blocks,
            "ratio": 1 - blocks / statistics.params_blocks if statistics.params_blocks else 0.0,
            "predicted_error": per_layer, "attn": attn, "mlp": mlp, "stream": [math.sqrt(s) for s in stream],
            "total": math.sqrt(sum(stream)), "sizes": sizes, "sparsity": sparsity,
            "dropped": [i for i, s in enumerate(plan.specs) if s is None], "calibrated": calibrated,
            "mlp_before_calibration": [math.sqrt(before[i]) if i in before else None for i in range(L)],
            "labels": SLICED_LABELS if sliced else MODULE_LABELS}
